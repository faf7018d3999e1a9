"""Hostile inputs to train/evaluate/convert/export and the checkpoint store: a planted last.pt, NaN weights,
two writers on one checkpoint folder, unverified or oddly named objects, secrets, a full disk, SIGTERM.

Every hostile input is made by the test itself; each case asserts one line and exit 2 (or the refusal),
and that nothing was written or fetched where the input pointed.
"""

from __future__ import annotations

import http.server
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli
from yolo.engine.lease import Holder, Lease
from yolo.errors import UserError
from yolo.model.checkpoint import save_checkpoint
from yolo.redact import redact
from yolo.storage import ChecksumMissing, InvalidKey, StorageError, open_storage
from yolo.train import TrainConfig, train

pytest_plugins = ("tests.s3_server",)
pytestmark = pytest.mark.usefixtures("one_thread")


def small(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=data, out=out, imgsz=64, epochs=1, batch_size=4, workers=0, device="cpu",
                  deterministic=True, noval=True)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def data4(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data4")
    assert run_cli("sample-data", "--out", root, "--train", 4, "--val", 2, "--imgsz", 64).returncode == 0
    return root / "data.yaml"


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The last stderr line, after asserting exit 2, no traceback, and that it names `words`."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in line, line
    return line


class RecordingHTTP:
    """A loopback HTTP server that counts requests (a planted weights URL must never be fetched)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                hits.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tamper(path: Path, **args) -> None:
    ckpt = torch.load(path, weights_only=True)
    ckpt["args"].update(args)
    save_checkpoint(path, ckpt)


# ------------------------------------------------------------------------------ a planted last.pt


def test_tampered_last_pt_decides_no_place(tiny_run, tmp_path, caplog):
    """A last.pt whose arguments name another --out, another checkpoint folder and a weights URL: the
    resumed run writes only under its own folder, mirrors nowhere it was not told to, fetches nothing."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    web = RecordingHTTP()
    elsewhere, bucket = tmp_path / "elsewhere", tmp_path / "attacker-bucket"
    try:
        tamper(run / "weights/last.pt", out=str(elsewhere), checkpoint_uri=str(bucket),
               weights=f"{web.url}/evil.pt")
        caplog.set_level("WARNING")
        result = train(TrainConfig(resume=str(run), out=None, device=None, workers=None, epochs=2))
    finally:
        web.close()
    assert result.exit_code == 0 and result.out == run and result.epochs_run == 2
    assert not elsewhere.exists() and not bucket.exists()
    assert web.hits == []
    assert "ignored" in caplog.text and str(elsewhere) in caplog.text and "not fetched" in caplog.text
    args = torch.load(run / "weights/last.pt", weights_only=True)["args"]
    assert args["out"] == str(run) and args["checkpoint_uri"] is None and args["weights"] is None


@pytest.mark.slow
def test_tampered_remote_last_pt_uploads_only_where_told(tiny_run, tmp_path, s3_env, s3_bucket):
    """--resume s3://victim/run with a last.pt naming the attacker's bucket: uploads stay in the victim's."""
    from tests.s3_server import make_bucket

    attacker = make_bucket(s3_env)
    last = tmp_path / "last.pt"
    shutil.copyfile(tiny_run / "weights/last.pt", last)
    tamper(last, checkpoint_uri=f"s3://{attacker}/stolen", out=str(tmp_path / "elsewhere"))
    victim = open_storage(f"s3://{s3_bucket}/runs/r1")
    victim.put(last, "weights/last.pt")

    result = train(TrainConfig(resume=f"s3://{s3_bucket}/runs/r1", out=tmp_path / "pod", device=None,
                               workers=None, epochs=2, data=tiny_run.parent / "data/data.yaml"))
    assert result.exit_code == 0 and result.epochs_run == 2
    assert open_storage(f"s3://{attacker}").list() == []
    assert "train.json" in victim.list()
    assert not (tmp_path / "elsewhere").exists()


def test_resume_refuses_weights_and_unverified_objects(tiny_run, tmp_path, s3_env, s3_bucket):
    with pytest.raises(UserError, match="--weights cannot be combined with --resume"):
        train(TrainConfig(resume=str(tiny_run), weights=str(tiny_run / "weights/best.pt"), out=tmp_path / "x"))

    # a last.pt rewritten without its checksum metadata (by another tool, or an attacker)
    store = open_storage(f"s3://{s3_bucket}/runs/r1")
    store.client.put_object(Bucket=s3_bucket, Key="runs/r1/weights/last.pt",
                            Body=(tiny_run / "weights/last.pt").read_bytes())
    with pytest.raises(ChecksumMissing, match="--trust-unverified"):
        train(TrainConfig(resume=f"s3://{s3_bucket}/runs/r1", out=tmp_path / "y", epochs=2))
    assert not (tmp_path / "y").exists()
    # the storage level: a verified read is refused, a plain one still reads
    with pytest.raises(ChecksumMissing):
        store.get("weights/last.pt", tmp_path / "z.pt", require_checksum=True)
    assert not (tmp_path / "z.pt").exists()
    assert store.get("weights/last.pt", tmp_path / "z.pt").is_file()


# ------------------------------------------------------------------------------ non-finite weights


def poisoned(source: Path, dest: Path, key_suffix: str = "conv.weight") -> Path:
    ckpt = torch.load(source, weights_only=True)
    for part in ("model",) + (("train",) if "train" in ckpt else ()):
        state = ckpt[part] if part == "model" else ckpt[part]["model"]
        name = next(k for k in state if k.endswith(key_suffix))
        state[name] = torch.full_like(state[name], float("nan"))
    save_checkpoint(dest, ckpt)
    return dest


def test_nan_weights_are_refused_by_evaluate_and_train(tiny_run, tmp_path):
    data = tiny_run.parent / "data/data.yaml"
    bad = poisoned(tiny_run / "weights/best.pt", tmp_path / "nan.pt")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "gate.json").write_text('{"promote": true}')  # an earlier run's verdict must not survive
    proc = run_cli("evaluate", "--data", data, "--weights", bad, "--out", out, "--imgsz", 64)
    one_line_error(proc, "NaN", "nan.pt")
    assert not (out / "gate.json").exists() and not (out / "metrics.json").exists()

    proc = run_cli("train", "--data", data, "--weights", bad, "--out", tmp_path / "t", "--imgsz", 64,
                   "--epochs", 1, "--device", "cpu", "--workers", 0, env={"OMP_NUM_THREADS": "1"})
    one_line_error(proc, "NaN", "--weights")
    assert not (tmp_path / "t" / "weights").exists()

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    poisoned(run / "weights/last.pt", run / "weights/last.pt")
    with pytest.raises(UserError, match="NaN or infinite"):
        train(TrainConfig(resume=str(run), out=None, device=None, workers=None, epochs=2))


