"""A run's checkpoints: what last.pt and best.pt hold, written atomically, mirrored to `--checkpoint-uri`.

`RunCheckpoints` builds both from the run's record (`RunSetup`): the fields they share (cfg, names,
weights, anchors, hyp, args, lineage, identity), best.pt in fp16 with its metrics, last.pt in fp32 with
the `train` entry the loop hands it. Before each write it checks that the run still holds its leases.

Training never waits for the network. `CheckpointSink.publish(path, key)` hard-links the freshly written
file to a private snapshot (so a later atomic replace of the local file cannot change bytes under an
upload in progress) and queues it; one worker thread uploads, at most one transfer in flight, and a newer
snapshot of the same key replaces a queued older one (newest wins). A failing store is retried with
back-off while training goes on; `close()` waits for the final state to land.

Also here: `write_checkpoint`, which turns a full disk into one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from yolo.errors import UserError
from yolo.files import environment_error
from yolo.model.checkpoint import checkpoint_dict, save_checkpoint
from yolo.redact import redact
from yolo.storage import open_storage

LOG = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the run's


class RunCheckpoints:
    """weights/last.pt and weights/best.pt of one run (rank 0 writes; other ranks only build dicts)."""

    def __init__(self, setup) -> None:
        self.setup = setup  # yolo.engine.setup.RunSetup: what the checkpoints record
        self.weights_dir = setup.out / "weights"
        self.sink = CheckpointSink(setup.cfg.checkpoint_uri if setup.ctx.is_main else None)

    def base(self, model: torch.nn.Module, half: bool) -> dict[str, Any]:
        """The fields best.pt and last.pt share: cfg, names, (EMA) weights, anchors, hyp, args, lineage."""
        s = self.setup
        ckpt = checkpoint_dict(
            model, half=half, imgsz=s.cfg.imgsz, hyp=s.hyp.to_dict(), args=s.cfg.to_dict(),
            dataset_fingerprint=s.dataset_fingerprint, data_version=s.cfg.data_version, run_id=s.run_id,
            identity=dict(s.identity_inputs),
        )  # fmt: skip
        ckpt["names"] = list(s.names)
        return ckpt

    def save_last(self, model: torch.nn.Module, epoch_done: int, train_entry: dict[str, Any]) -> None:
        """last.pt: `model` (the EMA) in fp32, the last completed epoch, and the loop's `train` entry."""
        ckpt = self.base(model, half=False)
        ckpt["epoch"] = epoch_done  # the last completed epoch, as upstream
        ckpt["train"] = train_entry
        self._write("weights/last.pt", ckpt)

    def save_best(self, model: torch.nn.Module, epoch: int, metrics: dict[str, float] | None) -> None:
        """best.pt: the EMA in fp16 (anchors fp32) with the metrics that made it the best."""
        ckpt = self.base(model, half=True)
        ckpt["epoch"] = epoch
        ckpt["metrics"] = metrics
        self._write("weights/best.pt", ckpt)

    def save_epoch(self, model: torch.nn.Module, epoch: int, metrics: dict[str, float] | None) -> None:
        """--save-period: weights/epochN.pt (N = epochs done), weights only (fp16 EMA) as best.pt."""
        ckpt = self.base(model, half=True)
        ckpt["epoch"] = epoch
        ckpt["metrics"] = metrics
        self._write(f"weights/epoch{epoch + 1}.pt", ckpt)

    def _write(self, key: str, ckpt: dict[str, Any]) -> None:
        self.setup.check_leases()
        path = self.setup.out / key
        write_checkpoint(path, ckpt)
        self.sink.publish(path, key)

    def publish(self, path: Path, key: str) -> None:
        """Mirror another file of the run folder (results.csv, train.json ...)."""
        self.sink.publish(path, key)

    def close(self, timeout: float | None) -> bool:
        return self.sink.close(timeout=timeout)


# ------------------------------------------------------------------------------------------ writing


def write_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    """save_checkpoint (atomic), with a full disk, a quota or a read-only folder as one UserError line;
    the previous file at `path` stays intact and no temp file is left."""
    try:
        save_checkpoint(path, ckpt)
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    except RuntimeError as e:
        # torch's zip writer reports a failed write(2) as a RuntimeError without the errno
        cause = environment_error(e)
        reason = cause.strerror if cause is not None else _write_failure(path, e)
        raise UserError(f"cannot write checkpoint {path}: {reason}") from None


