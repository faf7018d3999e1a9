"""Exported models run through yolo.backend: the official yolov5n as .pt, ONNX (dynamic and fixed shape) and
TorchScript give the same coco128 label rows; bad files and shapes are one-line errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from yolo.backend import _stride_names, load_backend
from yolo.errors import UserError
from yolo.export import ExportConfig, export
from yolo.predict import PredictConfig, predict

pytest.importorskip("onnxruntime")

# coco128 val images: four 480x640 (h x w), one 427x640, one 640x480 (portrait)
IMAGES_480x640 = ("000000001000.jpg", "000000001532.jpg", "000000001675.jpg", "000000002006.jpg")
OTHER_SHAPES = ("000000000885.jpg", "000000000785.jpg")
ROW_TOLERANCE = 1e-3  # normalised box coordinates and confidences


@pytest.fixture(scope="module")
def exported(tmp_path_factory, yolov5n_pt):
    """yolov5n exported as ONNX with dynamic axes, ONNX fixed at 480x640, TorchScript fixed at 480x640."""
    root = tmp_path_factory.mktemp("exports")
    files = {}
    for key, fmt, name, dynamic in (("onnx-dynamic", "onnx", "dyn.onnx", True),
                                    ("onnx-fixed", "onnx", "fixed.onnx", False),
                                    ("torchscript", "torchscript", "fixed.torchscript", False)):
        export(ExportConfig(weights=str(yolov5n_pt), format=fmt, out=root / name, imgsz=[480, 640],
                            dynamic=dynamic, device="cpu"))
        files[key] = root / name
    return files


@pytest.fixture(scope="module")
def images(tmp_path_factory, coco128_yaml):
    src = tmp_path_factory.mktemp("src")
    for name in IMAGES_480x640 + OTHER_SHAPES:
        shutil.copy(coco128_yaml.parent / "images" / "val2017" / name, src / name)
    return src


def _label_rows(weights, source, out, imgsz=(640,)) -> dict[str, np.ndarray]:
    predict(PredictConfig(weights=str(weights), source=source, out=out, imgsz=list(imgsz), device="cpu",
                          save_txt=True, save_conf=True, save_images=False))
    return {p.stem: np.loadtxt(p, ndmin=2) for p in (out / "labels").iterdir()}


@pytest.fixture(scope="module")
def pt_rows(tmp_path_factory, yolov5n_pt, images):
    return _label_rows(yolov5n_pt, images, tmp_path_factory.mktemp("pt"))


def _assert_same_rows(rows, reference, stems):
    for stem in stems:
        assert rows[stem].shape == reference[stem].shape, stem
        assert np.abs(rows[stem] - reference[stem]).max() <= ROW_TOLERANCE, stem


def test_dynamic_onnx_gives_the_pt_rows(tmp_path, exported, images, pt_rows):
    rows = _label_rows(exported["onnx-dynamic"], images, tmp_path / "out")
    assert sorted(rows) == sorted(pt_rows) and len(rows) == len(IMAGES_480x640 + OTHER_SHAPES)
    _assert_same_rows(rows, pt_rows, rows)  # every image, every shape


@pytest.mark.parametrize("kind", ["onnx-fixed", "torchscript"])
def test_fixed_shape_exports_give_the_pt_rows_at_their_shape_and_pad_smaller_images(tmp_path, exported, images,
                                                                                     pt_rows, kind):
    rows = _label_rows(exported[kind], images, tmp_path / "out", imgsz=(480, 640))  # 480x640 images: as at 640
    _assert_same_rows(rows, pt_rows, [n.rsplit(".", 1)[0] for n in IMAGES_480x640])
    # 427x640 letterboxes to 448x640 and is padded to 480x640: the same confident detections
    stem = OTHER_SHAPES[0].rsplit(".", 1)[0]
    confident = [r[r[:, 5] > 0.5] for r in (rows[stem], pt_rows[stem])]
    assert confident[0].shape == confident[1].shape and len(confident[0])
    assert np.abs(confident[0][:, :5] - confident[1][:, :5]).max() < 0.01


def test_fixed_shape_model_refuses_a_larger_input_and_splits_batches(exported):
    backend = load_backend(exported["onnx-fixed"], torch.device("cpu"))
    assert backend.meta.fixed_shape == (1, 3, 480, 640) and backend.meta.names[0] == "person"
    with pytest.raises(UserError, match="takes 480x640 images at most, got 512x640"):
        backend(torch.zeros(1, 3, 512, 640))
    batch = torch.rand(3, 3, 480, 640, generator=torch.Generator().manual_seed(0))
    together = backend(batch)
    one_by_one = torch.cat([backend(batch[i:i + 1]) for i in range(3)])
    assert together.shape == (3, 18900, 85) and torch.equal(together, one_by_one)


def test_predict_imgsz_larger_than_the_export_and_augment_on_a_fixed_shape_are_refused(tmp_path, exported, images):
    with pytest.raises(UserError, match="pass --imgsz 480 640"):
        predict(PredictConfig(weights=str(exported["onnx-fixed"]), source=images, out=tmp_path / "o", device="cpu"))
    with pytest.raises(UserError, match="--augment .* fixed input shape"):
        predict(PredictConfig(weights=str(exported["torchscript"]), source=images, out=tmp_path / "o",
                              imgsz=[480, 640], device="cpu", augment=True))


def test_pt_backend_matches_the_model(yolov5n_pt):
    from yolo.model.checkpoint import load_model

    backend = load_backend(yolov5n_pt, torch.device("cpu"))
    model, _ = load_model(yolov5n_pt, "cpu", fuse=True)
    x = torch.rand(2, 3, 256, 320, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(backend(x), model(x)[0])
    assert backend.meta.kind == "pytorch" and backend.meta.fixed_shape is None and backend.levels == 3
    assert backend.meta.stride == 32 and backend.nc == 80


def test_metadata_in_upstream_and_our_spellings(tmp_path):
    # upstream's export.py writes names as a Python dict literal; ours as JSON
    assert _stride_names({"stride": "32", "names": "{0: 'person', 1: 'bicycle'}"}, tmp_path) == (32, ["person",
                                                                                                 "bicycle"])
    assert _stride_names({"stride": "64", "names": '["a", "b"]'}, tmp_path) == (64, ["a", "b"])
    with pytest.raises(UserError, match="no stride/names metadata"):
        _stride_names({"names": "__import__('os').system('true')"}, tmp_path)


def test_unreadable_exports_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        load_backend(bad, torch.device("cpu"))
    bad_ts = tmp_path / "bad.torchscript"
    bad_ts.write_bytes(b"PK not a zip")
    with pytest.raises(UserError, match="not a readable TorchScript model"):
        load_backend(bad_ts, torch.device("cpu"))