def test_a_run_whose_every_step_was_skipped_fails(data4, tmp_path, monkeypatch):
    import yolo.engine.setup as setup_module

    real_prepare = setup_module.prepare_run

    def prepare_with_nan_loss(cfg, ctx):
        run = real_prepare(cfg, ctx)
        loss = run.compute_loss
        run.compute_loss = lambda preds, targets: tuple(t * float("nan") for t in loss(preds, targets))
        return run

    monkeypatch.setattr(setup_module, "prepare_run", prepare_with_nan_loss)
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.json").write_text("{}")  # an earlier run's result must not pass for this one's
    with pytest.raises(UserError, match="every training step had a non-finite loss"):
        train(small(data4, out))
    assert not (out / "train.json").exists()


# ------------------------------------------------------------------------------ one writer per folder


def test_second_writer_on_a_folder_is_refused_naming_the_holder(data4, tmp_path):
    out = tmp_path / "run"
    holder = Lease(open_storage(out), "feedfacefeedface", "/somewhere/else").acquire()
    try:
        with pytest.raises(UserError, match=r"in use by run feedfacefeedface \(pid \d+ on "):
            train(small(data4, out))
    finally:
        holder.release()
    assert not (out / "args.yaml").exists()
    assert not (out / ".lease").exists()  # released


