"""The multi-node train step: create a Training Operator PyTorchJob, follow it, hand its best.pt on.

With `nodes > 1` the pipeline's train task does not train: it builds the manifest of
pipelines/pytorchjob.py (nodes × GPUs, the run's image, data and checkpoint URI), creates it through the
Kubernetes API with the pod's service account, polls `status.conditions` until Succeeded or Failed, and
then copies `weights/best.pt`, `train.json` and `results.csv` from the job's checkpoint URI into the Model
artifact — what the one-pod train step does from its own run folder.

- The job is named after the KFP run and checkpoints to `checkpoint_root/<KFP run id>`: a KFP retry of
  this task finds the same job (still running: followed; failed: deleted and created again, resuming
  from the checkpoint URI; succeeded: its result is used).
- SIGTERM (the run is cancelled, or the pod is stopped) deletes the job, so no GPU pod outlives the run.
- A failed job fails the task with the job's reason and message (its Failed condition).
Kept free of kfp (components/train_multinode.py is the KFP wrapper), like components/runtime.py.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from pathlib import Path
from typing import Any

from components.params import check_train_extra_args
from components.registry import MODEL_FILE
from pipelines.cluster import Resources, VolumeClaim
from pipelines.kube import api_error_text, custom_objects_api
from pipelines.pytorchjob import API_VERSION, KIND, JobOptions, build_manifest
from yolo.errors import UserError
from yolo.storage import open_storage

LOGGER = logging.getLogger(__name__)
GROUP, VERSION = API_VERSION.split("/")
PLURAL = "pytorchjobs"
RESULT_FILES = ("train.json", "results.csv")  # next to weights/best.pt under the checkpoint URI
# JobOptions fields fixed at compile time (ClusterOptions → the `job` input); the rest come from the run.
COMPILED_FIELDS = ("nodes", "gpus", "image", "namespace", "service_account", "image_pull_secrets",
                   "node_selector", "tolerations", "dataset_pvc", "s3_secret", "s3_endpoint", "resources",
                   "shm_size", "max_restarts", "backoff_limit")  # fmt: skip


class Cancelled(Exception):
    """SIGTERM/SIGINT reached the launcher: the job has been deleted."""


def job_name(pipeline_run: str) -> str:
    """A DNS-1035 name from the KFP run id (a UUID): `yolo-train-<first 12 hex>`."""
    tail = re.sub(r"[^a-z0-9]", "", pipeline_run.lower())[:12] or "run"
    return f"yolo-train-{tail}"


def job_options(
    job: str,
    dataset_source: str,
    dataset_version: str,
    train_args: list[str],
    checkpoint_root: str,
    pipeline_run: str,
) -> JobOptions:
    """The compiled settings (`job`, JSON) with this run's data, train arguments and checkpoint URI."""
    compiled = json.loads(job)
    unknown = set(compiled) - set(COMPILED_FIELDS)
    if unknown:
        raise UserError(f"job settings: unknown field(s) {', '.join(sorted(unknown))}")
    if compiled.get("dataset_pvc"):
        compiled["dataset_pvc"] = VolumeClaim(**compiled["dataset_pvc"])
    if compiled.get("resources"):
        compiled["resources"] = Resources(**compiled["resources"])
    if not checkpoint_root:
        raise UserError("a multi-node train step needs checkpoint_root: every node resumes from it, and the "
                        "model is handed on from it")  # fmt: skip
    return JobOptions(
        **compiled,
        train_args=train_args,
        checkpoint_uri=f"{checkpoint_root.rstrip('/')}/{pipeline_run}",
        name=job_name(pipeline_run),
        dataset_source=dataset_source,
        dataset_version=dataset_version,
        pipeline_run=pipeline_run,
    )


def train_arguments(cfg, weights, epochs, imgsz, batch_size, workers, data_version, extra_args) -> list[str]:
    """The `yolo train` arguments of the run (the manifest adds --data, --out, --device, --checkpoint-uri)."""
    args = ["--epochs", str(epochs), "--imgsz", str(imgsz), "--batch-size", str(batch_size),
            "--workers", str(workers), "--data-version", data_version]  # fmt: skip
    args += ["--weights", weights] if weights else ["--cfg", cfg]
    return args + check_train_extra_args(extra_args)


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def outcome(obj: dict[str, Any]) -> tuple[str, str] | None:
    """("Succeeded"|"Failed", reason: message) once the job has ended, else None."""
    conditions = _conditions(obj)
    for kind in ("Failed", "Succeeded"):
        if kind in conditions:
            c = conditions[kind]
            return kind, ": ".join(filter(None, (c.get("reason"), c.get("message")))) or kind
    return None


