"""`python -m pipelines retrain`: the decision from the git diff since tag retrain/last, on a temp git repo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import retrain
from tests import submit_server
from tests.conftest import REPO
from yolo.errors import UserError

GIT = ("git", "-c", "user.name=test", "-c", "user.email=test@example.com")


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run([*GIT, "-C", str(repo), *args], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def _commit(repo: Path, files: dict[str, str], message: str = "change") -> str:
    for name, text in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        _git(repo, "add", name)
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


PRODUCTION = """\
experiment: retrain-test
cluster: {{gpus: 1}}
parameters:
  dataset-source: dvc://{repo}#data/coco
  dataset-rev: ""
  epochs: {epochs}
  imgsz: 640
  batch-size: 16
  model-name: yolov5n-retrain
"""


@pytest.fixture()
def repo(tmp_path) -> Path:
    """A project repo whose last submission (tag retrain/last) is its first commit."""
    root = tmp_path / "project"
    root.mkdir()
    _git(root, "init", "-q", "-b", "main")
    _commit(
        root,
        {
            "data/coco.dvc": "outs:\n- md5: aaa.dir\n  path: coco\n",
            "pipelines/production.yaml": PRODUCTION.format(repo=root, epochs=300),
            "params.yaml": "train: {epochs: 40}\n",
            "dvc.lock": "schema: '2.0'\n",
            "yolo/train.py": "print('v1')\n",
        },
        "initial",
    )
    _git(root, "tag", retrain.DEFAULT_TAG)
    return root


@pytest.mark.parametrize(
    ("files", "submit"),
    [
        ({"data/coco.dvc": "outs:\n- md5: bbb.dir\n  path: coco\n"}, True),  # a new dataset version
        ({"data/sets/voc.dvc": "outs: []\n"}, True),  # a new dataset, nested
        (
            {"pipelines/production.yaml": "experiment: x\nparameters: {epochs: 3}\n"},
            True,
        ),  # production params
        ({"yolo/train.py": "print('v2')\n", "README.md": "docs\n"}, False),  # code only
        ({"dvc.lock": "schema: '2.0'\nstages: {}\n"}, False),  # dvc.lock churn from a local repro
        ({"params.yaml": "train: {epochs: 41}\n"}, False),  # the CPU sample defaults
        ({"data/README.md": "about the data\n"}, False),  # under data/ but not a .dvc file
    ],
)
def test_decision_follows_data_and_production_params_only(repo, files, submit):
    head = _commit(repo, files)
    decision = retrain.decide(repo)
    assert decision.submit is submit, decision.reason
    assert decision.head == head and decision.base == _git(repo, "rev-parse", "HEAD~1")
    if submit:
        assert set(decision.changed) == set(files) and all(f in decision.reason for f in files)
    else:
        assert (
            decision.changed == () and "no data/**.dvc or pipelines/production.yaml change" in decision.reason
        )


def test_decision_edge_cases(repo):
    assert not retrain.decide(repo).submit  # HEAD is the tagged commit
    assert "nothing new" in retrain.decide(repo).reason
    assert retrain.decide(repo, force=True).submit
    _git(repo, "tag", "-d", retrain.DEFAULT_TAG)
    first = retrain.decide(repo)
    assert first.submit and "no earlier submission recorded" in first.reason
    _git(repo, "mv", "data/coco.dvc", "data/coco2017.dvc")
    _git(repo, "commit", "-q", "-m", "rename")
    renamed = retrain.decide(repo, base="HEAD~1")
    assert renamed.submit and set(renamed.changed) == {"data/coco.dvc", "data/coco2017.dvc"}
    with pytest.raises(UserError, match="--base 'nope': no such commit"):
        retrain.decide(repo, base="nope")


def test_dataset_in_this_repository_is_pinned_to_the_decided_commit(repo, tmp_path):
    params = {"dataset_source": f"dvc://{repo}#data/coco", "dataset_rev": ""}
    assert retrain.pin_dataset_to_head(repo, params, "a" * 40) and params["dataset_rev"] == "a" * 40
    other = {"dataset_source": f"dvc://{tmp_path}#data/coco", "dataset_rev": ""}
    assert retrain.pin_dataset_to_head(repo, other, "a" * 40) is None and other["dataset_rev"] == ""
    fixed = {"dataset_source": f"dvc://{repo}#data/coco", "dataset_rev": "v1.0"}
    assert retrain.pin_dataset_to_head(repo, fixed, "a" * 40) is None and fixed["dataset_rev"] == "v1.0"
    _git(repo, "remote", "add", "origin", "git@github.com:Org/Project.git")
    url = {"dataset_source": "dvc://https://github.com/org/project#data/coco", "dataset_rev": ""}
    assert retrain.pin_dataset_to_head(repo, url, "b" * 40) and url["dataset_rev"] == "b" * 40


def test_retrain_cli_submits_once_per_change_and_moves_the_tag(repo):
    server = submit_server.start()
    try:
        head = _commit(repo, {"data/coco.dvc": "outs:\n- md5: ccc.dir\n  path: coco\n"}, "new data")
        argv = [
            sys.executable,
            "-m",
            "pipelines",
            "retrain",
            "--repo",
            str(repo),
            "--host",
            server.url,
            "--token",
            "T",
            "--image",
            "ghcr.io/org/yolo-pipeline:" + head,
        ]
        proc = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ)
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("retrain: submit: changed since the last submission (tag retrain/last = ")
        assert lines[0].endswith("): data/coco.dvc") and lines[-2:] == ["run_id: run-0001", lines[-1]]
        (run,) = server.created_runs()
        params = run.body["runtime_config"]["parameters"]
        assert params["dataset_rev"] == head  # the data of the decided commit, not a branch name
        assert params["epochs"] == 300 and params["model_name"] == "yolov5n-retrain"
        assert server.experiments["exp-1"]["display_name"] == "retrain-test"
        assert _git(repo, "rev-parse", f"{retrain.DEFAULT_TAG}^{{commit}}") == head
        assert "run-0001" in _git(repo, "tag", "-l", "--format=%(contents)", retrain.DEFAULT_TAG)

        _commit(repo, {"yolo/train.py": "print('v3')\n", "dvc.lock": "schema: '2.0'\nx: 1\n"}, "code")
        again = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=60, env=dict(os.environ)
        )
        assert again.returncode == 0, again.stderr
        assert again.stdout.startswith(
            "retrain: no submit: no data/**.dvc or pipelines/production.yaml change"
        )
        assert len(server.created_runs()) == 1  # nothing more submitted
    finally:
        server.stop()


def test_params_file_must_live_in_the_repository(repo, tmp_path):
    assert retrain.production_params_path(repo, None) == "pipelines/production.yaml"
    assert retrain.production_params_path(repo, Path("conf/prod.yaml")) == "conf/prod.yaml"
    with pytest.raises(UserError, match="must be inside the repository"):
        retrain.production_params_path(repo, tmp_path / "elsewhere.yaml")


def test_namespace_from_the_production_params_file_reaches_a_multi_user_backend(repo):
    """Issue 15, fix 2: on multi-user Kubeflow submit needs a namespace; production.yaml and the retrain
    workflow never gave one, so CI retraining exited 2 there."""
    import yaml

    production = repo / "pipelines" / "production.yaml"
    production.write_text("namespace: team-a\n" + production.read_text())
    head = _commit(repo, {"data/coco.dvc": "outs:\n- md5: ddd.dir\n  path: coco\n"}, "new data")
    server = submit_server.start(multi_user=True)
    try:
        argv = [sys.executable, "-m", "pipelines", "retrain", "--repo", str(repo), "--host", server.url,
                "--token", "T", "--image", "ghcr.io/org/yolo-pipeline:" + head]  # fmt: skip
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr
        assert len(server.created_runs()) == 1
        (created,) = [r for r in server.requests if r.method == "POST" and r.path.endswith("/experiments")]
        assert created.body["namespace"] == "team-a"
    finally:
        server.stop()

    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "retrain.yml").read_text())
    (step,) = [s for s in workflow["jobs"]["retrain"]["steps"] if "pipelines retrain" in s.get("run", "")]
    assert step["env"]["KFP_NAMESPACE"] == "${{ vars.KFP_NAMESPACE }}"
    assert 'args+=(--namespace "$KFP_NAMESPACE")' in step["run"]
    assert "namespace" in yaml.safe_load((REPO / "pipelines" / "production.yaml").read_text())