def test_stale_local_lease_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = open_storage(tmp_path / "run")
    stale = Holder("0123456789abcdef", socket.gethostname(), dead.pid, "/x", time.time(), time.time() + 3600)
    assert store.create_lease(stale.to_bytes()) is not None
    caplog.set_level("WARNING")
    lease = Lease(store, "fedcba9876543210", str(tmp_path)).acquire()
    assert "took over the stale lease" in caplog.text
    lease.release()
    assert store.read_lease() is None


def test_s3_lease_conditional_writes(s3_env, s3_bucket, caplog):
    store = open_storage(f"s3://{s3_bucket}/ckpt")
    first = Lease(store, "aaaaaaaaaaaaaaaa", "/pod1", ttl=30).acquire()
    with pytest.raises(UserError, match="in use by run aaaaaaaaaaaaaaaa"):
        Lease(store, "bbbbbbbbbbbbbbbb", "/pod2", ttl=30).acquire()
    assert store.list() == []  # the lease is not a stored file
    first.release()
    assert store.read_lease() is None

    # a holder that stopped renewing (its pod was killed): expired, taken over
    gone = Holder("cccccccccccccccc", "another-host", 1, "/pod3", time.time() - 100, time.time() - 1)
    assert store.create_lease(gone.to_bytes()) is not None
    caplog.set_level("INFO")
    second = Lease(store, "dddddddddddddddd", "/pod4", ttl=30).acquire()
    assert "took over the stale lease" in caplog.text
    second.release()

    # the same run's previous pod, killed a moment ago: the retry waits for its lease to lapse
    killed = Holder("eeeeeeeeeeeeeeee", "another-host", 1, "/pod5", time.time(), time.time() + 1.0)
    assert store.create_lease(killed.to_bytes()) is not None
    retry = Lease(store, "eeeeeeeeeeeeeeee", "/pod6", ttl=5).acquire()
    assert "waiting for it to lapse" in caplog.text
    retry.release()


def test_a_run_that_lost_its_lease_stops_at_the_next_checkpoint(tmp_path):
    store = open_storage(tmp_path / "ckpt")
    lease = Lease(store, "aaaaaaaaaaaaaaaa", "/pod1", ttl=0.3).acquire()
    thief = Holder("bbbbbbbbbbbbbbbb", "another-host", 1, "/pod2", time.time(), time.time() + 60)
    while store.replace_lease(thief.to_bytes(), store.read_lease()[1]) is None:
        pass  # the holder renewed between our read and our swap: read again
    deadline = time.monotonic() + 30
    while lease.lost_to is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(UserError, match="lost the lease .* to run bbbbbbbbbbbbbbbb"):
        lease.check()
    lease.release()
    assert Holder.from_bytes(store.read_lease()[0]).run_id == "bbbbbbbbbbbbbbbb"  # not ours to delete


# ------------------------------------------------------------------------------ names and secrets


@pytest.mark.parametrize("uri", ["s3://bucket/a/../b", "s3://bucket/.partial/x", "s3://bucket/run/.lease",
                                 "s3://bucket/./x", "s3://buck`et/x", "s3:///x"])
def test_bad_storage_locations_are_one_line(uri):
    with pytest.raises(StorageError) as info:
        open_storage(uri)
    assert "\n" not in str(info.value)


def test_bad_keys_are_one_line_user_errors(tmp_path):
    store = open_storage(tmp_path / "s")
    for key in ("a/../../etc/passwd", "x/.partial/y", ".lease", "a/.yolo-storage/b", "a\nb"):
        with pytest.raises(InvalidKey):
            store.exists(key)
    assert open_storage("s3://bucket//a///b/").uri == "s3://bucket/a/b"


