"""Upstream YOLOv5 .pt files: imported by the restricted unpickler, hostile pickles refused, convert CLI."""

from __future__ import annotations

import builtins
import copy
import io
import os
import pathlib
import pickle
import sys
import types
import zipfile

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import SHARED
from yolo.cli import main
from yolo.data.image import letterbox
from yolo.errors import UserError
from yolo.model import DetectionModel, load_cfg
from yolo.model.checkpoint import load_checkpoint, load_model
from yolo.model.upstream import restricted_load

VAL = SHARED / "datasets" / "coco128" / "images" / "val2017"


@pytest.fixture(scope="module")
def official(yolov5n_pt):
    return load_checkpoint(yolov5n_pt)


def test_official_file_imports_with_upstream_names_and_shapes(official):
    assert official["format"] == "yolo-pipeline/1"
    assert official["source"]["kind"] == "upstream-yolov5" and official["source"]["class"] == "models.yolo.Model"
    assert official["cfg"]["nc"] == 80 and official["cfg"]["width_multiple"] == 0.25
    assert len(official["names"]) == 80 and official["names"][:3] == ["person", "bicycle", "car"]
    ours = DetectionModel(load_cfg("yolov5n")).state_dict()
    state = official["model"]
    assert list(state) == list(ours)
    assert all(state[k].shape == v.shape for k, v in ours.items())
    assert state["model.0.conv.weight"].dtype == torch.float16
    anchors_px = state["model.24.anchors"].float() * torch.tensor([8.0, 16.0, 32.0]).view(3, 1, 1)
    assert anchors_px.view(3, 6).tolist()[0] == [10, 13, 16, 30, 33, 23]
    assert (state["model.23.cv3.bn.running_var"].float() > 0).all()


def _detect(model, image_path, imgsz=320):
    im = cv2.imread(str(image_path))
    img, ratio, (dw, dh) = letterbox(im, imgsz)
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).float()[None] / 255
    with torch.no_grad():
        pred = model(x)[0][0]
    scores = pred[:, 4:5] * pred[:, 5:]
    # best box per class, back in normalised original-image xywh
    best = scores.max(0)
    boxes = pred[best.indices, :4].clone()
    boxes[:, 0] = (boxes[:, 0] - dw) / ratio[0] / im.shape[1]
    boxes[:, 1] = (boxes[:, 1] - dh) / ratio[1] / im.shape[0]
    boxes[:, 2] /= ratio[0] * im.shape[1]
    boxes[:, 3] /= ratio[1] * im.shape[0]
    return best.values, boxes


def _iou_xywh(a, b):
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.mark.parametrize("stem, cls", [("000000000285", 21), ("000000000785", 0)])  # a bear; a person
def test_imported_model_finds_the_labelled_object(yolov5n_pt, stem, cls):
    image = VAL / f"{stem}.jpg"
    if not image.exists():
        pytest.skip("coco128 val images not present")
    model, _ = load_model(yolov5n_pt, "cpu")
    scores, boxes = _detect(model, image)
    labels = np.loadtxt(str(image).replace("/images/", "/labels/").replace(".jpg", ".txt"), ndmin=2)
    assert scores[cls] > 0.8
    assert int(scores.argmax()) == cls
    truth = max(labels[labels[:, 0] == cls][:, 1:], key=lambda r: r[2] * r[3])
    assert _iou_xywh(boxes[cls].tolist(), truth.tolist()) > 0.6


