"""Where a run writes: `--out DIR` exactly, else upstream's `--project DIR --name NAME` with increment.

- `--out DIR` (the pipeline's way: DVC and KFP name the folder) is used as given.
- otherwise PROJECT/NAME, PROJECT/NAME2, ... as upstream: a new folder for each new run; `--exist-ok`
  reuses PROJECT/NAME. One exception, so that "run the same command to continue" holds after a
  preemption: when the newest PROJECT/NAME* folder holds an unfinished last.pt of this very run (same
  run identity), the run continues there instead of starting a new folder.
- whichever folder it is, a run that does not resume never replaces a `weights/best.pt` already there
  (`best_pt_refusal`): one line says what to do instead. DVC removes its outputs (best.pt among
  them) before it re-runs the stage, so `dvc repro` is unaffected.
"""

from __future__ import annotations

import re
from pathlib import Path

from yolo.engine import distributed as dist_utils
from yolo.engine.config import TrainConfig
from yolo.engine.distributed import DistContext
from yolo.engine.resume import LAST_KEY, read_last_quiet

BEST_KEY = "weights/best.pt"


def increments(project: Path, name: str) -> list[Path]:
    """The existing PROJECT/NAME, NAME2, NAME3 ... folders, oldest (lowest number) first."""
    if not project.is_dir():
        return []
    pattern = re.compile(re.escape(name) + r"(\d*)")
    found = []
    for child in project.iterdir():
        m = pattern.fullmatch(child.name)
        if m and child.is_dir() and m.group(1) != "1" and not m.group(1).startswith("0"):
            found.append((int(m.group(1) or 1), child))
    return [p for _, p in sorted(found)]


def next_increment(project: Path, name: str) -> Path:
    existing = increments(project, name)
    if not existing:
        return project / name
    last = existing[-1].name[len(name):]
    return project / f"{name}{int(last or 1) + 1}"


def choose_out(cfg: TrainConfig, ctx: DistContext, run_id: str) -> Path:
    """The run folder (rank 0 decides; every rank gets the same answer)."""
    if cfg.out is not None:
        return Path(cfg.out)
    decision = None
    if ctx.is_main:
        project, name = Path(cfg.project), cfg.name
        if cfg.exist_ok:
            decision = str(project / name)
        else:
            existing = increments(project, name)
            newest = existing[-1] if existing else None
            if newest is not None and _unfinished_run_of(newest / LAST_KEY, run_id):
                decision = str(newest)
            else:
                decision = str(next_increment(project, name))
    return Path(dist_utils.broadcast_object(decision, ctx))


def _unfinished_run_of(last: Path, run_id: str) -> bool:
    if not last.is_file():
        return False
    ckpt = read_last_quiet(last)
    return ckpt is not None and ckpt.get("run_id") == run_id and not ckpt["train"].get("finished")


def best_pt_refusal(out: Path) -> str | None:
    """Why a run that starts afresh in `out` may not (it would replace the best.pt there), or None."""
    if not (out / BEST_KEY).is_file():
        return None
    return (f"{out / BEST_KEY} exists (an earlier run) and this run would replace it: pass another --out (or "
            f"--project/--name, which picks a new folder), continue it with --resume {out} --epochs N, or "
            f"remove that folder")
