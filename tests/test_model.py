"""The YOLOv5 builder: cfg loading, parameter counts, names, strides, anchors, decode, fusion."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from yolo.errors import UserError
from yolo.model import DetectionModel, load_cfg
from yolo.model.yolo import count_parameters

# upstream's model summaries for nc=80: built (unfused) and after fuse() (what val.py/detect.py print)
PARAMS = {
    "n": (1_872_157, 1_867_405),
    "s": (7_235_389, 7_225_885),
    "m": (21_190_557, 21_172_173),
    "l": (46_563_709, 46_533_693),
    "x": (86_749_405, 86_705_005),
}


@pytest.fixture(scope="module")
def v5n() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel(load_cfg("yolov5n.yaml"))


@pytest.mark.parametrize("variant", list(PARAMS))
def test_parameter_counts_equal_upstream(variant):
    with torch.device("meta"):  # shapes only: counting needs no memory or init
        model = DetectionModel(load_cfg(f"yolov5{variant}.yaml"))
    built, fused = PARAMS[variant]
    assert count_parameters(model) == built
    assert count_parameters(model.fuse()) == fused


def test_state_dict_names_and_shapes(v5n):
    sd = v5n.state_dict()
    keys = list(sd)
    assert keys[0] == "model.0.conv.weight" and keys[-1] == "model.24.m.2.bias"
    assert sd["model.0.conv.weight"].shape == (16, 3, 6, 6)
    assert sd["model.24.anchors"].shape == (3, 3, 2)
    assert sd["model.24.m.0.weight"].shape == (255, 64, 1, 1)
    assert sd["model.8.m.0.cv2.conv.weight"].shape == (128, 128, 3, 3)
    assert "model.2.m.0.cv1.bn.running_var" in sd
    assert not any("anchor_grid" in k for k in keys)


def test_stride_anchors_and_bias_priors(v5n):
    detect = v5n.model[-1]
    assert v5n.stride.tolist() == [8.0, 16.0, 32.0] and detect.stride.tolist() == [8.0, 16.0, 32.0]
    assert (detect.nl, detect.na, detect.no, detect.nc) == (3, 3, 85, 80)
    cfg_px = torch.tensor(load_cfg("yolov5n")["anchors"], dtype=torch.float32).view(3, 3, 2)
    assert torch.allclose(detect.anchors * detect.stride.view(-1, 1, 1), cfg_px)
    assert detect.anchors_px()[0] == [10, 13, 16, 30, 33, 23]
    for conv, s in zip(detect.m, [8, 16, 32], strict=True):
        b = conv.bias.detach().view(3, 85)
        bound = 1 / math.sqrt(conv.in_channels)  # default conv bias init is U(-bound, bound)
        assert (b[:, 4] - math.log(8 / (640 / s) ** 2)).abs().max() <= bound
        assert (b[:, 5:] - math.log(0.6 / (80 - 0.99))).abs().max() <= bound


def test_reversed_anchor_order_is_flipped():
    cfg = load_cfg("yolov5n")
    cfg["anchors"] = cfg["anchors"][::-1]
    detect = DetectionModel(cfg).model[-1]
    assert detect.anchors_px()[0] == [10, 13, 16, 30, 33, 23]


def test_overrides_nc_and_anchors():
    anchors = [[5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25], [100, 101, 102, 103, 104, 105]]
    model = DetectionModel(load_cfg("yolov5n"), nc=3, anchors=anchors)
    detect = model.model[-1]
    assert model.yaml["nc"] == 3 and model.names == ["0", "1", "2"]
    assert detect.no == 8 and detect.m[0].weight.shape == (24, 64, 1, 1)
    assert detect.anchors_px() == [[float(v) for v in row] for row in anchors]
    assert model.yaml["anchors"] == anchors


def _reference_decode(raw: torch.Tensor, anchors_px: torch.Tensor, stride: float) -> torch.Tensor:
    """Upstream's Detect decode written out plainly, for one level."""
    bs, na, ny, nx, no = raw.shape
    yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float() - 0.5
    y = raw.sigmoid()
    xy = (y[..., :2] * 2 + grid) * stride
    wh = (y[..., 2:4] * 2) ** 2 * anchors_px.view(1, na, 1, 1, 2)
    return torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, no)


@pytest.mark.parametrize("grad", [False, True])
def test_train_and_eval_forward(v5n, grad):
    x = torch.rand(2, 3, 96, 128)
    v5n.train()
    maps = v5n(x)
    assert [tuple(m.shape) for m in maps] == [(2, 3, 12, 16, 85), (2, 3, 6, 8, 85), (2, 3, 3, 4, 85)]
    v5n.eval()
    with torch.set_grad_enabled(grad):
        pred, raw = v5n(x)
    assert pred.shape == (2, 3 * (12 * 16 + 6 * 8 + 3 * 4), 85)
    detect = v5n.model[-1]
    expected = torch.cat([_reference_decode(r, detect.anchors[i] * detect.stride[i], detect.stride[i])
                          for i, r in enumerate(raw)], 1)
    assert torch.equal(pred, expected)
    assert (pred[..., 4:] >= 0).all() and (pred[..., 4:] <= 1).all()


