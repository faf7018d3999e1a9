"""YOLOv5's training augmentations (upstream utils/augmentations.py + load_mosaic), numpy + cv2.

Every function takes its randomness as an explicit `np.random.Generator` (or as values drawn from one), so
a sample is a pure function of its generator's seed. Labels are `(n, 5) float32 [class, ...]` arrays; box
math is vectorised over the n boxes. Images are BGR uint8 HxWx3, as cv2 decodes them.
"""

from __future__ import annotations

import math
from typing import Protocol

import cv2
import numpy as np

from yolo.boxes import xywhn2xyxy

FILL = 114  # upstream's grey for padding and warp borders
_FILL3 = (FILL, FILL, FILL)


class GeometryHyp(Protocol):
    degrees: float
    translate: float
    scale: float
    shear: float
    perspective: float


def random_warp_matrix(
    rng: np.random.Generator,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    hyp: GeometryHyp,
) -> tuple[np.ndarray, float]:
    """Upstream's M = T @ S @ R @ P @ C for an input of `in_hw` warped into `out_hw`; returns (M, scale).

    C centres the input, P adds perspective, R rotates and scales, S shears, T translates into the output.
    """
    # one vectorised draw: perspective x, y; angle; scale; shear x, y; translate x, y
    u = rng.random(8)
    px, py = (2 * u[:2] - 1) * hyp.perspective
    angle = (2 * u[2] - 1) * hyp.degrees
    s = 1 - hyp.scale + 2 * hyp.scale * u[3]
    shear_x, shear_y = (2 * u[4:6] - 1) * hyp.shear
    tx = (0.5 - hyp.translate + 2 * hyp.translate * u[6]) * out_hw[1]
    ty = (0.5 - hyp.translate + 2 * hyp.translate * u[7]) * out_hw[0]

    C = np.eye(3)
    C[0, 2], C[1, 2] = -in_hw[1] / 2, -in_hw[0] / 2
    P = np.eye(3)
    P[2, 0], P[2, 1] = px, py
    # same matrix as cv2.getRotationMatrix2D(center=(0, 0), angle, scale): positive angle turns anticlockwise
    a = math.radians(angle)
    R = np.array(
        [[s * math.cos(a), s * math.sin(a), 0.0], [-s * math.sin(a), s * math.cos(a), 0.0], [0, 0, 1]]
    )
    S = np.eye(3)
    S[0, 1], S[1, 0] = math.tan(math.radians(shear_x)), math.tan(math.radians(shear_y))
    T = np.eye(3)
    T[0, 2], T[1, 2] = tx, ty
    return T @ S @ R @ P @ C, float(s)


def warp_boxes(boxes: np.ndarray, M: np.ndarray, perspective: bool, width: int, height: int) -> np.ndarray:
    """Axis-aligned hull of the four warped corners of each xyxy box, clipped to width x height."""
    n = len(boxes)
    xy = np.ones((n * 4, 3))
    # corners x1y1, x2y2, x1y2, x2y1 of every box, one row each
    xy[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
    xy = xy @ M.T
    xy = xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]
    xy = xy.reshape(n, 4, 2)
    new = np.concatenate((xy.min(1), xy.max(1)), 1)  # x1 y1 x2 y2
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, width)
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, height)
    return new


