"""`python -m pipelines compile --out pipeline.yaml` and `python -m pipelines run-local [--pipeline-root DIR]`.

compile: the KFP v2 pipeline for a cluster shape (GPUs per train pod, node selector, tolerations,
secret), as a YAML of PipelineSpec + PlatformSpec. run-local: the whole pipeline for real on this machine
with kfp.local's SubprocessRunner (each step a child process of this Python, no containers), tiny
defaults on the embedded sample data, a local folder standing in for the S3 model registry.
Parameters are checked before anything runs: a bad one is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from yolo.errors import UserError
from yolo.files import write_text

EXIT_USER_ERROR = 2
EXIT_PIPELINE_FAILED = 1
PROG = "python -m pipelines"


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a typo like `--epoch` is an error, not `--epochs`
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _toleration(text: str):
    """KEY[=VALUE][:EFFECT] → Toleration (operator Equal with a value, Exists without)."""
    from pipelines.training import Toleration

    spec, _, effect = text.partition(":")
    key, sep, value = spec.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY[=VALUE][:EFFECT], got {text!r}")
    if effect and effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(
            f"toleration effect {effect!r}: NoSchedule, PreferNoSchedule or NoExecute"
        )
    return Toleration(
        key=key, operator="Equal" if sep else "Exists", value=value if sep else None, effect=effect or None
    )


def _add_cluster_arguments(p: argparse.ArgumentParser, default_gpus: int) -> None:
    p.add_argument("--gpus", type=int, default=default_gpus, help="GPUs per train pod: 0, 1, 2, 4 or 8")
    p.add_argument(
        "--image", help="container image of every step (default: $YOLO_PIPELINE_IMAGE or the project's)"
    )


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Pipeline parameters with run-local's tiny defaults (seconds on a laptop CPU)."""
    p.add_argument(
        "--dataset-source",
        default="sample:train=32,val=16,imgsz=128",
        help="sample:[train=N,val=N,imgsz=N,seed=N] | PATH | dvc://REPO#PATH | s3://bucket/prefix",
    )
    p.add_argument("--dataset-rev", default="", help="git rev for a dvc:// source (resolved to a commit SHA)")
    p.add_argument("--cfg", default="yolov5n.yaml")
    p.add_argument("--weights", default="")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--min-map50", type=float, default=0.0)
    p.add_argument("--max-bad-fraction", type=float, default=0.05)
    p.add_argument("--model-name", default="yolov5n-sample")
    p.add_argument("--registry", help="model registry: a folder or s3:// (default PIPELINE_ROOT/registry)")
    p.add_argument(
        "--checkpoint-root", help="checkpoint mirror: a folder or s3:// (default PIPELINE_ROOT/checkpoints)"
    )
    p.add_argument(
        "--train-extra-args", default="", help="more `yolo train` flags, e.g. '--seed 1 --deterministic'"
    )


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    c = sub.add_parser("compile", help="write the pipeline YAML (PipelineSpec + PlatformSpec)")
    c.add_argument("--out", type=Path, required=True, help="output .yaml")
    _add_cluster_arguments(c, default_gpus=1)
    c.add_argument(
        "--s3-secret",
        default="yolo-s3-credentials",
        help="Kubernetes Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY ('' for none)",
    )
    c.add_argument(
        "--s3-endpoint", default="", help="AWS_ENDPOINT_URL for MinIO or another S3-compatible store"
    )
    c.add_argument(
        "--node-selector",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="train pods only; repeatable",
    )
    c.add_argument(
        "--toleration",
        type=_toleration,
        action="append",
        default=[],
        metavar="KEY[=VALUE][:EFFECT]",
        help="train pods only; repeatable",
    )
    c.add_argument("--train-retries", type=int, default=3)
    c.add_argument("--train-cpu", default="8")
    c.add_argument("--train-memory", default="32Gi")
    c.add_argument("--shm-size", default="16Gi", help="memory-backed /dev/shm size of the train pod")

    r = sub.add_parser("run-local", help="run the whole pipeline here with kfp.local (SubprocessRunner)")
    r.add_argument(
        "--pipeline-root",
        type=Path,
        default=Path("runs/kfp-local"),
        help="where artifacts, the workspace, checkpoints and the registry go",
    )
    _add_cluster_arguments(r, default_gpus=0)
    r.add_argument(
        "--no-cache",
        action="store_true",
        help="run every step (default: kfp.local's cache, under PIPELINE_ROOT/cache, with the same "
        "per-step caching as on KFP: unchanged data → import, validate, stats are cache hits)",
    )
    r.add_argument("--train-retries", type=int, default=0, help="retries of a failed train step (KFP: 3)")
    _add_run_arguments(r)
    from pipelines import katib, pytorchjob, retrain, submit  # shipping subcommands (docs/kubeflow.md)

    for extra in (submit, retrain, pytorchjob, katib):
        extra.add_parser(sub)
    return parser