class JobRunner:
    """Create, follow and (on cancel) delete one PyTorchJob."""

    def __init__(self, api, namespace: str, manifest: dict[str, Any], poll_interval: float) -> None:
        self.api = api
        self.namespace = namespace
        self.manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
        self.name = manifest["metadata"]["name"]
        self.poll_interval = poll_interval
        self.stop = threading.Event()

    def _call(self, action: str, fn, *args, missing_ok: bool = False):
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(GROUP, VERSION, self.namespace, PLURAL, *args)
        except ApiException as e:
            if e.status == 404 and missing_ok:
                return None
            raise UserError(f"{action} {KIND} {self.name} in {self.namespace}: {api_error_text(e)}") from None
        except (OSError, HTTPError) as e:
            raise UserError(f"{action} {KIND} {self.name}: cannot reach the Kubernetes API ({e})") from None

    def get(self) -> dict[str, Any] | None:
        return self._call("reading", self.api.get_namespaced_custom_object, self.name, missing_ok=True)

    def delete(self) -> None:
        from kubernetes.client import ApiException

        try:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name,
                                                     propagation_policy="Foreground")  # fmt: skip
        except ApiException as e:
            if e.status != 404:
                raise UserError(f"deleting {KIND} {self.name}: {api_error_text(e)}") from None

    def create(self) -> None:
        """Create the job; one left by an earlier attempt of this run is followed, or replaced if it failed."""
        existing = self.get()
        if existing is not None:
            ended = outcome(existing)
            if ended is None or ended[0] == "Succeeded":
                LOGGER.info(f"{KIND} {self.name} exists (an earlier attempt of this run): following it")
                return
            LOGGER.info(f"{KIND} {self.name} of an earlier attempt failed ({ended[1]}): creating it again")
            self.delete()
            while self.get() is not None and not self.stop.wait(self.poll_interval):
                pass
            self._check_cancelled()
        self._call("creating", self.api.create_namespaced_custom_object, self.manifest)
        LOGGER.info(f"created {KIND} {self.name} in {self.namespace}")

    def _check_cancelled(self) -> None:
        if self.stop.is_set():
            self.delete()
            raise Cancelled(f"cancelled: deleted {KIND} {self.name}")

    def follow(self) -> tuple[str, str]:
        """Poll until the job ends; delete it and raise Cancelled when a stop signal arrives."""
        last = None
        while True:
            self._check_cancelled()
            obj = self.get()
            if obj is None:
                raise RuntimeError(f"{KIND} {self.name} disappeared (deleted by someone else?)")
            ended = outcome(obj)
            if ended is not None:
                return ended
            state = ",".join(sorted(_conditions(obj))) or "Pending"
            if state != last:
                LOGGER.info(f"{KIND} {self.name}: {state}")
                last = state
            self.stop.wait(self.poll_interval)


def _on_stop_signals(event: threading.Event):
    """SIGTERM/SIGINT set `event` (the main thread polls it); returns the previous handlers."""
    def handler(signum, _frame) -> None:
        event.set()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def hand_on_model(checkpoint_uri: str, model, pipeline_run: str, name: str) -> float:
    """best.pt, train.json, results.csv from the checkpoint URI → the Model artifact; returns best mAP50."""
    storage = open_storage(checkpoint_uri)
    target = Path(model.path)
    target.mkdir(parents=True, exist_ok=True)
    storage.get(f"weights/{MODEL_FILE}", target / MODEL_FILE)
    present = set(storage.list())
    for file in RESULT_FILES:
        if file in present:
            storage.get(file, target / file)
    summary = json.loads((target / "train.json").read_text()) if (target / "train.json").is_file() else {}
    best = summary.get("best") or {}
    model.metadata.update({
        "file": MODEL_FILE, "map50": best.get("map50"), "map50_95": best.get("map50_95"),
        "run_id": summary.get("run_id"), "data_version": summary.get("data_version"),
        "epochs_run": summary.get("epochs_run"), "checkpoint_uri": checkpoint_uri, "pipeline_run": pipeline_run,
        "pytorchjob": name,
    })  # fmt: skip
    return float(best.get("map50") or 0.0)


def train_multinode(
    job: str,
    dataset_source: str,
    dataset_version: str,
    cfg: str,
    weights: str,
    epochs: int,
    imgsz: int,
    batch_size: int,
    workers: int,
    checkpoint_root: str,
    run_key: str,
    extra_args: str,
    model,
    poll_interval: float = 15.0,
) -> float:
    """Launch the PyTorchJob for this run, wait for it, and fill the Model artifact from its checkpoints."""
    args = train_arguments(cfg, weights, epochs, imgsz, batch_size, workers, dataset_version, extra_args)
    options = job_options(job, dataset_source, dataset_version, args, checkpoint_root, run_key)
    manifest = build_manifest(options)
    api, namespace = custom_objects_api(options.namespace or "")
    runner = JobRunner(api, namespace, manifest, poll_interval)
    previous = _on_stop_signals(runner.stop)
    try:
        runner.create()
        result, reason = runner.follow()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result == "Failed":
        raise RuntimeError(f"{KIND} {runner.name} failed: {reason}")
    LOGGER.info(f"{KIND} {runner.name} succeeded; model from {options.checkpoint_uri}")
    return hand_on_model(options.checkpoint_uri, model, run_key, runner.name)