def box_candidates(
    box1: np.ndarray,
    box2: np.ndarray,
    wh_thr: float = 2,
    ar_thr: float = 100,
    area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """Keep mask for boxes (4, n) that after augmentation (box2) are > wh_thr px, keep > area_thr of their
    area before (box1, already scaled) and have aspect ratio < ar_thr."""
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def random_perspective(
    im: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    hyp: GeometryHyp,
    border: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation/perspective of `im` and its pixel xyxy `labels` (upstream).

    `border` (negative for a mosaic) shrinks the output: a 2s mosaic with border -s/2 comes out s x s.
    Boxes that become too small or too thin are dropped (box_candidates).
    """
    height = im.shape[0] + border[0] * 2
    width = im.shape[1] + border[1] * 2
    M, s = random_warp_matrix(rng, im.shape[:2], (height, width), hyp)
    use_perspective = bool(hyp.perspective)
    if border[0] or border[1] or (M != np.eye(3)).any():
        if use_perspective:
            im = cv2.warpPerspective(im, M, dsize=(width, height), borderValue=_FILL3)
        else:  # affine is cheaper and identical when the last row is [0, 0, 1]
            im = cv2.warpAffine(im, M[:2], dsize=(width, height), borderValue=_FILL3)
    if len(labels):
        new = warp_boxes(labels[:, 1:5], M, use_perspective, width, height)
        keep = box_candidates(labels[:, 1:5].T * s, new.T, area_thr=0.10)
        labels = labels[keep]
        labels[:, 1:5] = new[keep]
    return im, labels


def mosaic_tiles(
    sizes: list[tuple[int, int]], s: int, xc: int, yc: int
) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """Where each of 4 images of (h, w) `sizes` goes in a 2s x 2s canvas around centre (xc, yc).

    Returns per image (canvas x1, y1, x2, y2) and (image x1, y1, x2, y2): top-left, top-right, bottom-left,
    bottom-right, each touching the centre and cropped at the canvas edge, as upstream's load_mosaic.
    """
    out = []
    for k, (h, w) in enumerate(sizes):
        if k == 0:  # top left: its bottom-right corner sits on the centre
            a = (max(xc - w, 0), max(yc - h, 0), xc, yc)
            b = (w - (a[2] - a[0]), h - (a[3] - a[1]), w, h)
        elif k == 1:  # top right
            a = (xc, max(yc - h, 0), min(xc + w, 2 * s), yc)
            b = (0, h - (a[3] - a[1]), min(w, a[2] - a[0]), h)
        elif k == 2:  # bottom left
            a = (max(xc - w, 0), yc, xc, min(2 * s, yc + h))
            b = (w - (a[2] - a[0]), 0, w, min(a[3] - a[1], h))
        else:  # bottom right
            a = (xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h))
            b = (0, 0, min(w, a[2] - a[0]), min(a[3] - a[1], h))
        out.append((a, b))
    return out


def build_mosaic(
    images: list[np.ndarray], labels: list[np.ndarray], s: int, xc: int, yc: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paste 4 images (long side s) into one 2s x 2s canvas (fill 114); labels normalised xywh -> pixel xyxy.

    Labels are clipped to the canvas, as upstream does before random_perspective.
    """
    canvas = np.full((2 * s, 2 * s, 3), FILL, dtype=np.uint8)
    out = []
    for im, lb, (a, b) in zip(
        images, labels, mosaic_tiles([im.shape[:2] for im in images], s, xc, yc), strict=True
    ):
        canvas[a[1] : a[3], a[0] : a[2]] = im[b[1] : b[3], b[0] : b[2]]
        if len(lb):
            h, w = im.shape[:2]
            lb = lb.copy()
            lb[:, 1:] = xywhn2xyxy(lb[:, 1:], w, h, a[0] - b[0], a[1] - b[1])
            out.append(lb)
    boxes = np.concatenate(out, 0) if out else np.zeros((0, 5), np.float32)
    np.clip(boxes[:, 1:], 0, 2 * s, out=boxes[:, 1:])
    return canvas, boxes


def hsv_gains(rng: np.random.Generator, hgain: float, sgain: float, vgain: float) -> np.ndarray | None:
    """Upstream's random HSV gains r = uniform(-1, 1, 3) * [h, s, v] + 1; None (and no draw) when all 0."""
    if not (hgain or sgain or vgain):
        return None
    return rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1


def apply_hsv(im: np.ndarray, gains: np.ndarray) -> None:
    """Scale hue (mod 180), saturation and value of BGR uint8 `im` in place through one 3-channel LUT."""
    x = np.arange(0, 256, dtype=gains.dtype)
    lut = np.empty((256, 1, 3), np.uint8)
    lut[:, 0, 0] = ((x * gains[0]) % 180).astype(np.uint8)
    lut[:, 0, 1] = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut[:, 0, 2] = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.LUT(cv2.cvtColor(im, cv2.COLOR_BGR2HSV), lut)
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)


def mixup(
    im: np.ndarray, labels: np.ndarray, im2: np.ndarray, labels2: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Blend two images with ratio r ~ Beta(32, 32) (truncating to uint8, as upstream) and join labels."""
    r = rng.beta(32.0, 32.0)
    im = (im * r + im2 * (1 - r)).astype(np.uint8)
    return im, np.concatenate((labels, labels2), 0)


def to_chw_rgb(im: np.ndarray, flip_ud: bool = False, flip_lr: bool = False) -> np.ndarray:
    """BGR HWC -> contiguous RGB CHW with optional flips: views composed, then a single copy."""
    if flip_ud:
        im = im[::-1]
    if flip_lr:
        im = im[:, ::-1]
    return np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1))