def test_decode_follows_anchor_and_weight_changes(v5n):
    v5n.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = v5n(x)[0].clone()
        detect = copy.deepcopy(v5n)
        detect.model[-1].set_anchors_px([[r * 2 for r in row] for row in v5n.model[-1].anchors_px()])
        doubled = detect(x)[0]
        assert torch.allclose(doubled[..., 2:4], before[..., 2:4] * 2)
        sd = v5n.state_dict()
        sd["model.24.anchors"] = sd["model.24.anchors"] * 3
        detect.load_state_dict(sd)
        tripled = detect(x)[0]
        assert torch.allclose(tripled[..., 2:4], before[..., 2:4] * 3)
        assert torch.equal(v5n(x)[0], before)  # the original's cached grids are untouched


def test_fuse_keeps_outputs(v5n):
    model = copy.deepcopy(v5n)
    for m in model.modules():  # non-trivial BN statistics so fusion has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        before = model(x)[0]
        fused = model.fuse()
        assert fused is model
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        after = model(x)[0]
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-3)


def test_half_and_channels_last(v5n):
    model = copy.deepcopy(v5n).eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = v5n.eval()(x)[0]
        out = model(x.contiguous(memory_format=torch.channels_last))[0]
    assert torch.allclose(ref, out, atol=1e-3)
    half = copy.deepcopy(v5n).half()
    assert half.model[-1].stride.dtype == torch.float16 and half.stride.tolist() == [8, 16, 32]


def test_load_cfg_names_and_paths(tmp_path):
    a, b = load_cfg("yolov5s"), load_cfg("yolov5s.yaml")
    assert a == b and a["width_multiple"] == 0.5 and a["depth_multiple"] == 0.33
    own = tmp_path / "mine.yaml"
    own.write_text((load_cfg.__globals__["CFG_DIR"] / "yolov5n.yaml").read_text().replace("nc: 80", "nc: 7"))
    assert load_cfg(own)["nc"] == 7
    assert DetectionModel(load_cfg(str(own))).model[-1].nc == 7


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_load_cfg_errors(tmp_path):
    with pytest.raises(UserError, match=r"not found: yolov5q \(did you mean `yolov5.\.yaml`\?\) \(built in: yolov5l.yaml"):
        load_cfg("yolov5q")
    with pytest.raises(UserError, match=r"bad.yaml, line 3: not valid yaml"):
        load_cfg(_write(tmp_path, "nc: 80\nbackbone: [[-1, 1\n"))
    with pytest.raises(UserError, match="missing key"):
        load_cfg(_write(tmp_path, "nc: 80\n"))
    with pytest.raises(UserError, match="expected a mapping"):
        load_cfg(_write(tmp_path, "- 1\n- 2\n"))
    text = (load_cfg.__globals__["CFG_DIR"] / "yolov5n.yaml").read_text()
    bad_line = text.splitlines().index("   [-1, 3, C3, [256, False]],  # 17 (P3/8-small)") + 1
    with pytest.raises(UserError, match=rf"line {bad_line}: head layer 7: unknown module 'C3x' \(did you mean `C3`"):
        load_cfg(_write(tmp_path, text.replace("[-1, 3, C3, [256, False]],  # 17", "[-1, 3, C3x, [256, False]],  # 17")))


def test_no_eval_of_yaml_strings(tmp_path):
    sentinel = tmp_path / "ran"
    cfg = load_cfg("yolov5n")
    cfg["head"][1][2] = f"__import__('os').system('touch {sentinel}')"
    with pytest.raises(UserError, match="unknown module"):
        DetectionModel(cfg)
    cfg = load_cfg("yolov5n")
    cfg["head"][1][3] = [f"__import__('os').system('touch {sentinel}')", 2, "nearest"]
    with pytest.raises(UserError):
        DetectionModel(cfg)
    assert not sentinel.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["head"].pop(), "last head layer must be Detect"),
    (lambda c: c["head"][2].__setitem__(0, [-1, 30]), "`from` must name earlier layers"),
    (lambda c: c["backbone"][2].__setitem__(1, 0), "`number` must be a positive integer"),
    (lambda c: c["backbone"][1].__setitem__(3, ["wide"]), "cannot build Conv"),
    (lambda c: c.__setitem__("nc", 0), "nc must be a positive integer"),
    (lambda c: c.__setitem__("anchors", [[1, 2, 3]]), "anchors must be"),
    (lambda c: c.__setitem__("anchors", [[10, 13], [30, 61]]), "one anchor row per input level"),
    (lambda c: c["head"][2].__setitem__(0, [-1, 4]), "does not build a runnable network"),
    (lambda c: c.__setitem__("activation", "nn.ReLU()"), "activation"),
])
def test_bad_cfg_is_a_user_error(edit, message):
    cfg = load_cfg("yolov5n")
    edit(cfg)
    with pytest.raises(UserError, match=message):
        DetectionModel(cfg)


def test_set_anchors_px_checks_order_in_pixels(v5n):
    detect = copy.deepcopy(v5n.model[-1])
    rows = [[20, 20] * 3, [30, 30] * 3, [40, 40] * 3]  # increasing in pixels, decreasing in stride units
    detect.set_anchors_px(rows)
    assert detect.anchors_px() == rows
    detect.set_anchors_px(rows[::-1])  # reversed levels are put back in order, as upstream
    assert detect.anchors_px() == rows
    with pytest.raises(UserError, match="do not fit"):
        detect.set_anchors_px([[1, 2, 3, 4]])
