"""What the container tests share: the image under test, the docker client, compiling the pipeline for
the image and running it with kfp.local's DockerRunner (tests/container_pipeline.py, a child process).

The image comes from $YOLO_PIPELINE_TEST_IMAGE, which `make e2e` and `.ci/run` set after building it
(.ci/docker.sh); without it (a plain `make test`) the container tests skip. Networking is loopback only:
a container that must reach a service of this machine (moto's S3 server) runs with host networking.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.container_pipeline import LABEL, writable_by_container

IMAGE = os.environ.get("YOLO_PIPELINE_TEST_IMAGE", "")
CONTAINER_UID = 1000


def docker_binary() -> str:
    """$DOCKER, else Debian's docker.io client, else whatever `docker` is on PATH."""
    return os.environ.get("DOCKER") or shutil.which("/usr/bin/docker") or shutil.which("docker") or "docker"


DOCKER = docker_binary()
needs_image = pytest.mark.skipif(
    not IMAGE, reason="no image to test: YOLO_PIPELINE_TEST_IMAGE is set by `make e2e` and .ci/run"
)


def docker(*args, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([DOCKER, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(map(str, args))}: {result.stderr[-2000:]}"
    return result


def sample_data(root: Path, train: int = 16, val: int = 8) -> Path:
    """Sample dataset on the host (the host's CLI), readable by the container's user; returns data.yaml."""
    result = subprocess.run(
        [sys.executable, "-m", "yolo", "sample-data", "--out", str(root), "--train", str(train),
         "--val", str(val), "--imgsz", "64"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root / "data.yaml"


def compile_pipeline(out: Path) -> Path:
    """`python -m pipelines compile` for this image: CPU, no cluster secret, no retries."""
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "compile", "--out", str(out), "--image", IMAGE, "--gpus", "0",
         "--s3-secret", "", "--train-retries", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def pipeline_run(
    pipeline: Path,
    root: Path,
    params: dict,
    network: str = "none",
    env: dict[str, str] | None = None,
    label: str = "e2e",
    cache: Path | None = None,
) -> subprocess.Popen:
    """Start the compiled pipeline in the image (every task a container; log in ROOT/run.log)."""
    writable_by_container(root)
    argv = [sys.executable, "-m", "tests.container_pipeline", "--pipeline", str(pipeline), "--root", str(root),
            "--params", json.dumps(params), "--network", network, "--label", label]  # fmt: skip
    for name, value in (env or {}).items():
        argv += ["--env", f"{name}={value}"]
    if cache is not None:
        argv += ["--cache", str(cache)]
    out = open(root / "run.log", "w")  # noqa: SIM115 - handed to the child, closed with it
    proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    out.close()
    return proc


def task_containers(label: str) -> list[str]:
    """Ids of the running task containers of one pipeline_run (by its label)."""
    return docker("ps", "-q", "--filter", f"label={LABEL}={label}").stdout.split()


def executor_outputs(root: Path) -> dict[str, dict]:
    """executor_output.json of every task of the (only) run under root, by task name."""
    (run,) = sorted((root / "artifacts").glob("yolo-training-*"))
    return {p.parent.name: json.loads(p.read_text()) for p in run.glob("*/executor_output.json")}
