"""DDP: `torchrun --nproc_per_node 2 -m yolo train --device cpu` (gloo), one set of outputs, resume alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_then_resume_with_one(tmp_path):
    data = tmp_path / "data"
    assert run_cli("sample-data", "--out", data, "--train", 8, "--val", 4, "--imgsz", 64).returncode == 0
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "yolo", "train", "--data", str(data / "data.yaml"),
            "--out", str(out), "--imgsz", "64", "--epochs", "1", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--seed", "3"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("epochs done") == 1  # rank 0 logs and writes; rank 1 stays quiet
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for name in ("weights/last.pt", "weights/best.pt", "results.csv", "train.json", "args.yaml"):
        assert name in files
    assert not [f for f in files if ".tmp" in f or ".upload-" in f]
    doc = json.loads((out / "train.json").read_text())
    assert doc["world_size"] == 2 and doc["epochs_run"] == 1
    last = torch.load(out / "weights/last.pt", weights_only=True)
    assert last["train"]["world_size"] == 2 and last["train"]["finished"]
    # gradients were all-reduced: both ranks stepped the same weights, so rank 0's copy is the model
    assert all(torch.isfinite(v.float()).all() for v in last["train"]["model"].values())

    # the same run continued by a single process (another world size), one more epoch
    again = run_cli("train", "--resume", out, "--epochs", "2", "--workers", "0", env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    doc = json.loads((out / "train.json").read_text())
    assert doc["epochs_run"] == 2 and doc["world_size"] == 1 and doc["resumed_from"].endswith("last.pt")
