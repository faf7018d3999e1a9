"""The compiled pipeline, end to end, in the image: every task a container (kfp.local DockerRunner) run as
the image's user, with no network at all (`--network none`: the sample data, a local registry and local
checkpoints need none). Every task's outputs are checked, since DockerRunner may report a container it
could not wait on as a success."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.container_pipeline import LABEL
from tests.container_tools import compile_pipeline, docker, executor_outputs, needs_image, pipeline_run

pytestmark = needs_image

TASKS = {"resolve-dataset-version", "import-data", "validate", "stats", "train", "evaluate", "promote"}


def _networks_of_task_containers(label: str, since: float) -> list[str]:
    """The docker network each container of this run was attached to, from the daemon's event log."""
    events = docker("events", "--since", f"{since:.0f}", "--until", f"{time.time() + 1:.0f}", "--format",
                    "{{json .}}").stdout.splitlines()  # fmt: skip
    events = [json.loads(line) for line in events]
    ours = {
        e["Actor"]["ID"]
        for e in events
        if e.get("Type") == "container" and e.get("Action") == "create"
        and e["Actor"]["Attributes"].get(LABEL) == label
    }  # fmt: skip
    return [
        e["Actor"]["Attributes"]["name"]
        for e in events
        if e.get("Type") == "network" and e.get("Action") == "connect"
        and e["Actor"]["Attributes"].get("container") in ours
    ]  # fmt: skip


@pytest.mark.slow
def test_pipeline_runs_in_the_image_without_network(tmp_path):
    pipeline = compile_pipeline(tmp_path / "pipeline.yaml")
    root = tmp_path / "kfp"
    artifacts = root / "artifacts"
    params = {
        "dataset_source": "sample:train=16,val=8,imgsz=64",
        "imgsz": 64,
        "epochs": 2,
        "batch_size": 4,
        "workers": 0,
        "min_map50": 0.0,
        "model_name": "e2e",
        "registry_uri": str(artifacts / "registry"),  # inside the pipeline root: mounted in every task
        "checkpoint_root": str(artifacts / "checkpoints"),
        "train_extra_args": "--seed 0",
    }
    started = time.time() - 1
    proc = pipeline_run(pipeline, root, params, network="none", label="e2e")
    assert proc.wait(timeout=1500) == 0, (root / "run.log").read_text()[-4000:]

    # Every task ran, each in a container of its own attached to no network but `none`.
    outputs = executor_outputs(root)
    assert set(outputs) == TASKS
    networks = _networks_of_task_containers("e2e", started)
    assert len(networks) == len(TASKS) and set(networks) == {"none"}

    run = json.loads((root / "outputs.json").read_text())
    model = Path(run["model"]["path"])
    best = torch.load(model / "best.pt", weights_only=True)
    assert {"model", "names"} <= set(best) and best["model"]  # a state dict, read without unpickling code
    assert (model / "best.pt").stat().st_uid == 1000  # written by the image's user
    assert json.loads((model / "train.json").read_text())["epochs_run"] == 2

    evaluation = Path(run["evaluation"]["path"])
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert 0.0 <= metrics["map50"] <= 1.0 and metrics["images"] == 8
    gate = json.loads((evaluation / "gate.json").read_text())
    assert gate["promote"] is True and gate["baseline"] is None  # first model: nothing to compare against

    # The KFP Metrics artifacts (what the UI shows) were logged in the containers.
    def logged(task: str, name: str) -> dict:
        return outputs[task]["artifacts"][name]["artifacts"][0]["metadata"]

    assert logged("validate", "summary")["train_images_ok"] == 16
    assert 0.0 <= logged("stats", "anchor_fit")["bpr_after"] <= 1.0
    assert logged("evaluate", "metrics")["map50"] == pytest.approx(metrics["map50"])
    assert run["metrics"]["metadata"]["map50"] == pytest.approx(metrics["map50"])

    # promote wrote v1 into the registry; train mirrored its checkpoints under checkpoint_root/<run id>.
    card = json.loads((artifacts / "registry/models/e2e/v1/model_card.json").read_text())
    assert card["metrics"]["map50"] == pytest.approx(metrics["map50"])
    assert (artifacts / "registry/models/e2e/v1/best.pt").read_bytes() == (model / "best.pt").read_bytes()
    assert len(list((artifacts / "checkpoints").glob("*/weights/last.pt"))) == 1
