"""The time-based mid-epoch checkpoint (yolo.engine.mirror): when it fires, and that what it writes is an
exact-resume state that changes nothing in the run that writes it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from yolo.engine.mirror import DEFAULT_MINUTES, MidEpochMirror, interval_minutes
from yolo.engine.preemption import StopRequested
from yolo.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_interval_only_for_a_remote_checkpoint_uri():
    assert interval_minutes("s3://bucket/runs/{run_id}", None) == DEFAULT_MINUTES
    assert interval_minutes("/mnt/pvc/checkpoints", None) == 0.0
    assert interval_minutes(None, None) == 0.0
    assert interval_minutes("s3://bucket/x", 0.0) == 0.0  # explicitly off
    assert interval_minutes(None, 2.5) == 2.5  # explicitly on, also without a mirror


def test_due_after_the_interval_since_the_last_checkpoint():
    now = [100.0]
    mirror = MidEpochMirror(2.0, clock=lambda: now[0])
    now[0] += 119.0
    assert not mirror.due()
    now[0] += 1.0
    assert mirror.due()
    mirror.reset()  # an epoch-end (or mid-epoch) last.pt was written
    assert not mirror.due()
    now[0] += 120.0
    assert mirror.due()
    off = MidEpochMirror(0.0, clock=lambda: now[0])
    now[0] += 1e9
    assert not off.enabled and not off.due()


class CopyLastAt(StopRequested):
    """Never stops; at (epoch, iteration) copies the run's weights/last.pt aside: what a node that died
    right then (no SIGTERM, no final save) would have left behind."""

    def __init__(self, last: Path, at: tuple[int, int], dest: Path):
        super().__init__()
        self.last, self.at, self.dest = last, at, dest

    def poll(self, epoch: int, iteration: int) -> bool:
        if (epoch, iteration) == self.at:
            shutil.copyfile(self.last, self.dest)
        return False


def _config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=data, out=out, imgsz=64, epochs=2, batch_size=4, workers=0, device="cpu",
                  deterministic=True, noval=True)  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


@pytest.mark.slow
def test_mid_epoch_checkpoint_resumes_exactly_and_changes_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = tmp_path / "data"
    assert run_cli("sample-data", "--out", data, "--train", 16, "--val", 4, "--imgsz", 64).returncode == 0
    data_yaml = data / "data.yaml"
    reference = train(_config(data_yaml, tmp_path / "reference"))
    assert reference.exit_code == 0

    # 4 batches per epoch; checkpoint_every ~0: a mid-epoch last.pt after every batch. At the poll after
    # batch 3 of epoch 1, last.pt on disk is the one written after batch 2.
    left = tmp_path / "left-behind.pt"
    mirrored_out = tmp_path / "mirrored"
    watcher = CopyLastAt(mirrored_out / "weights" / "last.pt", (1, 3), left)
    mirrored = train(_config(data_yaml, mirrored_out, checkpoint_every=1e-9), watcher)
    assert mirrored.exit_code == 0
    state = torch.load(left, weights_only=True)["train"]
    assert (state["epoch"], state["iteration"], state["batches_per_epoch"]) == (1, 2, 4)

    want = torch.load(tmp_path / "reference/weights/last.pt", weights_only=True)
    got = torch.load(mirrored_out / "weights/last.pt", weights_only=True)
    assert _max_difference(want["train"]["model"], got["train"]["model"]) <= 1e-6  # writing it changed nothing

    # A new node resumes from what the lost one left: the same weights as the uninterrupted run.
    pod = tmp_path / "pod2"
    (pod / "weights").mkdir(parents=True)
    shutil.copyfile(left, pod / "weights" / "last.pt")
    resumed = train(_config(data_yaml, pod, resume=str(pod)))
    assert resumed.exit_code == 0
    assert "epoch 1, batch 2" in caplog.text
    got = torch.load(pod / "weights/last.pt", weights_only=True)
    assert _max_difference(want["train"]["model"], got["train"]["model"]) <= 1e-6
    assert _max_difference(want["model"], got["model"]) <= 1e-6  # the EMA
