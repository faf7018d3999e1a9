"""What runs inside a component's container: one `yolo` CLI call per step, and the KFP artifacts filled
from the files that step wrote.

The KFP wrappers (components/<step>.py) stay typed signatures around one call here, so this module holds
the logic and can be tested without kfp. It never imports kfp: artifacts are passed in and used only
through `.path`, `.metadata`, `.log_metric(...)` and `.log_confusion_matrix(...)`.

Dataset sources (`import_data`): `sample:[train=N,val=N,imgsz=N,seed=N]` (the embedded sample data),
a local/PVC path (a folder holding data.yaml, or a data.yaml file), `dvc://REPO#PATH` (a DVC repository,
git URL or local path, and the path inside it; the rev comes separately), `s3://bucket/prefix`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from yolo.errors import UserError

LOGGER = logging.getLogger(__name__)
SOURCE_SCHEMES = ("sample:", "dvc://", "s3://", "file://")
SAMPLE_OPTIONS = ("train", "val", "imgsz", "seed")
DATA_YAML = "data.yaml"
MODEL_FILE = "best.pt"
VERSION_PATTERN = re.compile(r"^v(\d+)$")
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SHA_PATTERN = re.compile(r"^[0-9a-f]{40}$")


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
) -> int:
    """Run one yolo step as a child process (its log streams to the pod's); raise on a failing exit."""
    argv = yolo_command(step, [str(a) for a in args], gpus)
    LOGGER.info("running: %s", " ".join(argv))
    if forward_signals:
        code = _run_passing_on_stop_signals(argv)
    else:
        code = subprocess.run(argv, check=False).returncode
    if code not in allowed_exit_codes:
        raise RuntimeError(f"yolo {step} failed with exit code {code}")
    return code


def _run_passing_on_stop_signals(argv: list[str]) -> int:
    """Run argv; a SIGTERM/SIGINT this process gets is passed on to the child, and this process waits.

    In a pod the trainer is a grandchild (sh -> this Python -> `python -m yolo train`). Without this, a stop
    signal that reaches this Python (a PID 1 that signals its process group or only its child) kills it on
    the spot, and the pod can end while the trainer is still writing last.pt. With it, the trainer gets
    the signal (a second copy of the same signal is harmless to it, see yolo.engine.preemption), finishes
    its step, writes and uploads last.pt and exits 143, and this step then fails with that code.
    """
    child = subprocess.Popen(argv)

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


# ------------------------------------------------------------------------------------ dataset sources
@dataclass(frozen=True)
class Source:
    kind: str  # "sample" | "local" | "dvc" | "s3"
    location: str  # sample options, a path, a repo, an s3 URI
    path_in_repo: str = ""  # dvc only


def parse_source(source: str) -> Source:
    """Parse a dataset source string; UserError naming the problem for anything unknown."""
    text = source.strip()
    if not text:
        raise UserError(
            "dataset source is empty (use sample:, a path, dvc://REPO#PATH or s3://bucket/prefix)"
        )
    if text.startswith("sample:"):
        options = text[len("sample:") :]
        _sample_args(options)  # validates
        return Source("sample", options)
    if text.startswith("dvc://"):
        repo, _, path = text[len("dvc://") :].partition("#")
        if not repo or not path:
            raise UserError(
                f"dataset source {text!r}: expected dvc://REPO#PATH (a git URL or folder, then a path)"
            )
        return Source("dvc", repo, path.strip("/"))
    if text.startswith("s3://"):
        if not text[len("s3://") :].split("/", 1)[0]:
            raise UserError(f"dataset source {text!r}: no bucket (expected s3://bucket/prefix)")
        return Source("s3", text.rstrip("/"))
    if text.startswith("file://"):
        return Source("local", text[len("file://") :])
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?", text)
    if scheme and not re.match(r"^[A-Za-z]:[\\/]", text):  # not a Windows drive letter
        raise UserError(
            f"dataset source {text!r}: unknown scheme {scheme.group(1)!r} "
            "(use sample:, a path, dvc://REPO#PATH or s3://bucket/prefix)"
        )
    return Source("local", text)


def _sample_args(options: str) -> list[str]:
    """`train=8,val=4` → ['--train', '8', '--val', '4'] for `yolo sample-data`."""
    args: list[str] = []
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in SAMPLE_OPTIONS or not value.isdigit():
            raise UserError(
                f"sample source option {item!r}: expected NAME=INTEGER with NAME in {', '.join(SAMPLE_OPTIONS)}"
            )
        args += [f"--{key}", value]
    return args


def _git(args: list[str], cwd: str | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["git failed"])[-1]
        raise UserError(f"git {' '.join(args)}: {last}")
    return result.stdout.strip()


def resolve_git_rev(repo: str, rev: str) -> str:
    """The commit SHA a rev (branch, tag, SHA; '' = HEAD) names in a local or remote git repository."""
    rev = rev.strip() or "HEAD"
    if SHA_PATTERN.match(rev):
        return rev
    if Path(repo).is_dir():
        return _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=repo)
    lines = _git(["ls-remote", repo, rev]).splitlines()
    if not lines:
        raise UserError(f"dvc repo {repo}: no ref named {rev!r}")
    return lines[0].split()[0]


