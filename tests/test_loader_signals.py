"""Loader workers and stop signals: a SIGTERM from anyone but their parent (a container's init signalling
every process, a pod's PID 1 signalling the process group) is left to the trainer, which still needs its
workers to finish the step; the parent's SIGTERM (multiprocessing terminating workers at exit) ends them."""

from __future__ import annotations

import subprocess
import sys

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


def test_a_foreign_sigterm_does_not_stop_the_workers(tmp_path):
    loader, _ = create_train_loader(make_dataset(tmp_path / "data"), 64, 2, HYP, workers=2, seed=7)
    loader.set_epoch(0)
    it = iter(loader)
    # batches 0 and 1 come from workers 0 and 1 (round robin): both have run worker_init, so the signal
    # cannot land in the moment before a worker's handler exists (a race the test would otherwise lose on
    # a loaded machine)
    batches = [next(it), next(it)]
    assert len(loader) > len(batches)  # the signal arrives mid-epoch
    workers = [w.pid for w in it._workers]
    subprocess.run(["kill", "-TERM", *map(str, workers)], check=True)  # sent by another process
    batches += list(it)  # the epoch goes on, every batch delivered
    assert len(batches) == len(loader)


def test_workers_end_when_the_trainer_exits_mid_epoch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", EXIT_MID_EPOCH, str(tmp_path / "data")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout == "one batch\n", result.stderr[-2000:]
