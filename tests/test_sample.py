"""The sample dataset: deterministic bytes, valid labels, and validate accepts it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.conftest import run_cli
from yolo.data.dataset import check_image_bytes, load_data_config, parse_label_bytes
from yolo.data.sample import CLASS_NAMES, MAX_OBJECTS, SampleConfig, draw_sample, write_sample_dataset


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_counts_are_prefixes(tmp_path):
    a = files(write_sample_dataset(SampleConfig(tmp_path / "a", seed=3, train=6, val=3, imgsz=64)).parent)
    b = files(write_sample_dataset(SampleConfig(tmp_path / "b", seed=3, train=6, val=3, imgsz=64)).parent)
    c = files(write_sample_dataset(SampleConfig(tmp_path / "c", seed=4, train=6, val=3, imgsz=64)).parent)
    short = files(write_sample_dataset(SampleConfig(tmp_path / "d", seed=3, train=2, val=1, imgsz=64)).parent)
    assert a == b
    assert len(a) == 1 + 2 * 9 and "data.yaml" in a and "images/train/000005.png" in a
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))
    assert all(short[k] == a[k] for k in short if k != "data.yaml")  # a smaller count writes a prefix


def test_rewriting_replaces_the_dataset_without_leftovers(tmp_path):
    out = tmp_path / "s"
    write_sample_dataset(SampleConfig(out, train=5, val=2, imgsz=64))
    write_sample_dataset(SampleConfig(out, train=2, val=1, imgsz=64))
    assert sorted(p.name for p in out.iterdir()) == ["data.yaml", "images", "labels"]
    assert len(list((out / "images/train").iterdir())) == 2


def test_images_and_labels_are_valid_and_varied(tmp_path):
    yaml_path = write_sample_dataset(SampleConfig(tmp_path / "s", seed=0, train=40, val=4, imgsz=128))
    cfg = load_data_config(yaml_path)
    assert cfg.names == list(CLASS_NAMES) and cfg.root == tmp_path / "s"
    all_labels = []
    for png in sorted((tmp_path / "s/images/train").glob("*.png")):
        assert check_image_bytes(png.read_bytes())[:3:2] == ((128, 128), True)
        labels, problems, usable = parse_label_bytes(
            (tmp_path / "s/labels/train" / f"{png.stem}.txt").read_bytes(), len(CLASS_NAMES))
        assert usable and problems == [] and 1 <= len(labels) <= MAX_OBJECTS
        all_labels.append(labels)
    labels = np.concatenate(all_labels)
    assert set(labels[:, 0].astype(int)) == {0, 1, 2, 3}
    extent = labels[:, 3:].max(1) * 128
    assert extent.min() < 20 and extent.max() > 55  # small to large
    assert (labels[:, 3:] * 128 >= 5).all()


def test_boxes_enclose_the_class_coloured_pixels():
    """Each box holds its shape: the pixels that moved when the shape was drawn lie inside its box."""
    rng_state = np.random.default_rng([7, 0, 0])
    image, labels = draw_sample(rng_state, 128)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    saturation = image.max(2).astype(int) - image.min(2).astype(int)
    coloured = saturation > 90  # class colours are saturated; background clutter and noise are not
    inside = np.zeros_like(coloured)
    for _, cx, cy, w, h in labels:
        x0, y0 = int(np.floor((cx - w / 2) * 128)) - 1, int(np.floor((cy - h / 2) * 128)) - 1
        x1, y1 = int(np.ceil((cx + w / 2) * 128)) + 1, int(np.ceil((cy + h / 2) * 128)) + 1
        inside[max(y0, 0):y1, max(x0, 0):x1] = True
    assert coloured.sum() > 50
    assert (coloured & ~inside).sum() <= 0.01 * coloured.sum()


def test_sample_data_then_validate_cli(tmp_path):
    out = tmp_path / "s"
    result = run_cli("sample-data", "--out", out, "--train", "12", "--val", "4", "--imgsz", "64")
    assert result.returncode == 0, result.stderr
    result = run_cli("validate", "--data", out / "data.yaml", "--out", tmp_path / "v")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "v/report.json").read_text())
    assert report["ok"] and report["problems"] == []
    assert report["splits"]["train"]["images_ok"] == 12 and report["splits"]["val"]["images_ok"] == 4


def test_sample_data_bad_input(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("sample-data", "--out", blocker / "s")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot create output folder" in result.stderr
    result = run_cli("sample-data", "--out", tmp_path / "s", "--train", "0")
    assert result.returncode == 2 and "--train: must be >= 1" in result.stderr and not (tmp_path / "s").exists()
