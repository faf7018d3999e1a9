"""Anchor fit: upstream's metric on known answers, k-means, evolution, anchors.json helpers for train."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from yolo.anchors import (
    AutoAnchorConfig,
    FitnessEvaluator,
    anchors_for_imgsz,
    best_possible_recall,
    check_anchors_inline,
    evolve_anchors,
    fit_anchors,
    fit_figures,
    kmean_anchors,
    kmeans,
    label_wh,
    load_anchors_json,
    model_anchors_px,
    mutations,
    order_levels,
    ratio_metric,
    set_model_anchors,
    to_levels,
)
from yolo.errors import UserError
from yolo.files import write_json

P5_ANCHORS = np.array([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]], float)
STRIDES = [8.0, 16.0, 32.0]


def upstream_metric(wh: np.ndarray, anchors: np.ndarray, thr: float):
    """utils/autoanchor.py check_anchors' metric, in torch, as upstream writes it."""
    wh = torch.tensor(wh).float()
    k = torch.tensor(anchors).float().view(-1, 2)
    r = wh[:, None] / k[None]
    x = torch.min(r, 1 / r).min(2)[0]
    best = x.max(1)[0]
    return float((best > 1 / thr).float().mean()), float((x > 1 / thr).float().sum(1).mean()), best


def dataset(label_wh_px: np.ndarray, imgsz: int = 640, per_image: int = 10):
    """Square imgsz images holding labels of the given pixel sizes: (shapes_hw, labels)."""
    n_img = -(-len(label_wh_px) // per_image)
    shapes = np.full((n_img, 2), imgsz)
    labels = []
    for i in range(n_img):
        wh = label_wh_px[i * per_image:(i + 1) * per_image] / imgsz
        lb = np.zeros((len(wh), 5), np.float32)
        lb[:, 1:3] = 0.5
        lb[:, 3:5] = wh
        labels.append(lb)
    return shapes, labels


def test_bpr_all_boxes_equal_one_anchor_is_one():
    wh = np.tile([[33.0, 23.0]], (50, 1))
    assert best_possible_recall(wh, P5_ANCHORS) == 1.0
    bpr, aat = fit_figures(wh, P5_ANCHORS, 4.0)
    assert bpr == 1.0 and aat == upstream_metric(wh, P5_ANCHORS, 4.0)[1]


def test_bpr_boxes_ten_times_larger_than_every_anchor_is_zero():
    largest = P5_ANCHORS.reshape(-1, 2).max(0)
    wh = largest * 10 * np.linspace(1, 2, 20)[:, None]  # 10x the largest anchor or more on both sides
    assert best_possible_recall(wh, P5_ANCHORS) == 0.0
    assert fit_figures(wh, P5_ANCHORS, 4.0) == (0.0, 0.0)


def test_metric_matches_upstream_formula_on_random_sizes():
    rng = np.random.default_rng(3)
    wh = rng.uniform(1, 600, size=(2000, 2))
    for thr in (4.0, 2.9):
        bpr, aat = fit_figures(wh, P5_ANCHORS, thr)
        ref_bpr, ref_aat, best = upstream_metric(wh, P5_ANCHORS, thr)
        assert bpr == pytest.approx(ref_bpr, abs=1e-7) and aat == pytest.approx(ref_aat, rel=1e-6)
        assert np.array_equal(ratio_metric(wh, P5_ANCHORS).max(1), best.numpy())
        assert 0.0 < bpr < 1.0


def test_fitness_matches_upstream_anchor_fitness_for_a_population():
    rng = np.random.default_rng(4)
    wh = rng.uniform(2, 300, size=(500, 2)).astype(np.float32)
    population = rng.uniform(3, 300, size=(6, 9, 2))
    ours = FitnessEvaluator(wh, 4.0)(population)
    for k, f in zip(population, ours, strict=True):
        best = upstream_metric(wh, k, 4.0)[2]
        assert f == pytest.approx(float((best * (best > 0.25).float()).mean()), abs=1e-6)


def test_label_wh_uses_height_width_shapes_and_long_side_imgsz():
    shapes_hw = np.array([[480, 640], [640, 320]])  # landscape then portrait
    labels = [np.array([[0, 0.5, 0.5, 0.5, 0.5]], np.float32), np.array([[1, 0.5, 0.5, 1.0, 0.25]], np.float32)]
    wh = label_wh(shapes_hw, labels, 640)
    np.testing.assert_allclose(wh, [[320, 240], [320, 160]])
    np.testing.assert_allclose(label_wh(shapes_hw, labels, 320, np.array([[2.0], [1.0]])), [[320, 240], [160, 80]])


def test_kmeans_finds_separated_clusters_and_refuses_too_few_points():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([c + rng.normal(0, 0.1, size=(40, 2)) for c in centres])
    code, dist = kmeans(points, 3, np.random.default_rng(1))
    nearest = np.linalg.norm(centres[:, None] - code[None], axis=2)  # (true, found)
    assert sorted(nearest.argmin(1)) == [0, 1, 2] and nearest.min(1).max() < 0.05
    assert 0.05 < dist < 0.2
    assert kmeans(points[:2], 3, np.random.default_rng(1)) is None


def test_mutations_change_something_and_stay_in_upstream_range():
    v = mutations(np.random.default_rng(0), 500, (9, 2))
    assert v.shape == (500, 9, 2) and v.min() >= 0.3 and v.max() <= 3.0
    assert not (v == 1).reshape(500, -1).all(1).any()
    assert 0.8 < (v != 1).mean() < 0.95  # each gene mutates with p = 0.9


def long_thin_boxes(n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.uniform(250, 450, n)
    return np.stack([w, w / rng.uniform(30, 40, n)], 1)  # ~35:1: no P5 anchor is within 4x on both sides


def test_evolution_raises_bpr_on_long_thin_boxes_above_target():
    shapes, labels = dataset(long_thin_boxes())
    fit = fit_anchors(shapes, labels, P5_ANCHORS, STRIDES, AutoAnchorConfig(generations=200))
    assert fit.bpr_before < 0.98 and fit.evolved and fit.changed
    assert fit.bpr_after >= 0.98 and fit.bpr_after > fit.bpr_before
    assert fit.anchors.shape == (3, 6)
    area = fit.anchors.reshape(-1, 2).prod(1)
    assert np.all(np.diff(area) >= 0)  # small to large, three per level
    assert (fit.anchors.reshape(-1, 2)[:, 0] > fit.anchors.reshape(-1, 2)[:, 1]).mean() > 0.5  # wide anchors


def test_evolution_improves_fitness_and_returns_the_fittest_run():
    rng = np.random.default_rng(1)
    w = rng.uniform(120, 200, 300)
    wh = np.stack([w, w / rng.uniform(7, 9, 300)], 1).astype(np.float32)  # ~8:1: the P5 anchors fit some
    fitness = FitnessEvaluator(wh, 4.0)
    start = P5_ANCHORS.reshape(-1, 2)
    f0 = float(fitness(start)[0])
    k1, f1 = evolve_anchors(start, fitness, 150, 1, np.random.default_rng(0))
    k8, f8 = evolve_anchors(start, fitness, 150, 8, np.random.default_rng(0))
    assert f1 > f0 and f8 > f0
    assert f1 == pytest.approx(float(fitness(k1)[0])) and f8 == pytest.approx(float(fitness(k8)[0]))
    assert k8.min() >= 2.0  # anchors never shrink below upstream's 2 px floor


def test_good_anchors_are_kept_without_evolution_and_force_evolves():
    shapes, labels = dataset(np.tile([[33.0, 23.0], [59.0, 119.0]], (50, 1)))
    fit = fit_anchors(shapes, labels, P5_ANCHORS, STRIDES, AutoAnchorConfig(generations=20))
    assert fit.bpr_before == 1.0 and not fit.evolved and not fit.changed
    np.testing.assert_array_equal(fit.anchors, P5_ANCHORS)
    forced = fit_anchors(shapes, labels, P5_ANCHORS, STRIDES, AutoAnchorConfig(generations=20, force=True))
    assert forced.evolved and not forced.changed  # BPR cannot beat 1.0: keep the originals
    assert forced.bpr_after == 1.0


def test_fit_is_deterministic_and_seed_dependent():
    shapes, labels = dataset(long_thin_boxes(200))
    config = AutoAnchorConfig(generations=60)
    a = json.dumps(fit_anchors(shapes, labels, P5_ANCHORS, STRIDES, config).to_json(), sort_keys=True)
    b = json.dumps(fit_anchors(shapes, labels, P5_ANCHORS, STRIDES, config).to_json(), sort_keys=True)
    c = json.dumps(fit_anchors(shapes, labels, P5_ANCHORS, STRIDES,
                               AutoAnchorConfig(generations=60, seed=1)).to_json(), sort_keys=True)
    assert a == b and a != c


def test_too_few_labels_fall_back_to_random_init():
    wh0 = np.array([[30.0, 40.0], [50.0, 20.0], [1.0, 1.0]])  # 2 usable points for 9 anchors
    k = kmean_anchors(wh0, 9, 640, generations=10, rng=np.random.default_rng(0))
    assert k.shape == (9, 2) and np.all(k >= 0) and np.all(np.diff(k.prod(1)) >= 0)


def test_no_labels_is_a_user_error():
    shapes, labels = np.full((2, 2), 640), [np.zeros((0, 5), np.float32)] * 2
    with pytest.raises(UserError, match="no labels"):
        fit_anchors(shapes, labels, P5_ANCHORS, STRIDES)


def test_levels_follow_stride_order():
    k = P5_ANCHORS.reshape(-1, 2)[::-1]
    np.testing.assert_array_equal(to_levels(k, 3, STRIDES), P5_ANCHORS)
    np.testing.assert_array_equal(order_levels(P5_ANCHORS, [32, 16, 8]), P5_ANCHORS[::-1])
    np.testing.assert_array_equal(order_levels(P5_ANCHORS, STRIDES), P5_ANCHORS)


# ------------------------------------------------------------------------------------------------ train helpers
def test_anchors_json_round_trip_and_rescale(tmp_path, caplog):
    shapes, labels = dataset(long_thin_boxes(100))
    fit = fit_anchors(shapes, labels, P5_ANCHORS, STRIDES, AutoAnchorConfig(generations=30))
    write_json(tmp_path / "anchors.json", fit.to_json())
    imgsz, anchors = load_anchors_json(tmp_path / "anchors.json")
    assert imgsz == 640 and anchors.shape == (3, 6)
    np.testing.assert_allclose(anchors, fit.anchors, atol=1e-4)
    with caplog.at_level(logging.INFO, logger="yolo.anchors"):
        half = anchors_for_imgsz(anchors, 640, 320)
    np.testing.assert_allclose(half, anchors / 2)
    assert "rescaled" in caplog.text and "320" in caplog.text
    assert anchors_for_imgsz(anchors, 640, 640) is not None


@pytest.mark.parametrize("content, message", [
    ("{not json", "line 1"),
    ("[1, 2]", "imgsz"),
    ('{"imgsz": 640}', "imgsz"),
    ('{"imgsz": -1, "anchors": [[1, 2]]}', "positive integer"),
    ('{"imgsz": 640, "anchors": [[1, 2, 3]]}', "even length"),
    ('{"imgsz": 640, "anchors": [[1, 2], [1, 2, 3, 4]]}', "equal"),
    ('{"imgsz": 640, "anchors": [[1, 0]]}', "positive"),
    ('{"imgsz": 640, "anchors": [["a", 2]]}', "rows"),
    ('{"imgsz": 640, "anchors": [[1, 2]], "strides": [8, 16]}', "strides"),
])
def test_malformed_anchors_json_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "anchors.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        load_anchors_json(path)
    assert str(path) in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_anchors_json(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def yolov5n_model():
    from yolo.model.cfg import load_cfg
    from yolo.model.yolo import DetectionModel

    return DetectionModel(load_cfg("yolov5n.yaml"))


def test_model_anchor_round_trip(yolov5n_model):
    anchors, strides = model_anchors_px(yolov5n_model)
    assert strides == STRIDES
    np.testing.assert_allclose(anchors, P5_ANCHORS)
    new = P5_ANCHORS * 1.5
    set_model_anchors(yolov5n_model, new)
    np.testing.assert_allclose(model_anchors_px(yolov5n_model)[0], new, rtol=1e-6)
    np.testing.assert_allclose(yolov5n_model.model[-1].anchors.numpy(),
                               (new.reshape(3, 3, 2) / np.array(STRIDES)[:, None, None]), rtol=1e-6)
    set_model_anchors(yolov5n_model, new[::-1])  # given large-to-small: flipped back to the stride order
    np.testing.assert_allclose(model_anchors_px(yolov5n_model)[0], new, rtol=1e-6)
    with pytest.raises(UserError, match="do not fit"):
        set_model_anchors(yolov5n_model, np.ones((2, 6)))
    set_model_anchors(yolov5n_model, P5_ANCHORS)


def test_check_anchors_inline_writes_better_anchors_into_the_model(yolov5n_model):
    shapes, labels = dataset(long_thin_boxes(200))
    index = SimpleNamespace(shapes=shapes, labels=labels)
    fit = check_anchors_inline(yolov5n_model, index, imgsz=640, generations=60)
    try:
        assert fit.changed and fit.bpr_after > fit.bpr_before
        np.testing.assert_allclose(model_anchors_px(yolov5n_model)[0], fit.anchors, rtol=1e-5)
    finally:
        set_model_anchors(yolov5n_model, P5_ANCHORS)


def test_level_order_is_checked_in_pixels_not_stride_units(yolov5n_model):
    # mean areas 100 < 144 < 196 px^2 rise with the strides, but in stride units (/64, /256, /1024) they
    # fall: an order check after dividing by the strides would wrongly flip these levels
    similar = np.array([[10, 10] * 3, [12, 12] * 3, [14, 14] * 3], float)
    try:
        set_model_anchors(yolov5n_model, similar)
        np.testing.assert_allclose(model_anchors_px(yolov5n_model)[0], similar, rtol=1e-6)
    finally:
        set_model_anchors(yolov5n_model, P5_ANCHORS)