def test_secrets_never_reach_a_message(tmp_path, data4, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    text = "s3://AKIAIOSFODNN7EXAMPLE:pw@bucket/x failed with wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert redact(text) == "s3://***@bucket/x failed with ***"
    proc = run_cli("train", "--data", data4, "--out", tmp_path / "o", "--device", "cpu",
                   "--checkpoint-uri", "s3://AKIAIOSFODNN7EXAMPLE:topsecretvalue@bucket/runs",
                   env={"AWS_SECRET_ACCESS_KEY": "topsecretvalue"})
    one_line_error(proc, "credentials do not belong")
    assert "topsecretvalue" not in proc.stderr and "AKIAIOSFODNN7EXAMPLE" not in proc.stderr
    proc = run_cli("train", "--data", data4, "--out", tmp_path / "p", "--device", "cpu",
                   "--checkpoint-uri", "s3://bucket/runs/../../other")
    one_line_error(proc, "'..'")


# ------------------------------------------------------------------------------ the machine fails


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_checkpoint_write_that_fails_is_one_line_and_leaves_no_temp(data4, tmp_path):
    """A real failing write(2) (a 1 MiB file-size limit: last.pt is larger) as a full disk would fail it."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "yolo", "train", "--data", str(data4), "--out", str(out), "--imgsz", "64",
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--noval", "--cache", "off"]
    proc = subprocess.run(argv, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600, preexec_fn=_limit_file_size)
    one_line_error(proc, "cannot write checkpoint", "last.pt")
    assert not list(out.rglob("*.tmp")) and not (out / "weights/last.pt").exists()
    assert not (out / "train.json").exists()


def test_disk_full_at_a_checkpoint_is_one_line(data4, tmp_path, monkeypatch):
    import errno

    import yolo.engine.checkpointing as checkpointing

    def full(path, ckpt):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpointing, "save_checkpoint", full)
    with pytest.raises(UserError, match="cannot write checkpoint .*last.pt: No space left on device"):
        train(small(data4, tmp_path / "run"))
    assert not (tmp_path / "run" / ".lease").exists()  # the lease is released on the way out


def test_convert_and_export_to_unwritable_places_are_one_line(tiny_run, tmp_path):
    best = tiny_run / "weights/best.pt"
    one_line_error(run_cli("convert", "--weights", best, "--out", tmp_path), "is a folder")
    one_line_error(run_cli("convert", "--weights", best, "--out", "/sys/yolo-test/model.pt"), "/sys/yolo-test")
    one_line_error(run_cli("export", "--weights", best, "--out", "/sys/yolo-test/model.torchscript",
                           "--format", "torchscript"), "/sys/yolo-test")


def test_sigterm_during_evaluate_leaves_no_stale_results_or_temp_files(tiny_run, tmp_path, monkeypatch, capsys):
    from yolo.cli import main

    out = tmp_path / "eval"
    out.mkdir()
    for name in ("metrics.json", "gate.json"):
        (out / name).write_text(json.dumps({"stale": True}))
    real_write = Path.write_bytes

    def write_then_signal(self, data):
        written = real_write(self, data)
        if self.name.startswith(".predictions.json."):  # the temp file of an atomic write: SIGTERM mid-write
            os.kill(os.getpid(), signal.SIGTERM)
        return written

    monkeypatch.setattr(Path, "write_bytes", write_then_signal)
    code = main(["evaluate", "--data", str(tiny_run.parent / "data/data.yaml"), "--weights",
                 str(tiny_run / "weights/best.pt"), "--out", str(out), "--imgsz", "64"])
    assert code == 128 + signal.SIGTERM
    assert "terminated" in capsys.readouterr().err
    assert not (out / "metrics.json").exists() and not (out / "gate.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
