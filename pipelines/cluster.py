"""The pipeline's compile-time shape: where and with what its pods run (`ClusterOptions`).

Kept apart from pipelines/training.py, which imports kfp and the component modules: those read the image
when first imported, so parsing `--toleration` (or anything else) must not import them before `--image`
is applied.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass, field, replace

from components import pipeline_image
from components.params import check_gpus
from yolo.errors import UserError

TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_QUANTITY = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_UNIT = {"m": 1e-3, None: 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_UNIT |= {f"{p}i": 2.0 ** (10 * (i + 1)) for i, p in enumerate("KMGTPE")}


def quantity(name: str, text: str) -> float:
    """A Kubernetes resource quantity (500m, 8, 32Gi, 1.5G) as a number; UserError for anything else."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise UserError(f"{name}={text!r}: not a Kubernetes quantity (e.g. 500m, 8, 32Gi)")
    return float(match.group(1)) * _UNIT[match.group(2)]


@dataclass(frozen=True)
class Toleration:
    key: str
    operator: str = "Equal"  # or "Exists"
    value: str | None = None
    effect: str | None = None  # NoSchedule, PreferNoSchedule, NoExecute


def parse_toleration(text: str) -> Toleration:
    """KEY[=VALUE][:EFFECT] → Toleration (operator Equal with a value, Exists without); ValueError if not."""
    spec, _, effect = text.partition(":")
    key, sep, value = spec.partition("=")
    if not key:
        raise ValueError(f"expected KEY[=VALUE][:EFFECT], got {text!r}")
    if effect and effect not in TOLERATION_EFFECTS:
        raise ValueError(f"toleration effect {effect!r}: {', '.join(TOLERATION_EFFECTS[:-1])} or NoExecute")
    return Toleration(
        key=key, operator="Equal" if sep else "Exists", value=value if sep else None, effect=effect or None
    )


@dataclass(frozen=True)
class VolumeClaim:
    """A PersistentVolumeClaim to mount: its name and the folder inside it (subPath, "" = its root)."""

    name: str
    sub_path: str = ""


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def parse_volume_claim(text: str) -> VolumeClaim:
    """NAME[:SUBPATH] → VolumeClaim; ValueError for a name Kubernetes refuses or a path that climbs out."""
    name, _, sub_path = text.partition(":")
    if not _DNS_SUBDOMAIN.match(name):
        raise ValueError(f"PVC name {name!r}: lowercase letters, digits, '-' and '.' (a DNS-1123 subdomain)")
    sub_path = sub_path.strip("/")
    if any(part in ("", ".", "..") for part in sub_path.split("/")) and sub_path:
        raise ValueError(f"PVC subpath {sub_path!r}: a relative path without '.', '..' or empty parts")
    if re.search(r"[\x00-\x1f\\]", sub_path):
        raise ValueError(f"PVC subpath {sub_path!r}: no control characters or backslashes")
    return VolumeClaim(name=name, sub_path=sub_path)


