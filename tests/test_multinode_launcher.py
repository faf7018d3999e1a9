"""The multi-node train step (components/launcher.py) against the Kubernetes API stand-in
(tests/k8s_server.py): the real `kubernetes` client creates, reads and deletes the PyTorchJob.

The stand-in plays the Training Operator through `progress` (it sets the job's status conditions), and the
job's checkpoint folder is filled the way `yolo train` fills it (weights/best.pt, train.json).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from components import launcher
from pipelines.cluster import ClusterOptions, Toleration, VolumeClaim
from tests import k8s_server
from tests.conftest import REPO

pytest.importorskip("kubernetes")

RUN = "0f3c2a9e-1b2c-4d5e-8f90-123456789abc"  # a KFP run id
NAME = "yolo-train-0f3c2a9e1b2c"
OPTIONS = ClusterOptions(
    gpus=2, nodes=2, image="ghcr.io/org/yolo-pipeline:3f2a9c1", namespace="team-a", service_account="trainer",
    image_pull_secrets=("regcred",), node_selector={"pool": "gpu"},
    tolerations=(Toleration("nvidia.com/gpu", "Exists", None, "NoSchedule"),),
    dataset_pvc=VolumeClaim("datasets", "coco"), train_retries=2,
)  # fmt: skip


@pytest.fixture
def kube(tmp_path, monkeypatch):
    state = k8s_server.start()
    config = tmp_path / "kubeconfig"
    config.write_text(state.kubeconfig(namespace="ignored-context-ns"))
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield state
    state.stop()


def _checkpoints(root: Path, map50: float = 0.61) -> Path:
    """What `yolo train --checkpoint-uri ROOT/<run>` leaves there."""
    folder = root / RUN
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "best.pt").write_bytes(b"best weights of the job")
    (folder / "train.json").write_text(json.dumps({"best": {"map50": map50, "map50_95": 0.4}, "run_id": "ident",
                                                   "epochs_run": 3}))  # fmt: skip
    (folder / "results.csv").write_text("epoch,map50\n2,0.61\n")
    return folder


def _operator(final: dict):
    """A progress callback: Created, then Running, then `final` (a condition) from the 3rd read on."""

    def progress(obj: dict, gets: int) -> None:
        conditions = [{"type": "Created", "status": "True"}]
        if gets >= 2:
            conditions.append({"type": "Running", "status": "True"})
        if gets >= 3 and final:
            conditions[-1]["status"] = "False"
            conditions.append({"status": "True", **final})
        obj["status"] = {"conditions": conditions}

    return progress


def _launch(tmp_path, model_dir: Path, **kw):
    model = SimpleNamespace(path=str(model_dir), metadata={})
    result = launcher.train_multinode(
        json.dumps(OPTIONS.job_settings()), "/mnt/dataset/coco", "local-abc", "yolov5s.yaml", "", 3, 640, 32, 4,
        str(tmp_path / "ckpt"), RUN, "--seed 1", model, poll_interval=0.02, **kw,
    )  # fmt: skip
    return result, model


def test_succeeded_job_hands_on_its_best_pt_as_the_model(kube, tmp_path):
    _checkpoints(tmp_path / "ckpt")
    kube.progress = _operator({"type": "Succeeded", "reason": "PyTorchJobSucceeded"})
    best, model = _launch(tmp_path, tmp_path / "model")
    assert best == pytest.approx(0.61)
    assert (tmp_path / "model" / "best.pt").read_bytes() == b"best weights of the job"
    assert (tmp_path / "model" / "results.csv").is_file()
    assert model.metadata["pytorchjob"] == NAME and model.metadata["checkpoint_uri"] == f"{tmp_path}/ckpt/{RUN}"

    (create,) = [r for r in kube.requests if r.method == "POST"]
    assert create.path == "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs"
    assert create.headers["authorization"] == "Bearer test-token"
    job = create.body
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == ("kubeflow.org/v1", "PyTorchJob", NAME)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 1)
    assert job["spec"]["nprocPerNode"] == "2" and job["spec"]["elasticPolicy"]["maxReplicas"] == 2
    for replica in specs.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == OPTIONS.image and container["resources"]["limits"]["nvidia.com/gpu"] == 2
        command = container["command"]
        assert command[:2] == ["torchrun", "--nnodes=2:2"]
        assert command[command.index("--checkpoint-uri") + 1] == f"{tmp_path}/ckpt/{RUN}"
        assert command[command.index("--data") + 1] == "/data/data.yaml"
        assert command[command.index("--epochs") + 1] == "3" and "--seed" in command
        assert {"name": "YOLO_PIPELINE_RUN", "value": RUN} in container["env"]
        assert pod["serviceAccountName"] == "trainer" and pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["nodeSelector"] == {"pool": "gpu"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert {"name": "dataset", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}} in pod["volumes"]
        init = pod["initContainers"][0]["command"]
        assert init[-3:] == ["/mnt/dataset/coco", "local-abc", "/data"]
    assert kube.deleted == []  # a finished job is left for its logs (cleanPodPolicy None)


def test_failed_job_fails_the_task_naming_the_reason(kube, tmp_path):
    kube.progress = _operator({"type": "Failed", "reason": "BackoffLimitExceeded",
                               "message": "PyTorchJob yolo-train has failed because it has reached the specified backoff limit"})  # fmt: skip
    with pytest.raises(RuntimeError, match=f"PyTorchJob {NAME} failed: BackoffLimitExceeded: .*backoff limit"):
        _launch(tmp_path, tmp_path / "model")
    assert not (tmp_path / "model" / "best.pt").exists()


def test_a_retry_replaces_the_failed_job_of_its_earlier_attempt(kube, tmp_path):
    _checkpoints(tmp_path / "ckpt")
    failed = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": NAME, "namespace": "team-a"},
              "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}  # fmt: skip
    kube.objects[("pytorchjobs", "team-a", NAME)] = failed
    kube.progress = lambda obj, gets: obj.setdefault("status", {"conditions": [{"type": "Succeeded", "status": "True"}]})
    best, _ = _launch(tmp_path, tmp_path / "model")
    assert best == pytest.approx(0.61)
    assert kube.deleted == [("pytorchjobs", "team-a", NAME)]
    assert len([r for r in kube.requests if r.method == "POST"]) == 1


CANCEL_SCRIPT = """
import json, sys
from types import SimpleNamespace
from components import launcher
from pipelines.cluster import ClusterOptions
settings = json.dumps(ClusterOptions(gpus=1, nodes=2, image="img:1", namespace="team-a").job_settings())
launcher.train_multinode(settings, "sample:", "sample-x", "yolov5n.yaml", "", 3, 64, 8, 0, sys.argv[1],
                         "run-cancel", "", SimpleNamespace(path=sys.argv[2], metadata={}), poll_interval=0.05)
"""


def test_cancel_deletes_the_job(kube, tmp_path):
    """SIGTERM to the task (the run was cancelled) deletes the PyTorchJob, and the task fails."""
    kube.progress = _operator({})  # runs for ever
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CANCEL_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "m")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while kube.gets < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until the launcher follows the job it created
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert ("pytorchjobs", "team-a", "yolo-train-runcancel") in kube.objects
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "cancelled: deleted PyTorchJob yolo-train-runcancel" in err
    assert kube.deleted == [("pytorchjobs", "team-a", "yolo-train-runcancel")]
    assert kube.objects == {}