def _set_image(image: str | None) -> None:
    # The component modules read the image when first imported: set it before importing them.
    if image:
        if "components.train" in sys.modules:
            raise RuntimeError("--image must be set before the component modules are imported")
        os.environ["YOLO_PIPELINE_IMAGE"] = image


def compile_pipeline(args: argparse.Namespace) -> int:
    from components.params import check_gpus

    check_gpus(args.gpus)
    if args.train_retries < 0:
        raise UserError(f"--train-retries {args.train_retries}: must be >= 0")
    _set_image(args.image)
    from kfp import compiler

    from pipelines.training import ClusterOptions, build_pipeline

    options = ClusterOptions(
        gpus=args.gpus,
        s3_secret=args.s3_secret,
        s3_endpoint=args.s3_endpoint,
        node_selector=dict(args.node_selector),
        tolerations=tuple(args.toleration),
        train_retries=args.train_retries,
        train_cpu=args.train_cpu,
        train_memory=args.train_memory,
        shm_size=args.shm_size,
    )
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.yaml")  # the compiler insists on a .yaml name
    compiler.Compiler().compile(build_pipeline(options), str(tmp))
    os.replace(tmp, out)
    print(f"wrote {out} (gpus per train pod: {options.gpus}, image: {options.image})")
    return 0


def run_parameters(args: argparse.Namespace, root: Path) -> dict:
    """The pipeline arguments for run-local, checked."""
    from pipelines.submit import check_values

    params = {
        "dataset_source": args.dataset_source,
        "dataset_rev": args.dataset_rev,
        "cfg": args.cfg,
        "weights": args.weights,
        "epochs": args.epochs,
        "imgsz": args.imgsz,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "checkpoint_root": args.checkpoint_root
        if args.checkpoint_root is not None
        else str(root / "checkpoints"),
        "registry_uri": args.registry if args.registry is not None else str(root / "registry"),
        "min_map50": args.min_map50,
        "max_bad_fraction": args.max_bad_fraction,
        "model_name": args.model_name,
        "train_extra_args": args.train_extra_args,
    }
    check_values(params, args.gpus)  # the same checks submit runs, before anything starts
    from components.runtime import parse_source

    source = parse_source(params["dataset_source"])
    if source.kind == "local" and not Path(source.location).exists():  # here (unlike a pod) we can see it
        raise UserError(f"dataset source {source.location}: no such folder or data.yaml")
    return params


def run_local(args: argparse.Namespace) -> int:
    root = args.pipeline_root.resolve()
    params = run_parameters(args, root)  # before anything runs
    if args.train_retries < 0:
        raise UserError(f"--train-retries {args.train_retries}: must be >= 0")
    _set_image(args.image)
    import kfp.local

    from pipelines.training import ClusterOptions, build_pipeline

    # Steps run as `python3 -m kfp.dsl.executor_main`: kfp.local swaps in this interpreter, and the
    # `python -m yolo` / `dvc` they start come from the same environment.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    (root / "workspace").mkdir(parents=True, exist_ok=True)
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root / "artifacts"),
        workspace_root=str(root / "workspace"),
        raise_on_error=True,
        enable_caching=not args.no_cache,
        cache_root=str(root / "cache"),
    )
    pipeline = build_pipeline(ClusterOptions(gpus=args.gpus, s3_secret="", train_retries=args.train_retries))
    try:
        run = pipeline(**params)
    except RuntimeError as e:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [type(e).__name__]
        print(f"{PROG} run-local: {reason[0]} (artifacts and logs under {root})", file=sys.stderr)
        return EXIT_PIPELINE_FAILED
    report = summarise(run.outputs, params)
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    write_text(root / "last-run.json", text)  # for scripts and tests: stdout also carries kfp.local logs
    print(text, end="")
    return 0


def summarise(outputs: dict, params: dict) -> dict:
    """Metrics, gate decision, promoted version and artifact locations of a finished local run."""
    metrics = outputs["metrics"]
    evaluation = Path(outputs["evaluation"].path)
    gate = json.loads((evaluation / "gate.json").read_text())
    registry = params["registry_uri"]
    current = None
    current_file = Path(registry) / "models" / params["model_name"] / "current.json"
    if "://" not in registry and current_file.is_file():
        current = json.loads(current_file.read_text())
    return {
        "metrics": {
            k: metrics.metadata.get(k) for k in ("precision", "recall", "map50", "map50_95", "fitness")
        },
        "promote": gate["promote"],
        "gate_reasons": gate["reasons"],
        "baseline": gate.get("baseline"),
        "current_version": current["version"] if current else None,
        "model": outputs["model"].path,
        "evaluation": str(evaluation),
        "registry": registry,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            if hasattr(args, "handler"):  # submit, retrain, pytorchjob, tune (katib)
                return args.handler(args)
            if args.command == "compile":
                return compile_pipeline(args)
            return run_local(args)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] == "kfp":
                raise UserError(f"{e.name} is not installed: pip install -e '.[pipeline]'") from None
            raise
    except UserError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
