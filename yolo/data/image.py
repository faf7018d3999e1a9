"""Image decoding and the resize/letterbox geometry every step shares (upstream YOLOv5 semantics)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np


def read_image(path: str | Path) -> np.ndarray | None:
    """Decode an image as BGR uint8 HxWx3 with EXIF orientation applied; None if OpenCV cannot.

    Goes through np.fromfile + imdecode so non-ASCII paths work; IMREAD_COLOR folds grayscale,
    alpha and 16-bit images into 8-bit BGR exactly as cv2.imread does for upstream.
    """
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if buf.size == 0:
        return None
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def resize_long_side(im: np.ndarray, imgsz: int, augment: bool) -> np.ndarray:
    """Scale so the long side equals imgsz (upstream load_image): linear when training or enlarging,
    area when shrinking for evaluation. Sides are rounded up (math.ceil), as upstream v7 does."""
    h0, w0 = im.shape[:2]
    r = imgsz / max(h0, w0)
    if r == 1:
        return im
    interp = cv2.INTER_LINEAR if (augment or r > 1) else cv2.INTER_AREA
    return cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)


def letterbox(
    im: np.ndarray,
    new_shape: int | tuple[int, int] = 640,
    color: tuple[int, int, int] = (114, 114, 114),
    auto: bool = True,
    scale_fill: bool = False,
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping aspect ratio and pad to `new_shape` (h, w); returns image, (rw, rh), (dw, dh).

    auto=True pads only up to the next multiple of `stride` (smallest rectangle), as detect.py does.
    dw, dh are the padding on ONE side (the total split in two), as upstream returns them.
    """
    shape = im.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    ratio = (r, r)
    new_unpad = (int(round(shape[1] * r)), int(round(shape[0] * r)))
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    elif scale_fill:
        dw, dh = 0.0, 0.0
        new_unpad = (new_shape[1], new_shape[0])
        ratio = (new_shape[1] / shape[1], new_shape[0] / shape[0])
    dw /= 2
    dh /= 2
    if shape[::-1] != new_unpad:
        im = cv2.resize(im, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (float(dw), float(dh))
