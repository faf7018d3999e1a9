"""`python -m pipelines tune`: the hyperparameter search of `yolo-pipeline tune` as a Katib Experiment.

The Experiment (kubeflow.org/v1beta1) searches the same space YAML as the local study. Each trial is a
Kubernetes Job in the project image whose pod

  1. (with --dataset-source) imports the data into an emptyDir, as the pipeline's import step does;
  2. writes the trial's hyp.yaml from the values Katib suggested (`python -m yolo.tune.trial_hyp`);
  3. runs the train step: `python -m yolo train --hyp /work/hyp.yaml --epochs E ...`.

Metrics: Katib's StdOut collector. The train step already logs one line per epoch,
`epoch 3: ...; P 0.61 R 0.55 mAP50 0.602 mAP50-95 0.391`, so a metricsFormat regex on that line gives
one observation of mAP50-95 (the objective, best epoch counts: strategy max) and mAP50 per epoch, with
no file, wrapper script or extra dependency in the step. The File collector would need the step to write
a Katib-specific file; TensorFlowEvent would need --tensorboard and its event files per trial.
Early stopping: Katib's medianstop, which works on those per-epoch observations (StdOut or File
collectors only), stops a trial whose best mAP50-95 falls below the median of earlier trials at the
same step: the cluster's counterpart of the local study's median pruner.

`--submit` creates the Experiment through the Kubernetes API (the `kubernetes` client, your kubeconfig or
the pod's service account); `--wait` polls it until it succeeds or fails and reports the best trial.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from pipelines import pytorchjob
from yolo.errors import UserError
from yolo.files import write_text
from yolo.hyp import Hyp, load_hyp
from yolo.tune import PRUNE_AFTER_TRIALS, first_prunable_epoch
from yolo.tune.space import DEFAULT_SPACE, SearchSpace, load_space

GROUP, VERSION, PLURAL = "kubeflow.org", "v1beta1", "experiments"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Experiment"
CONTAINER = "training-container"
WORK_DIR = "/work"  # emptyDir: the trial's hyp.yaml and run folder
HYP_PATH = f"{WORK_DIR}/hyp.yaml"
OBJECTIVE = "mAP50-95"
ADDITIONAL_METRICS = ["mAP50"]
# Matches the train step's per-epoch log line: exactly two groups, metric name and value (Katib's rule).
METRICS_FORMAT = r"(mAP50-95|mAP50)\s+([0-9]*\.?[0-9]+)"
ALGORITHMS = {"tpe": "tpe", "random": "random", "evolve": "cmaes"}  # local --sampler -> Katib algorithm
RESERVED_TRAIN_FLAGS = ("--out", "--hyp", "--epochs", "--device", "--resume", "--checkpoint-uri", "--local-rank",
                        "--local_rank")  # fmt: skip
JOB_SUCCESS = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
JOB_FAILURE = 'status.conditions.#(type=="Failed")#|#(status=="True")#'


@dataclass
class ExperimentOptions:
    """What shapes the Experiment: the search, the trial's pod, and where it runs."""

    space: SearchSpace
    trials: int
    parallel: int
    epochs_per_trial: int
    gpus: int
    sampler: str = "tpe"
    seed: int = 0
    base_hyp: Hyp = field(default_factory=Hyp)
    train_args: list[str] = field(default_factory=list)
    max_failed: int = 3
    name: str = "yolo-tune"
    namespace: str | None = None
    image: str = ""
    dataset_source: str = ""
    dataset_version: str = ""
    s3_secret: str = "yolo-s3-credentials"
    s3_endpoint: str = ""
    cpu: str = "8"
    memory: str = "32Gi"
    shm_size: str = "16Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)


