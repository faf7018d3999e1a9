"""Loader workers and stop signals: a SIGTERM or SIGINT for everyone (a container's init signalling every
process, a pod's PID 1 or Ctrl-C signalling the process group) is left to the trainer, which still needs its
workers to finish the step; the workers end when the trainer exits, even mid-epoch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_loader import HYP, make_dataset
from yolo.data.loader import create_train_loader

# A trainer stand-in that exits with an unfinished epoch: its iterator (and 2 workers) still alive, so at
# exit multiprocessing terminates the workers (SIGTERM from the parent) and joins them.
EXIT_MID_EPOCH = """
import sys
from tests.test_loader import HYP, make_dataset
from yolo.data.loader import create_train_loader
from pathlib import Path
loader, _ = create_train_loader(make_dataset(Path(sys.argv[1])), 64, 2, HYP, workers=2, seed=7)
loader.set_epoch(0)
it = iter(loader)
next(it)
print("one batch", flush=True)
sys.exit(0)
"""


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_stop_signals_do_not_stop_the_workers(tmp_path, sig):
    loader, _ = create_train_loader(make_dataset(tmp_path / "data"), 64, 2, HYP, workers=2, seed=7)
    loader.set_epoch(0)
    it = iter(loader)
    workers = [w.pid for w in it._workers]
    # at once, while the workers may still be starting up (the moment a worker-side handler would miss),
    # sent by another process
    subprocess.run(["kill", f"-{sig}", *map(str, workers)], check=True)
    batches = [next(it)]
    subprocess.run(["kill", f"-{sig}", *map(str, workers)], check=True)  # and mid-epoch
    batches += list(it)  # the epoch goes on, every batch delivered
    assert len(batches) == len(loader) > 1


def test_workers_end_when_the_trainer_exits_mid_epoch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", EXIT_MID_EPOCH, str(tmp_path / "data")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout == "one batch\n", result.stderr[-2000:]
