"""One writer per checkpoint folder: a lease with its holder's name, renewed while the run lives.

The lease is a small JSON object at the folder's reserved key `.lease` (see yolo.storage): who holds it
(run identity, host, pid, output folder) and until when. It is taken by a create-if-absent write and
renewed every TTL/3 by a compare-and-swap on the version read (S3: `If-None-Match: *` / `If-Match:
ETag`; a local folder: O_EXCL creation and an flock-guarded swap), so two writers never both hold it.

A second writer finds a live lease and is refused in one line naming the holder. A lease is stale, and
taken over, when it has not been renewed for TTL seconds (`YOLO_LEASE_TTL_S`, default 60), or when its
holder is a process on this host that no longer exists. A KFP retry of a killed pod has the same run
identity as the lease it finds: it waits up to one TTL for that lease to lapse instead of failing (the
pipeline's retry back-off is 60 s, so usually it has lapsed already). A run that loses its lease (it
stalled past the TTL and another writer took over) stops at its next checkpoint.

Under a pipeline, the holder also names its pipeline run (`$YOLO_PIPELINE_RUN`, the KFP run id the train
component passes on). A lease held by the same pipeline run is an earlier attempt of this very task — KFP
starts a retry only after the previous pod ended — and is taken over at once. A lease held by another
pipeline run (a concurrent run with the same data and parameters, same run identity, same folder) is waited
for up to one TTL, as it may be a lost pod's, then refused naming that run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from yolo.errors import UserError
from yolo.storage import Storage

LOG = logging.getLogger(__name__)
DEFAULT_TTL_S = 60.0
PIPELINE_RUN_ENV = "YOLO_PIPELINE_RUN"  # the orchestrator's run id (KFP), set by the train component


def lease_ttl() -> float:
    raw = os.environ.get("YOLO_LEASE_TTL_S", "")
    try:
        ttl = float(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        raise UserError(f"environment variable YOLO_LEASE_TTL_S={raw!r} is not a number") from None
    if ttl <= 0:
        raise UserError(f"environment variable YOLO_LEASE_TTL_S={raw!r} must be positive")
    return ttl


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, and until when (wall-clock seconds)."""

    run_id: str
    host: str
    pid: int
    out: str
    since: float
    expires: float
    pipeline_run: str = ""  # the KFP run this writer belongs to ("" outside a pipeline)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.since))
        of = f" of pipeline run {self.pipeline_run}" if self.pipeline_run else ""
        return f"run {self.run_id}{of} (pid {self.pid} on {self.host}, writing {self.out}, since {started} UTC)"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder recorded in a lease, or None when it is unreadable (treated as stale)."""
        try:
            doc: Any = json.loads(data.decode("utf-8"))
            return cls(run_id=str(doc["run_id"]), host=str(doc["host"]), pid=int(doc["pid"]),
                       out=str(doc["out"]), since=float(doc["since"]), expires=float(doc["expires"]),
                       pipeline_run=str(doc.get("pipeline_run") or ""))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def is_this_process(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()

    def is_stale(self, now: float) -> bool:
        if now >= self.expires:
            return True
        return self.host == socket.gethostname() and not _process_alive(self.pid)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class Lease:
    """The lease on one storage root; `acquire()` or refuse, `release()` at the end (also on errors)."""

    def __init__(self, storage: Storage, run_id: str, out: str, ttl: float | None = None,
                 pipeline_run: str | None = None) -> None:
        self.storage = storage
        self.run_id = run_id
        self.out = out
        self.pipeline_run = os.environ.get(PIPELINE_RUN_ENV, "") if pipeline_run is None else pipeline_run
        self.ttl = lease_ttl() if ttl is None else ttl
        self.since = time.time()
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_to: str | None = None  # set when a renewal found another holder

    def _holder(self) -> Holder:
        return Holder(run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(), out=self.out,
                      since=self.since, expires=time.time() + self.ttl, pipeline_run=self.pipeline_run)

    def _earlier_attempt(self, holder: Holder) -> bool:
        """The holder is a previous attempt of this task in the same pipeline run (its pod has ended)."""
        same_run = bool(self.pipeline_run) and holder.pipeline_run == self.pipeline_run
        return same_run and holder.run_id == self.run_id and not holder.is_this_process()

    def acquire(self) -> Lease:
        """Take the lease, take over a stale one, wait out one of our own run, or raise UserError."""
        deadline = time.monotonic() + self.ttl + 5.0
        while True:
            tag = self.storage.create_lease(self._holder().to_bytes())
            if tag is not None:
                break
            current = self.storage.read_lease()
            if current is None:
                continue  # released between our two calls
            data, old_tag = current
            holder = Holder.from_bytes(data)
            earlier = holder is not None and self._earlier_attempt(holder)
            if holder is None or earlier or holder.is_stale(time.time()):
                tag = self.storage.replace_lease(self._holder().to_bytes(), old_tag)
                if tag is not None:
                    what = "an earlier attempt's" if earlier else "the stale"
                    LOG.warning(f"took over {what} lease on {self.storage.uri} from "
                                f"{holder.describe() if holder else 'an unreadable holder'}")
                    break
                continue  # someone else changed it first: look again
            if holder.run_id == self.run_id and time.monotonic() < deadline:
                # the same run's previous pod, killed without releasing: its lease lapses within one TTL
                LOG.info(f"{self.storage.uri} is leased by {holder.describe()}; waiting for it to lapse")
                time.sleep(min(max(holder.expires - time.time(), 0.0) + 0.1, self.ttl / 4))
                continue
            raise UserError(f"checkpoint folder {self.storage.uri} is in use by {holder.describe()}; a second "
                            f"writer would overwrite its checkpoints (wait for it, or use another folder)")
        self._tag = tag
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                tag = self.storage.replace_lease(self._holder().to_bytes(), self._tag or "")
            except UserError as e:  # the store is briefly unreachable: try again at the next beat
                LOG.warning(f"lease renewal at {self.storage.uri} failed ({e}); retrying")
                continue
            if tag is None:
                current = self.storage.read_lease()
                holder = Holder.from_bytes(current[0]) if current else None
                self.lost_to = holder.describe() if holder else "nobody (it was removed)"
                LOG.warning(f"lost the lease on {self.storage.uri} to {self.lost_to}")
                return
            self._tag = tag

    def check(self) -> None:
        """Raise UserError when another writer took the lease over (called before each checkpoint)."""
        if self.lost_to is not None:
            raise UserError(f"lost the lease on {self.storage.uri} to {self.lost_to}; stopping so that two "
                            f"writers never interleave their checkpoints")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._tag is not None and self.lost_to is None:
            try:
                self.storage.delete_lease(self._tag)
            except UserError as e:
                LOG.warning(f"could not release the lease on {self.storage.uri} ({e}); it lapses in {self.ttl:.0f}s")
        self._tag = None
