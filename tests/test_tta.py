"""Test-time augmentation: upstream's scales and flips, boxes mapped back, levels clipped; predict --augment."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from yolo.predict import PredictConfig, predict
from yolo.tta import FLIPS, SCALES, augmented_forward, scale_image

STRIDES = (8, 16, 32)


def test_upstream_scales_and_flips():
    assert SCALES == (1.0, 0.83, 0.67) and FLIPS == (None, 3, None)


def test_scale_image_pads_to_a_stride_multiple_with_grey():
    x = torch.ones(1, 3, 480, 640)
    assert scale_image(x, 1.0, 32) is x
    y = scale_image(x, 0.83, 32)
    assert y.shape == (1, 3, 416, 544)  # int(480 * .83) = 398 -> 416, int(640 * .83) = 531 -> 544
    # bilinear weights of a constant image sum to 1 within float rounding (which depends on the kernel
    # path torch takes for the thread count); the padding is exact
    torch.testing.assert_close(y[..., :398, :531], torch.ones(1, 3, 398, 531), atol=1e-6, rtol=0)
    assert torch.all(y[..., 398:, :] == 0.447) and torch.all(y[..., :, 531:] == 0.447)


def _marker_model(x: torch.Tensor) -> torch.Tensor:
    """A stand-in detector: every row is a 20 px box centred on the brightest pixel, with a row count laid out
    as YOLOv5's three levels (3 anchors per cell)."""
    bs, _, h, w = x.shape
    rows = sum(3 * (h // s) * (w // s) for s in STRIDES)
    brightest = x[:, 0].flatten(1).argmax(1)  # (bs,) first of the brightest pixels
    out = torch.zeros(bs, rows, 6)
    out[..., 0] = (brightest % w).float()[:, None] + 0.5
    out[..., 1] = (brightest // w).float()[:, None] + 0.5
    out[..., 2:4] = 20
    out[..., 4:] = 0.9
    return out


def test_boxes_come_back_to_the_input_frame_and_levels_are_clipped():
    x = torch.zeros(1, 3, 320, 480)
    x[..., 79:82, 99:102] = 1  # a bright 3x3 square around (x 100.5, y 80.5)
    y = augmented_forward(_marker_model, x, stride=32, levels=3)
    rows = [sum(3 * (h // s) * (w // s) for s in STRIDES) for h, w in ((320, 480), (288, 416), (224, 352))]
    # full size drops its stride-32 level (1/21 of the rows), the smallest drops its stride-8 level (16/21)
    assert y.shape[1] == rows[0] - rows[0] // 21 + rows[1] + rows[2] - rows[2] // 21 * 16
    parts = torch.split(y[0], [rows[0] - rows[0] // 21, rows[1], rows[2] - rows[2] // 21 * 16])
    for part, ratio in zip(parts, SCALES, strict=True):
        assert torch.allclose(part[:, 0], torch.full_like(part[:, 0], 100.5), atol=2)  # the flipped one too
        assert torch.allclose(part[:, 1], torch.full_like(part[:, 1], 80.5), atol=2)
        assert torch.allclose(part[:, 2], torch.full_like(part[:, 2], 20 / ratio))


def test_predict_augment_finds_the_people(tmp_path, coco128_yaml, yolov5n_pt):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(coco128_yaml.parent / "images" / "val2017" / "000000000785.jpg", src / "skier.jpg")
    rows = {}
    for augment in (False, True):
        out = tmp_path / f"out{augment}"
        predict(PredictConfig(weights=str(yolov5n_pt), source=src, out=out, imgsz=[320], device="cpu",
                              augment=augment, save_txt=True, save_conf=True, save_images=False))
        rows[augment] = np.loadtxt(out / "labels" / "skier.txt", ndmin=2)
    plain, tta = rows[False], rows[True]
    best = [r[r[:, 0] == 0][r[r[:, 0] == 0][:, 5].argmax()] for r in (plain, tta)]
    assert best[1][5] > 0.5 and np.abs(best[1][1:5] - best[0][1:5]).max() < 0.05  # the same skier
    assert not np.array_equal(plain, tta)  # the extra passes changed the result
