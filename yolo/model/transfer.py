"""Load weights by name where shapes match (upstream's intersect_dicts), and the one anchor priority."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from yolo.anchors import anchors_for_imgsz, parse_anchors_json

LOG = logging.getLogger(__name__)


@dataclass
class TransferReport:
    transferred: list[str]
    total: int  # entries in the model's state_dict
    not_transferred: dict[str, str] = field(default_factory=dict)  # model key -> missing / shape / excluded
    unused: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for

    @property
    def n(self) -> int:
        return len(self.transferred)

    def summary(self) -> str:
        text = f"Transferred {self.n}/{self.total} items"
        if self.not_transferred:
            reasons: dict[str, int] = {}
            for why in self.not_transferred.values():
                kind = why.split(" ", 1)[0]
                reasons[kind] = reasons.get(kind, 0) + 1
            text += " (not transferred: " + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items())) + ")"
        return text


def transfer_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                   exclude: Iterable[str] = ()) -> TransferReport:
    """Copy every entry whose name and shape match and whose name contains no `exclude` substring."""
    exclude = tuple(exclude)
    own = model.state_dict()
    matched: dict[str, torch.Tensor] = {}
    not_transferred: dict[str, str] = {}
    for key, target in own.items():
        source = state_dict.get(key)
        if any(x in key for x in exclude):
            not_transferred[key] = "excluded"
        elif source is None:
            not_transferred[key] = "missing from the checkpoint"
        elif tuple(source.shape) != tuple(target.shape):
            not_transferred[key] = f"shape {tuple(source.shape)} in the checkpoint, {tuple(target.shape)} here"
        else:
            matched[key] = source
    model.load_state_dict(matched, strict=False)  # copy_ casts fp16 checkpoints into fp32 parameters
    report = TransferReport(sorted(matched, key=list(own).index), len(own), not_transferred,
                            [k for k in state_dict if k not in own])
    LOG.info("%s", report.summary())
    for key, why in list(not_transferred.items())[:8]:
        LOG.debug("  not transferred: %s (%s)", key, why)
    return report


@dataclass(frozen=True)
class AnchorChoice:
    anchors_px: list[list[float]] | None  # rows per level in pixels; None = keep the checkpoint's
    source: str  # "anchors.json", "cfg" or "checkpoint"
    exclude_from_transfer: bool  # True when the checkpoint's anchors must not overwrite these

    @property
    def override(self) -> list[list[float]] | None:
        """Rows to build the model with; None when the cfg's or the checkpoint's own anchors stand."""
        return self.anchors_px if self.source == "anchors.json" else None


def choose_anchors(anchors_json: Any = None, cfg_given: Mapping[str, Any] | None = None, imgsz: int | None = None,
                   where: str = "anchors.json") -> AnchorChoice:
    """The project's anchor priority (train uses this): --anchors anchors.json > the --cfg's anchors >
    the checkpoint's.

    anchors.json holds pixels at its own `imgsz`; at another training size they are rescaled by the
    ratio (and the log says so). A cfg's anchors are used as written, as upstream does.
    """
    if anchors_json is not None:
        fitted_imgsz, rows = parse_anchors_json(anchors_json, where)
        if imgsz:
            rows = anchors_for_imgsz(rows, fitted_imgsz, int(imgsz))
        return AnchorChoice(rows.tolist(), "anchors.json", True)
    if cfg_given is not None:
        rows = cfg_given.get("anchors")
        return AnchorChoice(rows if isinstance(rows, list) else None, "cfg", True)
    return AnchorChoice(None, "checkpoint", False)
