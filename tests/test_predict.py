"""predict: official yolov5n on coco128 val images finds the labelled people; upstream's txt format; bad input."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from yolo.errors import UserError
from yolo.predict import PredictConfig, check_img_size, label_rows, predict
from yolo.sources import list_media

# two coco128 val images whose labels hold people (class 0): a skier, and a baseball scene
PERSON_IMAGES = ("000000000785.jpg", "000000000872.jpg")


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, coco128_yaml, yolov5n_pt):
    """One CLI run over a folder: two coco128 images, a blank image and a non-image file."""
    root = coco128_yaml.parent
    src = tmp_path_factory.mktemp("src")
    for name in PERSON_IMAGES:
        shutil.copy(root / "images" / "val2017" / name, src / name)
    cv2.imwrite(str(src / "blank.png"), np.full((48, 64, 3), 114, np.uint8))
    (src / "notes.txt").write_text("not an image")
    out = tmp_path_factory.mktemp("out")
    (out / "labels").mkdir()
    (out / "labels" / "blank.txt").write_text("0 0.5 0.5 1 1 0.9\n")  # stale, from an "earlier run"
    # in-process (a subprocess would re-import torch); the CLI itself is covered by the exit-2 test below
    summary = predict(PredictConfig(weights=str(yolov5n_pt), source=src, out=out, imgsz=[320], save_txt=True,
                                    save_conf=True))
    return root, src, out, summary


def _rows(path):
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines()]


def test_finds_labelled_people(predicted):
    root, _, out, _ = predicted
    for name in PERSON_IMAGES:
        stem = name.rsplit(".", 1)[0]
        truth = np.loadtxt(root / "labels" / "val2017" / f"{stem}.txt", ndmin=2)
        assert (truth[:, 0] == 0).any()
        rows = np.array(_rows(out / "labels" / f"{stem}.txt"))
        assert rows.shape[1] == 6
        people = rows[(rows[:, 0] == 0) & (rows[:, 5] > 0.5)]
        assert len(people), f"no person above 0.5 in {name}: {rows}"
        # the most confident person overlaps a labelled person well (centres within 5% of the image)
        best = people[people[:, 5].argmax()]
        gt = truth[truth[:, 0] == 0][:, 1:5]
        assert np.abs(gt[:, :2] - best[1:3]).max(1).min() < 0.05
        assert ((rows[:, 1:5] >= 0) & (rows[:, 1:5] <= 1)).all()
        assert (np.diff(rows[:, 5]) >= 0).all()  # upstream writes reversed(det): least confident first


def test_annotated_images_and_no_label_file_without_detections(predicted):
    _, src, out, summary = predicted
    for name in (*PERSON_IMAGES, "blank.png"):
        drawn = cv2.imread(str(out / name))
        original = cv2.imread(str(src / name))
        assert drawn is not None and drawn.shape == original.shape
    assert not np.array_equal(cv2.imread(str(out / PERSON_IMAGES[0])), cv2.imread(str(src / PERSON_IMAGES[0])))
    assert not (out / "labels" / "blank.txt").exists()  # none for an image without detections (stale removed)
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in (out / "labels").iterdir()) == [n.replace(".jpg", ".txt") for n in PERSON_IMAGES]
    assert summary.images == 3 and summary.labels_written == 2 and summary.detections >= 2
    assert set(summary.speed_ms) == {"preprocess", "inference", "nms"}


def test_label_rows_format_matches_detect_py():
    # detections already scaled to a 480x640 (h, w) original, most confident first (NMS order)
    det = torch.tensor([[10.0, 20.0, 110.0, 220.0, 0.9123456, 0.0], [0.0, 0.0, 640.0, 480.0, 0.3, 17.0]])
    text = label_rows(det, (480, 640, 3))
    assert text == "17 0.5 0.5 1 1 0.3\n0 0.09375 0.25 0.15625 0.416667 0.912346\n"
    assert label_rows(det[:0], (480, 640, 3)) == ""


def test_check_img_size_rounds_up_to_stride():
    assert check_img_size([640], 32) == [640, 640]
    assert check_img_size([300], 32) == [320, 320]
    assert check_img_size([320, 250], 32) == [320, 256]
    with pytest.raises(UserError):
        check_img_size([320, 256, 3], 32)


def test_list_media_sorted_and_filtered(tmp_path):
    for name in ("b.jpg", "a.PNG", "c.txt", "d", "._b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_media(tmp_path)] == ["a.PNG", "b.jpg"]
    assert list_media(tmp_path / "b.jpg") == [tmp_path / "b.jpg"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d / "c.txt", "not an image"),
        (lambda d: d / "empty", "no images found"),
    ],
)
def test_bad_source_is_a_user_error(tmp_path, make, match):
    (tmp_path / "c.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=match):
        predict(PredictConfig(weights="unused.pt", source=make(tmp_path), out=tmp_path / "out"))


def test_out_equal_to_source_folder_is_refused(tmp_path):
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="folder of the source images"):
        predict(PredictConfig(weights="unused.pt", source=tmp_path, out=tmp_path))


def test_bad_thresholds_and_half_on_cpu(tmp_path):
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="conf-thres"):
        predict(PredictConfig(weights="x.pt", source=tmp_path, out=tmp_path / "o", conf_thres=2.0))
    with pytest.raises(UserError, match="--half needs a CUDA device"):
        predict(PredictConfig(weights="x.pt", source=tmp_path, out=tmp_path / "o", device="cpu", half=True))


def test_cli_weights_not_a_checkpoint_is_one_line_exit_2(tmp_path):
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("this is not a checkpoint")
    result = run_cli("predict", "--weights", bogus, "--source", tmp_path / "a.jpg", "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("yolo-pipeline predict: error:")
    assert not (tmp_path / "o" / "labels").exists() or not any((tmp_path / "o" / "labels").iterdir())


def test_upstream_flags_save_txt_conf_crop_classes_and_hidden_labels(tmp_path, coco128_yaml, yolov5n_pt):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(coco128_yaml.parent / "images" / "val2017" / PERSON_IMAGES[1], src / "game.jpg")
    base = {"weights": str(yolov5n_pt), "source": src, "imgsz": [320], "device": "cpu"}
    # defaults as upstream: annotated image only, no labels, no crops
    predict(PredictConfig(**base, out=tmp_path / "plain"))
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["game.jpg"]
    # --save-txt without --save-conf: 5 columns; --classes 0 keeps people only; --save-crop cuts each box
    summary = predict(PredictConfig(**base, out=tmp_path / "o", save_txt=True, save_crop=True, classes=[0],
                                    hide_labels=True))
    rows = np.loadtxt(tmp_path / "o" / "labels" / "game.txt", ndmin=2)
    assert rows.shape[1] == 5 and len(rows) >= 2 and (rows[:, 0] == 0).all()
    crops = sorted((tmp_path / "o" / "crops" / "person").iterdir())
    assert summary.crops == len(rows) == len(crops) and crops[0].name == "game.jpg" and crops[1].name == "game2.jpg"
    image = cv2.imread(str(src / "game.jpg"))
    h, w = image.shape[:2]
    # the first crop is the first row's box grown by 2% + 10 px (upstream save_one_box), within a pixel
    _, cx, cy, bw, bh = rows[0]
    expected = (min(h, round(bh * h * 1.02 + 10)), min(w, round(bw * w * 1.02 + 10)))
    assert np.abs(np.array(cv2.imread(str(crops[0])).shape[:2]) - expected).max() <= 2
    # hidden labels draw boxes only: fewer changed pixels than with labels
    predict(PredictConfig(**base, out=tmp_path / "labelled", classes=[0]))
    changed = [np.count_nonzero(cv2.imread(str(tmp_path / d / "game.jpg")) != image) for d in ("o", "labelled")]
    assert 0 < changed[0] < changed[1]


def test_crop_folder_names_cannot_leave_the_output(tmp_path):
    from yolo.predict import _safe_folder_name

    assert _safe_folder_name("../../etc") == "______etc" and _safe_folder_name("traffic light") == "traffic light"
    assert "/" not in _safe_folder_name("a/b") and _safe_folder_name("..") == "__"
