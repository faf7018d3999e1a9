"""Hyperparameters: upstream defaults, yaml loading, and one-line errors for bad files."""

from __future__ import annotations

import pytest
import yaml

from yolo.errors import UserError
from yolo.hyp import Hyp, load_hyp

# upstream data/hyps/hyp.scratch-low.yaml, verbatim values
SCRATCH_LOW = {
    "lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "warmup_epochs": 3.0,
    "warmup_momentum": 0.8, "warmup_bias_lr": 0.1, "box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0,
    "obj_pw": 1.0, "iou_t": 0.20, "anchor_t": 4.0, "fl_gamma": 0.0, "hsv_h": 0.015, "hsv_s": 0.7,
    "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0, "perspective": 0.0,
    "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "copy_paste": 0.0,
}  # fmt: skip


def test_defaults_equal_upstream_scratch_low():
    d = Hyp().to_dict()
    assert d.pop("anchors") is None
    assert d == SCRATCH_LOW
    assert load_hyp(None) == Hyp()


def test_load_full_upstream_file_with_ints(tmp_path):
    f = tmp_path / "hyp.yaml"
    f.write_text(yaml.safe_dump({**SCRATCH_LOW, "degrees": 0, "mosaic": 1, "lr0": 0.02, "anchors": 3}))
    h = load_hyp(f)
    assert h.lr0 == 0.02 and h.anchors == 3.0
    assert isinstance(h.degrees, float) and isinstance(h.mosaic, float)


def test_partial_and_empty_files_take_defaults(tmp_path):
    f = tmp_path / "h.yaml"
    f.write_text("fl_gamma: 1.5\n")
    assert load_hyp(f) == Hyp(fl_gamma=1.5)
    f.write_text("")
    assert load_hyp(f) == Hyp()


def test_unknown_key_suggests_nearest(tmp_path):
    f = tmp_path / "h.yaml"
    f.write_text("lr0: 0.01\nmomentun: 0.9\n")
    with pytest.raises(UserError, match=r"h\.yaml.*unknown key `momentun`.*did you mean `momentum`"):
        load_hyp(f)


@pytest.mark.parametrize(
    "text, match",
    [
        ("lr0: fast\n", "lr0` must be a number"),
        ("mosaic: true\n", "mosaic` must be a number"),
        ("fliplr: 1.5\n", "fliplr` is a probability"),
        ("lr0: -0.1\n", "lr0` must be a finite number >= 0"),
        ("anchor_t: 0.5\n", "anchor_t` must be > 1"),
        ("anchors: 2.5\n", "anchors` must be a whole number"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("lr0: [1\n", "line"),
    ],
)
def test_bad_values_are_user_errors_naming_the_file(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=match) as e:
        load_hyp(f)
    assert "bad.yaml" in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_hyp(tmp_path / "nope.yaml")


def test_replace_validates_and_rejects_unknown():
    h = Hyp().replace(box=0.1, anchors=4)
    assert h.box == 0.1 and h.anchors == 4.0 and Hyp().box == 0.05
    with pytest.raises(UserError, match="did you mean `cls`"):
        Hyp().replace(clss=1.0)
    with pytest.raises(UserError, match="mixup"):
        Hyp().replace(mixup=2.0)
