"""One interface over a local folder and `s3://bucket/prefix`: put/get/exists/list/delete of files.

Every object carries the SHA-256 of its bytes (S3: object metadata `sha256`; local: a sidecar under
`.yolo-storage/`), recorded at upload and verified on download. Uploads land under a temporary key
and are copied to the final key only when complete, so a reader never sees a half-written object.
Downloads are written atomically. This is the only module that imports boto3, and only inside
functions: a machine without boto3 can still use local storage.

Credentials and endpoint come only from the environment / boto3 config (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, profiles, IAM roles); nothing here logs or stores them. Tuning knobs (env):
`YOLO_S3_MAX_ATTEMPTS` (default 5, botocore "standard" retry mode), `YOLO_S3_CONNECT_TIMEOUT` (s,
default 10), `YOLO_S3_READ_TIMEOUT` (s, default 60), `YOLO_S3_MULTIPART_THRESHOLD_MB` (default 64),
`YOLO_S3_MULTIPART_CHUNK_MB` (default 16), `YOLO_S3_MAX_CONCURRENCY` (default 4).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolo.errors import UserError
from yolo.files import atomic_path, write_json
from yolo.redact import has_credentials, redact

META_KEY = "sha256"  # S3 user metadata (x-amz-meta-sha256) holding the object's SHA-256 hex digest
PARTIAL_DIR = ".partial"  # S3 uploads in flight live under ROOT/.partial/ until copied into place
LOCAL_META_DIR = ".yolo-storage"  # local sidecars: ROOT/.yolo-storage/KEY.json with {"sha256", "size"}
LEASE_KEY = ".lease"  # the checkpoint folder's lease (yolo.engine.lease); never a user key
RESERVED = (PARTIAL_DIR, LOCAL_META_DIR, LEASE_KEY)
_HASH_CHUNK = 1 << 20
# Bucket names: letters, digits, dots, hyphens, underscores (AWS is stricter; legacy and S3-compatible
# stores are not), so `user:secret@bucket` or a `/`-smuggling name never reaches the endpoint
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


class StorageError(UserError):
    """A storage operation failed after retries (unreachable, denied, missing): one line, no trace.

    The message is redacted (credentials in URIs, AWS keys) when the error is made, so no caller can
    print a secret by printing the error."""

    def __init__(self, message: str = "") -> None:
        super().__init__(redact(str(message)))


class ObjectNotFound(StorageError):
    """The key does not exist."""


class ChecksumMismatch(StorageError):
    """The downloaded bytes do not match the SHA-256 recorded at upload."""


class ChecksumMissing(StorageError):
    """The object has no recorded SHA-256 (rewritten by another tool?) and a verified read was required."""


class InvalidKey(StorageError, ValueError):
    """A key or prefix with `..`, `.`, empty or reserved segments: one line, nothing read or written."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_key(key: str) -> str:
    """Keys are relative posix paths without `..`, empty parts, control characters or reserved segments."""
    segments = key.split("/")
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or any(ord(c) < 32 for c in key)
        or any(p in ("", ".", "..") for p in segments)
        or any(p in RESERVED for p in segments)
    ):
        raise InvalidKey(f"invalid storage key {key!r}: use a relative path like 'runs/r1/last.pt' "
                         f"(no '..', '.', empty or reserved ({', '.join(RESERVED)}) segments)")
    return key


def _normal_prefix(prefix: str, uri: str) -> str:
    """`a//b/` -> `a/b`; a `.`, `..` or reserved segment is refused (it would escape or alias the root)."""
    segments = [p for p in prefix.split("/") if p]
    bad = [p for p in segments if p in (".", "..") or p in RESERVED or any(ord(c) < 32 for c in p)]
    if bad:
        raise InvalidKey(f"{uri}: segment {bad[0]!r} is not allowed in a storage location")
    return "/".join(segments)