def _as_upstream(module: nn.Module, monkeypatch) -> None:
    """Give our modules upstream's class paths (models.common.Conv, ...) so torch.save pickles them so."""
    for package in ("models", "models.common", "models.yolo"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    for m in module.modules():
        cls = type(m)
        if cls.__module__.startswith("yolo."):
            target = "models.yolo" if cls.__name__ in ("Model", "Detect") else "models.common"
            stub = getattr(sys.modules[target], cls.__name__, None)
            if stub is None:
                stub = type(cls.__name__, (cls,), {"__module__": target})
                setattr(sys.modules[target], cls.__name__, stub)
            m.__class__ = stub


def _upstream_like_file(tmp_path, monkeypatch) -> tuple[pathlib.Path, dict]:
    torch.manual_seed(3)
    ours = DetectionModel(load_cfg("yolov5n"), nc=2)
    source = copy.deepcopy(ours).half()
    source.model[-1].register_buffer("anchor_grid", torch.zeros(3, 1, 3, 1, 1, 2))  # YOLOv5 <= v5.0
    Model = type("Model", (nn.Module,), {"__module__": "models.yolo"})  # noqa: N806
    upstream = Model()
    upstream.model, upstream.yaml, upstream.names = source.model, copy.deepcopy(ours.yaml), {0: "cat", 1: "dog"}
    upstream.stride = source.stride
    _as_upstream(upstream, monkeypatch)
    sys.modules["models.yolo"].Model = Model
    ckpt = {"epoch": 7, "best_fitness": np.array([0.42]), "model": upstream, "ema": None, "updates": None,
            "optimizer": None, "opt": {"project": pathlib.PosixPath("runs/train"), "imgsz": 640},
            "date": "2023-01-01T00:00:00"}
    path = tmp_path / "upstream_like.pt"
    torch.save(ckpt, path)
    return path, {k: v.half() if v.is_floating_point() else v for k, v in ours.state_dict().items()}


def test_upstream_like_file_round_trips_exact_tensors(tmp_path, monkeypatch):
    path, expected = _upstream_like_file(tmp_path, monkeypatch)
    monkeypatch.undo()  # upstream's modules are gone again: nothing can be imported from them
    ckpt = load_checkpoint(path)
    assert ckpt["names"] == ["cat", "dog"] and ckpt["source"]["epoch"] == 7
    assert list(ckpt["model"]) == list(expected)  # anchor_grid (legacy) dropped
    for key, value in expected.items():
        assert torch.equal(ckpt["model"][key], value), key


class _Hostile:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call, refused", [
    (os.system, rf"{os.system.__module__}\.system"),
    (builtins.eval, r"(__builtin__|builtins)\.eval"),  # protocol 2 spells builtins as __builtin__
    (builtins.exec, r"(__builtin__|builtins)\.exec"),
])
@pytest.mark.parametrize("container", ["pickle", "torch_zip", "torch_zip_inside_model"])
def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path, call, refused, container):
    sentinel = tmp_path / "executed"
    command = f"touch {sentinel}" if call is os.system else f"open({str(sentinel)!r}, 'w').close()"
    payload = _Hostile(call, command)
    path = tmp_path / "hostile.pt"
    if container == "pickle":
        path.write_bytes(pickle.dumps({"model": payload}, protocol=2))
    elif container == "torch_zip":
        torch.save({"model": payload}, path)
    else:
        torch.save({"epoch": 1, "model": {"yaml": {"nc": 80}, "x": torch.zeros(2), "hook": payload}}, path)
    with pytest.raises(UserError, match=rf"refusing to load `{refused}`") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not sentinel.exists()


def test_unknown_upstream_class_is_refused(tmp_path, monkeypatch):
    for package in ("models", "models.yolo"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    Segmentation = type("SegmentationModel", (), {"__module__": "models.yolo"})  # noqa: N806
    sys.modules["models.yolo"].SegmentationModel = Segmentation
    path = tmp_path / "seg.pt"
    torch.save({"model": Segmentation()}, path)
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"refusing to load `models.yolo.SegmentationModel`"):
        load_checkpoint(path)


def test_truncated_and_damaged_official_files(tmp_path, yolov5n_pt):
    data = yolov5n_pt.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"truncated.pt: not a readable checkpoint"):
        load_checkpoint(truncated)
    damaged = tmp_path / "damaged.pt"  # a valid zip whose first weight storage lost bytes
    with zipfile.ZipFile(yolov5n_pt) as src, zipfile.ZipFile(damaged, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            dst.writestr(info, body[:-2] if info.filename.endswith("/data/0") else body)
    with pytest.raises(UserError, match=r"damaged.pt: storage 0 has \d+ bytes, expected \d+"):
        load_checkpoint(damaged)


def test_restricted_load_handles_plain_data(tmp_path):
    path = tmp_path / "plain.pkl"
    buf = io.BytesIO()
    pickle.dump({"a": [1, 2.5, "x"], "s": {1, 2}}, buf, protocol=2)
    path.write_bytes(buf.getvalue())
    assert restricted_load(path) == {"a": [1, 2.5, "x"], "s": {1, 2}}


def test_convert_cli_writes_a_weights_only_file(tmp_path, yolov5n_pt, official, capsys):
    out = tmp_path / "sub" / "n.pt"
    assert main(["convert", "--weights", str(yolov5n_pt), "--out", str(out)]) == 0
    converted = torch.load(out, weights_only=True)
    assert converted["format"] == "yolo-pipeline/1" and converted["names"] == official["names"]
    assert converted["model"]["model.0.conv.weight"].dtype == torch.float16
    assert converted["anchors_px"][2] == [116, 90, 156, 198, 373, 326]
    assert converted["model"]["model.24.anchors"].dtype == torch.float32  # no digits lost to fp16
    for key, value in official["model"].items():
        assert torch.equal(converted["model"][key].to(value.dtype), value), key

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    capsys.readouterr()
    assert main(["convert", "--weights", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("yolo-pipeline convert: error: ") and "bad.pt" in err[0]
    assert not (tmp_path / "x.pt").exists()
