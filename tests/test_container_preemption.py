"""Preemption for real: the train task in its container, checkpoints to S3 (moto's server on this machine's
loopback, reached with host networking), stopped mid-epoch the way Kubernetes stops a pod
(`docker stop --time 30`: SIGTERM to PID 1, SIGKILL after 30 s). The trainer is a grandchild of the
container's shell (sh -> KFP executor -> `python -m yolo train`); the image's init passes the signal on.
The container must exit inside the grace period with last.pt of that step in S3, and the same pipeline run
again must continue from it and end with the weights of an uninterrupted run."""

from __future__ import annotations

import io
import subprocess
import time

import pytest
import torch

from tests.container_tools import DOCKER, compile_pipeline, docker, needs_image, pipeline_run, task_containers
from tests.s3_server import DUMMY_ENV

pytest_plugins = ("tests.s3_server",)
pytestmark = needs_image

EXIT_SIGTERM = 143  # the trainer's "preempted, resume me" code, and the container's when it ended in time
BATCHES = 16  # 32 images, batch 2


def _s3(s3_env):
    import boto3

    return boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1")


def _last(client, bucket: str, prefix: str) -> tuple[str, dict] | None:
    """(key, checkpoint) of the one weights/last.pt under prefix, or None while there is none."""
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    keys = [o["Key"] for o in listed if o["Key"].endswith("/weights/last.pt")]
    if not keys:
        return None
    (key,) = keys
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return key, torch.load(io.BytesIO(body), weights_only=True)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


@pytest.mark.slow
def test_docker_stop_mid_epoch_then_the_rerun_resumes_to_the_same_weights(tmp_path, s3_server, s3_env, s3_bucket):
    pipeline = compile_pipeline(tmp_path / "pipeline.yaml")
    client = _s3(s3_env)
    env = {**DUMMY_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    cache = tmp_path / "cache"  # shared: the second and third runs reuse import, validate and stats

    def params(checkpoints: str, root) -> dict:
        return {
            "dataset_source": "sample:train=32,val=8,imgsz=64",
            "imgsz": 64,
            "epochs": 2,
            "batch_size": 2,
            "workers": 2,  # loader workers get docker stop's SIGTERM too, and must leave it to the trainer
            "model_name": "preempt",
            "registry_uri": str(root / "artifacts" / "registry"),
            "checkpoint_root": f"s3://{s3_bucket}/{checkpoints}",
            # a mid-epoch last.pt every ~0.3 s: the test sees in S3 when the step is mid-epoch
            "train_extra_args": "--deterministic --seed 0 --checkpoint-every 0.005",
        }

    # 1) The run that is stopped: wait for a mid-epoch checkpoint of epoch 0, then stop its train container.
    first = tmp_path / "first"
    proc = pipeline_run(pipeline, first, params("preempted", first), network="host", env=env, label="first",
                        cache=cache)  # fmt: skip
    deadline = time.monotonic() + 900
    while True:
        assert proc.poll() is None, (first / "run.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no mid-epoch checkpoint in S3 within 15 minutes"
        found = _last(client, s3_bucket, "preempted/")
        if found and found[1]["train"]["iteration"] >= 2:
            break
        time.sleep(0.2)
    (container,) = task_containers("first")  # the train task: the only one running now
    waiter = subprocess.Popen([DOCKER, "wait", container], stdout=subprocess.PIPE, text=True)
    docker("stop", "--time", "30", container, timeout=120)
    exit_code = int(waiter.communicate(timeout=60)[0].strip())
    proc.wait(timeout=300)
    log = (first / "run.log").read_text()
    assert exit_code == EXIT_SIGTERM, log[-4000:]  # ended by itself inside the grace period (SIGKILL: 137)

    key, state = _last(client, s3_bucket, "preempted/")
    epoch, batch = state["train"]["epoch"], state["train"]["iteration"]
    assert 0 < batch < BATCHES and not state["train"]["finished"]  # mid-epoch, the step the signal found
    assert f"stopped by signal at epoch {epoch} batch {batch}/{BATCHES}" in log

    # 2) The same run again (same parameters, same checkpoint root): it resumes at that epoch and batch.
    second = tmp_path / "second"
    proc = pipeline_run(pipeline, second, params("preempted", second), network="host", env=env, label="second",
                        cache=cache)  # fmt: skip
    assert proc.wait(timeout=1200) == 0, (second / "run.log").read_text()[-4000:]
    assert f"epoch {epoch}, batch {batch}" in (second / "run.log").read_text()
    resumed_key, resumed = _last(client, s3_bucket, "preempted/")
    assert resumed_key == key and resumed["train"]["finished"]

    # 3) An uninterrupted run of the same parameters, checkpoints elsewhere: the same final weights.
    third = tmp_path / "third"
    proc = pipeline_run(pipeline, third, params("uninterrupted", third), network="host", env=env, label="third",
                        cache=cache)  # fmt: skip
    assert proc.wait(timeout=1200) == 0, (third / "run.log").read_text()[-4000:]
    _, reference = _last(client, s3_bucket, "uninterrupted/")
    assert _max_difference(reference["train"]["model"], resumed["train"]["model"]) <= 1e-6
    assert _max_difference(reference["model"], resumed["model"]) <= 1e-6  # the EMA
