"""Image decoding and the resize/letterbox geometry every step shares (upstream YOLOv5 semantics)."""

from __future__ import annotations

import io
import math
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from yolo.limits import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from yolo.untrusted import TOO_LARGE, InputRefused, read_regular_file

JPEG_START = b"\xff\xd8\xff"
# Pillow warns about images over half its bomb threshold; MAX_IMAGE_PIXELS is this pipeline's own limit
# (checked on every header read here), so the warning would only repeat it. Set once: catch_warnings()
# is not thread-safe, and headers are read in a thread pool.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (DHT, JPG, DAC are not)


def _jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment; Pillow refuses headers cut before their end."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    return None


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that an image's header declares, read without decoding anything; None when the
    header is not one Pillow recognises (or, for a JPEG, has no frame header)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError:
        return (MAX_IMAGE_PIXELS + 1, 1)
    except (OSError, ValueError, SyntaxError, TypeError, IndexError, struct.error, EOFError):
        return _jpeg_frame_size(data) if data[:3] == JPEG_START else None


def read_image(path: str | Path) -> np.ndarray | None:
    """Decode an image as BGR uint8 HxWx3 with EXIF orientation applied; None if it cannot be decoded.

    Only a regular file within MAX_IMAGE_BYTES whose header declares at most MAX_IMAGE_PIXELS is decoded
    (InputRefused otherwise: one line). IMREAD_COLOR folds grayscale, alpha and 16-bit images into 8-bit
    BGR exactly as cv2.imread does for upstream.
    """
    try:
        data, _ = read_regular_file(path, MAX_IMAGE_BYTES, "image")
    except OSError:
        return None
    size = image_header_size(data)
    if size is None:
        return None
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise InputRefused(TOO_LARGE, f"image {path} declares {size[0]}x{size[1]} px, more than the "
                                      f"{MAX_IMAGE_PIXELS} px an image may have: not decoded")
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None


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
