"""Turn upstream-style `--device` strings ('', 'cpu', '0', '0,1', 'cuda:1') into a torch.device."""

from __future__ import annotations

import logging
import os
from pathlib import Path

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


# Where the kernel says how much CPU this process may use. Module constants so tests can point them at fakes.
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_threads(processes: int = 1) -> int:
    """Intra-op threads for CPU work: OMP_NUM_THREADS when set, else the CPUs this process is given (its
    affinity, capped by a cgroup CPU quota such as a pod's limit) shared between `processes` local processes.
    Never the machine's current load: the thread count changes float summation order, so a rule that
    followed the load would make results depend on whatever else runs. One thread per process for
    parallel jobs is the scheduler's choice, through the same variables (docs/architecture.md)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        first = env.split(",")[0].strip()  # OpenMP allows a per-nesting-level list: "4,2"
        if not first.isdigit() or int(first) < 1:
            raise UserError(f"OMP_NUM_THREADS={env!r} is not a positive integer")
        threads, source = int(first), "OMP_NUM_THREADS"
    else:
        cpus, source = available_cpus()
        threads = max(1, cpus // max(1, processes))
        if processes > 1:
            source += f" / {processes} local processes"
    LOG.info(f"{threads} CPU thread(s) per process ({source})")
    return threads


def available_cpus() -> tuple[int, str]:
    """The whole CPUs this process may run on, and where that figure comes from."""
    try:
        cpus, source = len(os.sched_getaffinity(0)), "CPU affinity"
    except AttributeError:  # pragma: no cover - not Linux
        cpus, source = os.cpu_count() or 1, "CPU count"
    quota = cgroup_cpu_quota()
    if quota is not None and int(quota) < cpus:
        cpus, source = max(1, int(quota)), f"cgroup CPU quota {quota:g}"
    return cpus, source


def cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup's CFS quota (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us), the
    tightest along the cgroup's path up to the root; None when unlimited or not readable."""
    try:
        lines = PROC_CGROUP.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2: "0::/path"
            quotas += [_v2_quota(d) for d in _dirs_up(CGROUP_ROOT, path)]
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            for mount in (CGROUP_ROOT / controllers, CGROUP_ROOT / "cpu", CGROUP_ROOT / "cpu,cpuacct"):
                quotas += [_v1_quota(d) for d in _dirs_up(mount, path)]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _dirs_up(mount: Path, path: str) -> list[Path]:
    """mount/path and its parents up to mount. Inside a container the cgroup namespace makes the mount the
    container's own cgroup while /proc/self/cgroup may still name a longer path: the mount is always read."""
    parts = [p for p in path.strip().split("/") if p and p != ".."]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text(encoding="utf-8").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
        period = int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
