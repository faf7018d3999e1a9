"""Metric math against hand-computed cases and against pycocotools."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from yolo.boxes import box_iou
from yolo.metrics import (
    IOU_THRESHOLDS,
    ConfusionMatrix,
    ap_per_class,
    compute_ap,
    fitness,
    match_predictions,
    smooth,
)

# Upstream's sentinel (precision 0 at recall 1) makes the last of the 101 points 0, so a perfect curve
# integrates to 1 - 0.5/100 = 0.995: val.py reports 0.995 for perfect predictions, and so do we.
PERFECT_AP = 0.995


def _iou(labels_xyxy, preds_xyxy):
    return box_iou(np.asarray(labels_xyxy, np.float32), np.asarray(preds_xyxy, np.float32))


def test_iou_thresholds_are_upstreams_float32_linspace():
    assert IOU_THRESHOLDS.dtype == np.float32
    assert IOU_THRESHOLDS[0] == np.float32(0.5) and IOU_THRESHOLDS[-1] == np.float32(0.95)
    assert len(IOU_THRESHOLDS) == 10


def test_perfect_predictions_give_perfect_ap_p_r():
    labels = np.array([[0, 0, 10, 10], [20, 20, 40, 50], [5, 30, 15, 45]], np.float32)
    cls = np.array([0, 0, 0])
    correct = match_predictions(_iou(labels, labels), cls, cls)
    assert correct.all()
    res = ap_per_class(correct, np.array([0.9, 0.8, 0.7], np.float32), cls, cls)
    np.testing.assert_allclose(res.ap, PERFECT_AP)
    assert res.precision[0] == pytest.approx(1.0) and res.recall[0] == pytest.approx(1.0)
    assert res.tp[0] == 3 and res.fp[0] == 0
    assert fitness(res.ap50.mean(), res.ap50_95.mean()) == pytest.approx(PERFECT_AP)


def test_no_predictions_give_zero():
    res = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.array([0, 0, 1]))
    assert list(res.classes) == [0, 1]
    assert (res.ap == 0).all() and (res.precision == 0).all() and (res.recall == 0).all()


def test_duplicate_prediction_is_a_false_positive_and_lowers_ap():
    labels = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 0, 120, 30]], np.float32)
    preds = np.array([[0, 0, 10, 10], [0.5, 0, 10, 10], [50, 50, 60, 60], [100, 0, 120, 30]], np.float32)
    cls3, cls4 = np.zeros(3), np.zeros(4)
    correct = match_predictions(_iou(labels, preds), cls3, cls4)
    assert correct[:, 0].tolist() == [True, False, True, True]  # the second box on label 0 is a duplicate
    res = ap_per_class(correct, np.array([0.9, 0.8, 0.7, 0.6], np.float32), cls4, cls3)
    # recall 1/3, 1/3, 2/3, 1 and precision 1, 1/2, 2/3, 3/4 -> envelope 1 up to recall 1/3, then 3/4:
    # 34 grid points at 1, 66 at 0.75, the last at 0 -> trapezoid 0.01 * (34 + 49.5 - 0.5) = 0.83
    assert res.ap[0, 0] == pytest.approx(0.83)
    without_duplicate = ap_per_class(correct[[0, 2, 3]], np.array([0.9, 0.7, 0.6], np.float32), cls3, cls3)
    assert without_duplicate.ap[0, 0] == pytest.approx(PERFECT_AP)


def test_class_confusion_is_not_a_true_positive():
    labels = np.array([[0, 0, 10, 10]], np.float32)
    iou = _iou(labels, labels)
    correct = match_predictions(iou, np.array([1]), np.array([2]))
    assert not correct.any()
    res = ap_per_class(correct, np.array([0.9], np.float32), np.array([2]), np.array([1]))
    assert list(res.classes) == [1]  # the predicted class has no labels: not part of the mean
    assert res.ap[0, 0] == 0
    cm = ConfusionMatrix(nc=3)
    cm.update(iou, np.array([1]), np.array([2]), np.array([0.9]))
    expected = np.zeros((4, 4), int)
    expected[2, 1] = 1  # predicted 2, true 1
    np.testing.assert_array_equal(cm.matrix, expected)


def test_label_goes_to_the_more_confident_prediction_not_the_better_iou():
    # upstream's second np.unique keeps the first prediction (NMS order = confidence) per label
    label = np.array([[0, 0, 100, 100]], np.float32)
    preds = np.array([[0, 0, 100, 62], [0, 0, 100, 92]], np.float32)  # IoU 0.62 then 0.92
    correct = match_predictions(_iou(label, preds), np.zeros(1), np.zeros(2))
    at = {round(float(t), 2): i for i, t in enumerate(IOU_THRESHOLDS)}
    assert correct[:, at[0.5]].tolist() == [True, False]
    assert correct[:, at[0.6]].tolist() == [True, False]
    assert correct[:, at[0.65]].tolist() == [False, True]  # only the second clears 0.65
    assert correct[:, at[0.9]].tolist() == [False, True]
    assert correct[:, at[0.95]].tolist() == [False, False]


def test_iou_threshold_is_inclusive():
    label = np.array([[0, 0, 100, 100]], np.float32)
    pred = np.array([[0, 0, 100, 50]], np.float32)  # IoU exactly 0.5 (up to eps)
    iou = np.array([[0.5]], np.float32)
    assert match_predictions(iou, np.zeros(1), np.zeros(1))[0, 0]
    assert not match_predictions(np.nextafter(iou, 0), np.zeros(1), np.zeros(1))[0, 0]
    assert _iou(label, pred)[0, 0] == pytest.approx(0.5)


def test_compute_ap_simple_curve_and_smooth():
    ap, mpre, mrec = compute_ap(np.array([0.25, 0.5]), np.array([1.0, 0.5]))
    # envelope (0, 1) (0.25, 1) (0.5, 0.5) then the sentinel (1, 0); np.interp joins them linearly and the
    # breakpoints sit on the 101-point grid, so the trapezoid is exact: 0.25 + 0.1875 + 0.125
    assert ap == pytest.approx(0.5625)
    assert mrec[0] == 0 and mrec[-1] == 1 and mpre[-1] == 0
    y = np.full(1000, 0.3)
    np.testing.assert_allclose(smooth(y, 0.1), y)
    step = np.r_[np.zeros(500), np.ones(500)]
    s = smooth(step, 0.1)
    assert len(s) == 1000 and s[0] == 0 and s[-1] == 1 and s[500] == pytest.approx(51 / 101)


def test_precision_recall_reported_at_best_mean_f1():
    # one class, 4 labels: 2 confident TPs, then a confident FP, then low-confidence FPs
    tp = np.array([1, 1, 0, 0, 0], bool)[:, None].repeat(10, 1)
    conf = np.array([0.9, 0.8, 0.7, 0.2, 0.1], np.float32)
    res = ap_per_class(tp, conf, np.zeros(5), np.zeros(4))
    assert res.recall[0] == pytest.approx(0.5)
    # the curves are linear in confidence between predictions: precision falls from 1 at 0.8 to 2/3 at 0.7,
    # and the box-filtered mean F1 peaks in between, where recall is already 0.5 but precision not yet 2/3
    assert 0.7 < res.best_conf < 0.8
    assert res.precision[0] == pytest.approx(2 / 3 + (res.best_conf - 0.7) / 0.1 / 3, rel=1e-6)
    assert res.f1[0] == pytest.approx(2 * res.precision[0] * 0.5 / (res.precision[0] + 0.5))
    assert res.tp[0] == 2 and res.fp[0] == 0


def test_confusion_matrix_background_rows():
    labels = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    preds = np.array([[0, 0, 10, 10], [80, 80, 90, 90], [50, 50, 60, 60]], np.float32)
    cm = ConfusionMatrix(nc=2)
    # the third detection is below the 0.25 confidence floor: label 1 is missed
    cm.update(_iou(labels, preds), np.array([0, 1]), np.array([0, 1, 1]), np.array([0.9, 0.8, 0.1]))
    cm.update_missed(np.array([1]))
    expected = np.zeros((3, 3), int)
    expected[0, 0] = 1  # matched
    expected[2, 1] = 2  # label 1 missed twice (background row)
    expected[1, 2] = 1  # detection of class 1 on nothing (background column)
    np.testing.assert_array_equal(cm.matrix, expected)
    np.testing.assert_allclose(cm.normalized().sum(0)[cm.matrix.sum(0) > 0], 1.0)


# ------------------------------------------------------------------------------- pycocotools check
def _synthetic_detections(seed: int = 0, n_images: int = 12, nc: int = 3, miss: float = 0.0):
    """Per image: labels; a close detection of each (unless missed), a looser duplicate of some,
    wrong-class copies and background false positives, all with random scores, sorted as NMS leaves them."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images):
        n = rng.integers(1, 7)
        xy = rng.uniform(0, 400, (n, 2))
        gt = np.c_[xy, xy + rng.uniform(40, 120, (n, 2))].astype(np.float32)
        gt_cls = rng.integers(0, nc, n)
        found = rng.uniform(size=n) >= miss
        dup = rng.uniform(size=n) < 0.3
        wrong = rng.uniform(size=n) < 0.2
        n_fp = rng.integers(0, 4)
        fp_xy = rng.uniform(0, 400, (n_fp, 2))
        det = np.r_[gt[found] + rng.normal(0, 2, (found.sum(), 4)),
                    gt[dup] + rng.normal(0, 8, (dup.sum(), 4)),
                    gt[wrong] + rng.normal(0, 2, (wrong.sum(), 4)),
                    np.c_[fp_xy, fp_xy + rng.uniform(20, 100, (n_fp, 2))]].astype(np.float32)
        det_cls = np.r_[gt_cls[found], gt_cls[dup], (gt_cls[wrong] + 1) % nc, rng.integers(0, nc, n_fp)]
        score = rng.uniform(0.05, 1, len(det)).astype(np.float32)
        order = np.argsort(-score, kind="stable")
        images.append((gt, gt_cls, det[order], det_cls[order], score[order]))
    return images


