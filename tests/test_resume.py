"""Exact resume (epoch boundary and mid-epoch, 0 and 2 workers, through S3), SIGTERM, run identity decisions."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli
from yolo.engine.preemption import EXIT_SIGTERM, StopRequested
from yolo.errors import UserError
from yolo.train import TrainConfig, train

pytest_plugins = ("tests.s3_server",)
pytestmark = pytest.mark.usefixtures("one_thread")


class StopAt(StopRequested):
    """Acts like a SIGTERM that arrives right after `iteration` batches of `epoch` (0 = the epoch end)."""

    def __init__(self, epoch: int, iteration: int):
        super().__init__()
        self.at = (epoch, iteration)

    def poll(self, epoch: int, iteration: int) -> bool:
        if (epoch, iteration) == self.at:
            self.request(signal.SIGTERM)
        return self.requested




@pytest.fixture(scope="module")
def data8(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data8")
    assert run_cli("sample-data", "--out", root, "--train", 8, "--val", 4, "--imgsz", 64).returncode == 0
    return root / "data.yaml"


def config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=data, out=out, imgsz=64, epochs=4, batch_size=4, workers=0, device="cpu",
                  deterministic=True, noval=True)
    values.update(overrides)
    return TrainConfig(**values)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


@pytest.mark.slow
def test_interrupted_runs_end_with_the_same_weights(data8, tmp_path, s3_env, s3_bucket, caplog):
    caplog.set_level(logging.INFO)
    reference = train(config(data8, tmp_path / "reference"))
    assert reference.exit_code == 0

    uri = f"s3://{s3_bucket}/runs/r1"
    # 1) stopped at the end of epoch 0; 2) a fresh pod (empty --out) continues from S3 with 2 workers and
    # is stopped after batch 1 of epoch 2, in the middle of a gradient accumulation; 3) another fresh pod
    first = train(config(data8, tmp_path / "pod1", checkpoint_uri=uri), StopAt(1, 0))
    assert first.exit_code == EXIT_SIGTERM and first.epochs_run == 1
    second = train(config(data8, tmp_path / "pod2", checkpoint_uri=uri, workers=2), StopAt(2, 1))
    assert second.exit_code == EXIT_SIGTERM
    assert "resuming run" in caplog.text
    third = train(config(data8, tmp_path / "pod3", checkpoint_uri=uri))
    assert third.exit_code == 0 and third.epochs_run == 4

    want = torch.load(tmp_path / "reference/weights/last.pt", weights_only=True)
    got = torch.load(tmp_path / "pod3/weights/last.pt", weights_only=True)
    assert max_difference(want["train"]["model"], got["train"]["model"]) <= 1e-6
    assert max_difference(want["model"], got["model"]) <= 1e-6  # the EMA
    assert want["train"]["ema_updates"] == got["train"]["ema_updates"]
    assert want["run_id"] == got["run_id"]

    doc = json.loads((tmp_path / "pod3/train.json").read_text())
    assert doc["resumed_from"] == f"s3://{s3_bucket}/runs/r1/weights/last.pt"
    assert doc["epochs_run"] == 4 and doc["final"]["map50_95"] == pytest.approx(reference.final["map50_95"])

    from yolo.storage import open_storage

    store = open_storage(uri)
    assert {"weights/last.pt", "weights/best.pt", "results.csv", "train.json"} <= set(store.list())
    remote = torch.load(store.get("weights/last.pt", tmp_path / "remote.pt"), weights_only=True)
    assert remote["train"]["finished"] and max_difference(remote["model"], got["model"]) == 0


@pytest.mark.slow
def test_sigterm_stops_at_a_step_and_the_same_command_continues(data8, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "yolo", "train", "--data", str(data8), "--out", str(out), "--imgsz", "64",
            "--epochs", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--noval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "train_batch0.jpg").exists():  # drawn inside the first step: the loop is running
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM, err[-2000:]
    assert "SIGTERM received" in err and "Traceback" not in err
    last = torch.load(out / "weights/last.pt", weights_only=True)
    state = last["train"]
    assert not state["finished"] and (state["epoch"], state["iteration"]) < (2, 0)
    assert (state["epoch"], state["iteration"]) > (0, 0)

    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"batch {state['iteration']}" in again.stderr and "resuming run" in again.stderr
    assert json.loads((out / "train.json").read_text())["epochs_run"] == 2


# --------------------------------------------------------------------------------- decisions


def fake_last(run_id: str, finished: bool, epoch: int = 1) -> dict:
    return {"run_id": run_id, "train": {"finished": finished, "epoch": epoch, "iteration": 0}}


def test_automatic_resume_only_for_an_unfinished_run_of_the_same_identity(tmp_path, caplog):
    from yolo.engine.resume import find_own_last as _find_own_last

    caplog.set_level(logging.INFO)
    cfg = TrainConfig(out=tmp_path)
    last = tmp_path / "weights/last.pt"
    last.parent.mkdir()
    assert _find_own_last(cfg, tmp_path, "abc") is None  # nothing there

    torch.save(fake_last("abc", finished=False), last)
    assert _find_own_last(cfg, tmp_path, "abc") == (str(last), str(last))

    torch.save(fake_last("abc", finished=True), last)
    assert _find_own_last(cfg, tmp_path, "abc") is None
    assert "already finished" in caplog.text

    torch.save(fake_last("other", finished=False), last)
    assert _find_own_last(cfg, tmp_path, "abc") is None
    assert "belongs to another run" in caplog.text

    last.write_bytes(b"not a checkpoint")
    assert _find_own_last(cfg, tmp_path, "abc") is None
    assert "not a readable checkpoint" in caplog.text


def test_identity_changes_with_result_changing_arguments(tiny_run, tmp_path):
    from yolo.engine.distributed import DistContext
    from yolo.engine.setup import prepare_run

    data = tiny_run.parent / "data" / "data.yaml"
    base = dict(data=data, imgsz=64, epochs=1, batch_size=8, workers=0, device="cpu", deterministic=True)
    same = prepare_run(TrainConfig(out=tmp_path / "a", **base), DistContext())
    same.release()  # the leases a set-up takes (no training follows here)
    recorded = torch.load(tiny_run / "weights/last.pt", weights_only=True)["run_id"]
    assert same.run_id == recorded
    longer = prepare_run(TrainConfig(out=tmp_path / "b", **{**base, "epochs": 2}), DistContext())
    longer.release()
    assert longer.run_id != recorded
    # where the run writes and how many loader workers it uses do not change the result
    elsewhere = prepare_run(TrainConfig(out=tmp_path / "c", **{**base, "workers": 2}), DistContext())
    elsewhere.release()
    assert elsewhere.run_id == recorded


def test_explicit_resume_extends_a_finished_run_and_refuses_other_data(tiny_run, tmp_path, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.raises(UserError, match="the run finished"):
        train(TrainConfig(resume=str(run), out=None, device=None, workers=None, epochs_given=False))

    other = tmp_path / "other"
    assert run_cli("sample-data", "--out", other, "--train", 4, "--val", 2, "--imgsz", 64).returncode == 0
    with pytest.raises(UserError, match="another dataset"):
        train(TrainConfig(resume=str(run), out=None, device=None, workers=None, data=other / "data.yaml", epochs=2))

    caplog.set_level(logging.INFO)
    result = train(TrainConfig(resume=str(run), out=None, device=None, workers=None, epochs=2))
    assert result.exit_code == 0 and result.epochs_run == 2 and result.out == run
    doc = json.loads((run / "train.json").read_text())
    assert doc["resumed_from"] == str(run / "weights/last.pt") and doc["epochs_run"] == 2


def test_run_id_in_checkpoint_uri_names_the_folder_after_the_run_identity(data8, tmp_path, caplog):
    """ROOT/{run_id}: the same training started again (a KFP retry or resubmission) finds its own folder."""
    root = tmp_path / "ckpt"
    first = train(config(data8, tmp_path / "a", epochs=1, checkpoint_uri=f"{root}/{{run_id}}"))
    assert first.exit_code == 0
    summary = json.loads((tmp_path / "a" / "train.json").read_text())
    assert summary["checkpoint_uri"] == f"{root}/{first.run_id}"
    assert (root / first.run_id / "weights" / "last.pt").is_file()
    other = train(config(data8, tmp_path / "b", epochs=1, seed=1, checkpoint_uri=f"{root}/{{run_id}}"))
    assert other.run_id != first.run_id and (root / other.run_id / "weights" / "last.pt").is_file()
    with caplog.at_level(logging.INFO, logger="yolo"):
        again = train(config(data8, tmp_path / "c", epochs=1, checkpoint_uri=f"{root}/{{run_id}}"))
    assert again.run_id == first.run_id
    assert "already finished" in caplog.text  # it found the first run's last.pt in the same folder
