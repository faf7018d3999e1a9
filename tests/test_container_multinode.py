"""The PyTorchJob's container command (`python -m pipelines pytorchjob`), run in the image with `docker run`
as two single-process nodes (torchrun, c10d rendezvous, gloo) that finish one epoch together. What the
training operator would set per pod comes in as PET_* variables; everything goes over loopback (host
networking: PET_RDZV_ENDPOINT 127.0.0.1, gloo on `lo`), S3 is moto's server on this machine."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from tests.container_tools import IMAGE, docker, needs_image, sample_data
from tests.s3_server import DUMMY_ENV

pytest_plugins = ("tests.s3_server",)
pytestmark = needs_image


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pytorchjob_command_trains_one_epoch_on_two_nodes(tmp_path, s3_server, s3_env, s3_bucket):
    data = sample_data(tmp_path / "data", train=16, val=8)
    job = tmp_path / "job.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "pytorchjob", "--nodes", "2", "--gpus", "0", "--image", IMAGE,
         "--checkpoint-uri", f"s3://{s3_bucket}/job", "--s3-secret", "", "--out", str(job), "--",
         "--data", "/data/data.yaml", "--epochs", "1", "--imgsz", "64", "--batch-size", "4", "--workers", "0",
         "--seed", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    specs = yaml.safe_load(job.read_text())["spec"]["pytorchReplicaSpecs"]
    (master,) = specs["Master"]["template"]["spec"]["containers"]
    (worker,) = specs["Worker"]["template"]["spec"]["containers"]
    assert master["command"] == worker["command"] and master["image"] == IMAGE
    command = master["command"]
    assert command[0] == "torchrun"

    env = {
        **DUMMY_ENV,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{_free_loopback_port()}",  # the operator's: the master's service
        "PET_LOCAL_ADDR": "127.0.0.1",  # rank 0's address for the others: loopback, not a resolved hostname
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    env_args = [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]
    nodes = [
        docker("run", "-d", "--network", "host", "-v", f"{data.parent}:/data:ro", *env_args, IMAGE, *command)
        .stdout.strip()
        for _ in range(2)
    ]
    try:
        codes = [int(docker("wait", node, timeout=1200).stdout.strip()) for node in nodes]
        logs = [docker("logs", node).stderr + docker("logs", node).stdout for node in nodes]
    finally:
        docker("rm", "-f", *nodes, check=False)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)

    # Rank 0 mirrored the finished run to the checkpoint URI: one epoch, two processes.
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    summary = json.loads(client.get_object(Bucket=s3_bucket, Key="job/train.json")["Body"].read())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 1
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="job/")["Contents"]}
    assert {"job/weights/last.pt", "job/weights/best.pt"} <= keys
