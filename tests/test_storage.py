"""yolo.storage against a local folder and a real S3 endpoint (moto's server on loopback, boto3 over HTTP)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from yolo.errors import UserError
from yolo.storage import (
    ChecksumMismatch,
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    StorageError,
    open_storage,
    sha256_file,
)

# Fixtures s3_server, s3_env, s3_bucket. Helpers from the same module are imported inside tests: a
# top-level import would load it before pytest can register (and assertion-rewrite) it as a plugin.
pytest_plugins = ("tests.s3_server",)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/runs/r1")


def _file(path: Path, size: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes((i * 31 + seed) % 251 for i in range(size)))
    return path


def _corrupt(storage, key: str) -> None:
    """Replace the stored bytes of `key` but keep the checksum recorded at upload."""
    if isinstance(storage, LocalStorage):
        Path(storage.uri_for(key)).write_bytes(b"not the checkpoint")
        return
    object_key = storage.uri_for(key)[len(f"s3://{storage.bucket}/") :]
    head = storage.client.head_object(Bucket=storage.bucket, Key=object_key)
    storage.client.put_object(
        Bucket=storage.bucket, Key=object_key, Body=b"not the checkpoint", Metadata=head["Metadata"]
    )


def test_put_get_roundtrip_verifies(storage, tmp_path):
    src = _file(tmp_path / "last.pt", 70_000)
    uri = storage.put(src, "weights/last.pt")
    assert uri == storage.uri_for("weights/last.pt")
    assert uri.endswith("weights/last.pt")
    assert storage.exists("weights/last.pt")
    assert not storage.exists("weights/best.pt")

    out = storage.get("weights/last.pt", tmp_path / "down" / "last.pt")
    assert out.read_bytes() == src.read_bytes()
    assert sha256_file(out) == sha256_file(src)

    # Overwrite: the newer upload wins and still verifies.
    src2 = _file(tmp_path / "last2.pt", 1234, seed=7)
    storage.put(src2, "weights/last.pt")
    assert storage.get_bytes("weights/last.pt") == src2.read_bytes()


def test_bytes_helpers(storage):
    storage.put_bytes(b'{"version": 3}\n', "models/m/current.json")
    assert storage.get_bytes("models/m/current.json") == b'{"version": 3}\n'


def test_missing_key_is_not_found(storage, tmp_path):
    with pytest.raises(ObjectNotFound, match="not found"):
        storage.get("nope.pt", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_corrupted_object_detected_and_nothing_written(storage, tmp_path):
    src = _file(tmp_path / "best.pt", 5000)
    storage.put(src, "best.pt")
    _corrupt(storage, "best.pt")
    down = tmp_path / "down"
    down.mkdir()
    with pytest.raises(ChecksumMismatch, match="SHA-256"):
        storage.get("best.pt", down / "best.pt")
    assert list(down.iterdir()) == []  # neither the bad file nor a temp file is left behind


def test_list_and_delete(storage, tmp_path):
    src = _file(tmp_path / "f", 100)
    for key in ("a/1.pt", "a/2.pt", "ab.txt", "b/3.pt"):
        storage.put(src, key)
    assert storage.list() == ["a/1.pt", "a/2.pt", "ab.txt", "b/3.pt"]
    assert storage.list("a/") == ["a/1.pt", "a/2.pt"]
    assert storage.list("a") == ["a/1.pt", "a/2.pt", "ab.txt"]
    assert storage.list("zzz") == []
    storage.delete("a/1.pt")
    storage.delete("a/1.pt")  # deleting a missing key is fine
    assert storage.list() == ["a/2.pt", "ab.txt", "b/3.pt"]
    assert not storage.exists("a/1.pt")


def test_bad_keys_refused(storage, tmp_path):
    src = _file(tmp_path / "f", 10)
    for key in ("", "/abs", "a/../b", "a//b", ".partial/x", ".yolo-storage/x"):
        with pytest.raises(ValueError, match="invalid storage key"):
            storage.put(src, key)


def test_put_of_missing_file_is_one_line_error(storage, tmp_path):
    with pytest.raises(StorageError, match="no such file"):
        storage.put(tmp_path / "missing.pt", "x.pt")


def test_s3_uploads_leave_no_partial_objects(s3_env, s3_bucket, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}/p")
    storage.put(_file(tmp_path / "f", 100), "x.pt")
    raw = storage.client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    assert [o["Key"] for o in raw] == ["p/x.pt"]
    head = storage.client.head_object(Bucket=s3_bucket, Key="p/x.pt")
    assert head["Metadata"]["sha256"] == sha256_file(tmp_path / "f")


def test_s3_multipart_transfer_roundtrip(s3_env, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_S3_MULTIPART_THRESHOLD_MB", "5")
    monkeypatch.setenv("YOLO_S3_MULTIPART_CHUNK_MB", "5")
    storage = open_storage(f"s3://{s3_bucket}")
    src = tmp_path / "big.pt"
    src.write_bytes(os.urandom(11 * 1024 * 1024))
    storage.put(src, "big.pt")
    head = storage.client.head_object(Bucket=s3_bucket, Key="big.pt")
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts of <= 5 MiB: a multipart object
    assert head["Metadata"]["sha256"] == sha256_file(src)
    assert sha256_file(storage.get("big.pt", tmp_path / "back.pt")) == sha256_file(src)


def test_open_storage_schemes(tmp_path):
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    s3 = open_storage("s3://bucket/runs/r1/")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket", "runs/r1")
    assert s3.uri_for("last.pt") == "s3://bucket/runs/r1/last.pt"
    assert open_storage("s3://bucket").uri_for("a/b") == "s3://bucket/a/b"
    with pytest.raises(UserError, match="unsupported storage scheme 'gs'"):
        open_storage("gs://bucket/x")
    with pytest.raises(UserError, match="no bucket"):
        open_storage("s3:///x")


def test_local_check_access(tmp_path):
    storage = open_storage(tmp_path / "new" / "store")
    with pytest.raises(StorageError, match="no such folder"):
        storage.check_access()
    storage.check_access(write=True)
    assert (tmp_path / "new" / "store").is_dir()


def test_s3_check_access_ok_and_error_code(s3_env, s3_bucket):
    open_storage(f"s3://{s3_bucket}/runs").check_access(write=True)
    with pytest.raises(StorageError) as info:
        open_storage("s3://no-such-bucket-here/runs").check_access()
    message = str(info.value)
    assert message.startswith("s3://no-such-bucket-here/runs: NoSuchBucket")
    assert "\n" not in message


def test_unreachable_endpoint_is_one_line_user_error_without_secrets(monkeypatch):
    from tests.s3_server import DUMMY_ENV, apply_env, closed_port

    port = closed_port()
    apply_env(
        monkeypatch,
        {
            **DUMMY_ENV,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
            "YOLO_S3_MAX_ATTEMPTS": "2",
        },
    )
    storage = open_storage("s3://b/p")
    with pytest.raises(UserError) as info:
        storage.check_access()
    message = str(info.value)
    assert message == f"s3://b/p: endpoint unreachable (http://127.0.0.1:{port})"
    assert "s3cr3t" not in message
    with pytest.raises(StorageError, match="endpoint unreachable"):
        storage.exists("x")


def test_put_retried_across_server_restart_on_same_port(monkeypatch, tmp_path):
    from tests.s3_server import LoopbackS3, apply_env, make_bucket

    server = LoopbackS3().start()
    try:
        env = server.env()
        apply_env(monkeypatch, {**env, "YOLO_S3_MAX_ATTEMPTS": "10"})
        bucket = make_bucket(env)
        storage = open_storage(f"s3://{bucket}/runs")
        storage.put(_file(tmp_path / "e1.pt", 1000), "last.pt")
        port = server.port

        server.stop()
        with pytest.raises(ConnectionRefusedError):  # the port really is closed now
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        restarter = threading.Timer(1.0, server.start)
        restarter.start()
        started = time.monotonic()
        src = _file(tmp_path / "e2.pt", 2000, seed=3)
        storage.put(src, "last.pt")  # first attempts are refused; standard-mode retries get through
        restarter.join()
        assert server.port == port
        assert time.monotonic() - started >= 0.9  # it really waited for the restart
        assert storage.get_bytes("last.pt") == src.read_bytes()
    finally:
        server.stop()


def test_local_storage_works_without_boto3(tmp_path):
    code = (
        "import sys; sys.modules['boto3'] = None; sys.modules['botocore'] = None\n"
        "from yolo.storage import open_storage\n"
        f"s = open_storage({str(tmp_path)!r})\n"
        "s.put_bytes(b'abc', 'k/v.txt'); assert s.get_bytes('k/v.txt') == b'abc'; print(s.list())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['k/v.txt']"


def test_s3_failed_upload_names_the_s3_error_code(s3_env, tmp_path):
    storage = open_storage("s3://no-such-bucket-for-put/runs")
    with pytest.raises(StorageError) as info:
        storage.put(_file(tmp_path / "f", 10), "last.pt")
    assert str(info.value).startswith("upload to s3://no-such-bucket-for-put/runs/last.pt: NoSuchBucket")


def test_s3_object_without_recorded_checksum_still_downloads(s3_env, s3_bucket, tmp_path):
    """Objects put by other tools (aws s3 cp, a dataset prefix) have no sha256: nothing to verify against."""
    storage = open_storage(f"s3://{s3_bucket}/data")
    storage.client.put_object(Bucket=s3_bucket, Key="data/images/a.jpg", Body=b"jpeg bytes")
    assert storage.list() == ["images/a.jpg"]
    assert storage.get("images/a.jpg", tmp_path / "a.jpg").read_bytes() == b"jpeg bytes"


def test_fingerprint_follows_content_changes(storage, tmp_path):
    storage.put(_file(tmp_path / "a", 100), "d/a.jpg")
    storage.put(_file(tmp_path / "b", 200), "d/b.jpg")
    first = storage.fingerprint("d/")
    assert first == storage.fingerprint("d/")  # stable when nothing changed
    time.sleep(0.01)  # local tags are mtimes
    storage.put(_file(tmp_path / "b2", 200, seed=5), "d/b.jpg")  # same size, new bytes
    second = storage.fingerprint("d/")
    assert second != first
    storage.put(_file(tmp_path / "c", 10), "other/c.jpg")
    assert storage.fingerprint("d/") == second  # outside the prefix: no effect
    storage.delete("d/a.jpg")
    assert storage.fingerprint("d/") != second