def check_options(o: ExperimentOptions) -> None:
    """UserError (one line) for an Experiment that could not run as asked."""
    from components.params import check_gpus

    check_gpus(o.gpus)
    for name, value, low in (("--trials", o.trials, 1), ("--parallel", o.parallel, 1),
                             ("--epochs-per-trial", o.epochs_per_trial, 1), ("--max-failed", o.max_failed, 0)):  # fmt: skip
        if value < low:
            raise UserError(f"{name} {value}: must be >= {low}")
    if o.parallel > o.trials:
        raise UserError(f"--parallel {o.parallel}: more than --trials {o.trials}")
    if o.sampler not in ALGORITHMS:
        raise UserError(f"--sampler {o.sampler}: one of {', '.join(ALGORITHMS)}")
    if not re.match(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$", o.name):
        raise UserError(f"--name {o.name!r}: a DNS-1035 label (lowercase letters, digits, '-'; at most 40)")
    for reserved in RESERVED_TRAIN_FLAGS:
        if pytorchjob._flag_given(o.train_args, reserved):
            raise UserError(f"train argument {reserved}: set by the Experiment (per trial); remove it")
    has_data = pytorchjob._flag_given(o.train_args, "--data")
    if o.dataset_source and has_data:
        raise UserError("give either --dataset-source (imported by an init container) or --data in the train args")
    if not o.dataset_source and not has_data:
        raise UserError("no data: give --dataset-source SRC, or --data PATH (a volume the trial pods mount) after --")


def _decimal(value: float) -> str:
    """A number as Katib's string, always positional ('0.00001', not '1e-05', which YAML 1.2 reads back
    as a number where the API wants a string)."""
    return format(Decimal(repr(float(value))), "f")


def _parameters(space: SearchSpace) -> list[dict[str, Any]]:
    """Katib ParameterSpecs; values are strings, as the API wants them."""
    specs = []
    for p in space.params:
        if p.choices is not None:
            specs.append({"name": p.name, "parameterType": "discrete",
                          "feasibleSpace": {"list": [_decimal(c) for c in p.choices]}})  # fmt: skip
        else:
            feasible = {"min": _decimal(p.low), "max": _decimal(p.high)}
            if p.log:
                feasible["distribution"] = "logUniform"  # Katib >= v0.18 (KEP-2374)
            specs.append({"name": p.name, "parameterType": "double", "feasibleSpace": feasible})
    return specs


def hyp_command(o: ExperimentOptions) -> list[str]:
    """The init container that writes the trial's hyp.yaml: base values fixed, searched ones from Katib."""
    searched = set(o.space.names)
    fixed = [f"{k}={v!r}" for k, v in o.base_hyp.to_dict().items()
             if k not in searched and v is not None and v != getattr(Hyp(), k)]  # fmt: skip
    suggested = [f"{n}=${{trialParameters.{n}}}" for n in o.space.names]
    return ["python", "-m", "yolo.tune.trial_hyp", HYP_PATH, *fixed, *suggested]


def train_command(o: ExperimentOptions) -> list[str]:
    """The trial's train step. Katib's StdOut collector runs it under `sh -c` joined by spaces, so no
    argument may hold a space (checked)."""
    args = list(o.train_args)
    if o.dataset_source:
        args = ["--data", f"{pytorchjob.DATA_DIR}/data.yaml", *args]
    device = "cpu" if o.gpus == 0 else ",".join(str(i) for i in range(o.gpus))
    command = ["python", "-m", "yolo", "train", *args, "--hyp", HYP_PATH, "--epochs", str(o.epochs_per_trial),
               "--out", f"{WORK_DIR}/run", "--device", device]  # fmt: skip
    spaced = [a for a in command if not a or re.search(r"\s", a)]
    if spaced:
        raise UserError(f"train argument {spaced[0]!r}: Katib joins the command with spaces; no spaces allowed")
    return command


def _pod_spec(o: ExperimentOptions) -> dict[str, Any]:
    env = pytorchjob._env(o)  # the same AWS secret and endpoint variables as every other step
    resources: dict[str, Any] = {"requests": {"cpu": o.cpu, "memory": o.memory}, "limits": {"memory": o.memory}}
    if o.gpus > 0:
        resources["requests"]["nvidia.com/gpu"] = o.gpus
        resources["limits"]["nvidia.com/gpu"] = o.gpus
    work = {"name": "work", "mountPath": WORK_DIR}
    mounts = [work, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "work", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": o.shm_size}},
    ]
    init = []
    if o.dataset_source:
        data = {"name": "data", "mountPath": pytorchjob.DATA_DIR}
        mounts.append(data)
        volumes.append({"name": "data", "emptyDir": {}})
        init.append({"name": "import-data", "image": o.image, "env": env, "volumeMounts": [data],
                     "command": ["python", "-c", pytorchjob.IMPORT_SNIPPET, o.dataset_source, o.dataset_version,
                                 pytorchjob.DATA_DIR]})  # fmt: skip
    init.append({"name": "write-hyp", "image": o.image, "command": hyp_command(o), "volumeMounts": [work]})
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "initContainers": init,
        "containers": [{"name": CONTAINER, "image": o.image, "command": train_command(o), "env": env,
                        "resources": resources, "volumeMounts": mounts}],
        "volumes": volumes,
    }  # fmt: skip
    if o.node_selector:
        spec["nodeSelector"] = dict(o.node_selector)
    if o.tolerations:
        spec["tolerations"] = list(o.tolerations)
    return spec


