"""The evaluate step: geometry end to end with an exact stand-in model, outputs, the gate, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from yolo.data.dataset import load_data_config, load_split
from yolo.errors import UserError
from yolo.evaluate import (
    EvalConfig,
    confusion_document,
    evaluate_model,
    format_table,
    metrics_document,
    per_class_csv,
    pr_curve_csv,
    promotion_gate,
    read_baseline,
)
from yolo.metrics import fitness

PERFECT_AP = 0.995  # upstream's AP for a perfect PR curve (see test_metrics)
COLOURS_BGR = [(0, 0, 255), (0, 255, 0), (255, 0, 0)]  # class 0 red, 1 green, 2 blue (as RGB)
NAMES = ["red", "green", "blue"]

# (height, width, [(class, x1, y1, x2, y2) in pixels]); even coordinates so a 2x INTER_AREA shrink is exact
IMAGES = [
    (96, 128, [(0, 10, 20, 50, 60), (2, 70, 10, 120, 40)]),
    (128, 96, [(1, 4, 4, 40, 100)]),
    (128, 128, [(0, 60, 60, 100, 126), (1, 2, 2, 30, 30), (2, 90, 6, 126, 40)]),
    (64, 128, [(2, 20, 10, 80, 54)]),
    (128, 64, [(0, 10, 70, 50, 120)]),
    (112, 128, []),  # background image
]


def _write_dataset(root: Path, images=IMAGES) -> Path:
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for i, (h, w, boxes) in enumerate(images):
        im = np.full((h, w, 3), 90, np.uint8)
        rows = []
        for c, x1, y1, x2, y2 in boxes:
            im[y1:y2, x1:x2] = COLOURS_BGR[c]
            rows.append(f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
        cv2.imwrite(str(root / "images" / "val" / f"{i + 1:012d}.png"), im)
        (root / "labels" / "val" / f"{i + 1:012d}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    yaml = root / "data.yaml"
    yaml.write_text(f"path: .\ntrain: images/val\nval: images/val\nnames: {NAMES}\n")
    return yaml


class ColourBoxModel(nn.Module):
    """A stand-in detector that is exactly right: one box per pure-colour rectangle, its class the colour.

    It sees only the network input, so it checks what evaluation feeds a model (RGB order, 0..1 scale,
    letterbox geometry) and how predictions are mapped back to the original image.
    """

    def __init__(self, nc: int = 3):
        super().__init__()
        self.nc = nc
        self.scale = nn.Parameter(torch.ones(1))  # gives the evaluator a dtype to follow
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor):
        self.calls.append(tuple(x.shape))
        bs, _, h, w = x.shape
        rows = []
        for c in range(self.nc):
            others = [k for k in range(3) if k != c]
            mask = (x[:, c] > 0.9) & (x[:, others].amax(1) < 0.1)  # (bs, h, w)
            cols, lines = mask.any(1), mask.any(2)
            x1 = cols.float().argmax(1)
            x2 = w - cols.flip(1).float().argmax(1)
            y1 = lines.float().argmax(1)
            y2 = h - lines.flip(1).float().argmax(1)
            found = cols.any(1).float()
            row = torch.zeros(bs, 5 + self.nc)
            row[:, 0], row[:, 1] = (x1 + x2) / 2, (y1 + y2) / 2
            row[:, 2], row[:, 3] = x2 - x1, y2 - y1
            row[:, 4] = 0.9 * found
            row[:, 5 + c] = 1.0
            rows.append(row)
        return torch.stack(rows, 1) * self.scale, None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    yaml = _write_dataset(tmp_path_factory.mktemp("colour"))
    return load_split(load_data_config(yaml), "val")


@pytest.mark.parametrize("imgsz", [128, 64])  # 64: every image is shrunk 2x (INTER_AREA) first
def test_exact_model_scores_perfect_through_rect_letterbox_and_rescale(dataset, imgsz):
    model = ColourBoxModel()
    config = EvalConfig(imgsz=imgsz, batch_size=2, micro_batch=1, workers=2, collect_predictions=True)
    result = evaluate_model(model, dataset, config, "cpu", NAMES)
    assert result.map50 == pytest.approx(PERFECT_AP) and result.map50_95 == pytest.approx(PERFECT_AP)
    assert result.precision == pytest.approx(1.0) and result.recall == pytest.approx(1.0)
    assert result.fitness == pytest.approx(fitness(PERFECT_AP, PERFECT_AP))
    assert result.images == 6 and result.instances == 8
    assert [(c.class_id, c.name, c.images, c.instances) for c in result.per_class] == [
        (0, "red", 3, 3), (1, "green", 2, 2), (2, "blue", 3, 3)]
    # rect batches of 2: each pair shares one padded shape, a multiple of 32 (upstream pad 0.5)
    assert all(h % 32 == 0 and w % 32 == 0 and max(h, w) <= imgsz + 32 for _, _, h, w in model.calls)
    # COCO export: numeric stems as image ids, category = class index, boxes in original pixels
    by_image = {}
    for p in result.predictions:
        by_image.setdefault(p["image_id"], []).append(p)
    for i, (_, _, boxes) in enumerate(IMAGES):
        got = sorted((p["category_id"], *p["bbox"]) for p in by_image.get(i + 1, []))
        want = sorted((c, x1, y1, x2 - x1, y2 - y1) for c, x1, y1, x2, y2 in boxes)
        np.testing.assert_allclose(np.array(got, float).reshape(-1, 5), np.array(want, float).reshape(-1, 5),
                                   atol=1e-3)
    assert {p["score"] for p in result.predictions} == {0.9}
    matrix = result.confusion.matrix
    assert np.diag(matrix)[:3].tolist() == [3, 2, 3] and matrix.sum() == 8


def test_micro_batches_and_threads_do_not_change_numbers(dataset):
    results = []
    for micro, workers in ((1, 1), (2, 3), (0, 2)):
        config = EvalConfig(imgsz=64, batch_size=4, micro_batch=micro, workers=workers)
        results.append(evaluate_model(ColourBoxModel(), dataset, config, "cpu", NAMES))
    assert len({(r.map50, r.map50_95, r.precision, r.recall) for r in results}) == 1


def test_trainer_use_restores_mode_and_writes_nothing(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ColourBoxModel().train()
    result = evaluate_model(model, dataset, EvalConfig(imgsz=64, batch_size=32), "cpu", NAMES)
    assert model.training
    assert result.predictions == [] and list(tmp_path.iterdir()) == []
    assert result.maps.shape == (3,) and result.maps == pytest.approx(PERFECT_AP)
    assert set(result.speed_ms) == {"preprocess", "inference", "nms"}


def test_wrong_classes_score_zero_and_fill_the_confusion_matrix(dataset):
    class Shifted(ColourBoxModel):
        def forward(self, x):
            out, _ = super().forward(x)
            return torch.cat([out[..., :5], out[..., 5:].roll(1, -1)], -1), None  # class c -> c+1

    result = evaluate_model(Shifted(), dataset, EvalConfig(imgsz=128, batch_size=2), "cpu", NAMES)
    assert result.map50 == 0 and result.precision == 0 and result.recall == 0
    matrix = result.confusion.matrix
    assert matrix[1, 0] == 3 and matrix[2, 1] == 2 and matrix[0, 2] == 3 and np.trace(matrix) == 0


def test_single_cls_folds_classes(dataset):
    class Shifted(ColourBoxModel):
        def forward(self, x):
            out, _ = super().forward(x)
            return torch.cat([out[..., :5], out[..., 5:].roll(1, -1)], -1), None

    config = EvalConfig(imgsz=128, batch_size=2, single_cls=True)
    result = evaluate_model(Shifted(), dataset, config, "cpu", NAMES)
    assert result.map50 == pytest.approx(PERFECT_AP)
    assert [(c.class_id, c.name, c.images, c.instances) for c in result.per_class] == [(0, "item", 5, 8)]


def test_outputs_documents_and_plots(dataset, tmp_path):
    config = EvalConfig(imgsz=64, batch_size=2, collect_predictions=True)
    result = evaluate_model(ColourBoxModel(), dataset, config, "cpu", NAMES, out_dir=tmp_path, plots=True)
    for name in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"

    doc = metrics_document(result, dataset.fingerprint, "v1", "w.pt")
    contract = {"precision", "recall", "map50", "map50_95", "fitness", "images", "instances", "speed_ms",
                "per_class", "dataset_fingerprint", "data_version", "weights"}
    assert contract <= set(doc) and doc["data_version"] == "v1" and doc["dataset_fingerprint"] == dataset.fingerprint
    assert set(doc["per_class"][0]) == {"class", "name", "images", "instances", "precision", "recall", "map50",
                                        "map50_95"}
    json.dumps(doc)  # plain JSON types only

    rows = list(csv.reader(per_class_csv(result).splitlines()))
    assert rows[0][:2] == ["class", "name"] and [r[1] for r in rows[1:]] == NAMES
    pr = list(csv.reader(pr_curve_csv(result).splitlines()))
    assert pr[0] == ["recall", "all", *NAMES] and len(pr) == 102
    precision = np.array(pr[1:], float)
    assert (precision[:-1, 1] == 1).all() and precision[-1, 1] == 0  # perfect until the (1, 0) sentinel
    assert np.trapezoid(precision[:, 1], precision[:, 0]) == pytest.approx(result.map50)

    cm = confusion_document(result)
    assert cm["labels"] == [*NAMES, "background"] and cm["rows"] == "true"
    assert np.array(cm["matrix"]).shape == (4, 4) and np.trace(np.array(cm["matrix"])) == 8
    table = format_table(result).splitlines()
    assert table[0].split() == ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"]
    assert table[1].split()[:3] == ["all", "6", "8"] and len(table) == 2 + 3


def test_no_labels_gives_zeros_and_still_plots(tmp_path):
    yaml = _write_dataset(tmp_path / "d", [(64, 64, []), (64, 96, [])])
    index = load_split(load_data_config(yaml), "val")
    result = evaluate_model(ColourBoxModel(), index, EvalConfig(imgsz=64), "cpu", NAMES, out_dir=tmp_path,
                            plots=True)
    assert (result.map50, result.instances, result.per_class) == (0, 0, [])
    assert (tmp_path / "PR_curve.png").exists()
    assert pr_curve_csv(result).splitlines()[0] == "recall,all"


# --------------------------------------------------------------------------------------------- gate
def _metrics(map50, map50_95, per_class):
    return {"map50": map50, "map50_95": map50_95, "fitness": fitness(map50, map50_95),
            "per_class": [{"class": c, "name": f"c{c}", "map50_95": v} for c, v in per_class]}


def test_gate_without_conditions_does_not_promote_unless_asked():
    gate = promotion_gate(_metrics(0.99, 0.9, [(0, 0.9)]))
    assert not gate["promote"] and gate["baseline"] is None and gate["regressed_classes"] == []
    assert gate["reasons"] == ["no gate configured (--min-map50, --baseline): not promoted "
                               "(--promote-without-gate to promote)"]
    assert gate["delta"] == {"map50": None, "map50_95": None, "fitness": None}
    asked = promotion_gate(_metrics(0.01, 0.0, []), promote_without_gate=True)
    assert asked["promote"] and "promoted (--promote-without-gate)" in asked["reasons"][0]
    # a criterion decides by itself; the flag only matters when there is none
    assert not promotion_gate(_metrics(0.5, 0.3, []), min_map50=0.6, promote_without_gate=True)["promote"]


def test_gate_min_map50():
    assert not promotion_gate(_metrics(0.5, 0.3, []), min_map50=0.6)["promote"]
    gate = promotion_gate(_metrics(0.5, 0.3, []), min_map50=0.5)
    assert gate["promote"] and gate["min_map50"] == 0.5 and "mAP50" in gate["reasons"][0]


def test_gate_same_model_promotes_with_zero_delta():
    m = _metrics(0.5, 0.3, [(0, 0.3), (1, 0.2)])
    gate = promotion_gate(m, m, "base/metrics.json")
    assert gate["promote"] and gate["regressed_classes"] == [] and gate["baseline"] == "base/metrics.json"
    assert gate["delta"] == {"map50": 0.0, "map50_95": 0.0, "fitness": 0.0}


def test_gate_class_regression_blocks_even_when_fitness_rises():
    before = _metrics(0.5, 0.30, [(0, 0.40), (1, 0.20), (2, 0.30)])
    after = _metrics(0.6, 0.35, [(0, 0.34), (1, 0.26), (2, 0.36)])  # class 0 drops 0.06 > 0.05
    gate = promotion_gate(after, before, "b.json")
    assert not gate["promote"]
    assert gate["regressed_classes"] == [{"class": 0, "name": "c0", "before": 0.40, "after": 0.34}]
    assert gate["delta"]["fitness"] == pytest.approx(fitness(0.6, 0.35) - fitness(0.5, 0.30))
    assert promotion_gate(after, before, "b.json", max_class_drop=0.1)["promote"]


def test_gate_lower_fitness_blocks():
    gate = promotion_gate(_metrics(0.5, 0.29, [(0, 0.29)]), _metrics(0.5, 0.30, [(0, 0.30)]), "b.json")
    assert not gate["promote"] and gate["regressed_classes"] == []
    assert any("fitness" in r for r in gate["reasons"])


def test_read_baseline_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_baseline(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{\n  oops")
    with pytest.raises(UserError, match="line 2"):
        read_baseline(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"ok": true}')
    with pytest.raises(UserError, match="missing map50"):
        read_baseline(tmp_path / "other.json")


# ---------------------------------------------------------------------------------------------- CLI
def test_step_in_process_writes_everything_then_fails_min_map50(tmp_path, monkeypatch, capsys):
    import yolo.model.checkpoint
    from yolo.cli import main

    yaml = _write_dataset(tmp_path / "d")
    (tmp_path / "d" / "images" / "val" / "000000000099.png").write_bytes(b"not an image")  # skipped, reported
    model = ColourBoxModel()
    model.detect = type("DetectInfo", (), {"nc": 3})()
    monkeypatch.setattr(yolo.model.checkpoint, "load_model", lambda weights, device, fuse=False: (model, {}))
    out = tmp_path / "out"
    code = main(["evaluate", "--data", str(yaml), "--weights", "stand-in.pt", "--out", str(out), "--imgsz", "64",
                 "--device", "cpu", "--data-version", "dvc-md5", "--min-map50", "0.999"])
    captured = capsys.readouterr()
    assert code == 2 and "below --min-map50" in captured.err.strip().splitlines()[-1]
    assert captured.out.splitlines()[0].split()[:2] == ["Class", "Images"] and "blue" in captured.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["map50"] == pytest.approx(PERFECT_AP) and metrics["images"] == 6
    assert metrics["skipped_images"] == ["images/val/000000000099.png"]
    assert metrics["data_version"] == "dvc-md5" and metrics["weights"] == "stand-in.pt"
    gate = json.loads((out / "gate.json").read_text())
    assert gate["promote"] is False and gate["min_map50"] == 0.999
    assert json.loads((out / "image_ids.json").read_text())["images/val/000000000001.png"] == 1
    assert len(json.loads((out / "predictions.json").read_text())) == 8
    for name in ("per_class.csv", "pr_curve.csv", "confusion_matrix.json", "PR_curve.png", "confusion_matrix.png"):
        assert (out / name).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing behind

    # the same model against its own metrics as baseline: promoted, exit 0
    code = main(["evaluate", "--data", str(yaml), "--weights", "stand-in.pt", "--out", str(tmp_path / "again"),
                 "--imgsz", "64", "--device", "cpu", "--baseline", str(out / "metrics.json")])
    assert code == 0
    gate = json.loads((tmp_path / "again" / "gate.json").read_text())
    assert gate["promote"] and gate["delta"]["fitness"] == 0 and gate["regressed_classes"] == []


def test_cli_bad_device_and_empty_split_exit_2(cli, tmp_path):
    yaml = _write_dataset(tmp_path / "d")
    r = cli("evaluate", "--data", yaml, "--weights", "none.pt", "--out", tmp_path / "o", "--device", "7")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "device" in r.stderr
    empty = tmp_path / "empty"
    (empty / "images" / "val").mkdir(parents=True)
    (empty / "data.yaml").write_text("path: .\ntrain: images/val\nval: images/val\nnames: [a]\n")
    r = cli("evaluate", "--data", empty / "data.yaml", "--weights", "none.pt", "--out", tmp_path / "o2",
            "--device", "cpu")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_weights_for_other_classes_exit_2(cli, tmp_path, yolov5n_pt):
    yaml = _write_dataset(tmp_path / "d")
    r = cli("evaluate", "--data", yaml, "--weights", yolov5n_pt, "--out", tmp_path / "o", "--device", "cpu")
    assert r.returncode == 2, r.stderr
    assert "80 classes" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_coco128_at_320(cli, tmp_path, coco128_yaml, yolov5n_pt):
    baseline = tmp_path / "baseline.json"  # a 'current model' that was much better on person (class 0)
    baseline.write_text(json.dumps(_metrics(0.9, 0.8, [(0, 0.99)])))
    out = tmp_path / "eval"
    r = cli("evaluate", "--data", coco128_yaml, "--weights", yolov5n_pt, "--out", out, "--imgsz", "320",
            "--device", "cpu", "--data-version", "abc123", "--baseline", baseline, "--min-map50", "0.99")
    assert r.returncode == 2, r.stderr  # below --min-map50: outputs first, then one line
    assert len(r.stderr.strip().splitlines()[-1:]) == 1 and "min-map50" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    for name in ("metrics.json", "gate.json", "per_class.csv", "pr_curve.csv", "confusion_matrix.json",
                 "predictions.json", "PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png",
                 "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    # yolov5n on coco128 val2017 at 320: upstream val.py gives mAP50 ~0.3; sane bounds, not a reference
    assert 0.2 < metrics["map50"] < 0.5 and 0.1 < metrics["map50_95"] < metrics["map50"]
    assert metrics["images"] == 128 and metrics["instances"] > 800 and metrics["data_version"] == "abc123"
    assert "all" in r.stdout and "person" in r.stdout  # the table
    gate = json.loads((out / "gate.json").read_text())
    assert not gate["promote"] and gate["regressed_classes"][0]["class"] == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and {"image_id", "category_id", "bbox", "score"} == set(predictions[0])
    assert all(isinstance(p["image_id"], int) for p in predictions[:100])
    # the same model as its own baseline promotes
    same = promotion_gate(metrics, read_baseline(out / "metrics.json"), str(out / "metrics.json"))
    assert same["promote"] and same["regressed_classes"] == []
