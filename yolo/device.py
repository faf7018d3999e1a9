"""Turn upstream-style `--device` strings ('', 'cpu', '0', '0,1', 'cuda:1') into a torch.device."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from yolo.errors import UserError

LOG = logging.getLogger(__name__)


def select_device(spec: str | None = "") -> torch.device:
    """'' picks cuda:0 when there is a GPU, else the CPU; a GPU that is not there is a UserError."""
    spec = (spec or "").strip().lower().replace("cuda:", "")
    if spec in ("", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps requested but MPS is not available on this machine")
        return torch.device("mps")
    ids = [s for s in spec.split(",") if s]
    if not all(s.isdigit() for s in ids):
        raise UserError(f"--device {spec!r} is not understood (use cpu, 0, 0,1 ...)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in ids if int(i) >= count]
    if missing:
        raise UserError(
            f"--device {spec}: CUDA device {missing[0]} does not exist (this machine has {count} GPU(s))"
        )
    return torch.device(f"cuda:{ids[0]}")


def cpu_threads(threads: int, cores: int, adapt_to_load: bool = True) -> int:
    """Intra-op threads for CPU work: OMP_NUM_THREADS when set; else `threads`, but 1 when the machine is
    already busy (1-min load >= `cores`). There every thread of a parallel op waits for the slowest at each
    barrier, and one thread measured 2-4x faster than two (docs/benchmarks.md). Pass adapt_to_load=False
    where the thread count must not vary (--deterministic: it changes float summation order)."""
    with contextlib.suppress(ValueError):
        if int(os.environ.get("OMP_NUM_THREADS", "0")) > 0:
            return int(os.environ["OMP_NUM_THREADS"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if threads > 1 and adapt_to_load and load >= cores:
        LOG.info(
            f"load average {load:.1f} on {cores} cores: 1 intra-op thread per process (set OMP_NUM_THREADS to choose)"
        )
        return 1
    return threads
