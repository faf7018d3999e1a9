"""`python -m pipelines pytorchjob`: a Kubeflow PyTorchJob manifest that runs `yolo train` on several nodes.

The distributed engine is the existing one: torchrun's c10d rendezvous under the Kubeflow training
operator (kubeflow.org/v1 PyTorchJob, elastic mode). The operator creates one pod per replica (Master +
Workers), a headless service per pod, and sets torchrun's defaults as PET_* variables (PET_RDZV_ENDPOINT
from elasticPolicy.rdzvHost/rdzvPort, PET_NNODES = minReplicas:maxReplicas, PET_NPROC_PER_NODE from
nprocPerNode); the command also spells the size out, so the manifest reads on its own.

Every node runs the same command: `torchrun ... -m yolo train ARGS --checkpoint-uri URI`. Rank 0 mirrors
checkpoints to URI; when a pod is lost, torchrun re-forms the group (up to maxRestarts) and every rank
resumes from URI's last.pt — `yolo train` continues it because the run identity is the same.
restartPolicy OnFailure with a bounded runPolicy.backoffLimit, not ExitCode: `yolo train` exits 143 on
SIGTERM, but torchrun — PID 1 of the container — ends with exit 1 whatever stopped its workers (it
re-raises the signal as an exception), so the pod's exit code cannot tell a preemption from a bug.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components import pipeline_image
from components.params import check_gpus, reserved_flags_given
from components.sources import DATASET_MOUNT, manifest_dataset_version
from pipelines.cluster import Resources, VolumeClaim, volume_claim_argument
from yolo.engine.lease import PIPELINE_RUN_ENV
from yolo.errors import UserError
from yolo.files import write_text

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the operator requires a container of this name in every replica
PORT_NAME = "pytorchjob-port"  # the operator reads the port of this name
RDZV_PORT = 29400  # torchrun's customary c10d port
WORK_DIR = "/tmp/yolo-train"  # the pod-local run folder; the checkpoints that matter are at --checkpoint-uri
DATA_DIR = "/data"
AWS_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# train flags the manifest sets itself (they depend on the node, not on the run)
RESERVED_TRAIN_FLAGS = ("--out", "--device", "--checkpoint-uri", "--resume", "--local-rank", "--local_rank")
# The init container's import: the same code as the pipeline's import_data step, into an emptyDir.
IMPORT_SNIPPET = (
    "import shutil, sys, types\n"
    "from components.datasets import import_data\n"
    "root = sys.argv[3]\n"
    "meta = import_data(sys.argv[1], sys.argv[2], types.SimpleNamespace(path=root, metadata={}))\n"
    "if meta['data_yaml'] != 'data.yaml':\n"
    "    shutil.copyfile(f\"{root}/{meta['data_yaml']}\", f'{root}/data.yaml')\n"
)


@dataclass
class JobOptions:
    """What shapes the job: nodes × GPUs, image, checkpoints, data, secret and pod resources."""

    nodes: int
    gpus: int
    train_args: list[str] = field(default_factory=list)
    checkpoint_uri: str = ""
    min_nodes: int | None = None  # elastic lower bound (default: nodes, a fixed-size job that still re-forms)
    name: str = "yolo-train"
    namespace: str | None = None
    image: str = ""
    dataset_source: str = ""
    dataset_version: str = ""
    s3_secret: str = "yolo-s3-credentials"
    s3_endpoint: str = ""
    cpu: str = "8"
    memory: str = "32Gi"
    shm_size: str = "16Gi"
    max_restarts: int = 3
    backoff_limit: int = 3
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    dataset_pvc: VolumeClaim | None = None  # mounted read-only at DATASET_MOUNT in every container
    service_account: str = ""  # the pods' serviceAccountName (IRSA / workload identity for S3)
    image_pull_secrets: list[str] = field(default_factory=list)
    pipeline_run: str = ""  # the KFP run that launched the job: named in the checkpoint lease (lease.py)
    resources: Resources | None = None  # requests and limits incl. ephemeral storage (else cpu, memory)

    @property
    def procs_per_node(self) -> int:
        return max(self.gpus, 1)


def _flag_given(args: list[str], name: str) -> bool:
    return bool(reserved_flags_given(args, (name,)))


def _flag_value(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_options(o: JobOptions) -> None:
    """UserError (one line) for a job that could not run as asked."""
    check_gpus(o.gpus)
    if o.nodes < 1:
        raise UserError(f"--nodes {o.nodes}: must be >= 1")
    low = o.nodes if o.min_nodes is None else o.min_nodes
    if not 1 <= low <= o.nodes:
        raise UserError(f"--min-nodes {low}: must be between 1 and --nodes {o.nodes}")
    if not re.match(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$", o.name):
        raise UserError(f"--name {o.name!r}: a DNS-1035 label (lowercase letters, digits, '-'; at most 40)")
    if not o.checkpoint_uri:
        raise UserError("--checkpoint-uri is required: it is where a restarted node resumes from (s3://...)")
    clashes = reserved_flags_given(o.train_args, RESERVED_TRAIN_FLAGS)
    if clashes:
        raise UserError(f"train argument {clashes[0]}: set by the manifest (per node); remove it")
    has_data = _flag_given(o.train_args, "--data")
    if o.dataset_source and has_data:
        raise UserError(
            "give either --dataset-source (imported by an init container) or --data in the train args"
        )
    if not o.dataset_source and not has_data:
        raise UserError(
            "no data: give --dataset-source SRC, or --data PATH (a volume every node mounts) after --"
        )
    batch = _flag_value(o.train_args, "--batch-size")
    if batch is not None:
        if not batch.isdigit():
            raise UserError(f"--batch-size {batch}: not an integer")
        sizes = sorted({n * o.procs_per_node for n in range(low, o.nodes + 1)})
        bad = [s for s in sizes if int(batch) % s]
        if bad:
            raise UserError(
                f"--batch-size {batch}: must be a multiple of every world size the job may run "
                f"with ({', '.join(map(str, sizes))} processes)"
            )


def train_command(o: JobOptions) -> list[str]:
    """torchrun with c10d rendezvous (endpoint from PET_RDZV_ENDPOINT), then the train step."""
    low = o.nodes if o.min_nodes is None else o.min_nodes
    device = "cpu" if o.gpus == 0 else ",".join(str(i) for i in range(o.gpus))
    args = list(o.train_args)
    if o.dataset_source:
        args = ["--data", f"{DATA_DIR}/data.yaml", *args]
    return [
        "torchrun",
        f"--nnodes={low}:{o.nodes}",
        f"--nproc-per-node={o.procs_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-id={o.name}",
        f"--max-restarts={o.max_restarts}",
        "-m",
        "yolo",
        "train",
        *args,
        "--out",
        WORK_DIR,
        "--device",
        device,
        "--checkpoint-uri",
        o.checkpoint_uri,
    ]


def _env(o: JobOptions, pipeline_run: str = "") -> list[dict[str, Any]]:
    """The S3 secret and endpoint variables (katib.py's trials use them too), and the KFP run's id."""
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if o.s3_secret:
        env += [
            {"name": k, "valueFrom": {"secretKeyRef": {"name": o.s3_secret, "key": k, "optional": True}}}
            for k in AWS_SECRET_KEYS
        ]
    if o.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": o.s3_endpoint})
    if pipeline_run:
        env.append({"name": PIPELINE_RUN_ENV, "value": pipeline_run})
    return env


def _pod_template(o: JobOptions) -> dict[str, Any]:
    resources: dict[str, Any] = {
        "requests": {"cpu": o.cpu, "memory": o.memory},
        "limits": {"memory": o.memory},
    }
    if o.resources is not None:
        r = o.resources
        resources = {"requests": {"cpu": r.cpu, "memory": r.memory},
                     "limits": {"cpu": r.cpu_limit, "memory": r.memory_limit}}  # fmt: skip
        if r.ephemeral:
            resources["requests"]["ephemeral-storage"] = r.ephemeral
        if r.ephemeral_limit:
            resources["limits"]["ephemeral-storage"] = r.ephemeral_limit
    if o.gpus > 0:
        resources["limits"]["nvidia.com/gpu"] = o.gpus
        resources["requests"]["nvidia.com/gpu"] = o.gpus
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": o.shm_size}}
    ]
    spec: dict[str, Any] = {}
    dataset_mounts: list[dict[str, Any]] = []
    if o.dataset_pvc is not None:
        claim = {"claimName": o.dataset_pvc.name, "readOnly": True}
        volumes.append({"name": "dataset", "persistentVolumeClaim": claim})
        dataset_mounts.append({"name": "dataset", "mountPath": DATASET_MOUNT, "readOnly": True})
        if o.dataset_pvc.sub_path:
            dataset_mounts[0]["subPath"] = o.dataset_pvc.sub_path
        mounts += dataset_mounts
    if o.dataset_source:
        mounts.append({"name": "data", "mountPath": DATA_DIR})
        volumes.append({"name": "data", "emptyDir": {}})
        spec["initContainers"] = [
            {
                "name": "import-data",
                "image": o.image,
                "command": ["python", "-c", IMPORT_SNIPPET, o.dataset_source, o.dataset_version, DATA_DIR],
                "env": _env(o, o.pipeline_run),
                "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}, *dataset_mounts],
            }
        ]
    spec["containers"] = [
        {
            "name": CONTAINER,
            "image": o.image,
            "command": train_command(o),
            "env": _env(o, o.pipeline_run),
            "ports": [{"name": PORT_NAME, "containerPort": RDZV_PORT, "protocol": "TCP"}],
            "resources": resources,
            "volumeMounts": mounts,
        }
    ]
    spec["volumes"] = volumes
    if o.node_selector:
        spec["nodeSelector"] = dict(o.node_selector)
    if o.tolerations:
        spec["tolerations"] = list(o.tolerations)
    if o.service_account:
        spec["serviceAccountName"] = o.service_account
    if o.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in o.image_pull_secrets]
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": "yolo-pipeline", "yolo-pipeline/job": o.name}},
        "spec": spec,
    }


def _replica(o: JobOptions, replicas: int) -> dict[str, Any]:
    return {"replicas": replicas, "restartPolicy": "OnFailure", "template": _pod_template(o)}


def build_manifest(o: JobOptions) -> dict[str, Any]:
    """The PyTorchJob as a dict (kubeflow.org/v1): Master (rendezvous host) + nodes-1 Workers."""
    check_options(o)
    low = o.nodes if o.min_nodes is None else o.min_nodes
    metadata: dict[str, Any] = {"name": o.name, "labels": {"app.kubernetes.io/name": "yolo-pipeline"}}
    if o.namespace:
        metadata["namespace"] = o.namespace
    replica_specs = {"Master": _replica(o, 1)}
    if o.nodes > 1:
        replica_specs["Worker"] = _replica(o, o.nodes - 1)
    spec: dict[str, Any] = {"runPolicy": {"cleanPodPolicy": "None", "backoffLimit": o.backoff_limit}}
    # The operator's admission webhook (v1.9) requires a Worker replica whenever elasticPolicy is set. One
    # node has none, so it runs without: torchrun's c10d rendezvous then defaults to localhost:29400 in
    # the one pod, and a failed pod is still restarted (restartPolicy, backoffLimit, --max-restarts).
    if o.nodes > 1:
        spec["elasticPolicy"] = {
            "rdzvBackend": "c10d",
            "rdzvHost": f"{o.name}-master-0",  # the operator's service of the Master pod
            "rdzvPort": RDZV_PORT,
            "rdzvId": o.name,
            "minReplicas": low,
            "maxReplicas": o.nodes,
            "maxRestarts": o.max_restarts,
        }
    spec["nprocPerNode"] = str(o.procs_per_node)
    spec["pytorchReplicaSpecs"] = replica_specs
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


# --------------------------------------------------------------------------------------------- CLI
def _toleration(text: str) -> dict[str, str]:
    spec, _, effect = text.partition(":")
    key, sep, value = spec.partition("=")
    if not key or effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(f"expected KEY[=VALUE][:EFFECT], got {text!r}")
    out = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        out["value"] = value
    if effect:
        out["effect"] = effect
    return out


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_parser(sub) -> None:
    """Register `pytorchjob` on the `python -m pipelines` subparsers."""
    p = sub.add_parser(
        "pytorchjob",
        help="write a Kubeflow PyTorchJob manifest (multi-node `yolo train` under torchrun)",
        description="Train arguments go after `--`, e.g. `... --out job.yaml -- --cfg yolov5s.yaml --epochs 300`.",
    )
    p.add_argument("--nodes", type=int, required=True, help="pods (Master + Workers)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per pod: 0 (CPU, one process), 1, 2, 4 or 8")
    p.add_argument("--min-nodes", type=int, help="elastic lower bound (default: --nodes)")
    p.add_argument("--out", type=Path, required=True, help="the manifest to write (YAML)")
    p.add_argument("--name", default="yolo-train", help="job name (a DNS-1035 label)")
    p.add_argument("--namespace")
    p.add_argument("--image", help="default: $YOLO_PIPELINE_IMAGE or the project's")
    p.add_argument("--checkpoint-uri", required=True, help="s3://bucket/prefix every node resumes from")
    p.add_argument(
        "--dataset-source", default="", help="imported by an init container: sample:, s3://, dvc://, path"
    )
    p.add_argument(
        "--dataset-rev", default="", help="git rev of a dvc:// source (resolved to a commit SHA now)"
    )
    p.add_argument("--s3-secret", default="yolo-s3-credentials", help="Secret with AWS keys ('' for none)")
    p.add_argument("--s3-endpoint", default="")
    p.add_argument("--cpu", default="8")
    p.add_argument("--memory", default="32Gi")
    p.add_argument("--shm-size", default="16Gi")
    p.add_argument("--max-restarts", type=int, default=3, help="torchrun re-rendezvous after a lost node")
    p.add_argument("--backoff-limit", type=int, default=3, help="pod recreations before the job fails")
    p.add_argument("--node-selector", type=_key_value, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--toleration", type=_toleration, action="append", default=[], metavar="KEY[=VALUE][:EFFECT]"
    )
    p.add_argument(
        "--dataset-pvc",
        type=volume_claim_argument,
        metavar="NAME[:SUBPATH]",
        help=f"a PVC with datasets, mounted read-only at {DATASET_MOUNT} in every pod",
    )
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `yolo train` arguments")
    p.set_defaults(handler=run)


def options_from_args(args: argparse.Namespace) -> JobOptions:
    train_args = list(args.train_args)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    version = manifest_dataset_version(args.dataset_source, args.dataset_rev)
    return JobOptions(
        nodes=args.nodes,
        gpus=args.gpus,
        min_nodes=args.min_nodes,
        train_args=train_args,
        checkpoint_uri=args.checkpoint_uri,
        name=args.name,
        namespace=args.namespace,
        image=args.image or pipeline_image(),
        dataset_source=args.dataset_source,
        dataset_version=version,
        s3_secret=args.s3_secret,
        s3_endpoint=args.s3_endpoint,
        cpu=args.cpu,
        memory=args.memory,
        shm_size=args.shm_size,
        max_restarts=args.max_restarts,
        backoff_limit=args.backoff_limit,
        node_selector=dict(args.node_selector),
        tolerations=list(args.toleration),
        dataset_pvc=args.dataset_pvc,
    )


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    manifest = build_manifest(options)
    header = f"# {KIND} for `yolo train` on {options.nodes} node(s) x {options.procs_per_node} process(es).\n"
    header += f"# kubectl apply -f {args.out.name}   (needs the Kubeflow training operator)\n"
    header += f"# train command: {shlex.join(train_command(options))}\n"
    write_text(args.out, header + yaml.safe_dump(manifest, sort_keys=False, width=110))
    print(
        f"wrote {args.out} ({options.nodes} node(s) x {options.procs_per_node}, image {options.image})",
        file=sys.stderr,
    )
    return 0
