"""Weights by name or URL, served from a loopback HTTP server: cache, verification, failing fast."""

from __future__ import annotations

import functools
import hashlib
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from yolo.errors import UserError
from yolo.model.checkpoint import load_checkpoint
from yolo.model.download import resolve_weights


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        type(self).requests.append(self.path)
        if self.path == "/short.pt":  # promises more bytes than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"PK" * 5)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(yolov5n_pt, tmp_path, monkeypatch):
    _Handler.requests = []
    handler = functools.partial(_Handler, directory=str(yolov5n_pt.parent))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("YOLO_WEIGHTS_BASE_URL", base)
    monkeypatch.setenv("YOLO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # so a bare name is not a local file
    yield base
    httpd.shutdown()
    httpd.server_close()


def _cached_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_local_path_is_used_as_is(yolov5n_pt, monkeypatch):
    monkeypatch.setenv("YOLO_WEIGHTS_BASE_URL", "http://127.0.0.1:9")  # would fail if contacted
    assert resolve_weights(yolov5n_pt) == yolov5n_pt
    assert resolve_weights(str(yolov5n_pt)) == yolov5n_pt


def test_official_name_downloads_once_into_the_cache(server, tmp_path, yolov5n_pt):
    path = resolve_weights("yolov5n.pt")
    assert path.read_bytes() == yolov5n_pt.read_bytes()
    assert path.is_relative_to(tmp_path / "cache") and path.name == "yolov5n.pt"
    assert resolve_weights("yolov5n.pt") == path
    assert _Handler.requests == ["/yolov5n.pt"]  # second call served from the cache
    ckpt = load_checkpoint("yolov5n.pt")
    assert ckpt["names"][0] == "person"


def test_url_with_sha256(server, tmp_path, yolov5n_pt):
    digest = hashlib.sha256(yolov5n_pt.read_bytes()).hexdigest()
    assert resolve_weights(f"{server}/yolov5n.pt#sha256={digest}").read_bytes() == yolov5n_pt.read_bytes()
    wrong = "0" * 64
    (tmp_path / "cache").rename(tmp_path / "old")
    with pytest.raises(UserError, match=f"has sha256 {digest}, expected {wrong}"):
        resolve_weights(f"{server}/yolov5n.pt#sha256={wrong}")
    assert _cached_files(tmp_path) == []  # nothing half-verified is left behind


def test_http_errors_and_incomplete_bodies(server, tmp_path):
    with pytest.raises(UserError, match=r"cannot download .*/yolov5x6.pt: HTTP 404"):
        resolve_weights("yolov5x6.pt")
    with pytest.raises(UserError, match=r"cannot download .*/short.pt: incomplete, 10 of 1000 bytes"):
        resolve_weights(f"{server}/short.pt")
    assert _cached_files(tmp_path) == []


def test_offline_fails_fast_with_one_line(tmp_path, monkeypatch):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connection refused, like a machine without network
    monkeypatch.setenv("YOLO_WEIGHTS_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("YOLO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"cannot download http://127.0.0.1:\d+/yolov5s.pt: .*offline\?") as err:
        resolve_weights("yolov5s.pt")
    assert "\n" not in str(err.value)


def test_stalled_server_times_out(tmp_path, monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # the kernel accepts the connection; nobody ever answers
    monkeypatch.setenv("YOLO_DOWNLOAD_TIMEOUT", "0.5")
    monkeypatch.setenv("YOLO_CACHE_DIR", str(tmp_path / "cache"))
    start = time.monotonic()
    try:
        with pytest.raises(UserError, match="timed out"):
            resolve_weights(f"http://127.0.0.1:{listener.getsockname()[1]}/w.pt")
    finally:
        listener.close()
    assert time.monotonic() - start < 30  # bounded, never hangs (the limit is generous for a busy CI)
    assert _cached_files(tmp_path) == []


def test_unknown_names_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"weights not found: yolov5q.pt \(did you mean `yolov5.\.pt`\?\)"):
        resolve_weights("yolov5q.pt")
    with pytest.raises(UserError, match=r"weights not found: runs/x/best.pt \(give a local"):
        resolve_weights("runs/x/best.pt")
