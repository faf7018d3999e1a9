"""Turn upstream-style `--device` strings ('', 'cpu', '0', '0,1', 'cuda:1') into a torch.device."""

from __future__ import annotations

import torch

from yolo.errors import UserError


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