class Storage:
    """Common interface; see LocalStorage and S3Storage."""

    uri: str

    def put(self, local_path: str | os.PathLike, key: str) -> str:
        """Upload a file to `key` (checksum recorded); returns uri_for(key)."""
        raise NotImplementedError

    def get(self, key: str, local_path: str | os.PathLike, require_checksum: bool = False) -> Path:
        """Download `key` atomically to `local_path`, verifying its SHA-256; returns the path.

        An object without a recorded SHA-256 is read unverified, unless `require_checksum` (resume): then
        ChecksumMissing, and nothing is written."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to this storage's root) starting with `prefix`."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""
        raise NotImplementedError

    def uri_for(self, key: str) -> str:
        raise NotImplementedError

    def check_access(self, write: bool = False) -> None:
        """Raise StorageError (one line) unless the root is reachable (and writable when `write`)."""
        raise NotImplementedError

    def fingerprint(self, prefix: str = "") -> str:
        """SHA-256 over (key, size, version tag) of every object under `prefix`: changes when any does.

        The tag is the S3 ETag, or a local file's mtime: cheap (no object is read), so it can key a cache.
        """
        digest = hashlib.sha256()
        for key, size, tag in self._stat_all(prefix):
            digest.update(f"{key}\0{size}\0{tag}\n".encode())
        return digest.hexdigest()

    def _stat_all(self, prefix: str) -> list[tuple[str, int, str]]:
        raise NotImplementedError

    def put_bytes(self, data: bytes, key: str) -> str:
        """Upload bytes to `key`; returns uri_for(key)."""
        with tempfile.TemporaryDirectory(prefix="yolo-storage-") as tmp:
            path = Path(tmp) / "blob"
            path.write_bytes(data)
            return self.put(path, key)

    def get_bytes(self, key: str) -> bytes:
        """Download and verify `key`, returning its bytes."""
        with tempfile.TemporaryDirectory(prefix="yolo-storage-") as tmp:
            return self.get(key, Path(tmp) / "blob").read_bytes()

    # The lease primitives (yolo.engine.lease): a small object at the reserved key LEASE_KEY.
    def create_lease(self, data: bytes) -> str | None:
        """Write the lease only if none exists; its version tag, or None when another lease is there."""
        raise NotImplementedError

    def read_lease(self) -> tuple[bytes, str] | None:
        """(bytes, version tag) of the current lease, or None."""
        raise NotImplementedError

    def replace_lease(self, data: bytes, tag: str) -> str | None:
        """Overwrite the lease only if it still has version `tag`; the new tag, or None when it changed."""
        raise NotImplementedError

    def delete_lease(self, tag: str) -> None:
        """Remove the lease if it still has version `tag` (best effort)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _missing_checksum(uri: str) -> ChecksumMissing:
    return ChecksumMissing(f"{uri}: no SHA-256 recorded with the object (written by another tool, or its "
                           f"metadata was rewritten); refusing unverified bytes (pass --trust-unverified "
                           f"to accept them)")


def open_storage(uri: str | os.PathLike) -> Storage:
    """`s3://bucket[/prefix]` → S3Storage; a local path or `file://` URI → LocalStorage."""
    text = os.fspath(uri)
    if has_credentials(text):
        raise StorageError(f"{text}: credentials do not belong in a storage URI (they would reach logs and "
                           f"parameters); give them through AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a "
                           f"profile or a role")
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"{text}: no bucket name (expected s3://bucket/prefix)")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise StorageError(f"{text}: {bucket!r} is not a bucket name (letters, digits, dots, hyphens)")
        return S3Storage(bucket, _normal_prefix(prefix, text))
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise StorageError(f"{text}: unsupported storage scheme {scheme!r} (use s3://bucket/prefix or a path)")
    if not text:
        raise UserError("empty storage location")
    return LocalStorage(Path(text).expanduser().resolve())


def is_remote(uri: str | os.PathLike) -> bool:
    return os.fspath(uri).startswith("s3://")


# --------------------------------------------------------------------------------------- local