def _write_failure(path: Path, error: RuntimeError) -> str:
    try:
        st = os.statvfs(path.parent)
        free = f"{st.f_bavail * st.f_frsize / 1e6:.1f} MB free there"
    except OSError:
        free = "free space unknown"
    return f"the write failed ({free}; {str(error).splitlines()[0][-120:]})"


# ------------------------------------------------------------------------------------------ sink


class CheckpointSink:
    """Mirror files of the run folder to a storage URI in the background (see module docstring).

    `uri=None` makes every call a no-op, so the loop calls it unconditionally. `storage` may be given
    directly (tests); otherwise `yolo.storage.open_storage(uri)` is opened lazily.
    """

    def __init__(
        self,
        uri: str | None,
        storage: Any = None,
        retry_initial_s: float = 2.0,
        retry_max_s: float = 60.0,
    ) -> None:
        self.uri = uri
        self._storage = storage
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._pending: OrderedDict[str, Path] = OrderedDict()  # key -> staged snapshot
        self._in_flight: str | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._stage_dir: Path | None = None
        self._thread: threading.Thread | None = None
        self.uploaded: list[str] = []  # keys in upload order (observability, tests)
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self.uri is not None

    @property
    def storage(self):
        if self._storage is None and self.uri is not None:
            self._storage = open_storage(self.uri)  # boto3 itself is imported only for an s3:// URI
        return self._storage

    def publish(self, path: Path, key: str) -> None:
        """Queue an upload of the file now at `path` under `key`; returns at once."""
        if not self.enabled:
            return
        snapshot = self._snapshot(Path(path), key)
        with self._cond:
            if self._closed:
                raise RuntimeError("CheckpointSink is closed")
            older = self._pending.pop(key, None)
            self._pending[key] = snapshot
            self._cond.notify_all()
        if older is not None:
            older.unlink(missing_ok=True)
        self._ensure_thread()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is uploaded; False if `timeout` ran out first."""
        if not self.enabled:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._in_flight is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the worker. Returns False when uploads were still pending at the timeout."""
        done = self.flush(timeout)
        with self._cond:
            self._closed = True
            abandoned = list(self._pending)
            for staged in self._pending.values():
                staged.unlink(missing_ok=True)
            self._pending.clear()
            self._cond.notify_all()
        if abandoned:
            LOG.warning(redact(f"gave up uploading {', '.join(abandoned)} to {self.uri}; the local copies are complete"))
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._stage_dir is not None:
            shutil.rmtree(self._stage_dir, ignore_errors=True)
        return done

    # -- internals ---------------------------------------------------------------------------------

    def _snapshot(self, path: Path, key: str) -> Path:
        if self._stage_dir is None:
            self._stage_dir = Path(tempfile.mkdtemp(prefix=".upload-", dir=path.parent))
        fd, name = tempfile.mkstemp(prefix=key.replace("/", "_") + ".", dir=self._stage_dir)
        os.close(fd)
        staged = Path(name)
        staged.unlink()
        try:
            os.link(path, staged)  # same bytes, no copy; immune to a later os.replace of `path`
        except OSError:
            shutil.copyfile(path, staged)
        return staged

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="checkpoint-upload", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        delay = self._retry_initial_s
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending and self._closed:
                    return
                key, staged = self._pending.popitem(last=False)
                self._in_flight = key
            try:
                self.storage.put(staged, key)
            except Exception as e:  # noqa: BLE001 - any store failure: warn and retry, never kill training
                self.failures += 1
                reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                LOG.warning(redact(f"checkpoint upload of {key} to {self.uri} failed ({reason}); "
                                   f"retrying in {delay:.0f}s"))
                with self._cond:
                    if key not in self._pending:  # nothing newer arrived: retry this snapshot
                        self._pending[key] = staged
                        self._pending.move_to_end(key, last=False)
                    else:
                        staged.unlink(missing_ok=True)
                    self._in_flight = None
                    self._cond.notify_all()
                    self._cond.wait(delay)  # woken early by close()/newer files, which is fine
                delay = min(delay * 2, self._retry_max_s)
                continue
            staged.unlink(missing_ok=True)
            delay = self._retry_initial_s
            with self._cond:
                self.uploaded.append(key)
                self._in_flight = None
                self._cond.notify_all()