def _ours_and_coco(images, nc):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    stats, gt_ann, dets = [], [], []
    for img_id, (gt, gt_cls, det, det_cls, score) in enumerate(images, 1):
        correct = match_predictions(box_iou(gt, det), gt_cls, det_cls)
        stats.append((correct, score, det_cls, gt_cls))
        for b, c in zip(gt.tolist(), gt_cls.tolist(), strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            gt_ann.append({"id": len(gt_ann) + 1, "image_id": img_id, "category_id": c + 1,
                           "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
        for b, c, s in zip(det.tolist(), det_cls.tolist(), score.tolist(), strict=True):
            dets.append({"image_id": img_id, "category_id": c + 1, "score": s,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    tp, conf, pcls, tcls = (np.concatenate(x) for x in zip(*stats, strict=True))
    ours = ap_per_class(tp, conf, pcls, tcls)

    coco = COCO()
    coco.dataset = {"images": [{"id": i, "width": 600, "height": 600} for i in range(1, len(images) + 1)],
                    "annotations": gt_ann, "categories": [{"id": c + 1, "name": str(c)} for c in range(nc)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    per_class = evaluator.eval["precision"][0, :, :, 0, 2]  # IoU .5, recall grid, class, all areas, 100 dets
    return ours, evaluator.stats[1], np.where(per_class < 0, 0, per_class).mean(0)


def test_ap50_agrees_with_pycocotools():
    pytest.importorskip("pycocotools")
    ours, coco_ap50, coco_per_class = _ours_and_coco(_synthetic_detections(seed=0), nc=3)
    assert (ours.recall > 0).all() and 0.3 < ours.ap50.mean() < 0.95  # a non-trivial case
    # every label is found eventually, so the two differ only in integration (trapezoid over the
    # 101-point envelope vs its mean) and in tie handling
    assert ours.ap50.mean() == pytest.approx(coco_ap50, abs=0.01)
    np.testing.assert_allclose(ours.ap50, coco_per_class, atol=0.015)


def test_ap50_exceeds_pycocotools_when_labels_are_missed():
    # upstream's (recall 1, precision 0) sentinel is joined linearly to the last real point, so missed
    # labels still add area past the highest recall, where COCO counts none: we keep upstream's number
    pytest.importorskip("pycocotools")
    ours, coco_ap50, _ = _ours_and_coco(_synthetic_detections(seed=1, miss=0.3), nc=3)
    assert ours.ap50.mean() > coco_ap50 + 0.01
