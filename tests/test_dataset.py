"""Dataset reading: data.yaml, split lists, label parsing per problem code, image checks, load_split and the index."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import yolo.data.index as index_module
from tests.data_faults import (
    GOOD_LABEL,
    add_pair,
    image_array,
    jpeg_bytes,
    png_bytes,
    write,
    write_yaml,
)
from yolo.data.dataset import (
    _decoded_shape,
    check_image_bytes,
    label_path_for,
    list_split_images,
    load_data_config,
    parse_data_config,
    parse_label_bytes,
)
from yolo.data.image import image_header_size
from yolo.data.index import FileRecord, load_split
from yolo.errors import UserError


# ---------------------------------------------------------------------------------------------- data.yaml
def test_config_resolves_path_relative_to_the_yaml_folder(tmp_path, monkeypatch):
    (tmp_path / "ds" / "images" / "train").mkdir(parents=True)
    yaml_path = write(tmp_path / "cfg" / "data.yaml",
                      "path: ../ds\ntrain: images/train\nval: [images/train, images/val]\nnames: {0: a, 1: b}\n")
    monkeypatch.chdir("/")  # the working directory must not matter
    cfg = load_data_config(yaml_path)
    assert cfg.root == tmp_path / "ds"
    assert cfg.splits == {"train": [tmp_path / "ds/images/train"],
                          "val": [tmp_path / "ds/images/train", tmp_path / "ds/images/val"]}
    assert cfg.names == ["a", "b"] and cfg.nc == 2


def test_config_nc_only_and_missing_path_default_to_yaml_folder(tmp_path):
    cfg = load_data_config(write_yaml(tmp_path, "train: a\nval: b\nnc: 3\n"))
    assert cfg.root == tmp_path and cfg.names == ["class0", "class1", "class2"]


@pytest.mark.parametrize(("text", "expected"), [
    ("train: a\nval: b\nnc: 3\nnames: [x, y]\n", "nc is 3 but `names` lists 2 classes"),
    ("train: a\nval: b\nnames: {0: x, 2: y}\n", "without gaps"),
])
def test_names_mismatch_is_reported_not_hidden(tmp_path, text, expected):
    yaml_path = write_yaml(tmp_path, text)
    _, mismatches = parse_data_config(yaml_path)
    assert len(mismatches) == 1 and expected in mismatches[0]
    with pytest.raises(UserError, match=expected.split()[0]):
        load_data_config(yaml_path)


@pytest.mark.parametrize(("text", "expected"), [
    ("trian: a\nval: b\nnames: [x]\n", "missing required key `train`; found `trian` (did you mean `train`?)"),
    ("train: a\nnames: [x]\n", "missing required key `val`"),
    ("- a\n- b\n", "must be a mapping"),
    ("train: a\nval: b\n", "missing key `names`"),
    ("train: a\nval: b\nnames: x\n", "`names` must be a list"),
    ("train: a\nval: b\nnames: [x]\nnc: two\n", "`nc` must be a positive integer"),
    ("train: a\nval: [b, 3]\nnames: [x]\n", "`val` must be a folder"),
    ("train: a\nval: b\nnames: [x\n", "line 4: not valid YAML"),
    ("path: nowhere\ntrain: a\nval: b\nnames: [x]\n", "does not exist (`path: nowhere` is resolved relative to"),
])
def test_config_errors_name_the_file_and_the_fault(tmp_path, text, expected):
    yaml_path = write_yaml(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_data_config(yaml_path)
    assert str(yaml_path) in str(e.value) and expected in str(e.value)


def test_missing_yaml_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"data.yaml not found: nope.yaml \\(looked in {tmp_path}\\)"):
        load_data_config("nope.yaml")


# ---------------------------------------------------------------------------------------------- file lists
def test_split_sources_folder_recursive_list_file_and_order(tmp_path):
    for rel in ["images/train/b.jpg", "images/train/sub/a.PNG", "images/train/a.jpg", "images/train/.hidden.jpg",
                "images/train/notes.txt", "images/extra/z.webp"]:
        write(tmp_path / rel, b"x")
    write(tmp_path / "val.txt", "./images/train/b.jpg\nimages/extra/z.webp\n\nimages/train/notes.txt\n")
    cfg = load_data_config(write_yaml(tmp_path, "train: [images/train, images/train]\nval: val.txt\nnames: [x]\n"))
    rel = [p.relative_to(tmp_path).as_posix() for p in list_split_images(cfg, "train")]
    assert rel == ["images/train/a.jpg", "images/train/b.jpg", "images/train/sub/a.PNG"]  # sorted, deduplicated
    rel = [p.relative_to(tmp_path).as_posix() for p in list_split_images(cfg, "val")]
    assert rel == ["images/extra/z.webp", "images/train/b.jpg"]
    with pytest.raises(UserError, match="no `test` split"):
        list_split_images(cfg, "test")


def test_label_path_replaces_the_last_images_folder():
    assert label_path_for("/d/images/x/images/a.b.jpg") == Path("/d/images/x/labels/a.b.txt")
    assert label_path_for("/d/pics/a.png") == Path("/d/pics/a.txt")


# ---------------------------------------------------------------------------------------------- labels
def parse(text: str | bytes, nc: int = 3):
    return parse_label_bytes(text.encode() if isinstance(text, str) else text, nc)


def codes(problems) -> list[tuple[str, str]]:
    return [(code, action) for code, _, action in problems]


def test_good_labels_parse_to_float32_rows():
    labels, problems, usable = parse("0 0.5 0.5 0.25 0.25\n\n  1 0.3 0.6 0.2 0.3  \r\n")
    assert usable and problems == []
    assert labels.dtype == np.float32 and labels.shape == (2, 5)
    np.testing.assert_allclose(labels, [[0, 0.5, 0.5, 0.25, 0.25], [1, 0.3, 0.6, 0.2, 0.3]])


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_empty_label_file_is_a_background_without_problem(text):
    labels, problems, usable = parse(text)
    assert usable and problems == [] and labels.shape == (0, 5)


def test_polygon_row_becomes_its_bounding_box():
    labels, problems, usable = parse("2 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6\n0 0.5 0.5 0.2 0.2\n")
    assert usable and problems == []
    np.testing.assert_allclose(labels, [[2, 0.3, 0.4, 0.4, 0.4], [0, 0.5, 0.5, 0.2, 0.2]], atol=1e-6)


@pytest.mark.parametrize(("text", "code", "where"), [
    ("0 0.5 0.5 0.2\n", "label_bad_row", "line 1: expected 5 values"),
    ("0 0.5 0.5 0.2 0.2 0.1\n", "label_bad_row", "got 6"),
    ("0 0.1 0.1 0.2 0.2 0.3 0.3 0.4\n", "label_bad_row", "got 8"),  # a polygon needs x, y pairs
    ("0 0.5 0.5 0.2 0.2\n0 0.5 abc 0.2 0.2\n", "label_bad_row", "line 2: not a number: 'abc'"),
    ("0 0.5 nan 0.2 0.2\n", "label_bad_row", "finite"),
    (b"0 0.5 0.5 0.2 0.2\n\xff\xfe\n", "label_bad_row", "not UTF-8"),
    ("3 0.5 0.5 0.2 0.2\n", "label_class_out_of_range", "class 3 is not an integer in [0, 3)"),
    ("-1 0.5 0.5 0.2 0.2\n", "label_class_out_of_range", "class -1"),
    ("1.5 0.5 0.5 0.2 0.2\n", "label_class_out_of_range", "class 1.5"),
    ("0 0.5 0.5 0.2 0.2\n1 1.01 0.5 0.2 0.2\n2 0.5 0.5 0.2 -0.1\n", "label_out_of_bounds", "line 2: cx cy w h must "
     "be in [0, 1], got 1.01 0.5 0.2 0.2 (+1 more rows)"),
])
def test_a_bad_row_makes_the_whole_file_unusable(text, code, where):
    labels, problems, usable = parse(text)
    assert not usable and labels.shape == (0, 5)
    assert codes(problems)[0] == (code, "skipped")
    assert where in problems[0][1]


def test_zero_size_rows_are_dropped_and_the_file_kept():
    labels, problems, usable = parse("0 0.5 0.5 0 0.2\n1 0.3 0.6 0.2 0.3\n2 0.5 0.5 0.2 0\n")
    assert usable and codes(problems) == [("label_zero_size", "row_dropped")]
    assert "line 1" in problems[0][1] and "(+1 more rows)" in problems[0][1]
    np.testing.assert_allclose(labels, [[1, 0.3, 0.6, 0.2, 0.3]])


def test_duplicate_rows_are_dropped_keeping_file_order():
    labels, problems, usable = parse("2 0.7 0.7 0.1 0.1\n0 0.5 0.5 0.2 0.2\n2 0.7 0.7 0.1 0.1\n2 0.70 0.7 .1 0.1\n")
    assert usable and codes(problems) == [("label_duplicate", "row_dropped")]
    assert problems[0][1].startswith("line 3:") and "(+1 more rows)" in problems[0][1]
    np.testing.assert_allclose(labels, [[2, 0.7, 0.7, 0.1, 0.1], [0, 0.5, 0.5, 0.2, 0.2]])


def test_class_written_as_float_integer_and_utf8_bom_are_accepted():
    labels, problems, usable = parse("\ufeff1.0 0.5 0.5 0.2 0.2\n")
    assert usable and problems == [] and labels[0, 0] == 1


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.lists(st.lists(st.sampled_from(["0", "1", "2", "7", "-1", "0.5", "1", "1.5", "0", "nan", "inf",
                                                    "1e400", "x", "0.25", "1_0", "", "\t", "\x0c"]),
                                   max_size=10), max_size=6)
                 .map(lambda rows: "\n".join(" ".join(r) for r in rows).encode())))
def test_arbitrary_label_bytes_never_crash(data):
    labels, problems, usable = parse_label_bytes(data, 3)
    assert labels.dtype == np.float32 and labels.ndim == 2 and labels.shape[1] == 5
    assert all(action in {"skipped", "row_dropped"} for _, _, action in problems)
    if usable:
        assert np.isfinite(labels).all()
        assert ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all()
        assert (labels[:, 3:] > 0).all()
        assert set(labels[:, 0].tolist()) <= {0.0, 1.0, 2.0}
        assert len(np.unique(labels, axis=0)) == len(labels)
    else:
        assert len(labels) == 0 and any(action == "skipped" for _, _, action in problems)


# ---------------------------------------------------------------------------------------------- images
def test_image_checks():
    im = image_array()
    jpg = jpeg_bytes(im)
    assert check_image_bytes(jpg) == ((48, 64), [], True)
    assert check_image_bytes(jpeg_bytes(im, exif_orientation=6)) == ((64, 48), [], True)  # EXIF applied
    shape, problems, usable = check_image_bytes(jpg + b"\0\0")
    assert (shape, usable, problems[0][0]) == ((48, 64), True, "image_corrupt")
    assert check_image_bytes(jpg[:-300])[1:] == ([("image_corrupt", "truncated or corrupt JPEG that OpenCV "
                                                                    "cannot decode")], False)
    assert check_image_bytes(b"GIF89a nonsense")[1][0][0] == "image_unreadable"
    assert check_image_bytes(b"")[1] == [("image_unreadable", "empty file")]
    assert check_image_bytes(png_bytes(image_array(9, 40)))[1:] == (
        [("image_too_small", "image is 40x9 px, under 10 px on a side")], False)
    assert check_image_bytes(png_bytes(image_array(10, 10)))[2]


def _textured_jpeg(h: int, w: int, exif_orientation: int | None = None, progressive: bool = False) -> bytes:
    rng = np.random.default_rng(h * w)
    im = cv2.resize(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8), (w, h))
    im = cv2.add(im, rng.integers(0, 40, im.shape, dtype=np.uint8))  # entropy in every block
    if exif_orientation is not None:
        return jpeg_bytes(im, exif_orientation)
    return cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])[1].tobytes()


def _full_decode_shape(data: bytes):
    try:
        im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return None if im is None else im.shape[:2]


@settings(max_examples=200, deadline=None)
@given(progressive=st.booleans(), cut=st.floats(0.0, 1.0), flips=st.lists(
    st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=6))
def test_the_eighth_scale_check_rejects_exactly_what_a_full_decode_rejects(progressive, cut, flips):
    """validate decodes JPEGs at 1/8 scale (yolo.data.dataset._decoded_shape): what it accepts must load."""
    data = bytearray(_textured_jpeg(120, 200, progressive=progressive))
    for where, value in flips:  # anywhere: headers, tables, entropy-coded data
        data[int(where * (len(data) - 1))] = value
    data = bytes(data[: max(4, int(cut * len(data)))] if cut < 0.98 else data)
    size = image_header_size(data)
    if size is None or data[:3] != b"\xff\xd8\xff":
        return  # refused before any decode
    assert _decoded_shape(data, True, size) == _full_decode_shape(data)


def test_the_eighth_scale_check_reports_the_full_size_turned_by_exif():
    for h, w, orientation, expected in ((48, 64, None, (48, 64)), (48, 64, 6, (64, 48)), (200, 120, 8, (120, 200)),
                                        (60, 64, 6, (64, 60)), (64, 64, 6, (64, 64)), (61, 67, 6, (67, 61))):
        data = _textured_jpeg(h, w, orientation)
        assert check_image_bytes(data)[0] == expected == _full_decode_shape(data), (h, w, orientation)


# ---------------------------------------------------------------------------------------------- load_split
@pytest.fixture
def small_dataset(tmp_path) -> Path:
    root = tmp_path / "ds"
    for i in range(4):
        add_pair(root, "train", f"im{i}", png_bytes(image_array(40 + i, 64, seed=i)), GOOD_LABEL)
    add_pair(root, "train", "bg", png_bytes(image_array()), None)
    add_pair(root, "train", "broken", png_bytes(image_array()), "5 0.5 0.5 0.1 0.1\n")
    add_pair(root, "val", "v0", jpeg_bytes(image_array()), "2 0.5 0.5 0.1 0.1\n", "jpg")
    write_yaml(root)
    return root


def test_load_split_serves_usable_images_in_upstream_order(small_dataset):
    cfg = load_data_config(small_dataset / "data.yaml")
    split = load_split(cfg, "train")
    assert split.files == ["images/train/bg.png"] + [f"images/train/im{i}.png" for i in range(4)]
    assert split.skipped == ["images/train/broken.png"]
    assert split.shapes.tolist() == [[48, 64], [40, 64], [41, 64], [42, 64], [43, 64]]
    assert [len(lb) for lb in split.labels] == [0, 2, 2, 2, 2]
    assert split.image_path(1) == small_dataset / "images/train/im0.png" and len(split) == 5
    assert split.names == ["circle", "square", "triangle"] and len(split.fingerprint) == 64
    single = load_split(cfg, "train", single_cls=True)
    assert single.names == ["item"] and all((lb[:, 0] == 0).all() for lb in single.labels)
    assert split.labels[1][1, 0] == 1  # folding copies: the unfolded index is untouched
    assert load_split(cfg, "val").fingerprint != split.fingerprint


def test_load_splits_reads_a_file_two_splits_list_once(small_dataset, monkeypatch):
    import yolo.data.index as index_module

    read = []
    verify = index_module.verify_file
    monkeypatch.setattr(index_module, "verify_file", lambda task: read.append(task[2]) or verify(task))
    # upstream's coco128.yaml validates on its train folder: the same files in both splits
    cfg = load_data_config(write_yaml(small_dataset, "train: images/train\nval: images/train\nnames: [a, b, c]\n"))
    splits = index_module.load_splits(cfg, ("train", "val"))
    assert sorted(read) == sorted(f"images/train/{n}.png" for n in ("bg", "broken", "im0", "im1", "im2", "im3"))
    assert splits["val"].files == splits["train"].files == load_split(cfg, "val").files
    assert splits["val"].fingerprint == load_split(cfg, "val").fingerprint  # the same records, the same hash


def test_load_split_errors(small_dataset):
    cfg = load_data_config(write_yaml(small_dataset, "train: images/train\nval: images/none\nnames: [a, b, c]\n"))
    with pytest.raises(UserError, match="images/none does not exist"):
        load_split(cfg, "val")
    (small_dataset / "images/empty").mkdir()
    cfg = load_data_config(write_yaml(small_dataset, "train: images/train\nval: images/empty\nnames: [a, b, c]\n"))
    with pytest.raises(UserError, match="split `val` has no images"):
        load_split(cfg, "val")
    with pytest.raises(UserError, match="index not found"):
        load_split(cfg, "train", index_dir=small_dataset / "no-index")


def _validate(yaml_path: Path, out: Path) -> Path:
    from yolo.data.validate import ValidateConfig, validate

    validate(ValidateConfig(data=yaml_path, out=out, max_bad_fraction=0.5))
    return out / "index"


@pytest.fixture
def count_decodes(monkeypatch):
    """Count image decodes done by the index (pools stay in-process below PARALLEL_MIN_FILES files)."""
    calls = []
    original = index_module.check_image_bytes

    def counting(data):
        calls.append(len(data))
        return original(data)

    monkeypatch.setattr(index_module, "check_image_bytes", counting)
    return calls


def test_index_is_reused_and_changed_files_are_reverified(small_dataset, tmp_path, count_decodes):
    index_dir = _validate(small_dataset / "data.yaml", tmp_path / "v")
    cfg = load_data_config(small_dataset / "data.yaml")
    fresh = load_split(cfg, "train")
    count_decodes.clear()
    reused = load_split(cfg, "train", index_dir=index_dir)
    assert count_decodes == []  # nothing decoded: served from the index
    assert reused.files == fresh.files and reused.skipped == fresh.skipped
    assert reused.fingerprint == fresh.fingerprint and (reused.shapes == fresh.shapes).all()
    assert all(np.array_equal(a, b) for a, b in zip(reused.labels, fresh.labels, strict=True))

    # same bytes, new mtime (a checkout, a touch): re-hashed, not re-decoded
    label = small_dataset / "labels/train/im0.txt"
    os.utime(label, ns=(1, 1))
    assert load_split(cfg, "train", index_dir=index_dir).fingerprint == fresh.fingerprint
    assert count_decodes == []

    # a label edited after indexing: its size/mtime differ, its hash differs, so the pair is re-verified
    label.write_text("2 0.5 0.5 0.4 0.4\n")
    changed = load_split(cfg, "train", index_dir=index_dir)
    assert len(count_decodes) == 1
    np.testing.assert_allclose(changed.labels[1], [[2, 0.5, 0.5, 0.4, 0.4]])
    assert changed.fingerprint != fresh.fingerprint

    # an image replaced by a broken one is re-verified and skipped, never served stale
    (small_dataset / "images/train/im1.png").write_bytes(b"broken")
    changed = load_split(cfg, "train", index_dir=index_dir)
    assert "images/train/im1.png" in changed.skipped and "images/train/im1.png" not in changed.files

    # a new image is verified, a removed one disappears
    (small_dataset / "images/train/im2.png").unlink()
    add_pair(small_dataset, "train", "new", png_bytes(image_array(20, 30)), "0 0.5 0.5 0.5 0.5\n")
    changed = load_split(cfg, "train", index_dir=index_dir)
    assert "images/train/new.png" in changed.files and "images/train/im2.png" not in changed.files


def test_copied_dataset_reuses_the_index(small_dataset, tmp_path, count_decodes):
    index_dir = _validate(small_dataset / "data.yaml", tmp_path / "v")
    original = load_split(load_data_config(small_dataset / "data.yaml"), "train")
    copy = shutil.copytree(small_dataset, tmp_path / "copy", copy_function=shutil.copy)  # new mtimes
    count_decodes.clear()
    moved = load_split(load_data_config(copy / "data.yaml"), "train", index_dir=index_dir)
    assert count_decodes == []
    assert moved.root == copy and moved.files == original.files and moved.fingerprint == original.fingerprint


def test_index_for_another_data_yaml_is_not_trusted(small_dataset, tmp_path, count_decodes):
    index_dir = _validate(small_dataset / "data.yaml", tmp_path / "v")
    write_yaml(small_dataset, "path: .\ntrain: images/train\nval: images/val\nnames: [a, b, c, d, e, f]\n")
    count_decodes.clear()
    split = load_split(load_data_config(small_dataset / "data.yaml"), "train", index_dir=index_dir)
    assert len(count_decodes) == 6  # verified again: nc changed, so class checks change
    assert "images/train/broken.png" in split.files  # class 5 is valid with six names


def test_index_files_load_without_pickle(small_dataset, tmp_path):
    index_dir = _validate(small_dataset / "data.yaml", tmp_path / "v")
    records = index_module.read_split_records(index_dir, "train", index_module.yaml_hash(
        load_data_config(small_dataset / "data.yaml")))
    assert set(records) == {f"images/train/{s}.png" for s in ["bg", "broken", "im0", "im1", "im2", "im3"]}
    rec = records["images/train/im0.png"]
    assert isinstance(rec, FileRecord) and rec.usable and rec.shape == (40, 64) and rec.labels.shape == (2, 5)
    assert rec.image_size == (small_dataset / rec.image).stat().st_size and len(rec.image_hash) == 64
    assert records["images/train/bg.png"].label_hash == "" and records["images/train/bg.png"].problems[0][0] == \
        "label_missing"
    with np.load(index_dir / "train.npz", allow_pickle=False) as z:
        assert z["boxes"].dtype == np.float32 and z["box_count"].sum() == len(z["boxes"]) == 8
