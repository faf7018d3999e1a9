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

from components.params import NAMES, PARAMETERS, check_gpus, check_parameters
from components.sources import DATASET_MOUNT, parse_source, redact
from pipelines.cluster import (
    TASKS,
    ClusterOptions,
    Toleration,
    parse_toleration,
    task_resources_argument,
    volume_claim_argument,
)
from yolo.cli import EXIT_USER_ERROR, OneLineParser
from yolo.errors import UserError
from yolo.files import write_text

EXIT_PIPELINE_FAILED = 1
PROG = "python -m pipelines"


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _toleration(text: str) -> Toleration:
    """KEY[=VALUE][:EFFECT] → Toleration (pipelines.cluster: no component module is imported by parsing)."""
    try:
        return parse_toleration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_cluster_arguments(p: argparse.ArgumentParser, default_gpus: int) -> None:
    p.add_argument("--gpus", type=int, default=default_gpus, help="GPUs per train pod: 0, 1, 2, 4 or 8")
    p.add_argument(
        "--image", help="container image of every step (default: $YOLO_PIPELINE_IMAGE or the project's)"
    )


# run-local's defaults where they differ from the pipeline's: `make run`'s training, minutes on a laptop CPU. The checkpoint
# root and the registry default to folders under --pipeline-root.
RUN_LOCAL_DEFAULTS = {
    "dataset_source": "sample:",  # as `make run`: 384 train / 96 val images at 128 px
    "epochs": 60,  # yolov5n from scratch reaches mAP50 > 0.5 here (params.yaml's measurements), in minutes
    "imgsz": 128,
    "batch_size": 16,
    "workers": 2,
    "model_name": "yolov5n-sample",
    "checkpoint_root": None,
    "registry_uri": None,
}
ROOT_DEFAULTS = {"checkpoint_root": "checkpoints", "registry_uri": "registry"}  # under --pipeline-root


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The pipeline parameters (components.params.PARAMETERS) with run-local's defaults."""
    for parameter in PARAMETERS:
        names = [parameter.flag]
        if parameter.name == "registry_uri":
            names.append("--registry")  # run-local's first spelling, kept
        default = RUN_LOCAL_DEFAULTS.get(parameter.name, parameter.default)
        shown = (
            f"PIPELINE_ROOT/{ROOT_DEFAULTS[parameter.name]}" if parameter.name in ROOT_DEFAULTS else default
        )
        p.add_argument(
            *names,
            dest=parameter.name,
            type=parameter.type,
            default=default,
            help=f"{parameter.help} (default: {shown})",
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
    c.add_argument(
        "--dataset-pvc",
        type=volume_claim_argument,
        metavar="NAME[:SUBPATH]",
        help=f"a PVC mounted at {DATASET_MOUNT} in every data step; a dataset source under it is read in "
        "place, not copied (mount it ReadOnlyMany)",
    )
    c.add_argument(
        "--image-pull-secret",
        action="append",
        default=[],
        metavar="NAME",
        help="Secret for a private registry, on every task's pod; repeatable",
    )
    c.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="train nodes: > 1 makes the train task launch a Training Operator PyTorchJob of NODES x --gpus",
    )
    c.add_argument("--namespace", default="", help="namespace of the PyTorchJob (default: the run's)")
    c.add_argument(
        "--service-account",
        default="",
        help="service account of the PyTorchJob's pods (a single-node run's is the run's: submit --service-account)",
    )
    c.add_argument(
        "--resources",
        type=task_resources_argument,
        action="append",
        default=[],
        metavar="TASK:KIND=REQUEST[/LIMIT],...",
        help=f"requests/limits of one task ({', '.join(TASKS)}); KIND cpu, memory or ephemeral-storage; "
        "repeatable (e.g. import:memory=16Gi/16Gi,ephemeral-storage=50Gi/100Gi)",
    )
    c.add_argument("--train-retries", type=int, default=3)
    c.add_argument("--train-cpu", default="8", help="CPU request of the train pod")
    c.add_argument("--train-memory", default="32Gi", help="memory request of the train pod")
    c.add_argument("--train-cpu-limit", default="16", help="CPU limit of the train pod")
    c.add_argument(
        "--train-memory-limit", default="48Gi", help="memory limit of the train pod (it covers /dev/shm too)"
    )
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
    from pipelines import (  # shipping subcommands (docs/kubeflow.md)
        katib,
        publish,
        pytorchjob,
        retrain,
        submit,
    )

    for extra in (submit, publish, retrain, pytorchjob, katib):
        extra.add_parser(sub)
    return parser


def _set_image(image: str | None) -> None:
    # The component modules read the image when first imported: set it before importing them.
    if image:
        if "components.train" in sys.modules:
            raise RuntimeError("--image must be set before the component modules are imported")
        os.environ["YOLO_PIPELINE_IMAGE"] = image


def _merged_resources(given: list[tuple[str, dict[str, str]]]) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {}
    for task, values in given:
        merged.setdefault(task, {}).update(values)
    return merged


def compile_pipeline(args: argparse.Namespace) -> int:
    check_gpus(args.gpus)
    if args.train_retries < 0:
        raise UserError(f"--train-retries {args.train_retries}: must be >= 0")
    _set_image(args.image)
    from kfp import compiler

    from pipelines.training import build_pipeline

    options = ClusterOptions(
        gpus=args.gpus,
        s3_secret=args.s3_secret,
        s3_endpoint=args.s3_endpoint,
        node_selector=dict(args.node_selector),
        tolerations=tuple(args.toleration),
        train_retries=args.train_retries,
        train_cpu=args.train_cpu,
        train_memory=args.train_memory,
        train_cpu_limit=args.train_cpu_limit,
        train_memory_limit=args.train_memory_limit,
        shm_size=args.shm_size,
        dataset_pvc=args.dataset_pvc,
        image_pull_secrets=tuple(args.image_pull_secret),
        nodes=args.nodes,
        namespace=args.namespace,
        service_account=args.service_account,
        task_resources=_merged_resources(args.resources),
    )
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.yaml")  # the compiler insists on a .yaml name
    compiler.Compiler().compile(build_pipeline(options), str(tmp))
    os.replace(tmp, out)
    shape = f"{options.nodes} nodes x {options.gpus} GPUs (PyTorchJob)" if options.nodes > 1 else f"gpus per train pod: {options.gpus}"
    print(f"wrote {out} ({shape}, image: {options.image})")
    return 0


def run_parameters(args: argparse.Namespace, root: Path) -> dict:
    """The pipeline arguments for run-local, checked."""
    params = {name: getattr(args, name) for name in NAMES}
    for name, folder in ROOT_DEFAULTS.items():
        if params[name] is None:
            params[name] = str(root / folder)
    check_parameters(gpus=args.gpus, **params)  # the same checks submit runs, before anything starts
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

    from pipelines.training import build_pipeline

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
        print(f"{PROG} run-local: {redact(reason[0])} (artifacts and logs under {root})", file=sys.stderr)
        return EXIT_PIPELINE_FAILED
    report = summarise(run.outputs, params)
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    write_text(root / "last-run.json", text)  # for scripts and tests: stdout also carries kfp.local logs
    print(text, end="")
    verdict = f"promoted as {report['current_version']}" if report["promote"] else "not promoted"
    print(f"{PROG} run-local: {verdict} ({'; '.join(report['gate_reasons'])})", file=sys.stderr)
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
        print(f"{PROG} {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
