"""The training pipeline: resolve → import_data → validate → stats → train → evaluate → (if gate) promote.

Two kinds of knobs. Cluster shape (GPUs per train pod, node selector, tolerations, secret, resources) is
fixed when the pipeline is compiled — it is part of the pod spec the scheduler needs — and lives in
`ClusterOptions`. Everything about the data and the training run is a pipeline parameter, chosen per run.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.
import json
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Metrics, Model

from components.evaluate import evaluate
from components.import_data import import_data, resolve_dataset_version
from components.params import NAMES
from components.promote import promote
from components.sources import DATASET_MOUNT
from components.stats import stats
from components.train import train
from components.train_multinode import train_multinode
from components.validate import validate
from pipelines.cluster import ClusterOptions, Resources, Toleration

__all__ = ["ClusterOptions", "Toleration", "build_pipeline"]  # the cluster shape is importable from here too

PIPELINE_NAME = "yolo-training"
AWS_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
GPU_RESOURCE = "nvidia.com/gpu"
SCRATCH = "/tmp"  # a task's node-local scratch (the train run folder, downloads), sized per task


class PipelineOutputs(NamedTuple):
    """What a run returns (kfp.local hands these back; on KFP they show as the run's outputs)."""

    metrics: Metrics
    model: Model
    evaluation: Artifact


def _with_s3(task: dsl.PipelineTask, options: ClusterOptions) -> dsl.PipelineTask:
    """Give a task S3 access: credentials from the secret, the endpoint as env (and the pull secrets: every
    task goes through here or _pulled)."""
    _pulled(task, options)
    if options.s3_secret:
        kubernetes.use_secret_as_env(
            task,
            secret_name=options.s3_secret,
            secret_key_to_env={k: k for k in AWS_SECRET_KEYS},
            optional=True,
        )
    if options.s3_endpoint:
        task.set_env_variable("AWS_ENDPOINT_URL", options.s3_endpoint)
    return task


def _pulled(task: dsl.PipelineTask, options: ClusterOptions) -> dsl.PipelineTask:
    """The image pull secrets of a private registry, once per task."""
    if options.image_pull_secrets and "imagePullSecret" not in task.platform_config.get("kubernetes", {}):
        kubernetes.set_image_pull_secrets(task, list(options.image_pull_secrets))
    return task


def _resources(task: dsl.PipelineTask, resources: Resources, scratch: str = "") -> dsl.PipelineTask:
    """Requests and limits for CPU and memory (every task has all four), and a /tmp scratch of size
    `scratch` when one is given (KFP's ResourceSpec cannot request ephemeral storage; see Resources)."""
    task.set_cpu_request(resources.cpu).set_memory_request(resources.memory)
    task.set_cpu_limit(resources.cpu_limit).set_memory_limit(resources.memory_limit)
    if scratch:
        kubernetes.empty_dir_mount(task, volume_name="scratch", mount_path=SCRATCH, size_limit=scratch)
    return task


def _step_resources(task: dsl.PipelineTask, options: ClusterOptions, name: str) -> dsl.PipelineTask:
    return _resources(task, options.resources(name), options.scratch_limit(name))


def _with_dataset_volume(task: dsl.PipelineTask, options: ClusterOptions) -> dsl.PipelineTask:
    """Mount the --dataset-pvc volume where a dataset source under DATASET_MOUNT is read in place.

    Read-only by use, not by the mount: KFP's PlatformSpec (kfp-kubernetes up to 2.17) has no readOnly for
    a pvcMount. No step writes there (import_data references a mounted dataset instead of copying it);
    give the claim the ReadOnlyMany access mode to have Kubernetes enforce it (docs/kubeflow.md)."""
    claim = options.dataset_pvc
    if claim is not None:
        kubernetes.mount_pvc(task, pvc_name=claim.name, mount_path=DATASET_MOUNT, sub_path=claim.sub_path)
    return task


def _configure_train(task: dsl.PipelineTask, options: ClusterOptions) -> None:
    task.set_caching_options(False)
    _resources(task, options.resources("train"), options.scratch_limit("train"))
    if options.gpus > 0:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(options.gpus)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=options.shm_size
    )
    for key, value in sorted(options.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in options.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    # A preempted or failed pod is retried; the retry finds checkpoint_root/<run identity>/last.pt and resumes.
    task.set_retry(
        num_retries=options.train_retries,
        backoff_duration="60s",
        backoff_factor=2.0,
        backoff_max_duration="3600s",
    )
    _with_s3(task, options)


def build_pipeline(options: ClusterOptions | None = None):
    """The pipeline function for these cluster options (compile it, or call it under kfp.local)."""
    options = options or ClusterOptions()

    @dsl.pipeline(
        name=PIPELINE_NAME, description="YOLOv5 training: validate, stats, train, evaluate, promote"
    )
    def training(
        dataset_source: str = "sample:",
        dataset_rev: str = "",
        cfg: str = "yolov5n.yaml",
        weights: str = "",
        epochs: int = 100,
        imgsz: int = 640,
        batch_size: int = 16,
        workers: int = 8,
        checkpoint_root: str = "",
        registry_uri: str = "",
        min_map50: float = 0.5,
        max_bad_fraction: float = 0.05,
        model_name: str = "yolov5",
        train_extra_args: str = "",
    ) -> PipelineOutputs:
        # The parameters above, as pipeline channels (locals() also holds `options`, a closure variable).
        given = dict(locals())
        run_key = dsl.PIPELINE_JOB_ID_PLACEHOLDER

        # The first step checks every parameter (so a run started from the UI with bad values stops here).
        resolve = resolve_dataset_version(
            source=dataset_source,
            rev=dataset_rev,
            gpus=options.gpus,
            **{name: given[name] for name in NAMES if name not in ("dataset_source", "dataset_rev")},
        )
        resolve.set_display_name("resolve dataset version").set_caching_options(False)
        _with_dataset_volume(_with_s3(_step_resources(resolve, options, "resolve"), options), options)

        # Keyed by the resolved version only (not the rev name): re-runs on unchanged data are cache hits.
        data = import_data(source=dataset_source, version=resolve.output)
        data.set_display_name("import data").set_caching_options(True)
        _with_dataset_volume(_with_s3(_step_resources(data, options, "import"), options), options)

        check = validate(dataset=data.outputs["dataset"], max_bad_fraction=max_bad_fraction, workers=0)
        _step_resources(check.set_display_name("validate").set_caching_options(True), options, "validate")
        _pulled(_with_dataset_volume(check, options), options)

        label_stats = stats(
            dataset=data.outputs["dataset"],
            index=check.outputs["index"],
            cfg=cfg,
            weights=weights,
            imgsz=imgsz,
        )
        _step_resources(label_stats.set_display_name("stats").set_caching_options(True), options, "stats")
        _pulled(_with_dataset_volume(label_stats, options), options)

        if options.nodes > 1:  # a PyTorchJob of nodes x gpus, launched and followed by this task
            fit = train_multinode(
                job=json.dumps(options.job_settings(), sort_keys=True),
                dataset_source=dataset_source,
                dataset_version=resolve.output,
                cfg=cfg,
                weights=weights,
                epochs=epochs,
                imgsz=imgsz,
                batch_size=batch_size,
                workers=workers,
                checkpoint_root=checkpoint_root,
                run_key=run_key,
                extra_args=train_extra_args,
            )
            fit.after(check, label_stats)  # train on checked data only
            fit.set_display_name("train (PyTorchJob)").set_caching_options(False)
            _with_s3(_resources(fit, options.light_step), options)  # the launcher; the job gets "train"
            fit.set_retry(num_retries=options.train_retries, backoff_duration="60s", backoff_factor=2.0,
                          backoff_max_duration="3600s")  # fmt: skip
        else:
            fit = train(
                dataset=data.outputs["dataset"],
                index=check.outputs["index"],
                label_stats=label_stats.outputs["label_stats"],
                cfg=cfg,
                weights=weights,
                epochs=epochs,
                imgsz=imgsz,
                batch_size=batch_size,
                gpus=options.gpus,
                workers=workers,
                checkpoint_root=checkpoint_root,
                run_key=run_key,
                extra_args=train_extra_args,
            )
            fit.set_display_name("train")
            _configure_train(fit, options)
            _with_dataset_volume(fit, options)

        score = evaluate(
            dataset=data.outputs["dataset"],
            index=check.outputs["index"],
            model=fit.outputs["model"],
            imgsz=imgsz,
            batch_size=batch_size,
            min_map50=min_map50,
            registry_uri=registry_uri,
            model_name=model_name,
        )
        # Not cached: the baseline it compares against (current.json) changes between runs.
        score.set_display_name("evaluate").set_caching_options(False)
        _with_dataset_volume(_with_s3(_step_resources(score, options, "evaluate"), options), options)
        if options.gpus > 0:
            score.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)

        with dsl.If(score.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 - a KFP condition
            with dsl.If(registry_uri != "", name="registry-set"):
                publish = promote(
                    model=fit.outputs["model"],
                    evaluation=score.outputs["evaluation"],
                    registry_uri=registry_uri,
                    model_name=model_name,
                    image=options.image,
                    run_key=run_key,
                )
                publish.set_display_name("promote").set_caching_options(False)
                _with_s3(_step_resources(publish, options, "promote"), options)

        return PipelineOutputs(score.outputs["metrics"], fit.outputs["model"], score.outputs["evaluation"])

    return training