def volume_claim_argument(text: str) -> VolumeClaim:
    """parse_volume_claim as an argparse type (compile, submit's compile child, pytorchjob)."""
    try:
        return parse_volume_claim(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class Resources:
    """Requests and limits of one task. Every task has CPU and memory both: a namespace whose ResourceQuota
    counts requests or limits refuses pods that leave either out. Ephemeral storage: KFP's ResourceSpec has
    no field for it, so in the pipeline `ephemeral_limit` sizes an emptyDir at /tmp (the kubelet evicts a
    pod past it) and `ephemeral` is not sent; a PyTorchJob's pods get both as real requests and limits."""

    cpu: str
    memory: str
    cpu_limit: str
    memory_limit: str
    ephemeral: str = ""
    ephemeral_limit: str = ""

    def check(self, what: str) -> None:
        for kind in ("cpu", "memory", "ephemeral"):
            request, limit = getattr(self, kind), getattr(self, f"{kind}_limit")
            if request and limit and quantity(f"{what} {kind}", request) > quantity(f"{what} {kind} limit", limit):
                raise UserError(f"{what} {kind} limit {limit} is below its request {request}")
            for value, name in ((request, kind), (limit, f"{kind} limit")):
                if value:
                    quantity(f"{what} {name}", value)


TASKS = ("resolve", "import", "validate", "stats", "train", "evaluate", "promote")
RESOURCE_KINDS = {"cpu": "cpu", "memory": "memory", "ephemeral-storage": "ephemeral"}


def parse_task_resources(text: str) -> tuple[str, dict[str, str]]:
    """TASK:KIND=REQUEST[/LIMIT][,KIND=...] → (task, {Resources field: value}); ValueError if not."""
    task, sep, spec = text.partition(":")
    if not sep or task not in TASKS:
        raise ValueError(f"expected TASK:KIND=REQUEST[/LIMIT],... with TASK one of {', '.join(TASKS)}; got {text!r}")
    fields: dict[str, str] = {}
    for item in spec.split(","):
        kind, eq, value = item.partition("=")
        if not eq or kind not in RESOURCE_KINDS or not value:
            raise ValueError(f"{item!r}: expected KIND=REQUEST[/LIMIT], KIND one of {', '.join(RESOURCE_KINDS)}")
        request, _, limit = value.partition("/")
        name = RESOURCE_KINDS[kind]
        for key, quantity_text in ((name, request), (f"{name}_limit", limit)):
            if quantity_text:
                if not _QUANTITY.match(quantity_text):
                    raise ValueError(f"{kind} {quantity_text!r}: not a Kubernetes quantity (e.g. 500m, 8, 32Gi)")
                fields[key] = quantity_text
    return task, fields


def task_resources_argument(text: str) -> tuple[str, dict[str, str]]:
    try:
        return parse_task_resources(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class ClusterOptions:
    """Compile-time settings: where and with what the steps' pods run."""

    gpus: int = 1  # per train pod: 0 (CPU), 1, 2, 4 or 8 (torchrun, one process per GPU)
    image: str = field(default_factory=pipeline_image)
    s3_secret: str = (
        "yolo-s3-credentials"  # a Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; "" = none
    )
    s3_endpoint: str = ""  # AWS_ENDPOINT_URL for MinIO or another S3-compatible store; "" = AWS
    train_cpu: str = "8"
    train_memory: str = "32Gi"
    # Limits: memory also covers /dev/shm (a Memory emptyDir counts against the pod's memory limit).
    train_cpu_limit: str = "16"
    train_memory_limit: str = "48Gi"
    shm_size: str = "16Gi"  # memory-backed /dev/shm for DataLoader workers (the 64 MiB default is too small)
    # A PyTorchJob pod's node-local storage (run folder, checkpoints, the imported dataset's emptyDir). The
    # pipeline's own tasks have no ephemeral-storage default: KFP cannot request it, and a default /tmp
    # size limit would evict a task whose data outgrew it; give one per task with --resources.
    train_ephemeral: str = "20Gi"
    train_ephemeral_limit: str = "200Gi"
    # import, validate, stats, evaluate: data-sized work
    step: Resources = Resources(cpu="2", memory="8Gi", cpu_limit="4", memory_limit="8Gi")
    # resolve (a git ls-remote or an S3 listing) and promote (a few uploads)
    light_step: Resources = Resources(cpu="500m", memory="1Gi", cpu_limit="1", memory_limit="2Gi")
    # per-task overrides (--resources TASK:KIND=REQUEST[/LIMIT]): TASK -> {Resources field: value}
    task_resources: dict[str, dict[str, str]] = field(default_factory=dict)
    train_retries: int = 3  # pod retries; each resumes from checkpoint_root/<run identity>
    node_selector: dict[str, str] = field(default_factory=dict)  # train pods only
    tolerations: tuple[Toleration, ...] = ()  # train pods only
    # A PVC holding datasets, mounted at components.sources.DATASET_MOUNT in every task that reads data
    dataset_pvc: VolumeClaim | None = None
    image_pull_secrets: tuple[str, ...] = ()  # every task's pod (and the PyTorchJob's)
    # nodes > 1: the train task launches a PyTorchJob of `nodes` pods x `gpus` (components/launcher.py),
    # in `namespace` ("" = the pipeline pod's own), its pods running as `service_account` ("" = default).
    # A single-node run's service account is the run's own (submit --service-account).
    nodes: int = 1
    namespace: str = ""
    service_account: str = ""

    def __post_init__(self) -> None:
        check_gpus(self.gpus)
        for task in TASKS:
            self.resources(task).check(task)
        unknown = set(self.task_resources) - set(TASKS)
        if unknown:
            raise UserError(f"--resources: no task {sorted(unknown)[0]!r} ({', '.join(TASKS)})")
        quantity("shm_size", self.shm_size)
        if self.nodes < 1:
            raise UserError(f"--nodes {self.nodes}: must be >= 1")
        for what, name in (("--namespace", self.namespace), ("--service-account", self.service_account),
                           *(("--image-pull-secret", n) for n in self.image_pull_secrets)):  # fmt: skip
            if name and not _DNS_SUBDOMAIN.match(name):
                raise UserError(f"{what} {name!r}: lowercase letters, digits, '-' and '.' (a Kubernetes name)")

    def job_settings(self) -> dict:
        """The PyTorchJob's compiled settings (pipelines.pytorchjob.JobOptions fields), for nodes > 1."""
        return {
            "nodes": self.nodes, "gpus": self.gpus, "image": self.image, "namespace": self.namespace,
            "service_account": self.service_account, "image_pull_secrets": list(self.image_pull_secrets),
            "node_selector": dict(self.node_selector),
            "tolerations": [{k: v for k, v in asdict(t).items() if v is not None} for t in self.tolerations],
            "dataset_pvc": asdict(self.dataset_pvc) if self.dataset_pvc else None,
            "s3_secret": self.s3_secret, "s3_endpoint": self.s3_endpoint,
            "resources": asdict(self.resources("train")), "shm_size": self.shm_size,
            "max_restarts": self.train_retries, "backoff_limit": self.train_retries,
        }  # fmt: skip

    def resources(self, task: str) -> Resources:
        """The requests and limits of one task (TASKS): its kind's defaults, then --resources."""
        if task == "train":
            base = Resources(self.train_cpu, self.train_memory, self.train_cpu_limit, self.train_memory_limit,
                             self.train_ephemeral, self.train_ephemeral_limit)  # fmt: skip
        else:
            base = self.light_step if task in ("resolve", "promote") else self.step
        return replace(base, **self.task_resources.get(task, {}))

    def scratch_limit(self, task: str) -> str:
        """The size of a pipeline task's /tmp scratch: the ephemeral-storage limit given with --resources."""
        return self.task_resources.get(task, {}).get("ephemeral_limit", "")