def _tree_fingerprint(root: Path) -> str:
    from yolo.storage import open_storage

    return open_storage(root).fingerprint()


def _local_root(location: str) -> tuple[Path, Path]:
    """(dataset root to copy, data.yaml) of a local source: a folder with data.yaml, or a yaml file."""
    path = Path(location).expanduser().resolve()
    if path.is_dir():
        yaml_path = path / DATA_YAML
        if not yaml_path.is_file():
            raise UserError(f"dataset source {location}: no {DATA_YAML} in this folder")
        return path, yaml_path
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {e}") from None
        root = (path.parent / str(raw.get("path") or ".")).resolve()
        return root, path
    raise UserError(f"dataset source {location}: no such folder or data.yaml")


def resolve_version(source: str, rev: str = "") -> str:
    """A version string that changes exactly when the data does: the key import_data is cached by."""
    parsed = parse_source(source)
    if parsed.kind == "sample":
        from yolo import __version__

        options = ",".join(sorted(filter(None, (o.strip() for o in parsed.location.split(",")))))
        return "sample-" + hashlib.sha256(f"{__version__}|{options}".encode()).hexdigest()[:16]
    if parsed.kind == "dvc":
        return resolve_git_rev(parsed.location, rev)
    if parsed.kind == "s3":
        from yolo.storage import open_storage

        storage = open_storage(parsed.location)
        storage.check_access()
        keys = storage.list()
        if not keys:
            raise UserError(f"dataset source {parsed.location}: no objects under this prefix")
        return "s3-" + storage.fingerprint()[:16]
    root, yaml_path = _local_root(parsed.location)
    digest = hashlib.sha256(_tree_fingerprint(root).encode() + b"|" + yaml_path.read_bytes())
    return "local-" + digest.hexdigest()[:16]


def _empty_target(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    elif path.exists():
        raise RuntimeError(f"{path}: output artifact location is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)


def _copy_local(location: str, target: Path) -> None:
    root, yaml_path = _local_root(location)
    raw = yaml.safe_load(yaml_path.read_text()) or {}
    shutil.copytree(root, target, ignore=shutil.ignore_patterns(".git", ".dvc", "__pycache__"))
    # The copy's data.yaml points at the copy; split entries must be relative to (or inside) the root.
    for split in ("train", "val", "test"):
        entries = raw.get(split)
        if entries is None:
            continue
        as_list = entries if isinstance(entries, list) else [entries]
        fixed = []
        for entry in as_list:
            p = Path(str(entry))
            if p.is_absolute():
                try:
                    p = p.resolve().relative_to(root)
                except ValueError:
                    raise UserError(
                        f"{yaml_path}: {split} entry {entry} is outside the dataset root {root}"
                    ) from None
            fixed.append(p.as_posix())
        raw[split] = fixed if isinstance(entries, list) else fixed[0]
    raw["path"] = "."
    (target / DATA_YAML).write_text(yaml.safe_dump(raw, sort_keys=False))


def _download_s3(uri: str, target: Path) -> int:
    from yolo.storage import open_storage

    storage = open_storage(uri)
    keys = storage.list()
    target.mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: storage.get(key, target / key), keys))
    return len(keys)


