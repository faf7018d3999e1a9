# Two commands do all the set-up on a fresh machine with Python >= 3.10:
#   make run   - create .venv, install, run the whole pipeline with `dvc repro` on the sample data
#   make test  - create .venv, install with the dev extras, run the tests
# With Docker (a running dockerd; debootstrap and root for the Debian base when it is not built yet):
#   make image - build the CPU image IMAGE (Debian base + pip-installed torch; see .ci/docker.sh)
#   make e2e   - build it, then run the pipeline in it (kfp.local DockerRunner) and the container tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint clean image e2e

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dvc]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,dvc,pipeline,export]'
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 dvc repro

test: $(VENV)/.dev-installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

IMAGE ?= yolo-pipeline:local

image:
	IMAGE=$(IMAGE) bash .ci/docker.sh image

e2e: image $(VENV)/.dev-installed
	IMAGE=$(IMAGE) PYTHON=$(BIN)/python bash .ci/docker.sh e2e

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
