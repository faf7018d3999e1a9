"""Test-time augmentation (`--augment`), as upstream's DetectionModel._forward_augment.

The batch runs three times: as is, flipped left-right at 0.83 scale, and at 0.67 scale. Each output's boxes
are mapped back to the input's frame, the full-size pass drops its largest-stride level (large objects are
better seen scaled down) and the smallest pass drops its smallest-stride level, and the three are
concatenated for NMS. `forward` is any callable from an image batch to decoded predictions (a Backend or a
model's `lambda x: model(x)[0]`), so predict and evaluate share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from yolo.errors import UserError

if TYPE_CHECKING:
    from yolo.backend import Backend

SCALES = (1.0, 0.83, 0.67)
FLIPS = (None, 3, None)  # tensor dim flipped: 3 = width (left-right); 2 would be up-down
PAD_VALUE = 0.447  # upstream pads the scaled image with the ImageNet mean grey


def scale_image(x: torch.Tensor, ratio: float, stride: int) -> torch.Tensor:
    """Resize (bilinear) by ratio, then pad bottom/right to a multiple of stride (upstream scale_img)."""
    if ratio == 1.0:
        return x
    h, w = x.shape[2:]
    size = (int(h * ratio), int(w * ratio))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    ph, pw = (math.ceil(s * ratio / stride) * stride for s in (h, w))
    return F.pad(x, [0, pw - size[1], 0, ph - size[0]], value=PAD_VALUE)


def _descale(pred: torch.Tensor, flip: int | None, ratio: float, size: tuple[int, int]) -> torch.Tensor:
    """Boxes (cx, cy, w, h) of a scaled, maybe flipped pass back in the original input's pixels."""
    cx, cy, wh = pred[..., 0:1] / ratio, pred[..., 1:2] / ratio, pred[..., 2:4] / ratio
    if flip == 2:
        cy = size[0] - cy
    elif flip == 3:
        cx = size[1] - cx
    return torch.cat((cx, cy, wh, pred[..., 4:]), -1)


def augmented_forward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, stride: int,
                      levels: int) -> torch.Tensor:
    """Decoded predictions (bs, N', 5+nc) of the three augmented passes, for NMS as usual.

    stride: the model's largest stride; levels: its detection levels (3 for P5 models, 4 for P6), whose
    rows come in level order (smallest stride first) with 4x fewer rows per level."""
    size = (x.shape[2], x.shape[3])
    outputs = []
    for ratio, flip in zip(SCALES, FLIPS, strict=True):
        xi = scale_image(x.flip(flip) if flip else x, ratio, stride)
        outputs.append(_descale(forward(xi), flip, ratio, size))
    # rows per unit: level k (0 = smallest stride) holds 4**(levels-1-k) units
    units = sum(4**k for k in range(levels))
    if any(o.shape[1] % units for o in outputs):
        raise ValueError(f"--augment: output rows {[o.shape[1] for o in outputs]} do not split into {levels} levels")
    outputs[0] = outputs[0][:, : -(outputs[0].shape[1] // units)]  # drop the largest-stride level
    outputs[-1] = outputs[-1][:, (outputs[-1].shape[1] // units) * 4 ** (levels - 1):]  # drop the smallest
    return torch.cat(outputs, 1)


def augmented(backend: Backend) -> Callable[[torch.Tensor], torch.Tensor]:
    """backend's forward with TTA, for predict and evaluate --augment; a fixed-shape export cannot run the
    scaled passes at their own sizes, so it is refused in one line."""
    if backend.meta.fixed_shape is not None:
        raise UserError(f"--augment runs the model at three sizes; this {backend.meta.kind} model has a fixed input "
                        "shape: use the .pt, or an ONNX export made with --dynamic")
    return lambda x: augmented_forward(backend, x, backend.meta.stride, backend.levels)
