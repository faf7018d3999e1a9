"""train_batch*.jpg: a grid of training images with their boxes and class names, as upstream plot_images."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from yolo.files import write_bytes


def class_color(c: int) -> tuple[int, int, int]:
    """A stable, distinct BGR colour per class: hues spaced by the golden ratio, full saturation."""
    hue = int((c * 0.618033988749895 % 1.0) * 180)
    hsv = np.array([[[hue, 220, 230]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def plot_batch(
    images: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    names: Sequence[str],
    path: str | os.PathLike,
    paths: Sequence[str] | None = None,
    max_size: int = 1920,
    max_subplots: int = 16,
) -> np.ndarray:
    """Write a grid of uint8 RGB (bs, 3, H, W) `images` with targets (n, 6) [image, cls, cx, cy, w, h]
    (normalised) drawn on them to `path` (jpg, atomically); returns the BGR grid."""
    ims = _numpy(images)
    tg = _numpy(targets).reshape(-1, 6)
    if ims.dtype != np.uint8:  # accept float 0..1 batches too
        ims = (ims * 255 if ims.max() <= 1 else ims).clip(0, 255).astype(np.uint8)
    bs, _, h, w = ims.shape
    bs = min(bs, max_subplots)
    ns = math.ceil(bs**0.5)
    grid = np.full((ns * h, ns * w, 3), 255, dtype=np.uint8)
    for i in range(bs):
        y, x = h * (i // ns), w * (i % ns)
        grid[y : y + h, x : x + w] = ims[i].transpose(1, 2, 0)[..., ::-1]  # RGB CHW -> BGR HWC
    scale = max_size / ns / max(h, w)
    if scale < 1:
        h, w = math.ceil(scale * h), math.ceil(scale * w)
        grid = cv2.resize(grid, (w * ns, h * ns))
    grid = np.ascontiguousarray(grid)
    fs = int((h + w) * ns * 0.01)  # upstream's font size in px for this grid
    thickness = max(round(fs / 10), 1)
    font_scale = max(fs / 60, 0.3)  # cv2's Hershey font is ~22 px tall at scale 1
    for i in range(bs):
        y, x = h * (i // ns), w * (i % ns)
        cv2.rectangle(grid, (x, y), (x + w, y + h), (255, 255, 255), 2)
        if paths is not None:
            label = os.path.basename(str(paths[i]))[:40]
            cv2.putText(grid, label, (x + 4, y + 4 + int(22 * font_scale)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (220, 220, 220), 1,
                        cv2.LINE_AA)  # fmt: skip
        rows = tg[tg[:, 0] == i]
        if not len(rows):
            continue
        cx, cy, bw, bh = (rows[:, 2:6] * [w, h, w, h]).T  # normalised -> pixels of this tile
        boxes = (
            np.stack((cx - bw / 2 + x, cy - bh / 2 + y, cx + bw / 2 + x, cy + bh / 2 + y), 1)
            .round()
            .astype(int)
        )
        for (x1, y1, x2, y2), c in zip(boxes, rows[:, 1].astype(int), strict=True):
            color = class_color(c)
            cv2.rectangle(grid, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
            text = names[c] if 0 <= c < len(names) else str(c)
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
            top = max(y1 - th - base, y)
            cv2.rectangle(grid, (x1, top), (x1 + tw, top + th + base), color, -1)
            cv2.putText(grid, text, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1,
                        cv2.LINE_AA)  # fmt: skip
    ok, buf = cv2.imencode(".jpg", grid, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError(f"cv2 could not encode {path}")
    write_bytes(path, buf.tobytes())
    return grid
