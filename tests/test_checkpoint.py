"""Our checkpoint format: round trip, weights_only, atomic writes, rebuild with nc/anchors, transfer."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch

from yolo.errors import UserError
from yolo.model import DetectionModel, load_cfg
from yolo.model.checkpoint import (
    FORMAT,
    checkpoint_dict,
    load_checkpoint,
    load_model,
    model_from_checkpoint,
    save_checkpoint,
)
from yolo.model.transfer import choose_anchors, transfer_state


@pytest.fixture(scope="module")
def model() -> DetectionModel:
    torch.manual_seed(1)
    m = DetectionModel(load_cfg("yolov5n"), nc=3)
    m.names = ["cat", "dog", "bird"]
    return m


def _outputs(m, x):
    m.eval()
    with torch.no_grad():
        return m(x)[0]


def test_round_trip_fp32_is_exact(tmp_path, model):
    path = tmp_path / "w" / "last.pt"
    save_checkpoint(path, checkpoint_dict(model, half=False, epoch=4, optimizer={"lr": [0.01]}))
    raw = torch.load(path, weights_only=True)  # readable without any of our classes
    assert raw["format"] == FORMAT and raw["epoch"] == 4 and raw["names"] == ["cat", "dog", "bird"]
    assert raw["anchors_px"][0] == [10, 13, 16, 30, 33, 23]
    ckpt = load_checkpoint(path)
    rebuilt = model_from_checkpoint(ckpt)
    assert rebuilt.names == ["cat", "dog", "bird"] and rebuilt.yaml["nc"] == 3
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(_outputs(rebuilt, x), _outputs(model, x))


def test_half_checkpoint_loads_as_fp32(tmp_path, model):
    path = tmp_path / "best.pt"
    save_checkpoint(path, checkpoint_dict(model))
    ckpt = load_checkpoint(str(path))
    assert ckpt["model"]["model.0.conv.weight"].dtype == torch.float16
    assert ckpt["model"]["model.0.bn.num_batches_tracked"].dtype == torch.int64
    assert ckpt["model"]["model.24.anchors"].dtype == torch.float32
    loaded, _ = load_model(path, "cpu")
    assert not loaded.training and all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(1, 3, 64, 64)
    ref = _outputs(model, x)
    assert torch.allclose(_outputs(loaded, x)[..., :4], ref[..., :4], atol=0.5)
    assert torch.allclose(_outputs(loaded, x)[..., 4:], ref[..., 4:], atol=0.01)
    fused, _ = load_model(path, torch.device("cpu"), fuse=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert torch.allclose(_outputs(fused, x)[..., 4:], ref[..., 4:], atol=0.01)


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, model, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, checkpoint_dict(model, epoch=1))
    before = path.read_bytes()

    def dies_halfway(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")  # save_checkpoint hands torch.save the temp file, opened
        f.flush()
        raise KeyboardInterrupt  # e.g. the pod is killed mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, checkpoint_dict(model, epoch=2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    fresh = tmp_path / "new.pt"
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(fresh, checkpoint_dict(model))
    assert not fresh.exists()


@pytest.mark.parametrize("bad", [
    {"model": torch.nn.Linear(1, 1)},
    {"opt": pickle},
    {"best_fitness": __import__("numpy").float64(0.5)},
])
def test_save_refuses_what_weights_only_cannot_read(tmp_path, model, bad):
    with pytest.raises(TypeError, match="checkpoints hold only"):
        save_checkpoint(tmp_path / "x.pt", {**checkpoint_dict(model), **bad})
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(ValueError, match="format"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}})


def test_new_nc_rebuilds_and_transfers_all_but_detect_outputs(tmp_path, model, caplog):
    ckpt = checkpoint_dict(model, half=False)
    with caplog.at_level(logging.INFO):
        rebuilt = model_from_checkpoint(ckpt, nc=5)
    assert "Transferred 343/349 items (not transferred: 6 shape)" in caplog.text
    assert rebuilt.model[-1].nc == 5 and rebuilt.names == ["0", "1", "2", "3", "4"]
    assert torch.equal(rebuilt.state_dict()["model.23.cv3.conv.weight"], model.state_dict()["model.23.cv3.conv.weight"])
    assert torch.equal(rebuilt.model[-1].anchors, model.model[-1].anchors)


def test_transfer_report_and_anchor_exclusion(model):
    anchors = [[5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25], [100, 101, 102, 103, 104, 105]]
    target = DetectionModel(load_cfg("yolov5n"), nc=3, anchors=anchors)
    state = dict(model.state_dict())
    del state["model.0.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    report = transfer_state(target, state, exclude=("anchor",))
    assert report.n == 347 and report.total == 349
    assert report.not_transferred == {"model.0.conv.weight": "missing from the checkpoint",
                                      "model.24.anchors": "excluded"}
    assert report.unused == ["extra.weight"]
    assert target.model[-1].anchors_px() == [[float(v) for v in row] for row in anchors]
    assert torch.equal(target.state_dict()["model.24.m.0.weight"], state["model.24.m.0.weight"])
    rebuilt = model_from_checkpoint(checkpoint_dict(model, half=False), anchors=anchors)
    assert rebuilt.model[-1].anchors_px()[2] == [100, 101, 102, 103, 104, 105]
    assert rebuilt.names == ["cat", "dog", "bird"]


def test_anchor_priority():
    cfg = load_cfg("yolov5s")
    rows = [[1, 2, 3, 4, 5, 6], [10, 20, 30, 40, 50, 60], [100, 200, 300, 400, 500, 600]]
    choice = choose_anchors({"imgsz": 320, "anchors": rows}, cfg, imgsz=640)
    assert choice.source == "anchors.json" and choice.exclude_from_transfer
    assert choice.anchors_px[0] == [2, 4, 6, 8, 10, 12]  # rescaled 320 -> 640
    assert choose_anchors({"imgsz": 640, "anchors": rows}, None, imgsz=640).anchors_px == rows
    choice = choose_anchors(None, cfg, imgsz=640)
    assert choice.source == "cfg" and choice.anchors_px == cfg["anchors"] and choice.exclude_from_transfer
    choice = choose_anchors(None, None, imgsz=640)
    assert choice == type(choice)(None, "checkpoint", False)
    with pytest.raises(UserError, match="anchors.json"):
        choose_anchors({"anchors": [[1, 2, 3]]}, None)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, model):
    tmp_path = tmp_path_factory.mktemp("bad")
    good = tmp_path / "good.pt"
    save_checkpoint(good, checkpoint_dict(model))
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "random": os.urandom(4096),
        "empty": b"",
        "text": b"this is not a checkpoint\n",
        "plain_pickle": pickle.dumps({"a": 1}),
    }
    for name, content in files.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    torch.save({"model.0.conv.weight": torch.zeros(1)}, tmp_path / "state_dict.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"format": "yolo-pipeline/9", "cfg": {}, "model": {}, "names": []}, tmp_path / "future.pt")
    return tmp_path


@pytest.mark.parametrize("name, message", [
    ("truncated", "not a readable checkpoint"),
    ("random", "not a readable checkpoint"),
    ("empty", "not a readable checkpoint"),
    ("text", "not a readable checkpoint"),
    ("plain_pickle", "not a checkpoint"),
    ("state_dict", "not a yolo-pipeline checkpoint"),
    ("tensor", "holds a Tensor"),
    ("future", "newer than this version"),
])
def test_bad_weights_files_are_user_errors(bad_files, name, message):
    path = bad_files / f"{name}.pt"
    with pytest.raises(UserError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_weights_and_folder(tmp_path):
    with pytest.raises(UserError, match=r"weights not found: \S*/nope.pt \(give a local"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_mismatched_state_is_a_user_error(model):
    ckpt = checkpoint_dict(model)
    ckpt["model"]["model.2.cv1.conv.weight"] = torch.zeros(5, 32, 1, 1)  # weights of another width
    with pytest.raises(UserError, match=r"shapes differ for model.2.cv1.conv.weight \(5, 32, 1, 1\) vs"):
        model_from_checkpoint(ckpt)
    del ckpt["model"]["model.2.cv1.conv.weight"]
    with pytest.raises(UserError, match=r"missing \['model.2.cv1.conv.weight'\]"):
        model_from_checkpoint(ckpt)


def test_saved_file_is_readable_by_others(tmp_path, model):
    path = tmp_path / "best.pt"
    save_checkpoint(path, checkpoint_dict(model))
    assert path.stat().st_mode & 0o777 == 0o644


def test_same_checkpoint_same_bytes(tmp_path, model):
    """Reproducible artifacts: the temp file's random name must not end up inside the archive."""
    ckpt = checkpoint_dict(model, epoch=1)
    save_checkpoint(tmp_path / "a.pt", ckpt)
    (tmp_path / "b").mkdir()
    save_checkpoint(tmp_path / "b" / "best.pt", ckpt)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "best.pt").read_bytes()