class LocalStorage(Storage):
    """A folder: keys are relative paths; checksums live in sidecars under `.yolo-storage/`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _meta_path(self, key: str) -> Path:
        return self.root / LOCAL_META_DIR / f"{_check_key(key)}.json"

    def uri_for(self, key: str) -> str:
        return str(self._path(key))

    def put(self, local_path: str | os.PathLike, key: str) -> str:
        source = Path(local_path)
        if not source.is_file():
            raise StorageError(f"{source}: no such file to upload")
        digest = sha256_file(source)
        target = self._path(key)
        try:
            # The sidecar first: a crash between the two leaves a stale checksum that fails loudly on
            # read (never a silently wrong file); the data file itself appears atomically.
            write_json(self._meta_path(key), {"sha256": digest, "size": source.stat().st_size})
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        except OSError as e:
            raise StorageError(f"{target}: cannot write ({e.strerror or e})") from None
        return str(target)

    def get(self, key: str, local_path: str | os.PathLike, require_checksum: bool = False) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{source}: not found")
        recorded = self._recorded_sha256(key)
        if recorded is None and require_checksum:
            raise _missing_checksum(str(source))
        out = Path(local_path)
        with atomic_path(out) as tmp:
            shutil.copyfile(source, tmp)
            if recorded is not None and sha256_file(tmp) != recorded:
                raise ChecksumMismatch(
                    f"{source}: SHA-256 differs from the one recorded at upload (corrupted)"
                )
        return out

    def _recorded_sha256(self, key: str) -> str | None:
        meta = self._meta_path(key)
        if not meta.is_file():
            return None  # a file placed by hand: nothing to verify against
        with contextlib.suppress(ValueError, OSError):
            return json.loads(meta.read_text())["sha256"]
        return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = []
        for path in self.root.rglob("*"):
            if not path.is_file():
                continue
            key = path.relative_to(self.root).as_posix()
            name = path.name
            if key.split("/", 1)[0] == LOCAL_META_DIR or key == LEASE_KEY or (
                name.startswith(".") and name.endswith(".tmp")
            ):
                continue
            if key.startswith(prefix):
                keys.append(key)
        return sorted(keys)

    def _stat_all(self, prefix: str) -> list[tuple[str, int, str]]:
        stats = [(key, (self.root / key).stat()) for key in self.list(prefix)]
        return [(key, st.st_size, str(st.st_mtime_ns)) for key, st in stats]

    def delete(self, key: str) -> None:
        for path in (self._path(key), self._meta_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def check_access(self, write: bool = False) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root}: not a folder")
        if not write:
            if not self.root.is_dir():
                raise StorageError(f"{self.root}: no such folder")
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{self.root}: cannot create ({e.strerror or e})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"{self.root}: not writable")

    # A local lease is a file whose version tag is its content's SHA-256. Taking it is O_EXCL creation;
    # replacing it is a compare-and-swap under an flock of the folder's lock file, so two processes on
    # this machine (or on a file system with working flock) never both win.
    def _lease_path(self) -> Path:
        return self.root / LEASE_KEY

    @contextlib.contextmanager
    def _lease_lock(self):
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{LEASE_KEY}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def create_lease(self, data: bytes) -> str | None:
        with self._lease_lock():
            try:
                fd = os.open(self._lease_path(), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return hashlib.sha256(data).hexdigest()

    def read_lease(self) -> tuple[bytes, str] | None:
        try:
            data = self._lease_path().read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def replace_lease(self, data: bytes, tag: str) -> str | None:
        with self._lease_lock():
            current = self.read_lease()
            if current is None or current[1] != tag:
                return None
            with atomic_path(self._lease_path()) as tmp:
                tmp.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def delete_lease(self, tag: str) -> None:
        with self._lease_lock():
            current = self.read_lease()
            if current is not None and current[1] == tag:
                self._lease_path().unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ S3


@dataclass(frozen=True)
class S3Settings:
    """Retry/timeout/transfer knobs, read from the environment when a storage is opened."""

    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    max_concurrency: int = 4

    @classmethod
    def from_env(cls) -> S3Settings:
        def number(name: str, default: float, kind=float):
            raw = os.environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise UserError(f"environment variable {name}={raw!r} is not a number") from None
            if value <= 0:
                raise UserError(f"environment variable {name}={raw!r} must be positive")
            return value

        mb = 1024 * 1024
        return cls(
            max_attempts=number("YOLO_S3_MAX_ATTEMPTS", cls.max_attempts, int),
            connect_timeout=number("YOLO_S3_CONNECT_TIMEOUT", cls.connect_timeout),
            read_timeout=number("YOLO_S3_READ_TIMEOUT", cls.read_timeout),
            multipart_threshold=int(
                number("YOLO_S3_MULTIPART_THRESHOLD_MB", cls.multipart_threshold / mb) * mb
            ),
            multipart_chunksize=int(number("YOLO_S3_MULTIPART_CHUNK_MB", cls.multipart_chunksize / mb) * mb),
            max_concurrency=number("YOLO_S3_MAX_CONCURRENCY", cls.max_concurrency, int),
        )


def _import_boto3():
    try:
        import boto3
    except ImportError:  # pragma: no cover - boto3 is a core dependency, but a slim image may lack it
        raise UserError("s3:// storage needs boto3: pip install boto3") from None
    return boto3


def describe_s3_error(error: BaseException, endpoint: str | None = None) -> str:
    """A short reason for a botocore failure: the S3 error code, or 'endpoint unreachable'."""
    from botocore import exceptions as bx

    # boto3's transfer layer wraps the botocore error (S3UploadFailedError etc.): report the original.
    seen = error
    while not isinstance(seen, (bx.ClientError, bx.BotoCoreError)) and (seen.__cause__ or seen.__context__):
        seen = seen.__cause__ or seen.__context__
    if isinstance(seen, (bx.ClientError, bx.BotoCoreError)):
        error = seen
    if isinstance(error, bx.ClientError):
        info = error.response.get("Error", {})
        code = str(info.get("Code") or "Error")
        code = {"404": "NotFound", "403": "AccessDenied", "400": "BadRequest"}.get(code, code)
        message = info.get("Message")
        return f"{code} ({message})" if message and message != code else code
    if isinstance(error, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
        return f"endpoint unreachable ({endpoint})" if endpoint else "endpoint unreachable"
    if isinstance(error, bx.ReadTimeoutError):
        return f"endpoint timed out ({endpoint})" if endpoint else "endpoint timed out"
    if isinstance(error, bx.NoCredentialsError):
        return "no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role)"
    return f"{type(error).__name__}: {error}"


class S3Storage(Storage):
    """`s3://bucket/prefix` through one thread-safe boto3 client (retries, timeouts, multipart)."""

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.settings = settings or S3Settings.from_env()
        self._client = None
        self._transfer_config = None

    # boto3 objects are built on first use, so constructing a storage never touches the network.
    @property
    def client(self):
        if self._client is None:
            boto3 = _import_boto3()
            from botocore.config import Config

            s = self.settings
            config = Config(
                retries={"mode": "standard", "max_attempts": s.max_attempts},
                connect_timeout=s.connect_timeout,
                read_timeout=s.read_timeout,
                max_pool_connections=max(10, 2 * s.max_concurrency),
            )
            self._client = boto3.session.Session().client("s3", config=config)
        return self._client

    @property
    def transfer_config(self):
        if self._transfer_config is None:
            from boto3.s3.transfer import TransferConfig

            s = self.settings
            self._transfer_config = TransferConfig(
                multipart_threshold=s.multipart_threshold,
                multipart_chunksize=s.multipart_chunksize,
                max_concurrency=s.max_concurrency,
            )
        return self._transfer_config

    @property
    def _root(self) -> str:
        """The object-key prefix of this storage's root: '' or 'prefix/'."""
        return f"{self.prefix}/" if self.prefix else ""

    def _object_key(self, key: str) -> str:
        return self._root + _check_key(key)

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def _fail(self, what: str, error: BaseException, cls: type[StorageError] = StorageError) -> StorageError:
        endpoint = self._client.meta.endpoint_url if self._client is not None else None
        return cls(f"{what}: {describe_s3_error(error, endpoint)}")

    def _boto_errors(self) -> tuple[type[BaseException], ...]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer import exceptions as tx

        return (
            BotoCoreError,
            ClientError,
            Boto3Error,
            tx.RetriesExceededError,
            tx.S3UploadFailedError,
            tx.S3DownloadFailedError,
            tx.S3CopyFailedError,
        )

    def _head(self, key: str) -> dict[str, Any] | None:
        """head_object of `key`, or None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(self.uri_for(key), e) from None
        except self._boto_errors() as e:
            raise self._fail(self.uri_for(key), e) from None

    def put(self, local_path: str | os.PathLike, key: str) -> str:
        source = Path(local_path)
        if not source.is_file():
            raise StorageError(f"{source}: no such file to upload")
        final_key = self._object_key(key)
        digest = sha256_file(source)
        size = source.stat().st_size
        temp_key = f"{self._root}{PARTIAL_DIR}/{uuid.uuid4().hex}"
        extra = {"Metadata": {META_KEY: digest}}
        try:
            self.client.upload_file(
                str(source), self.bucket, temp_key, ExtraArgs=extra, Config=self.transfer_config
            )
            # Server-side copy into place: the final key only ever holds a complete upload.
            self.client.copy(
                {"Bucket": self.bucket, "Key": temp_key},
                self.bucket,
                final_key,
                ExtraArgs={**extra, "MetadataDirective": "REPLACE"},
                Config=self.transfer_config,
            )
            head = self.client.head_object(Bucket=self.bucket, Key=final_key)
        except self._boto_errors() as e:
            raise self._fail(f"upload to {self.uri_for(key)}", e) from None
        finally:
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=temp_key)
        if head.get("Metadata", {}).get(META_KEY) != digest or head.get("ContentLength") != size:
            raise ChecksumMismatch(
                f"upload to {self.uri_for(key)}: stored object does not match the local file"
            )
        return self.uri_for(key)

    def get(self, key: str, local_path: str | os.PathLike, require_checksum: bool = False) -> Path:
        out = Path(local_path)
        uri = self.uri_for(key)
        for _ in range(3):  # the object may be replaced mid-download (a newer last.pt): try again
            head = self._head(key)
            if head is None:
                raise ObjectNotFound(f"{uri}: not found")
            recorded = head.get("Metadata", {}).get(META_KEY)
            if recorded is None and require_checksum:
                raise _missing_checksum(uri)
            try:
                with atomic_path(out) as tmp:
                    self.client.download_file(
                        self.bucket, self._object_key(key), str(tmp), Config=self.transfer_config
                    )
                    if recorded is None or sha256_file(tmp) == recorded:
                        return out
                    raise ChecksumMismatch(
                        f"{uri}: SHA-256 differs from the one recorded at upload (corrupted)"
                    )
            except ChecksumMismatch:
                newer = self._head(key)
                if newer is None or newer.get("ETag") == head.get("ETag"):
                    raise
            except self._boto_errors() as e:
                raise self._fail(f"download of {uri}", e) from None
        raise StorageError(f"{uri}: the object kept changing during download")

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def list(self, prefix: str = "") -> list[str]:
        return [key for key, _, _ in self._stat_all(prefix)]

    def _stat_all(self, prefix: str) -> list[tuple[str, int, str]]:
        root = self._root
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(root) :]
                    if key.split("/", 1)[0] != PARTIAL_DIR and key != LEASE_KEY:
                        found.append((key, int(item.get("Size", 0)), str(item.get("ETag", ""))))
        except self._boto_errors() as e:
            raise self._fail(f"list of {self.uri}", e) from None
        return sorted(found)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))
        except self._boto_errors() as e:
            raise self._fail(f"delete of {self.uri_for(key)}", e) from None

    def check_access(self, write: bool = False) -> None:
        root = self._root
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=root, MaxKeys=1)
            if write:
                probe = f"{root}{PARTIAL_DIR}/access-check-{uuid.uuid4().hex}"
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
                self.client.delete_object(Bucket=self.bucket, Key=probe)
        except self._boto_errors() as e:
            raise self._fail(self.uri, e) from None

    # Lease primitives: S3 conditional writes (If-None-Match: * creates only when absent; If-Match: ETag
    # replaces only the version we read), so two writers never both hold the lease.
    def _lease_object(self) -> str:
        return self._root + LEASE_KEY

    def _precondition_failed(self, error: BaseException) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in (
            "PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404")

    def _conditional_put(self, data: bytes, **condition: str) -> str | None:
        try:
            reply = self.client.put_object(Bucket=self.bucket, Key=self._lease_object(), Body=data, **condition)
        except self._boto_errors() as e:
            if self._precondition_failed(e):
                return None
            raise self._fail(f"lease at {self.uri}", e) from None
        return str(reply["ETag"])

    def create_lease(self, data: bytes) -> str | None:
        return self._conditional_put(data, IfNoneMatch="*")

    def read_lease(self) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._lease_object())
            return reply["Body"].read(1 << 16), str(reply["ETag"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(f"lease at {self.uri}", e) from None
        except self._boto_errors() as e:
            raise self._fail(f"lease at {self.uri}", e) from None

    def replace_lease(self, data: bytes, tag: str) -> str | None:
        return self._conditional_put(data, IfMatch=tag)

    def delete_lease(self, tag: str) -> None:
        current = self.read_lease()
        if current is not None and current[1] == tag:
            with contextlib.suppress(*self._boto_errors()):
                self.client.delete_object(Bucket=self.bucket, Key=self._lease_object())
