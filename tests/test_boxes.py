"""Box formats, IoU family and NMS: hand-computed values and a slow greedy reference for NMS."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from tests.conftest import REPO
from yolo.boxes import (
    PER_CLASS_NMS_MIN,
    _class_offset_nms,
    bbox_iou,
    box_iou,
    clip_boxes,
    nms_kernel,
    non_max_suppression,
    scale_boxes,
    xywh2xyxy,
    xywhn2xyxy,
    xyxy2xywh,
    xyxy2xywhn,
)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_format_conversions(kind):
    xywh = np.array([[50.0, 40.0, 20.0, 10.0], [5.0, 5.0, 10.0, 10.0]], dtype=np.float32)
    xyxy = np.array([[40.0, 35.0, 60.0, 45.0], [0.0, 0.0, 10.0, 10.0]], dtype=np.float32)
    wrap = torch.from_numpy if kind == "torch" else np.asarray
    a = xywh2xyxy(wrap(xywh))
    assert type(a) is type(wrap(xywh))
    np.testing.assert_allclose(np.asarray(a), xyxy)
    np.testing.assert_allclose(np.asarray(xyxy2xywh(wrap(xyxy))), xywh)
    norm = xywh / np.array([100, 50, 100, 50], dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(xywhn2xyxy(wrap(norm), 100, 50, padw=3, padh=4)), xyxy + [3, 4, 3, 4]
    )
    np.testing.assert_allclose(np.asarray(xyxy2xywhn(wrap(xyxy), 100, 50)), norm, rtol=1e-6)


def test_xyxy2xywhn_clip_is_in_place_like_upstream():
    x = torch.tensor([[-10.0, -5.0, 120.0, 30.0]])
    y = xyxy2xywhn(x, w=100, h=50, clip=True)
    assert x.tolist() == [[0.0, 0.0, 100.0, 30.0]]
    torch.testing.assert_close(y, torch.tensor([[0.5, 0.3, 1.0, 0.6]]))


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_clip_boxes(kind):
    b = np.array([[-1.0, -2.0, 700.0, 500.0], [10, 20, 30, 40]], dtype=np.float32)
    b = torch.from_numpy(b) if kind == "torch" else b
    clip_boxes(b, (480, 640))
    np.testing.assert_array_equal(np.asarray(b), [[0, 0, 640, 480], [10, 20, 30, 40]])


def test_scale_boxes_inverts_letterbox():
    # 480x640 original letterboxed to 320 x 320 (auto off): gain 0.5, pad (0, 40)
    orig = torch.tensor([[100.0, 50.0, 300.0, 250.0]])
    boxed = orig * 0.5 + torch.tensor([0.0, 40.0, 0.0, 40.0])
    back = scale_boxes((320, 320), boxed.clone(), (480, 640))
    torch.testing.assert_close(back, orig)
    # explicit ratio_pad (the loader's) wins over the shapes
    back2 = scale_boxes((999, 999), boxed.clone(), (480, 640), ratio_pad=((0.5, 0.5), (0.0, 40.0)))
    torch.testing.assert_close(back2, orig)
    out_of_image = scale_boxes((320, 320), torch.tensor([[-20.0, 0.0, 330.0, 300.0]]), (480, 640))
    assert out_of_image.tolist() == [[0.0, 0.0, 640.0, 480.0]]


def test_box_iou_matches_torchvision_and_numpy():
    g = torch.Generator().manual_seed(0)
    a = xywh2xyxy(torch.rand(7, 4, generator=g) * torch.tensor([100, 100, 40, 40]) + 1)
    b = xywh2xyxy(torch.rand(5, 4, generator=g) * torch.tensor([100, 100, 40, 40]) + 1)
    ours = box_iou(a, b)
    assert ours.shape == (7, 5)
    torch.testing.assert_close(ours, torchvision.ops.box_iou(a, b), atol=1e-6, rtol=1e-5)
    as_np = box_iou(a.numpy(), b.numpy())
    assert isinstance(as_np, np.ndarray)
    np.testing.assert_allclose(as_np, ours.numpy(), rtol=1e-6)
    assert box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]])).item() == pytest.approx(
        1 / 7
    )


def test_bbox_iou_family_hand_computed():
    b1 = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b2 = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou = 1 / 7
    assert bbox_iou(b1, b2, xywh=False).item() == pytest.approx(iou, abs=1e-6)
    assert bbox_iou(b1, b2, xywh=False, GIoU=True).item() == pytest.approx(iou - 2 / 9, abs=1e-6)
    assert bbox_iou(b1, b2, xywh=False, DIoU=True).item() == pytest.approx(iou - 2 / 18, abs=1e-6)
    # same aspect ratio: CIoU's aspect term vanishes and it equals DIoU
    assert bbox_iou(b1, b2, xywh=False, CIoU=True).item() == pytest.approx(iou - 2 / 18, abs=1e-6)
    # different aspect: [0,0,2,2] vs [1,1,3,4]
    b3 = torch.tensor([[1.0, 1.0, 3.0, 4.0]])
    iou = 1 / 9
    v = 4 / math.pi**2 * (math.atan(2 / 3) - math.atan(1.0)) ** 2
    expected = iou - (3.25 / 25 + v * v / (v - iou + 1))
    assert bbox_iou(b1, b3, xywh=False, CIoU=True).item() == pytest.approx(expected, abs=1e-6)
    # xywh input gives the same answer, elementwise over many rows
    many1, many3 = b1.repeat(4, 1), b3.repeat(4, 1)
    out = bbox_iou(xyxy2xywh(many1), xyxy2xywh(many3), CIoU=True)
    assert out.shape == (4, 1)
    torch.testing.assert_close(out, torch.full((4, 1), expected), atol=1e-6, rtol=0)
    # identical boxes: 1; disjoint boxes: IoU 0 and GIoU negative
    assert bbox_iou(b1, b1, xywh=False, CIoU=True).item() == pytest.approx(1.0, abs=1e-6)
    far = torch.tensor([[10.0, 10.0, 12.0, 12.0]])
    assert bbox_iou(b1, far, xywh=False).item() == 0.0
    assert bbox_iou(b1, far, xywh=False, GIoU=True).item() < -0.5


def test_ciou_gradient_finite_and_alpha_detached():
    b1 = torch.tensor([[1.0, 1.0, 2.0, 3.0]], requires_grad=True)
    b2 = torch.tensor([[1.5, 1.2, 2.5, 2.0]])
    bbox_iou(b1, b2, CIoU=True).sum().backward()
    assert torch.isfinite(b1.grad).all() and b1.grad.abs().sum() > 0


def _greedy_nms_reference(pred, conf_thres, iou_thres, multi_label, agnostic, max_det):
    """Slow, obviously-correct per-box reference for one image (tests only)."""
    rows = []
    nc = pred.shape[1] - 5
    for p in pred.tolist():
        obj = p[4]
        if obj <= conf_thres:
            continue
        scores = [s * obj for s in p[5:]]
        x1, y1, x2, y2 = p[0] - p[2] / 2, p[1] - p[3] / 2, p[0] + p[2] / 2, p[1] + p[3] / 2
        if multi_label and nc > 1:
            rows += [[x1, y1, x2, y2, s, c] for c, s in enumerate(scores) if s > conf_thres]
        else:
            c = max(range(nc), key=lambda k: scores[k])
            if scores[c] > conf_thres:
                rows.append([x1, y1, x2, y2, scores[c], c])
    rows.sort(key=lambda r: -r[4])
    kept = []
    for r in rows:
        suppressed = any(
            (agnostic or k[5] == r[5])
            and box_iou(torch.tensor([k[:4]]), torch.tensor([r[:4]]), eps=0).item() > iou_thres
            for k in kept
        )
        if not suppressed:
            kept.append(r)
    return torch.tensor(kept[:max_det]).reshape(-1, 6)


def _random_predictions(seed, bs=2, n=60, nc=4):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(bs, n, 2, generator=g) * 100
    wh = torch.rand(bs, n, 2, generator=g) * 30 + 5
    obj = torch.rand(bs, n, 1, generator=g)
    cls = torch.rand(bs, n, nc, generator=g)
    return torch.cat((xy, wh, obj, cls), 2)


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("agnostic", [False, True])
def test_nms_matches_greedy_reference(multi_label, agnostic):
    pred = _random_predictions(1)
    before = pred.clone()
    out = non_max_suppression(pred, 0.2, 0.45, multi_label=multi_label, agnostic=agnostic, max_det=300)
    assert torch.equal(pred, before), "NMS must not modify its input"
    assert len(out) == 2
    for image_pred, det in zip(pred, out, strict=True):
        ref = _greedy_nms_reference(image_pred, 0.2, 0.45, multi_label, agnostic, 300)
        assert det.shape == ref.shape and det.shape[0] > 3
        torch.testing.assert_close(det, ref, atol=1e-5, rtol=1e-5)
        assert (det[:, 4].diff() <= 0).all()  # sorted by confidence


def test_nms_semantics_candidates_multilabel_classes_maxdet():
    # box A: obj 0.9, classes 0.8 and 0.5 -> scores 0.72 and 0.45; box B: obj 0.2 (not a candidate)
    pred = torch.tensor(
        [[[50.0, 50, 20, 20, 0.9, 0.8, 0.5], [10, 10, 5, 5, 0.2, 1.0, 1.0], [80, 80, 10, 10, 0.6, 0.1, 0.9]]]
    )
    single = non_max_suppression(pred, conf_thres=0.25)[0]
    assert single[:, 5].tolist() == [0.0, 1.0]
    torch.testing.assert_close(single[:, 4], torch.tensor([0.72, 0.54]))
    torch.testing.assert_close(single[0, :4], torch.tensor([40.0, 40, 60, 60]))
    # multi-label: the same box A appears for both classes (0.45 > 0.25); B still excluded by obj
    multi = non_max_suppression(pred, conf_thres=0.25, multi_label=True)[0]
    assert sorted(zip(multi[:, 5].tolist(), [round(s, 4) for s in multi[:, 4].tolist()], strict=True)) == [
        (0.0, 0.72), (1.0, 0.45), (1.0, 0.54),
    ]  # fmt: skip
    # agnostic multi-label: A's class-1 copy overlaps A's class-0 copy completely and is suppressed
    assert non_max_suppression(pred, 0.25, multi_label=True, agnostic=True)[0].shape[0] == 2
    assert non_max_suppression(pred, 0.25, classes=[1])[0][:, 5].tolist() == [1.0]
    assert non_max_suppression(pred, 0.25, max_det=1)[0].shape == (1, 6)
    assert non_max_suppression(pred, 0.95)[0].shape == (0, 6)
    # a tuple (eval forward's (decoded, raw)) is accepted
    assert non_max_suppression((pred, [None]), 0.25)[0].shape == (2, 6)


def test_nms_single_class_ignores_multi_label_and_handles_empty_batch():
    pred = torch.tensor([[[50.0, 50, 20, 20, 0.9, 0.8], [52, 50, 20, 20, 0.8, 0.9]]])
    out = non_max_suppression(pred, 0.25, 0.45, multi_label=True)[0]
    assert out.shape == (1, 6) and out[0, 4].item() == pytest.approx(0.72)
    empty = non_max_suppression(torch.zeros(3, 0, 85))
    assert [d.shape for d in empty] == [(0, 6)] * 3


def test_nms_class_offset_keeps_overlapping_boxes_of_different_classes():
    pred = torch.tensor([[[50.0, 50, 20, 20, 0.9, 0.9, 0.0], [50, 50, 20, 20, 0.9, 0.0, 0.8]]])
    assert non_max_suppression(pred, 0.25)[0].shape[0] == 2
    assert non_max_suppression(pred, 0.25, agnostic=True)[0].shape[0] == 1


def test_nms_rejects_bad_thresholds():
    with pytest.raises(ValueError):
        non_max_suppression(torch.zeros(1, 1, 6), conf_thres=1.5)


def test_nms_kernel_is_torchvisions_and_skips_the_package_import():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(500, 2, generator=g) * 200
    boxes = torch.cat((xy, xy + 10 + torch.rand(500, 2, generator=g) * 60), 1)
    scores = (torch.rand(500, generator=g) * 20).round() / 20  # many ties: the order among them must agree
    assert torch.equal(nms_kernel()(boxes, scores, 0.45), torchvision.ops.nms(boxes, scores, 0.45))
    # a fresh process that runs NMS never imports the torchvision package (its import pulls in
    # torch._dynamo: seconds of start-up for evaluate and train)
    code = (
        "import sys, torch; from yolo.boxes import non_max_suppression; "
        "p = torch.rand(1, 50, 7); p[..., :2] *= 100; p[..., 2:4] *= 30; "
        "assert non_max_suppression(p, 0.1)[0].shape[0] > 0; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'torch._dynamo')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_nms_keeps_exactly_what_the_class_offset_call_keeps(seed):
    # thousands of candidates over 80 classes, clustered so that boxes overlap, scores with ties, sorted
    # by descending score as non_max_suppression hands them over
    g = torch.Generator().manual_seed(seed)
    n = 6000
    centres = torch.rand(40, 2, generator=g) * 600
    xy = centres[torch.randint(0, 40, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 8
    wh = 20 + torch.rand(n, 2, generator=g) * 80
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), 1)
    scores = (torch.rand(n, generator=g) * 200).round() / 200
    classes = torch.randint(0, 80, (n,), generator=g).float()
    order = scores.argsort(descending=True)
    boxes, scores, classes = boxes[order], scores[order], classes[order]
    assert n >= PER_CLASS_NMS_MIN
    reference = nms_kernel()(boxes + classes[:, None] * 7680, scores, 0.6)  # upstream's single call
    kept = _class_offset_nms(boxes, scores, classes, 0.6, 7680)
    assert 100 < len(kept) < n and torch.equal(kept, reference)
    # a span too wide for the shift to separate classes: the single call, same answer as upstream
    wide = boxes.clone()
    wide[0] += 9000
    assert torch.equal(_class_offset_nms(wide, scores, classes, 0.6, 7680),
                       nms_kernel()(wide + classes[:, None] * 7680, scores, 0.6))
