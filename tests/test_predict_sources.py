"""predict's sources: a video the test writes, globs, .txt lists, URLs and a stream from a loopback server,
and the one-line failures for what cannot be opened."""

from __future__ import annotations

import functools
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from tests.conftest import run_cli
from yolo.errors import UserError
from yolo.predict import PredictConfig, predict
from yolo.sources import open_source

PERSON_IMAGE = "000000000785.jpg"  # a skier: yolov5n finds the person at 320 px
FRAMES = 30


@pytest.fixture(scope="module")
def person(coco128_yaml) -> np.ndarray:
    image = cv2.imread(str(coco128_yaml.parent / "images" / "val2017" / PERSON_IMAGE))
    return cv2.resize(image, (320, 240), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, person):
    """A 30-frame MJPEG AVI written with OpenCV: the image sliding 2 px right per frame."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    assert writer.isOpened()
    for i in range(FRAMES):
        writer.write(np.roll(person, 2 * i, axis=1))
    writer.release()
    return path


def _frames(path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def _predict(yolov5n_pt, source, out, **kw):
    kw = {"imgsz": [320], "device": "cpu", "save_txt": True, "save_conf": True, **kw}
    return predict(PredictConfig(weights=str(yolov5n_pt), source=source, out=out, **kw))


def test_video_gives_an_annotated_video_and_labels_per_frame(tmp_path, yolov5n_pt, clip):
    summary = _predict(yolov5n_pt, str(clip), tmp_path / "out")
    out = tmp_path / "out"
    assert summary.images == FRAMES and summary.videos == [str(out / "clip.mp4")]
    written = _frames(out / "clip.mp4")
    source = _frames(clip)
    assert len(written) == FRAMES and written[0].shape == source[0].shape
    assert np.abs(written[0].astype(int) - source[0].astype(int)).mean() > 1  # boxes were drawn
    labels = sorted((out / "labels").iterdir(), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert [p.name for p in labels] == [f"clip_{i}.txt" for i in range(1, FRAMES + 1)]
    for p in labels:
        rows = np.loadtxt(p, ndmin=2)
        assert ((rows[:, 0] == 0) & (rows[:, 5] > 0.5)).any(), p.name  # the skier in every frame
    # the person moves right by 2 px a frame: 58 px over the clip, 58/320 of the width
    first, last = (np.loadtxt(labels[k], ndmin=2) for k in (0, -1))
    best = [rows[(rows[:, 0] == 0)][rows[rows[:, 0] == 0][:, 5].argmax()] for rows in (first, last)]
    assert best[1][1] - best[0][1] == pytest.approx(58 / 320, abs=0.02)
    assert not list(out.glob(".*partial*"))  # the partial file was renamed into place


def test_vid_stride_reads_every_nth_frame(tmp_path, yolov5n_pt, clip):
    summary = _predict(yolov5n_pt, str(clip), tmp_path / "out", vid_stride=7)
    assert summary.images == 5  # frames 1, 8, 15, 22, 29
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == sorted(
        f"clip_{i}.txt" for i in (1, 8, 15, 22, 29))
    assert len(_frames(tmp_path / "out" / "clip.mp4")) == 5


def test_glob_takes_only_what_it_matches(tmp_path, yolov5n_pt, person):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(src / name), person)
    cv2.imwrite(str(src / "c.png"), person)
    _predict(yolov5n_pt, str(src / "*.jpg"), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file()) == ["a.jpg", "b.jpg"]
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == ["a.txt", "b.txt"]
    with pytest.raises(UserError, match="matches no images or videos"):
        open_source(str(src / "*.bmp"))


def test_txt_list_of_files_folders_and_globs(tmp_path, person, clip, monkeypatch):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / f"{folder}.jpg"), person)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'one' / 'one.jpg'}\n\ntwo\n{clip.parent}/*.avi\n")
    monkeypatch.chdir(tmp_path)  # relative lines are read from the current folder, as upstream
    source = open_source(str(listing))
    assert [p.name for p in source.files] == ["one.jpg", "two.jpg", "clip.avi"]
    listing.write_text("one/one.jpg\nmissing.jpg\n")
    with pytest.raises(UserError, match=r"line 2 \('missing.jpg'\)"):
        open_source(str(listing))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, person, clip, monkeypatch):
    """Loopback HTTP: an image, the clip as a file URL, and the clip again at a suffix-less stream URL."""
    root = tmp_path / "www"
    root.mkdir()
    cv2.imwrite(str(root / "skier.jpg"), person)
    shutil.copy(clip, root / "live")
    monkeypatch.setenv("YOLO_CACHE_DIR", str(tmp_path / "cache"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_image_url_is_downloaded_once_and_predicted(tmp_path, yolov5n_pt, server):
    url = f"{server}/skier.jpg"
    _predict(yolov5n_pt, url, tmp_path / "out")
    assert (tmp_path / "out" / "skier.jpg").is_file()
    rows = np.loadtxt(tmp_path / "out" / "labels" / "skier.txt", ndmin=2)
    assert ((rows[:, 0] == 0) & (rows[:, 5] > 0.5)).any()
    cached = list((tmp_path / "cache" / "sources").rglob("skier.jpg"))
    assert len(cached) == 1  # the cache, not the current folder; and the URL was not folded to http:/


def test_stream_url_is_read_with_opencv(tmp_path, yolov5n_pt, server):
    summary = _predict(yolov5n_pt, f"{server}/live", tmp_path / "out", vid_stride=10, save_txt=False)
    assert summary.images == 3 and summary.videos == [str(tmp_path / "out" / "live.mp4")]
    assert len(_frames(tmp_path / "out" / "live.mp4")) == 3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("source, match", [
    ("99", "cannot open webcam 99"),
    (f"rtsp://127.0.0.1:{_closed_port()}/cam", "cannot open stream rtsp://127.0.0.1"),
    (f"http://127.0.0.1:{_closed_port()}/stream", "cannot open stream http://127.0.0.1"),
    ("ftp://example.invalid/a.jpg", "unsupported URL scheme"),
])
@pytest.mark.timeout(120)  # fails, does not hang: OPEN_TIMEOUT_MS bounds a silent server
def test_unopenable_streams_are_one_line_errors(source, match):
    with pytest.raises(UserError, match=match):
        open_source(source)


def test_cli_unreachable_image_url_is_one_line_exit_2(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/x.jpg"
    result = run_cli("predict", "--weights", "unused.pt", "--source", url, "--out", tmp_path / "out",
                     env={"YOLO_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr and [line for line in lines if "error" in line] == lines[-1:]
    assert lines[-1].startswith("yolo-pipeline predict: error: cannot download ")
    assert url in lines[-1]  # the URL as given: http://, not http:/
