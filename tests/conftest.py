"""Shared fixtures: paths to ../shared (skipping cleanly without it) and the CLI runner."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO128 = SHARED / "datasets" / "coco128" / "data.yaml"
YOLOV5N = SHARED / "weights" / "yolov5n.pt"

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def restore_logging():
    """cli.main() points the root logger at the current (captured) stderr; undo that after every test so
    later tests do not log into a closed capture stream."""
    root, ours = logging.getLogger(), logging.getLogger("yolo")
    handlers, level, our_level = list(root.handlers), root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


@pytest.fixture(scope="session")
def coco128_yaml() -> Path:
    if not COCO128.exists():
        pytest.skip(f"../shared coco128 not present at {COCO128}")
    return COCO128


@pytest.fixture(scope="session")
def yolov5n_pt() -> Path:
    if not YOLOV5N.exists():
        pytest.skip(f"../shared official weights not present at {YOLOV5N}")
    return YOLOV5N


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run `python -m yolo ARGS` in a subprocess; returns CompletedProcess with text stdout/stderr."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "yolo", *map(str, args)],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 1-epoch CPU training run (imgsz 64) on tiny sample data, shared by the whole session.

    Returns the run folder (weights/best.pt, weights/last.pt, results.csv, train.json, ...); its data.yaml
    is at `tiny_run.parent / "data" / "data.yaml"` (16 train + 8 val images, 64 px).
    """
    root = tmp_path_factory.mktemp("tiny_run")
    data = root / "data"
    made = run_cli("sample-data", "--out", data, "--train", 16, "--val", 8, "--imgsz", 64)
    assert made.returncode == 0, made.stderr
    run = root / "run"
    # one intra-op thread: on a shared 2-core machine two threads stall each other at every barrier
    trained = run_cli("train", "--data", data / "data.yaml", "--out", run, "--imgsz", 64, "--epochs", 1,
                      "--batch-size", 8, "--workers", 0, "--device", "cpu", "--deterministic",
                      env={"OMP_NUM_THREADS": "1"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    return run


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread, restored afterwards: exact-resume comparisons need a fixed summation order."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    torch.use_deterministic_algorithms(before[1])
