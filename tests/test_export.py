"""export: yolov5n at 128 px to ONNX (onnxruntime vs torch) and TorchScript; bad options are user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from yolo.errors import UserError
from yolo.export import ExportConfig, export

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, yolov5n_pt):
    """yolov5n exported once to dynamic ONNX and to TorchScript, both at 128 x 128."""
    folder = tmp_path_factory.mktemp("export")
    onnx_result = export(
        ExportConfig(weights=str(yolov5n_pt), format="onnx", out=folder / "n.onnx", imgsz=[128], dynamic=True)
    )
    ts_result = export(
        ExportConfig(weights=str(yolov5n_pt), format="torchscript", out=folder / "n.torchscript", imgsz=[128])
    )
    return folder, onnx_result, ts_result


@pytest.mark.slow  # two exports of yolov5n: ~5 s alone, 15 s on the busy shared machine
def test_onnx_checked_against_torch_with_metadata(exported):
    folder, result, _ = exported
    out = folder / "n.onnx"
    assert result.path == out and out.is_file()
    assert result.input_shape == [1, 3, 128, 128]
    assert result.output_shape == [1, 3 * (16 * 16 + 8 * 8 + 4 * 4), 85]
    assert result.max_abs_diff <= 1e-3  # onnxruntime vs torch, measured inside export()
    assert not list(folder.glob(".*.tmp"))  # the atomic write left nothing behind
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["stride"]) == 32 and json.loads(meta["names"])[0] == "person"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_onnxruntime_and_torchscript_agree_and_onnx_axes_are_dynamic(exported):
    folder, _, ts_result = exported
    assert ts_result.max_abs_diff <= 1e-3 and ts_result.output_shape == [1, 1008, 85]
    session = onnxruntime.InferenceSession(str(folder / "n.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["output0"]
    extra = {"config.txt": ""}
    module = torch.jit.load(str(folder / "n.torchscript"), _extra_files=extra)
    assert json.loads(extra["config.txt"])["names"][0] == "person"
    x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    with torch.no_grad():
        from_ts = module(torch.from_numpy(x)).numpy()
    from_onnx = session.run(None, {"images": x})[0]
    assert from_onnx.shape == from_ts.shape == (1, 1008, 85)
    assert np.abs(from_onnx - from_ts).max() <= 1e-3  # two exporters, one model: the same numbers
    assert (from_ts[..., 4] > 0).all() and (from_ts[..., 4] < 1).all()  # decoded: sigmoided objectness
    # dynamic axes: another batch size and aspect run, with the anchor count of that shape
    other = session.run(None, {"images": np.zeros((2, 3, 96, 160), np.float32)})[0]
    assert other.shape == (2, 3 * (12 * 20 + 6 * 10 + 3 * 5), 85)
    # boxes of the last level sit on that level's grid: centres within the 96 x 160 image (+ a cell)
    assert other[..., 0].max() < 160 + 32 and other[..., 1].max() < 96 + 32


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--half needs a CUDA device"):
        export(ExportConfig(weights="x.pt", format="onnx", out=tmp_path / "a.onnx", half=True, device="cpu"))
    with pytest.raises(UserError, match="is a folder"):
        export(ExportConfig(weights="x.pt", format="onnx", out=tmp_path, device="cpu"))
    with pytest.raises(UserError, match="opset"):
        export(ExportConfig(weights="x.pt", format="onnx", out=tmp_path / "a.onnx", opset=11, device="cpu"))


def test_weights_not_a_checkpoint_is_a_user_error_and_nothing_written(tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="bogus.pt"):
        export(ExportConfig(weights=str(bogus), format="onnx", out=tmp_path / "a.onnx", device="cpu"))
    assert not (tmp_path / "a.onnx").exists()
