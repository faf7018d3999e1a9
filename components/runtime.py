"""The step adapters inside the pipeline's containers: each runs ONE `yolo` CLI call (validate, stats,
train, evaluate; torchrun when the train pod has several GPUs) and fills the KFP artifacts from the files
that step wrote.

The KFP wrappers (components/<step>.py) stay typed signatures around one call here, so this module holds
the logic and can be tested without kfp. It never imports kfp: artifacts are passed in and used only
through `.path`, `.metadata`, `.log_metric(...)` and `.log_confusion_matrix(...)`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

from components.params import check_train_extra_args
from components.registry import MODEL_FILE, current_model
from components.sources import redact
from yolo.engine.lease import PIPELINE_RUN_ENV
from yolo.storage import open_storage

LOGGER = logging.getLogger(__name__)
DATA_YAML = "data.yaml"


# --------------------------------------------------------------------------------------------- CLI
def yolo_command(step: str, args: list[str], gpus: int = 0) -> list[str]:
    """argv for one step: `python -m yolo STEP ...`, or torchrun with one process per GPU when gpus > 1."""
    if gpus > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        return [*launcher, "-m", "yolo", step, *args]
    return [sys.executable, "-m", "yolo", step, *args]


def run_yolo(
    step: str,
    args: list[str],
    gpus: int = 0,
    allowed_exit_codes: tuple[int, ...] = (0,),
    forward_signals: bool = False,
    env: dict[str, str] | None = None,
) -> int:
    """Run one yolo step as a child process (its log streams to the pod's); raise on a failing exit.
    `env`: variables added to this process's environment for the child."""
    argv = yolo_command(step, [str(a) for a in args], gpus)
    LOGGER.info("running: %s", redact(" ".join(argv)))
    child_env = {**os.environ, **env} if env else None
    if forward_signals:
        code = _run_passing_on_stop_signals(argv, child_env)
    else:
        code = subprocess.run(argv, check=False, env=child_env).returncode
    if code not in allowed_exit_codes:
        raise RuntimeError(f"yolo {step} failed with exit code {code}")
    return code


def _run_passing_on_stop_signals(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run argv; a SIGTERM/SIGINT this process gets is passed on to the child, and this process waits.

    In a pod the trainer is a grandchild (sh -> this Python -> `python -m yolo train`). Without this, a stop
    signal that reaches this Python (a PID 1 that signals its process group or only its child) kills it on
    the spot, and the pod can end while the trainer is still writing last.pt. With it, the trainer gets
    the signal (a second copy of the same signal is harmless to it, see yolo.engine.preemption), finishes
    its step, writes and uploads last.pt and exits 143, and this step then fails with that code.
    """
    child = subprocess.Popen(argv, env=env)

    def pass_on(signum: int, _frame) -> None:
        child.send_signal(signum)

    stop_signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, pass_on) for sig in stop_signals}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _parent_made(path: str | os.PathLike) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Path(path)


def log_metrics(artifact, values: dict[str, float]) -> None:
    """log_metric each value, and write them as JSON at the artifact's path.

    The file matters: a Metrics artifact is otherwise metadata only, and kfp.local's cache treats an
    output whose path does not exist as missing — every task with a Metrics output would never be a hit.
    """
    for name, value in values.items():
        artifact.log_metric(name, value)
    _parent_made(artifact.path).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def data_yaml_of(dataset_path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """The data.yaml inside a Dataset artifact folder written by import_data."""
    name = (metadata or {}).get("data_yaml") or DATA_YAML
    return Path(dataset_path) / name


# -------------------------------------------------------------------------------------------- steps
def validate(dataset, max_bad_fraction: float, workers: int, index, report, summary) -> bool:
    """`yolo validate` into the index artifact (report.json, report.md, index/); report.md → Markdown,
    per-split counts → Metrics."""
    out = Path(index.path)
    run_yolo(
        "validate",
        [
            "--data",
            data_yaml_of(dataset.path, dataset.metadata),
            "--out",
            out,
            "--max-bad-fraction",
            max_bad_fraction,
            "--workers",
            workers,
        ],
    )
    result = _read_json(out / "report.json")
    shutil.copyfile(out / "report.md", _parent_made(report.path))
    index.metadata.update({"ok": bool(result["ok"]), "problems": len(result.get("problems", []))})
    log_metrics(
        summary,
        {
            f"{split}_{name}": counts[name]
            for split, counts in sorted(result.get("splits", {}).items())
            for name in ("images", "images_ok", "backgrounds", "boxes", "problems")
            if isinstance(counts.get(name), (int, float))
        },
    )
    return bool(result["ok"])


def stats(dataset, index, cfg: str, weights: str, imgsz: int, stats_out, metrics) -> bool:
    """`yolo stats` (label statistics + autoanchor) into the stats artifact; BPR logged as metrics."""
    out = Path(stats_out.path)
    model = ["--weights", weights] if weights else ["--cfg", cfg]
    run_yolo(
        "stats",
        [
            "--data",
            data_yaml_of(dataset.path, dataset.metadata),
            "--out",
            out,
            "--index",
            Path(index.path) / "index",
            *model,
            "--imgsz",
            imgsz,
        ],
    )
    anchors = _read_json(out / "anchors.json")
    fit = ("bpr_before", "bpr_after", "aat_before", "aat_after")
    log_metrics(metrics, {name: float(anchors[name]) for name in fit if anchors.get(name) is not None})
    stats_out.metadata.update(
        {"anchors_changed": bool(anchors.get("changed")), "imgsz": anchors.get("imgsz")}
    )
    return bool(anchors.get("changed"))


def train_device(gpus: int) -> str:
    return "cpu" if gpus == 0 else ",".join(str(i) for i in range(gpus))


def checkpoint_uri(checkpoint_root: str) -> str:
    """Where the train step's checkpoints live: ROOT/{run_id}, which `yolo train` fills with its run identity
    (data fingerprint, cfg, hyp, result-changing args). A KFP retry, or a resubmission of the same data and
    parameters after a lost node, lands in the same folder and resumes; other parameters start clean."""
    if not checkpoint_root:
        return ""
    return f"{checkpoint_root.rstrip('/')}/{{run_id}}"


def train(
    dataset,
    index,
    stats_out,
    cfg: str,
    weights: str,
    epochs: int,
    imgsz: int,
    batch_size: int,
    gpus: int,
    workers: int,
    checkpoint_root: str,
    run_key: str,
    extra_args: str,
    model,
    out_dir: str = "",
) -> float:
    """`yolo train` (torchrun when gpus > 1); best.pt, train.json and results.csv → the Model artifact."""
    run_dir = Path(out_dir or mkdtemp(prefix="yolo-train-"))
    args: list[Any] = [
        "--data",
        data_yaml_of(dataset.path, dataset.metadata),
        "--out",
        run_dir,
        "--index",
        Path(index.path) / "index",
        "--anchors",
        Path(stats_out.path) / "anchors.json",
        "--epochs",
        epochs,
        "--imgsz",
        imgsz,
        "--batch-size",
        batch_size,
        "--device",
        train_device(gpus),
        "--workers",
        workers,
        "--data-version",
        dataset.metadata.get("version", ""),
    ]
    args += ["--weights", weights] if weights else ["--cfg", cfg]
    uri = checkpoint_uri(checkpoint_root)
    if uri:
        args += ["--checkpoint-uri", uri]
    args += check_train_extra_args(extra_args)  # never one of the flags set above
    # The lease on the checkpoint folder names this pipeline run: a retry of this task takes over its own
    # earlier attempt's lease at once; another run with the same data and parameters is refused (lease.py).
    run_key_env = {PIPELINE_RUN_ENV: run_key} if run_key else None
    run_yolo("train", args, gpus=gpus, forward_signals=True, env=run_key_env)
    summary = _read_json(run_dir / "train.json")
    target = Path(model.path)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "weights" / MODEL_FILE, target / MODEL_FILE)
    for name in ("train.json", "results.csv"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, target / name)
    best = summary.get("best") or {}
    model.metadata.update(
        {
            "file": MODEL_FILE,
            "map50": best.get("map50"),
            "map50_95": best.get("map50_95"),
            "run_id": summary.get("run_id"),
            "data_version": summary.get("data_version"),
            "epochs_run": summary.get("epochs_run"),
            "checkpoint_uri": summary.get("checkpoint_uri") or None,
            "pipeline_run": run_key,
        }
    )
    return float(best.get("map50") or 0.0)


def evaluate(
    dataset,
    index,
    model,
    imgsz: int,
    batch_size: int,
    min_map50: float,
    registry_uri: str,
    model_name: str,
    evaluation,
    metrics,
    confusion,
) -> bool:
    """`yolo evaluate` against the promoted model's metrics (current.json) as baseline; returns promote."""
    out = Path(evaluation.path)
    args: list[Any] = [
        "--data",
        data_yaml_of(dataset.path, dataset.metadata),
        "--weights",
        Path(model.path) / MODEL_FILE,
        "--out",
        out,
        "--index",
        Path(index.path) / "index",
        "--imgsz",
        imgsz,
        "--batch-size",
        batch_size,
        "--data-version",
        dataset.metadata.get("version", ""),
    ]
    # always a floor: evaluate with no criterion never promotes (0 is a floor that accepts any finite model)
    args += ["--min-map50", min_map50]
    current = current_model(registry_uri, model_name)
    if current is not None:
        baseline = (
            out / "baseline_metrics.json"
        )  # kept inside the artifact: gate.json names what it compared to
        out.mkdir(parents=True, exist_ok=True)
        open_storage(registry_uri).get(current["metrics_key"], baseline)
        args += ["--baseline", baseline]
        evaluation.metadata["baseline_version"] = current["version"]
    # Exit 2 with gate.json written is a failed --min-map50 gate: not a pipeline failure, just no promotion.
    code = run_yolo("evaluate", args, allowed_exit_codes=(0, 2))
    if code == 2 and not (out / "gate.json").is_file():
        raise RuntimeError("yolo evaluate failed with exit code 2 (see its log)")
    result = _read_json(out / "metrics.json")
    gate = _read_json(out / "gate.json")
    log_metrics(
        metrics,
        {name: float(result[name]) for name in ("precision", "recall", "map50", "map50_95", "fitness")},
    )
    matrix = _read_json(out / "confusion_matrix.json")
    confusion.log_confusion_matrix([str(label) for label in matrix["labels"]], matrix["matrix"])
    shutil.copyfile(out / "confusion_matrix.json", _parent_made(confusion.path))
    evaluation.metadata.update({"promote": bool(gate["promote"]), "reasons": gate.get("reasons", [])})
    return bool(gate["promote"])
