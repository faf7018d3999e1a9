"""Weights by path, official name or URL (upstream's attempt_download): cached, atomic, verified, fail-fast."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from yolo.errors import UserError, did_you_mean
from yolo.files import atomic_path

LOG = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0"
BASE_URL_ENV = "YOLO_WEIGHTS_BASE_URL"
CACHE_DIR_ENV = "YOLO_CACHE_DIR"
TIMEOUT_ENV = "YOLO_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 15.0  # per connect/read: offline machines fail at once, a stalled server within this
OFFICIAL_NAME = re.compile(r"^yolov5[nsmlx]6?\.pt$")
OFFICIAL_NAMES = [f"yolov5{v}{p6}.pt" for v in "nsmlx" for p6 in ("", "6")]
CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where downloads are kept: $YOLO_CACHE_DIR, else ~/.cache/yolo-pipeline."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "yolo-pipeline"


def official_url(name: str) -> str:
    base = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{name}"


def resolve_weights(spec: str | os.PathLike) -> Path:
    """A local file as is; an official name (`yolov5s.pt`) from the release URL; an http(s) URL downloaded."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.startswith(("https://", "http://")):
        return download(text)
    if OFFICIAL_NAME.match(text):  # a bare official name that is not a local file
        return download(official_url(text))
    hint = did_you_mean(path.name, OFFICIAL_NAMES) if "/" not in text else ""
    raise UserError(f"weights not found: {text}{hint} (give a local .pt file, an official name such as "
                    "yolov5s.pt, or an https:// URL)")


def _cache_path(url: str, kind: str = "weights") -> Path:
    parsed = urllib.parse.urlsplit(url)
    name = Path(urllib.parse.unquote(parsed.path)).name or "weights.pt"
    # one folder per URL without its fragment: same name from two servers never collides
    key = hashlib.sha256(urllib.parse.urlunsplit(parsed._replace(fragment="")).encode()).hexdigest()[:16]
    return cache_dir() / kind / key / name


def download(url: str, kind: str = "weights") -> Path:
    """Download `url` into the cache (once); `#sha256=HEX` in the URL is verified. UserError when it fails.
    kind names the cache subfolder: "weights", or "sources" for predict's --source URLs."""
    parsed = urllib.parse.urlsplit(url)
    expected_sha = None
    frag = urllib.parse.parse_qs(parsed.fragment)
    if "sha256" in frag:
        expected_sha = frag["sha256"][0].lower()
    target = _cache_path(url, kind)
    if target.is_file():
        if expected_sha and _sha256(target) != expected_sha:
            LOG.info("cached %s does not match its sha256; downloading again", target)
        else:
            return target
    clean_url = urllib.parse.urlunsplit(parsed._replace(fragment=""))
    timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    LOG.info("Downloading %s to %s", clean_url, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        request = urllib.request.Request(clean_url, headers={"User-Agent": "yolo-pipeline"})
        with urllib.request.urlopen(request, timeout=timeout) as response, atomic_path(target) as tmp:
            expected_size = response.headers.get("Content-Length")
            digest, size = hashlib.sha256(), 0
            with open(tmp, "wb") as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            if expected_size is not None and size != int(expected_size):
                raise UserError(f"cannot download {clean_url}: incomplete, {size} of {expected_size} bytes")
            if size == 0:
                raise UserError(f"cannot download {clean_url}: the server sent 0 bytes")
            if expected_sha and digest.hexdigest() != expected_sha:
                raise UserError(f"cannot download {clean_url}: it has sha256 {digest.hexdigest()}, expected {expected_sha}")
            os.chmod(tmp, 0o644)  # the temp file is created 0600
    except UserError:
        raise
    except urllib.error.HTTPError as e:
        raise UserError(f"cannot download {clean_url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        mirror = f" or set {BASE_URL_ENV} to a mirror" if kind == "weights" else ""
        raise UserError(f"cannot download {clean_url}: {_reason(e.reason)} (offline? put the file locally"
                        f"{mirror})") from None
    except TimeoutError as e:
        raise UserError(f"cannot download {clean_url}: timed out after {timeout:g} s ({e})") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # reset mid-body, IncompleteRead, bad URL
        raise UserError(f"cannot download {clean_url}: {_reason(e)}") from None
    return target


def _reason(reason: object) -> str:
    text = str(reason) or type(reason).__name__
    return text.splitlines()[0][:160]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
