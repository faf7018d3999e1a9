"""Invariants of the YOLOv5 augmentations: boxes follow pixels, stay inside, flips and HSV behave."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from yolo.data.augment import (
    FILL,
    apply_hsv,
    box_candidates,
    build_mosaic,
    hsv_gains,
    mixup,
    random_perspective,
    random_warp_matrix,
    to_chw_rgb,
    warp_boxes,
)
from yolo.hyp import Hyp


def _rect_image(size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    im = np.full((size, size, 3), FILL, np.uint8)
    x1, y1, x2, y2 = box
    im[y1:y2, x1:x2] = 255
    return im


def _pixel_box(im: np.ndarray) -> np.ndarray:
    """xyxy extent (pixel-edge coordinates) of the bright pixels."""
    ys, xs = np.nonzero(im[..., 0] > (FILL + 255) / 2)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


@pytest.mark.parametrize("seed", range(6))
def test_warped_box_follows_the_drawn_rectangle(seed):
    hyp = Hyp(degrees=20, translate=0.1, scale=0.3, shear=8, perspective=0.0008)
    box = (40, 50, 90, 80)
    im = _rect_image(128, box)
    labels = np.array([[3, *box]], np.float32)
    out, new = random_perspective(im, labels, np.random.default_rng(seed), hyp)
    assert out.shape == im.shape and out.dtype == np.uint8
    assert len(new) == 1 and new[0, 0] == 3
    np.testing.assert_allclose(new[0, 1:], _pixel_box(out), atol=2)


def test_mosaic_border_halves_the_canvas_and_keeps_boxes_inside():
    s = 64
    rng = np.random.default_rng(0)
    ims = [np.full((s, s * 3 // 4, 3), 50 * (k + 1), np.uint8) for k in range(4)]
    labels = [np.array([[k, 0.5, 0.5, 0.5, 0.5]], np.float32) for k in range(4)]
    canvas, boxes = build_mosaic(ims, labels, s, xc=s, yc=s)
    assert canvas.shape == (2 * s, 2 * s, 3)
    assert len(boxes) == 4 and (boxes[:, 1:] >= 0).all() and (boxes[:, 1:] <= 2 * s).all()
    # each box lies on its own image's colour: tile k is filled with 50 * (k + 1)
    for cls, x1, y1, x2, y2 in boxes:
        cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
        assert canvas[cy, cx, 0] == 50 * (int(cls) + 1)
    out, warped = random_perspective(canvas, boxes, rng, Hyp(), border=(-s // 2, -s // 2))
    assert out.shape == (s, s, 3)
    assert (warped[:, 1:] >= 0).all() and (warped[:, 1:] <= s).all()


def test_mosaic_tiles_touch_the_centre():
    s = 32
    ims = [np.full((20, 24, 3), v, np.uint8) for v in (10, 20, 30, 40)]
    empty = [np.zeros((0, 5), np.float32)] * 4
    canvas, boxes = build_mosaic(ims, empty, s, xc=30, yc=36)
    assert boxes.shape == (0, 5)
    assert canvas[35, 29, 0] == 10 and canvas[35, 30, 0] == 20  # top-left | top-right at the centre
    assert canvas[36, 29, 0] == 30 and canvas[36, 30, 0] == 40  # bottom-left | bottom-right
    assert canvas[36 - 20, 29, 0] == 10 and canvas[36 - 21, 29, 0] == FILL  # tile height 20 above centre
    assert canvas[0, 0, 0] == FILL


def test_box_candidates_thresholds():
    before = np.array([[0, 0, 10, 10]] * 4, float).T
    after = np.array([[0, 0, 10, 10], [0, 0, 2, 10], [0, 0, 3, 3], [0, 0, 10, 10]], float).T
    before[:, 3] = [0, 0, 100, 100]  # the last box had 100x the area before
    assert box_candidates(before, after).tolist() == [True, False, False, False]
    thin_before = np.array([[0, 0, 500, 3]], float).T
    thin = np.array([[0, 0, 500, 2.5]], float).T
    assert box_candidates(thin_before, thin).tolist() == [False]  # aspect ratio 200 > 100


def test_warp_boxes_matches_point_transform_and_clips():
    M, _ = random_warp_matrix(
        np.random.default_rng(1), (100, 100), (100, 100), Hyp(degrees=30, perspective=0.001)
    )
    boxes = np.array([[10, 10, 50, 40], [-20, 0, 120, 10]], float)
    new = warp_boxes(boxes, M, True, 100, 100)
    corners = np.array([[10, 10], [50, 10], [10, 40], [50, 40]], float)
    pts = cv2.perspectiveTransform(corners[None], M)[0]
    expect = np.clip([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()], 0, 100)
    np.testing.assert_allclose(new[0], expect, atol=1e-9)
    assert (new >= 0).all() and (new <= 100).all()


def test_warp_matrix_draws_within_hyp_ranges():
    hyp = Hyp(degrees=0, translate=0, scale=0, shear=0, perspective=0)
    M, s = random_warp_matrix(np.random.default_rng(0), (50, 80), (50, 80), hyp)
    np.testing.assert_allclose(M, np.eye(3), atol=1e-12)
    assert s == 1
    scales = [
        random_warp_matrix(np.random.default_rng(i), (8, 8), (8, 8), Hyp(scale=0.5))[1] for i in range(200)
    ]
    assert 0.5 <= min(scales) < 0.6 and 1.4 < max(scales) <= 1.5


def _hsv_reference(im, r):
    """Upstream's augment_hsv written the plain way: split, one LUT per channel, merge."""
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=r.dtype)
    luts = (
        ((x * r[0]) % 180).astype(np.uint8),
        np.clip(x * r[1], 0, 255).astype(np.uint8),
        np.clip(x * r[2], 0, 255).astype(np.uint8),
    )
    merged = cv2.merge([cv2.LUT(c, lut) for c, lut in zip((hue, sat, val), luts, strict=True)])
    return cv2.cvtColor(merged, cv2.COLOR_HSV2BGR)


def test_hsv_equals_upstream_lut_per_channel():
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    gains = hsv_gains(rng, 0.015, 0.7, 0.4)
    assert gains is not None and np.all(np.abs(gains - 1) <= [0.015, 0.7, 0.4])
    expect = _hsv_reference(im, gains)
    apply_hsv(im, gains)
    np.testing.assert_array_equal(im, expect)
    assert hsv_gains(rng, 0, 0, 0) is None


def test_mixup_blends_and_joins_labels():
    a, b = np.full((8, 8, 3), 200, np.uint8), np.full((8, 8, 3), 100, np.uint8)
    la, lb = np.ones((2, 5), np.float32), np.zeros((3, 5), np.float32)
    im, labels = mixup(a, la, b, lb, np.random.default_rng(0))
    r = np.random.default_rng(0).beta(32.0, 32.0)
    assert im.dtype == np.uint8 and (im == int(200 * r + 100 * (1 - r))).all()
    assert labels.shape == (5, 5)


def test_to_chw_rgb_flips_and_channel_order():
    im = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = to_chw_rgb(im, flip_ud=True, flip_lr=True)
    assert out.flags["C_CONTIGUOUS"] and out.shape == (3, 2, 3)
    np.testing.assert_array_equal(out, im[::-1, ::-1, ::-1].transpose(2, 0, 1))
