"""The model registry (a folder or s3://bucket/prefix): models/<name>/v<N>/{best.pt, metrics.json,
gate.json, model_card.json}, and models/<name>/current.json naming the promoted version, written last."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from components.params import MODEL_NAME_PATTERN
from yolo.errors import UserError
from yolo.storage import open_storage

LOGGER = logging.getLogger(__name__)
MODEL_FILE = "best.pt"  # the weights file in a Model artifact and in a registry version
VERSION_PATTERN = re.compile(r"^v(\d+)$")


def current_model(registry_uri: str, model_name: str) -> dict[str, Any] | None:
    """The registry's models/<name>/current.json, or None when nothing was promoted yet."""
    if not registry_uri:
        return None
    storage = open_storage(registry_uri)
    key = f"models/{model_name}/current.json"
    if not storage.exists(key):
        return None
    return json.loads(storage.get_bytes(key))


def _next_version(keys: list[str], model_name: str) -> str:
    prefix = f"models/{model_name}/"
    numbers = [
        int(m.group(1)) for key in keys if (m := VERSION_PATTERN.match(key[len(prefix) :].split("/", 1)[0]))
    ]
    return f"v{max(numbers, default=0) + 1}"


def promote(model, evaluation, registry_uri: str, model_name: str, image: str, run_key: str) -> str:
    """Copy best.pt + metrics + a model card to models/<name>/<version>/, then point current.json at it."""
    if not MODEL_NAME_PATTERN.match(model_name):
        raise UserError(f"model name {model_name!r}: use letters, digits, '.', '_' or '-'")
    storage = open_storage(registry_uri)
    storage.check_access(write=True)
    version = _next_version(storage.list(f"models/{model_name}/"), model_name)
    folder = f"models/{model_name}/{version}"
    evaluation_dir = Path(evaluation.path)
    metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    weights_uri = storage.put(Path(model.path) / MODEL_FILE, f"{folder}/{MODEL_FILE}")
    storage.put(evaluation_dir / "metrics.json", f"{folder}/metrics.json")
    storage.put(evaluation_dir / "gate.json", f"{folder}/gate.json")
    totals = {k: metrics.get(k) for k in ("precision", "recall", "map50", "map50_95", "fitness")}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    card = {
        "name": model_name,
        "version": version,
        "created": now,
        "weights": weights_uri,
        "metrics": totals,
        "data_version": metrics.get("data_version"),
        "dataset_fingerprint": metrics.get("dataset_fingerprint"),
        "run_id": model.metadata.get("run_id"),
        "pipeline_run": run_key,
        "image": image,
    }
    storage.put_bytes(
        (json.dumps(card, indent=2, sort_keys=True) + "\n").encode(), f"{folder}/model_card.json"
    )
    # current.json last: until it is replaced, readers see the previous complete version.
    current = {
        "name": model_name,
        "version": version,
        "updated": now,
        "weights_key": f"{folder}/{MODEL_FILE}",
        "metrics_key": f"{folder}/metrics.json",
        "card_key": f"{folder}/model_card.json",
        "weights": weights_uri,
        "metrics": totals,
    }
    storage.put_bytes(
        (json.dumps(current, indent=2, sort_keys=True) + "\n").encode(), f"models/{model_name}/current.json"
    )
    LOGGER.info("promoted %s %s → %s", model_name, version, storage.uri_for(folder))
    return version
