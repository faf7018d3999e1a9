"""Run identity: one hash of everything that decides a training run's result.

Two invocations with the same identity would produce the same weights, so an unfinished last.pt with
that identity may be continued automatically (a KFP retry, a re-run of `dvc repro`); anything else
starts clean.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _canonical(value: Any) -> Any:
    """JSON-stable form: tuples → lists, Paths → str, floats that are integers stay floats."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def file_digest(path: str | Path | None) -> str | None:
    """SHA-256 of a file's bytes (a weights or anchors file), or None when there is none."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_identity(
    dataset_fingerprint: str,
    cfg: Mapping[str, Any],
    hyp: Mapping[str, Any],
    arguments: Mapping[str, Any],
) -> str:
    """16-hex-digit hash of the dataset fingerprint, model cfg, hyp and result-changing arguments."""
    payload = {
        "dataset": dataset_fingerprint,
        "cfg": _canonical(cfg),
        "hyp": _canonical(hyp),
        "args": _canonical(arguments),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
