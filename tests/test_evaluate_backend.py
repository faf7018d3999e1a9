"""evaluate runs exported models through yolo.backend: an ONNX export of yolov5n scores what the .pt scores
on 16 coco128 val images; --augment (TTA) runs; a fixed-shape export refuses --augment in one line."""

from __future__ import annotations

import shutil

import pytest

from yolo.errors import UserError
from yolo.evaluate import EvalConfig, EvaluateStepConfig, evaluate_step
from yolo.export import ExportConfig, export

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def subset(tmp_path_factory, coco128_yaml):
    """The first 16 coco128 val images with their labels, and coco128's names."""
    root = tmp_path_factory.mktemp("coco16")
    src = coco128_yaml.parent
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for image in sorted((src / "images" / "val2017").iterdir())[:16]:
        shutil.copy(image, root / "images" / "val" / image.name)
        label = src / "labels" / "val2017" / f"{image.stem}.txt"
        if label.exists():
            shutil.copy(label, root / "labels" / "val" / label.name)
    names = [line for line in coco128_yaml.read_text().splitlines() if line.startswith("names:")][0]
    (root / "data.yaml").write_text(f"path: .\ntrain: images/val\nval: images/val\nnc: 80\n{names}\n")
    return root / "data.yaml"


def _evaluate(data, weights, out, **eval_kw):
    config = EvalConfig(imgsz=320, **eval_kw)
    result, _ = evaluate_step(EvaluateStepConfig(data=data, weights=str(weights), out=out, device="cpu", eval=config))
    return result


def test_onnx_export_scores_what_the_pt_scores(tmp_path, subset, yolov5n_pt):
    onnx_file = tmp_path / "dyn.onnx"
    export(ExportConfig(weights=str(yolov5n_pt), format="onnx", out=onnx_file, imgsz=[320], dynamic=True, device="cpu"))
    pt = _evaluate(subset, yolov5n_pt, tmp_path / "pt")
    onnx = _evaluate(subset, onnx_file, tmp_path / "onnx")
    assert pt.map50 > 0.3
    assert abs(onnx.map50 - pt.map50) <= 1e-3 and abs(onnx.map50_95 - pt.map50_95) <= 1e-3
    assert (tmp_path / "onnx" / "metrics.json").is_file()

    tta = _evaluate(subset, yolov5n_pt, tmp_path / "tta", augment=True)
    assert tta.map50 > 0.3 and tta.map50_95 != pt.map50_95  # the augmented passes ran


def test_augment_with_a_fixed_shape_export_is_refused(tmp_path, subset, yolov5n_pt):
    ts = tmp_path / "m.torchscript"
    export(ExportConfig(weights=str(yolov5n_pt), format="torchscript", out=ts, imgsz=[320], device="cpu"))
    with pytest.raises(UserError, match="--augment .* fixed input shape"):
        _evaluate(subset, ts, tmp_path / "ts", augment=True)
