"""A run resumed in a fresh folder (a new pod) brings best.pt of its earlier epochs along: when the
remaining epochs do not improve, it must still end with a best.pt (the train component copies it)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import run_cli
from yolo.engine.preemption import EXIT_SIGTERM, StopRequested
from yolo.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


class StopAt(StopRequested):
    def __init__(self, epoch: int, iteration: int):
        super().__init__()
        self.at = (epoch, iteration)

    def poll(self, epoch: int, iteration: int) -> bool:
        if (epoch, iteration) == self.at:
            self.request(signal.SIGTERM)
        return self.requested


@pytest.mark.slow
def test_resumed_run_ends_with_the_best_pt_of_earlier_epochs(tmp_path):
    data = tmp_path / "data"
    assert run_cli("sample-data", "--out", data, "--train", 8, "--val", 4, "--imgsz", 64).returncode == 0
    mirror = tmp_path / "mirror"  # the checkpoint URI (a folder here; S3 behaves the same)

    def config(out: Path) -> TrainConfig:
        return TrainConfig(data=data / "data.yaml", out=out, imgsz=64, epochs=2, batch_size=4, workers=0,
                           device="cpu", checkpoint_uri=str(mirror))  # fmt: skip

    # Stopped in epoch 1: best.pt so far is epoch 0's (untrained, fitness 0; epoch 1 will not beat it).
    first = train(config(tmp_path / "pod1"), StopAt(1, 1))
    assert first.exit_code == EXIT_SIGTERM and first.best_epoch == 0
    best_so_far = (mirror / "weights" / "best.pt").read_bytes()

    second = train(config(tmp_path / "pod2"))  # a fresh folder: resumes from the mirror
    assert second.exit_code == 0 and second.best_epoch == 0
    assert (tmp_path / "pod2" / "weights" / "best.pt").read_bytes() == best_so_far