def _dvc_executable() -> str:
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else "dvc"


def import_data(source: str, version: str, dataset) -> dict[str, Any]:
    """Materialise the source into the Dataset artifact folder; returns (and records) its metadata."""
    parsed = parse_source(source)
    target = Path(dataset.path)
    _empty_target(target)
    metadata: dict[str, Any] = {"source": source, "version": version, "data_yaml": DATA_YAML}
    if parsed.kind == "sample":
        run_yolo("sample-data", ["--out", target, *_sample_args(parsed.location)])
    elif parsed.kind == "local":
        _copy_local(parsed.location, target)
    elif parsed.kind == "s3":
        metadata["objects"] = _download_s3(parsed.location, target)
    elif parsed.kind == "dvc":
        if not SHA_PATTERN.match(version):
            raise UserError(
                f"dataset source {source}: version {version!r} is not a commit SHA (resolve it first)"
            )
        commit = version
        metadata.update(commit=commit, path=parsed.path_in_repo)
        argv = [
            _dvc_executable(),
            "get",
            parsed.location,
            parsed.path_in_repo,
            "--rev",
            commit,
            "-o",
            str(target),
        ]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"dvc get failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    yaml_path = data_yaml_of(target)
    if not yaml_path.is_file():
        candidates = sorted(target.glob("*.yaml"))
        if len(candidates) != 1:
            raise UserError(f"dataset source {source}: expected {DATA_YAML} at the top of the dataset")
        metadata["data_yaml"] = candidates[0].name
    metadata["files"] = sum(1 for p in target.rglob("*") if p.is_file())
    dataset.metadata.update(metadata)
    return metadata


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
    from tempfile import mkdtemp

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
    if extra_args.strip():
        import shlex

        args += shlex.split(extra_args)
    run_yolo("train", args, gpus=gpus, forward_signals=True)
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


def current_model(registry_uri: str, model_name: str) -> dict[str, Any] | None:
    """The registry's models/<name>/current.json, or None when nothing was promoted yet."""
    if not registry_uri:
        return None
    from yolo.storage import open_storage

    storage = open_storage(registry_uri)
    key = f"models/{model_name}/current.json"
    if not storage.exists(key):
        return None
    return json.loads(storage.get_bytes(key))


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
    if min_map50 > 0:
        args += ["--min-map50", min_map50]
    current = current_model(registry_uri, model_name)
    if current is not None:
        from yolo.storage import open_storage

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


def _next_version(keys: list[str], model_name: str) -> str:
    prefix = f"models/{model_name}/"
    numbers = [
        int(m.group(1)) for key in keys if (m := VERSION_PATTERN.match(key[len(prefix) :].split("/", 1)[0]))
    ]
    return f"v{max(numbers, default=0) + 1}"


def promote(model, evaluation, registry_uri: str, model_name: str, image: str, run_key: str) -> str:
    """Copy best.pt + metrics + a model card to models/<name>/<version>/, then point current.json at it."""
    from datetime import datetime, timezone

    from yolo.storage import open_storage

    if not MODEL_NAME_PATTERN.match(model_name):
        raise UserError(f"model name {model_name!r}: use letters, digits, '.', '_' or '-'")
    storage = open_storage(registry_uri)
    storage.check_access(write=True)
    version = _next_version(storage.list(f"models/{model_name}/"), model_name)
    folder = f"models/{model_name}/{version}"
    evaluation_dir = Path(evaluation.path)
    metrics = _read_json(evaluation_dir / "metrics.json")
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
