"""Training hyperparameters: upstream YOLOv5's hyp.scratch-low keys and defaults as a typed config."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolo.errors import UserError, did_you_mean
from yolo.untrusted import InvalidYaml, parse_yaml, read_yaml_file

# Keys that are probabilities (drawn per image), so values above 1 are a typo rather than a choice.
_PROBABILITIES = ("flipud", "fliplr", "mosaic", "mixup", "copy_paste")


@dataclass(frozen=True)
class Hyp:
    lr0: float = 0.01  # initial learning rate (SGD=1E-2, Adam=1E-3)
    lrf: float = 0.01  # final OneCycleLR learning rate (lr0 * lrf)
    momentum: float = 0.937  # SGD momentum / Adam beta1
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0  # fractions ok
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    box: float = 0.05  # box loss gain (before scale_loss_gains)
    cls: float = 0.5  # cls loss gain
    cls_pw: float = 1.0  # cls BCE positive weight
    obj: float = 1.0  # obj loss gain (scale with pixels)
    obj_pw: float = 1.0  # obj BCE positive weight
    iou_t: float = 0.2  # IoU training threshold (unused by the loss, kept for upstream files)
    anchor_t: float = 4.0  # anchor-multiple threshold for target matching
    fl_gamma: float = 0.0  # focal loss gamma (efficientDet default gamma=1.5)
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0
    mixup: float = 0.0
    copy_paste: float = 0.0
    anchors: float | None = None  # anchors per output level (upstream hyp.VOC.yaml); None keeps the cfg's

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "anchors" and value is None:
                continue
            # bool is an int subclass in Python, but `mosaic: true` is a mistake, not 1.0
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"hyp `{f.name}` must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise UserError(f"hyp `{f.name}` must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, f.name, float(value))
        for name in _PROBABILITIES:
            if getattr(self, name) > 1:
                raise UserError(f"hyp `{name}` is a probability and must be <= 1, got {getattr(self, name)}")
        if self.anchor_t <= 1:
            raise UserError(f"hyp `anchor_t` must be > 1 (a ratio threshold), got {self.anchor_t}")
        if self.anchors is not None and (self.anchors < 1 or self.anchors != int(self.anchors)):
            raise UserError(f"hyp `anchors` must be a whole number of anchors per level >= 1, got {self.anchors}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every key (floats, anchors may be None), in upstream's order."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Hyp:
        """A copy with `changes` applied; unknown keys are a UserError."""
        unknown = sorted(set(changes) - _KEYS)
        if unknown:
            raise UserError(f"unknown hyp key `{unknown[0]}`{did_you_mean(unknown[0], _KEYS)}")
        return dataclasses.replace(self, **changes)


_KEYS = frozenset(f.name for f in dataclasses.fields(Hyp))


def load_hyp(path: str | Path | None) -> Hyp:
    """Hyp from a yaml file (missing keys take upstream's defaults); None gives the defaults."""
    if path is None:
        return Hyp()
    path = Path(path)
    if not path.exists():
        raise UserError(f"hyp file {path} not found")
    try:
        data, _ = parse_yaml(read_yaml_file(path, "hyp file"), f"hyp file {path}")
    except InvalidYaml as e:
        where = f", line {e.line}" if e.line else ""
        raise UserError(f"hyp file {path}{where}: not valid YAML ({e.problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"hyp file {path}: expected a mapping of key: value, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str) or key not in _KEYS:
            raise UserError(f"hyp file {path}: unknown key `{key}`{did_you_mean(str(key), _KEYS)}")
    try:
        return Hyp(**data)
    except UserError as e:
        raise UserError(f"hyp file {path}: {e}") from None
