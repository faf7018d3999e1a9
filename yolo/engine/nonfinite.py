"""Non-finite numbers never pass for a model: weights are checked before a run or an evaluation uses them.

A NaN or inf weight makes every output NaN; NMS then finds nothing, mAP is 0.0, and without a gate floor
such a model would be promoted, while a training from it skips every step and logs losses of 0.0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from yolo.errors import UserError

# The parts of a checkpoint that hold weights and optimiser state (last.pt's `train` holds both again).
WEIGHT_FIELDS = ("model", "train")


def nonfinite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors under `obj` (dicts, lists) holding a NaN or an infinity."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            return [prefix or "tensor"]
        return []
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    found: list[str] = []
    for key, value in items:
        found += nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def refuse_nonfinite(ckpt: Mapping[str, Any], what: str) -> None:
    """UserError naming the first tensors when the checkpoint's weights or optimiser state are not finite."""
    bad = nonfinite_entries({k: ckpt[k] for k in WEIGHT_FIELDS if k in ckpt})
    if bad:
        raise UserError(f"{what}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {', '.join(bad[:3])}); "
                        f"refusing to use these weights")


def refuse_nonfinite_model(model: torch.nn.Module, what: str) -> None:
    """The same check for a built model's parameters and buffers."""
    refuse_nonfinite({"model": model.state_dict()}, what)
