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

pytest_plugins = ("tests.s3_server",)
pytestmark = needs_image

EXIT_SIGTERM = 143  # the trainer's "preempted, resume me" code, and the container's when it ended in time
BATCHES = 32  # 64 images, batch 2: after the test sees a batch <= 16, seconds of batches are left for the signal


def _s3(s3_env):
    import boto3

    return boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1")


def _last_etag(client, bucket: str, prefix: str) -> str | None:
    """ETag of the one weights/last.pt under prefix (None while there is none): cheap to poll."""
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    tags = [o["ETag"] for o in listed if o["Key"].endswith("/weights/last.pt")]
    assert len(tags) <= 1
    return tags[0] if tags else None


def _last(client, bucket: str, prefix: str) -> tuple[str, dict]:
    """(key, checkpoint) of the one weights/last.pt under prefix."""
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    (key,) = [o["Key"] for o in listed if o["Key"].endswith("/weights/last.pt")]
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return key, torch.load(io.BytesIO(body), weights_only=True)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


@pytest.mark.slow
def test_docker_stop_mid_epoch_then_the_rerun_resumes_to_the_same_weights(tmp_path, s3_server, s3_env, s3_bucket):
    pipeline = compile_pipeline(tmp_path / "pipeline.yaml")
    client = _s3(s3_env)
    env = s3_server.env()  # AWS_ENDPOINT_URL (loopback) and dummy credentials
    # One intra-op thread in every run: --deterministic keeps the thread count fixed (it changes float
    # summation order), and on a busy 2-core machine two threads are many times slower than one.
    env["OMP_NUM_THREADS"] = "1"
    root = tmp_path / "kfp"  # one pipeline root: the later runs' import, validate and stats are cache hits

    def params(checkpoints: str) -> dict:
        return {
            "dataset_source": "sample:train=64,val=4,imgsz=64",
            "imgsz": 64,
            "epochs": 2,
            "batch_size": 2,
            "workers": 2,  # loader workers get docker stop's SIGTERM too, and must leave it to the trainer
            "model_name": "preempt",
            "registry_uri": str(root / "artifacts" / "registry"),
            "checkpoint_root": f"s3://{s3_bucket}/{checkpoints}",
            # a mid-epoch last.pt every ~0.6 s: the test sees in S3 when the step is mid-epoch
            "train_extra_args": "--deterministic --seed 0 --checkpoint-every 0.01",
        }

    def log(name: str) -> str:
        return (root / f"{name}.log").read_text()

    # 1) The run that is stopped: wait for a checkpoint in the first half of an epoch (batches left for the
    # signal to arrive mid-epoch; in practice epoch 0, whose first mid-epoch upload is not queued behind
    # an epoch end's), then stop the train container.
    proc = pipeline_run(pipeline, root, params("preempted"), "first", network="host", env=env)
    deadline = time.monotonic() + 900
    seen, container, waiter = None, None, None
    while True:
        assert proc.poll() is None, "the run ended before a mid-epoch checkpoint:\n" + log("first")[-4000:]
        assert time.monotonic() < deadline, "no mid-epoch checkpoint in S3 within 15 minutes"
        etag = _last_etag(client, s3_bucket, "preempted/")
        if etag is not None and etag != seen:
            seen = etag
            if container is None:  # the first checkpoint: the train task is the one container running now
                (container,) = task_containers("first")
                waiter = subprocess.Popen([DOCKER, "wait", container], stdout=subprocess.PIPE, text=True)
            state = _last(client, s3_bucket, "preempted/")[1]["train"]
            if 1 <= state["iteration"] <= BATCHES // 2:
                break
        time.sleep(0.05)
    docker("stop", "--time", "30", container, timeout=120)
    exit_code = int(waiter.communicate(timeout=60)[0].strip())
    proc.wait(timeout=300)
    assert exit_code == EXIT_SIGTERM, log("first")[-4000:]  # ended by itself in the grace period (not 137)

    key, state = _last(client, s3_bucket, "preempted/")
    epoch, batch = state["train"]["epoch"], state["train"]["iteration"]
    assert 0 < batch < BATCHES and not state["train"]["finished"]  # mid-epoch, the step the signal found
    assert f"stopped by signal at epoch {epoch} batch {batch}/{BATCHES}" in log("first")

    # 2) The same run again (same parameters, same checkpoint root): it resumes at that epoch and batch.
    proc = pipeline_run(pipeline, root, params("preempted"), "second", network="host", env=env)
    assert proc.wait(timeout=1200) == 0, log("second")[-4000:]
    assert f"epoch {epoch}, batch {batch}" in log("second")
    resumed_key, resumed = _last(client, s3_bucket, "preempted/")
    assert resumed_key == key and resumed["train"]["finished"]

    # 3) An uninterrupted run of the same parameters, checkpoints elsewhere: the same final weights.
    proc = pipeline_run(pipeline, root, params("uninterrupted"), "third", network="host", env=env)
    assert proc.wait(timeout=1200) == 0, log("third")[-4000:]
    _, reference = _last(client, s3_bucket, "uninterrupted/")
    assert _max_difference(reference["train"]["model"], resumed["train"]["model"]) <= 1e-6
    assert _max_difference(reference["model"], resumed["model"]) <= 1e-6  # the EMA
