"""Figures drawn in worker processes, so that matplotlib's seconds overlap the caller's work.

Matplotlib is pure Python under the GIL: drawn in a thread it neither runs beside the caller's Python
nor lets the caller's threads take the GIL when they need it (evaluate's val_batch drawing and the
trainer's first epoch slowed down beside it). Two worker processes import matplotlib as soon as they
start, while the caller is still loading data and model, and draw what they are given; the caller keeps
the OpenCV drawing, and waits for the figures at the end of its step.

The workers are forked, at the start of a step, before the caller starts any thread (torch's and ONNX
Runtime's pools, loaders): a fork copies no lock another thread holds then, and unlike spawn it never
re-imports the caller's `__main__` (a library user's unguarded script would run again). They never touch
torch: figures get numpy arrays and plain data.

A figure never fails a run: a failed figure, or processes that cannot start or died, is a warning and the
figure is drawn in the caller instead. Workers run at a lower priority (nice 10): beside training they
take only the CPU the training leaves, and at the end of a step they have the machine to themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

LOG = logging.getLogger(__name__)
PROCESSES = 2  # one figure each at a time: evaluate's curves and its confusion matrix take about as long
NICENESS = 10
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent exits


def _start_worker(parent: int) -> None:
    """Worker start-up: killed with its parent (an OOM-killed step must leave no process behind: a
    worker's task pipe never reports EOF, so it would wait forever), lower priority, the parent ends the
    workers (a Ctrl-C or a pod's SIGTERM to the group must not kill a figure half-way), then the imports
    every figure needs."""
    with contextlib.suppress(OSError, AttributeError):  # prctl is Linux-only, as is everything this ships on
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    os.nice(NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import matplotlib.figure  # noqa: F401 - imported now, while the caller still loads data and model

    import yolo.plots.evaluation  # noqa: F401


def _ready() -> int:
    return os.getpid()


class PlotProcesses:
    """`submit(what, fn, *args)` draws fn(*args) in a worker process (fn and args must pickle: module-level
    functions, numpy arrays, plain data); `wait()` returns once every figure is written."""

    def __init__(self, processes: int = PROCESSES) -> None:
        self._pending: list[tuple[str, Callable, tuple, Future | None]] = []
        self._pool: ProcessPoolExecutor | None = None
        if processes and threading.active_count() > 1:
            # a library caller with threads of its own: a fork could copy a lock one of them holds
            LOG.debug("plots are drawn in this process: it already runs other threads")
            processes = 0
        if processes == 0:  # drawn in the caller, at wait()
            return
        try:
            self._pool = ProcessPoolExecutor(
                processes, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker,
                initargs=(os.getpid(),))
            self._pool.submit(_ready)  # forks every worker now: their imports overlap the caller's start-up
        except (OSError, RuntimeError) as e:  # no /dev/shm, no process limit left: draw in the caller
            LOG.warning(f"plots are drawn in this process: worker processes did not start ({e})")
            self._pool = None

    def submit(self, what: str, fn: Callable, *args) -> None:
        future = None
        if self._pool is not None:
            try:
                future = self._pool.submit(fn, *args)
            except (BrokenProcessPool, RuntimeError):
                future = None
        self._pending.append((what, fn, args, future))

    def wait(self) -> None:
        """Every submitted figure drawn: a figure whose worker failed is drawn here (a failure is a warning)."""
        pending, self._pending = self._pending, []
        for what, fn, args, future in pending:
            try:
                if future is None:
                    fn(*args)
                else:
                    future.result()
            except BrokenProcessPool:
                LOG.warning(f"{what}: the plotting process died; drawing it here")
                _draw_here(what, fn, args)
            except Exception as e:  # noqa: BLE001 - a figure must never fail the step
                LOG.warning(f"{what} not drawn: {e}")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def __enter__(self) -> PlotProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _draw_here(what: str, fn: Callable, args: tuple) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - a figure must never fail the step
        LOG.warning(f"{what} not drawn: {e}")