def trial_job(o: ExperimentOptions) -> dict[str, Any]:
    """The trial template: a batch/v1 Job, one pod, never restarted (a failed trial counts as failed)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {
            "backoffLimit": 0,
            "template": {
                # an Istio sidecar would keep the pod, and so the Job and the trial, running forever
                "metadata": {"annotations": {"sidecar.istio.io/inject": "false"},
                             "labels": {"app.kubernetes.io/name": "yolo-pipeline", "yolo-pipeline/experiment": o.name}},
                "spec": _pod_spec(o),
            },
        },
    }  # fmt: skip


def build_experiment(o: ExperimentOptions) -> dict[str, Any]:
    """The Katib Experiment as a dict."""
    check_options(o)
    metadata: dict[str, Any] = {"name": o.name, "labels": {"app.kubernetes.io/name": "yolo-pipeline"}}
    if o.namespace:
        metadata["namespace"] = o.namespace
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "objective": {
                "type": "maximize",
                "objectiveMetricName": OBJECTIVE,
                "additionalMetricNames": list(ADDITIONAL_METRICS),
                # the best epoch of a trial counts, as best.pt does (not the last one)
                "metricStrategies": [{"name": m, "value": "max"} for m in (OBJECTIVE, *ADDITIONAL_METRICS)],
            },
            "algorithm": {"algorithmName": ALGORITHMS[o.sampler],
                          "algorithmSettings": [{"name": "random_state", "value": str(o.seed)}]},
            "earlyStopping": {"algorithmName": "medianstop", "algorithmSettings": [
                # the local pruner's rule (yolo.tune): start_step counts epochs reported, from 1
                {"name": "min_trials_required", "value": str(PRUNE_AFTER_TRIALS)},
                {"name": "start_step", "value": str(first_prunable_epoch(o.epochs_per_trial) + 1)}]},
            "parallelTrialCount": o.parallel,
            "maxTrialCount": o.trials,
            "maxFailedTrialCount": o.max_failed,
            "metricsCollectorSpec": {"collector": {"kind": "StdOut"},
                                     "source": {"filter": {"metricsFormat": [METRICS_FORMAT]}}},
            "parameters": _parameters(o.space),
            "trialTemplate": {
                "primaryContainerName": CONTAINER,
                "successCondition": JOB_SUCCESS,
                "failureCondition": JOB_FAILURE,
                "trialParameters": [{"name": n, "reference": n, "description": f"hyp.yaml `{n}`"}
                                    for n in o.space.names],
                "trialSpec": trial_job(o),
            },
        },
    }  # fmt: skip


# ------------------------------------------------------------------------------------ submit and wait
def _kube_api(namespace: str | None) -> tuple[Any, str]:
    """CustomObjectsApi from the kubeconfig ($KUBECONFIG or ~/.kube/config) or the pod's service account,
    and the namespace to use (--namespace, else the kubeconfig context's, else 'default')."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise UserError("--submit needs the kubernetes client: pip install -e '.[pipeline]'") from None
    context_namespace = None
    configuration = client.Configuration()  # our own, not the client's process-wide default
    try:
        # $KUBECONFIG read now: the client reads it once, when first imported
        path = os.environ.get("KUBECONFIG") or None
        config.load_kube_config(config_file=path, client_configuration=configuration)
        _, active = config.list_kube_config_contexts(config_file=path)
        context_namespace = (active or {}).get("context", {}).get("namespace")
    except (config.ConfigException, FileNotFoundError, OSError):
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise UserError("no Kubernetes configuration: set KUBECONFIG (or ~/.kube/config), or run in a pod") from None
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    return api, namespace or context_namespace or "default"


def _api_error(action: str, e) -> UserError:
    try:
        message = json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        message = e.reason
    return UserError(f"{action}: HTTP {e.status} {message}")


def submit(experiment: dict[str, Any], namespace: str | None) -> tuple[Any, str]:
    """Create the Experiment; returns the API and its namespace."""
    from kubernetes.client import ApiException
    from urllib3.exceptions import HTTPError

    api, ns = _kube_api(namespace)
    body = {**experiment, "metadata": {**experiment["metadata"], "namespace": ns}}
    name = experiment["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    except ApiException as e:
        raise _api_error(f"creating Experiment {name} in namespace {ns}", e) from None
    except (OSError, HTTPError) as e:  # connection refused, DNS, TLS (urllib3 wraps them after its retries)
        reason = getattr(e, "reason", None) or e
        raise UserError(f"creating Experiment {name}: cannot reach the Kubernetes API ({reason})") from None
    return api, ns


def wait(api, namespace: str, name: str, timeout: float, poll: float) -> dict[str, Any]:
    """Poll the Experiment until a Succeeded or Failed condition is true; returns the object."""
    from kubernetes.client import ApiException
    from urllib3.exceptions import HTTPError

    deadline = time.monotonic() + timeout
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            raise _api_error(f"reading Experiment {name} in namespace {namespace}", e) from None
        except (OSError, HTTPError) as e:
            raise UserError(f"reading Experiment {name}: cannot reach the Kubernetes API "
                            f"({getattr(e, 'reason', None) or e})") from None
        conditions = {c.get("type"): c.get("status") for c in obj.get("status", {}).get("conditions", [])}
        if conditions.get("Succeeded") == "True" or conditions.get("Failed") == "True":
            return obj
        if time.monotonic() > deadline:
            raise UserError(f"Experiment {name} not finished after {timeout:g} s (it keeps running; "
                            f"kubectl get experiment {name} -n {namespace})")
        time.sleep(poll)


def best_trial_report(obj: dict[str, Any], base_hyp: Hyp) -> dict[str, Any]:
    """The best trial of a finished Experiment: its name, metrics, parameters, and the hyp they make."""
    status = obj.get("status", {})
    optimal = status.get("currentOptimalTrial") or {}
    params = {a["name"]: float(a["value"]) for a in optimal.get("parameterAssignments", [])}
    metrics = {m["name"]: float(m["max"]) for m in (optimal.get("observation") or {}).get("metrics", [])
               if m.get("max") not in (None, "")}  # fmt: skip
    succeeded = any(c.get("type") == "Succeeded" and c.get("status") == "True" for c in status.get("conditions", []))
    return {
        "experiment": obj["metadata"]["name"],
        "namespace": obj["metadata"].get("namespace"),
        "state": "Succeeded" if succeeded else "Failed",
        "best_trial": optimal.get("bestTrialName") or None,
        "metrics": metrics,
        "params": params,
        "hyp": {k: v for k, v in base_hyp.replace(**params).to_dict().items() if v is not None} if params else None,
        "trials": {k: status.get(f"trials{k[0].upper()}{k[1:]}", 0) for k in
                   ("succeeded", "failed", "earlyStopped", "killed", "running")},
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    """Register `tune` on the `python -m pipelines` subparsers."""
    p = sub.add_parser(
        "tune",
        help="write (and --submit) a Katib Experiment: the hyperparameter search of `yolo-pipeline tune`",
        description="Train arguments go after `--`, e.g. `... --out experiment.yaml -- --cfg yolov5s.yaml --imgsz 640`.",
    )
    p.add_argument("--out", type=Path, required=True, help="the Experiment to write (YAML)")
    p.add_argument("--trials", type=int, default=30, help="maxTrialCount (default 30)")
    p.add_argument("--parallel", type=int, default=3, help="trials running at once (default 3)")
    p.add_argument("--epochs-per-trial", type=int, default=10)
    p.add_argument("--space", type=Path, help=f"search space YAML (default {DEFAULT_SPACE.name}, as local tune)")
    p.add_argument("--sampler", choices=tuple(ALGORITHMS), default="tpe",
                   help="tpe, random, or evolve (Katib's CMA-ES)")
    p.add_argument("--seed", type=int, default=0, help="the algorithm's random_state")
    p.add_argument("--hyp", type=Path, help="base hyperparameters: values of the keys outside the space")
    p.add_argument("--nodes", type=int, default=1, help="pods per trial (1: a Job)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per trial pod: 0 (CPU), 1, 2, 4 or 8")
    p.add_argument("--max-failed", type=int, default=3, help="maxFailedTrialCount (default 3)")
    p.add_argument("--name", default="yolo-tune", help="Experiment name (a DNS-1035 label)")
    p.add_argument("--namespace", help="default: the kubeconfig context's, else 'default'")
    p.add_argument("--image", help="default: $YOLO_PIPELINE_IMAGE or the project's")
    p.add_argument("--dataset-source", default="", help="imported by an init container: sample:, s3://, dvc://, path")
    p.add_argument("--dataset-rev", default="", help="git rev of a dvc:// source (resolved to a commit SHA now)")
    p.add_argument("--s3-secret", default="yolo-s3-credentials", help="Secret with AWS keys ('' for none)")
    p.add_argument("--s3-endpoint", default="")
    p.add_argument("--cpu", default="8")
    p.add_argument("--memory", default="32Gi")
    p.add_argument("--shm-size", default="16Gi")
    p.add_argument("--node-selector", type=pytorchjob._key_value, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--toleration", type=pytorchjob._toleration, action="append", default=[],
                   metavar="KEY[=VALUE][:EFFECT]")
    p.add_argument("--submit", action="store_true", help="create the Experiment through the Kubernetes API")
    p.add_argument("--wait", action="store_true", help="with --submit: wait for it and report the best trial")
    p.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="--wait limit in seconds")
    p.add_argument("--poll-interval", type=float, default=30.0, help="--wait: seconds between status reads")
    p.add_argument("--best-hyp", type=Path, help="--wait: also write the best trial's hyp.yaml here")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `yolo train` arguments")
    p.set_defaults(handler=run)


def options_from_args(args: argparse.Namespace) -> ExperimentOptions:
    from components import pipeline_image

    if args.nodes != 1:
        raise UserError(f"--nodes {args.nodes}: trials run as one pod each (a Job); multi-node trials are not "
                        "supported yet (use --gpus for more GPUs per trial)")
    if args.wait and not args.submit:
        raise UserError("--wait needs --submit")
    train_args = list(args.train_args)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    from components.sources import manifest_dataset_version

    version = manifest_dataset_version(args.dataset_source, args.dataset_rev)
    return ExperimentOptions(
        space=load_space(args.space), trials=args.trials, parallel=args.parallel,
        epochs_per_trial=args.epochs_per_trial, gpus=args.gpus, sampler=args.sampler, seed=args.seed,
        base_hyp=load_hyp(args.hyp), train_args=train_args, max_failed=args.max_failed, name=args.name,
        namespace=args.namespace, image=args.image or pipeline_image(), dataset_source=args.dataset_source,
        dataset_version=version, s3_secret=args.s3_secret, s3_endpoint=args.s3_endpoint, cpu=args.cpu,
        memory=args.memory, shm_size=args.shm_size, node_selector=dict(args.node_selector),
        tolerations=list(args.toleration),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    experiment = build_experiment(options)
    header = (f"# Katib {KIND}: {options.trials} trial(s) of `yolo train` ({options.epochs_per_trial} epochs each), "
              f"{options.parallel} at a time, {len(options.space.params)} hyperparameters from {options.space.source}.\n"
              f"# kubectl apply -f {args.out.name}   (needs Katib >= v0.18 in the cluster)\n"
              f"# trial command: {shlex.join(train_command(options))}\n")  # fmt: skip
    write_text(args.out, header + yaml.safe_dump(experiment, sort_keys=False, width=110))
    print(f"wrote {args.out} ({options.trials} trials, {options.parallel} parallel, image {options.image})",
          file=sys.stderr)
    if not args.submit:
        return 0
    api, ns = submit(experiment, options.namespace)
    print(f"created Experiment {options.name} in namespace {ns}", file=sys.stderr)
    if not args.wait:
        return 0
    report = best_trial_report(wait(api, ns, options.name, args.timeout, args.poll_interval), options.base_hyp)
    if args.best_hyp is not None and report["hyp"] is not None:
        write_text(args.best_hyp, yaml.safe_dump(report["hyp"], sort_keys=False))
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report["state"] == "Succeeded" else 1
