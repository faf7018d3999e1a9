"""`python -m pipelines compile`: the YAML parses into PipelineSpec/PlatformSpec protos (unknown fields are
rejected there) and carries the train pod's GPU, /dev/shm, secret, retry and caching settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("kfp")
pytest.importorskip("kfp.kubernetes")

from google.protobuf import json_format  # noqa: E402
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb  # noqa: E402
from kfp.pipeline_spec import pipeline_spec_pb2 as pb  # noqa: E402

from pipelines.__main__ import main  # noqa: E402

COMPILE_FLAGS = [
    "--gpus",
    "2",
    "--s3-secret",
    "s3-creds",
    "--s3-endpoint",
    "http://minio.minio:9000",
    "--node-selector",
    "cloud.google.com/gke-accelerator=nvidia-tesla-a100",
    "--toleration",
    "nvidia.com/gpu:NoSchedule",
    "--toleration",
    "dedicated=training:NoExecute",
    "--train-retries",
    "4",
]


def _compile(tmp_path: Path, *flags: str) -> tuple[pb.PipelineSpec, pb.PlatformSpec]:
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--out", str(out), *flags]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == 2
    pipeline = json_format.ParseDict(docs[0], pb.PipelineSpec())
    platform = json_format.ParseDict(docs[1], pb.PlatformSpec())
    return pipeline, platform


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("compile"), *COMPILE_FLAGS)


def _deployment(pipeline: pb.PipelineSpec) -> pb.PipelineDeploymentConfig:
    return json_format.ParseDict(
        json_format.MessageToDict(pipeline.deployment_spec), pb.PipelineDeploymentConfig()
    )


def _k8s(platform: pb.PlatformSpec, executor: str) -> k8s_pb.KubernetesExecutorConfig:
    executors = platform.platforms["kubernetes"].deployment_spec.executors
    return json_format.ParseDict(
        json_format.MessageToDict(executors[executor]), k8s_pb.KubernetesExecutorConfig()
    )


def _all_tasks(pipeline: pb.PipelineSpec) -> dict[str, pb.PipelineTaskSpec]:
    tasks = dict(pipeline.root.dag.tasks)
    for component in pipeline.components.values():
        if component.WhichOneof("implementation") == "dag":
            tasks.update(component.dag.tasks)
    return tasks


def test_train_executor_requests_gpus_and_resources(compiled):
    pipeline, _ = compiled
    resources = _deployment(pipeline).executors["exec-train"].container.resources
    assert resources.accelerator.resource_type == "nvidia.com/gpu"
    assert resources.accelerator.resource_count == "2"
    assert resources.resource_cpu_request == "8" and resources.resource_memory_request == "32Gi"
    # The gpus value is baked into the train call, so the step starts torchrun with 2 processes.
    gpus = pipeline.root.dag.tasks["train"].inputs.parameters["gpus"].runtime_value.constant
    assert gpus.number_value == 2


def test_train_pod_shm_secret_node_selector_tolerations(compiled):
    _, platform = compiled
    train = _k8s(platform, "exec-train")
    (shm,) = train.empty_dir_mounts
    assert (shm.mount_path, shm.medium, shm.volume_name) == ("/dev/shm", "Memory", "dshm")
    (secret,) = train.secret_as_env
    assert secret.secret_name == "s3-creds"
    assert {(k.secret_key, k.env_var) for k in secret.key_to_env} == {
        ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
        ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    }
    assert dict(train.node_selector.labels) == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    tolerations = {(t.key, t.operator, t.value, t.effect) for t in train.tolerations}
    assert tolerations == {
        ("nvidia.com/gpu", "Exists", "", "NoSchedule"),
        ("dedicated", "Equal", "training", "NoExecute"),
    }
    # Steps that read or write S3 get the secret too; validate/stats never touch S3.
    for executor in ("exec-evaluate", "exec-promote", "exec-import-data", "exec-resolve-dataset-version"):
        assert _k8s(platform, executor).secret_as_env[0].secret_name == "s3-creds"
    executors = platform.platforms["kubernetes"].deployment_spec.executors
    assert "exec-validate" not in executors and "exec-stats" not in executors


def test_s3_endpoint_is_env_on_s3_steps(compiled):
    pipeline, _ = compiled
    deployment = _deployment(pipeline)
    for executor in ("exec-train", "exec-evaluate", "exec-promote", "exec-import-data"):
        env = {e.name: e.value for e in deployment.executors[executor].container.env}
        assert env.get("AWS_ENDPOINT_URL") == "http://minio.minio:9000", executor


def test_retry_and_caching_policy(compiled):
    pipeline, _ = compiled
    tasks = _all_tasks(pipeline)
    retry = tasks["train"].retry_policy
    assert retry.max_retry_count == 4
    assert retry.backoff_duration.seconds == 60 and retry.backoff_factor == 2.0
    caching = {name: task.caching_options.enable_cache for name, task in tasks.items() if name.islower()}
    assert caching["train"] is False and caching["promote"] is False
    assert caching["resolve-dataset-version"] is False and caching["evaluate"] is False
    assert caching["validate"] is True and caching["stats"] is True and caching["import-data"] is True


def test_import_is_keyed_by_resolved_version_not_rev(compiled):
    pipeline, _ = compiled
    inputs = pipeline.root.dag.tasks["import-data"].inputs.parameters
    assert set(inputs) == {"source", "version"}  # never the rev name
    version = inputs["version"].task_output_parameter
    assert (version.producer_task, version.output_parameter_key) == ("resolve-dataset-version", "Output")
    # The run's checkpoint folder is keyed by the pipeline job, so a retried train pod resumes it.
    run_key = pipeline.root.dag.tasks["train"].inputs.parameters["run_key"].runtime_value.constant
    assert run_key.string_value == "{{$.pipeline_job_uuid}}"


def test_promote_only_when_gate_passes_and_registry_set(compiled):
    pipeline, _ = compiled
    conditions = [
        task.trigger_policy.condition
        for task in _all_tasks(pipeline).values()
        if task.trigger_policy.condition
    ]
    assert any("evaluate" in c and "Output" in c and "true" in c for c in conditions), conditions
    assert any("registry_uri" in c for c in conditions), conditions
    assert "promote" not in pipeline.root.dag.tasks  # it lives inside the condition's sub-DAG
    assert "promote" in _all_tasks(pipeline)


def test_pipeline_parameters_and_order(compiled):
    pipeline, _ = compiled
    params = set(pipeline.root.input_definitions.parameters)
    assert {
        "dataset_source",
        "dataset_rev",
        "cfg",
        "weights",
        "epochs",
        "imgsz",
        "batch_size",
        "checkpoint_root",
        "registry_uri",
        "min_map50",
        "model_name",
    } <= params
    tasks = pipeline.root.dag.tasks
    assert list(tasks["validate"].dependent_tasks) == ["import-data"]
    assert set(tasks["train"].dependent_tasks) == {"import-data", "validate", "stats"}
    assert set(tasks["evaluate"].dependent_tasks) == {"import-data", "validate", "train"}


def test_cpu_only_compile_has_no_accelerator(tmp_path):
    pipeline, platform = _compile(tmp_path, "--gpus", "0", "--s3-secret", "")
    resources = _deployment(pipeline).executors["exec-train"].container.resources
    assert not resources.accelerator.resource_type and not resources.accelerator.resource_count
    train = _k8s(platform, "exec-train")
    assert train.empty_dir_mounts[0].mount_path == "/dev/shm" and not train.secret_as_env


def test_compile_refuses_bad_gpu_count(tmp_path, capsys):
    assert main(["compile", "--out", str(tmp_path / "p.yaml"), "--gpus", "3"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "python -m pipelines compile: error: gpus=3: must be one of 0, 1, 2, 4, 8"
    )
    assert not (tmp_path / "p.yaml").exists()


def test_toleration_and_image_compile_together(tmp_path):
    """Issue 15, fix 1: parsing --toleration imported the component modules before --image was applied
    (a traceback). In a fresh interpreter, as a user runs it."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "p.yaml"
    image = "registry.example/yolo:tolerated"
    flags = ["--image", image, "--toleration", "gpu=true:NoSchedule", "--node-selector", "pool=gpu"]
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "compile", "--out", str(out), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    spec, platform = yaml.safe_load_all(out.read_text())
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {image}
    train = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert train["tolerations"] == [{"key": "gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]


def test_every_task_requests_and_limits_cpu_and_memory(compiled):
    """Issue 15, fix 6: a namespace with a ResourceQuota refuses pods without requests or limits."""
    from pipelines.cluster import quantity

    pipeline, _ = compiled
    executors = json_format.MessageToDict(pipeline.deployment_spec)["executors"]
    assert len(executors) == 7
    for name, executor in executors.items():
        resources = executor["container"].get("resources", {})
        for kind in ("Cpu", "Memory"):
            request, limit = resources.get(f"resource{kind}Request"), resources.get(f"resource{kind}Limit")
            assert request and limit, (name, kind)
            assert quantity(kind, limit) >= quantity(kind, request), (name, kind)
    train = executors["exec-train"]["container"]["resources"]
    assert (train["resourceCpuLimit"], train["resourceMemoryLimit"]) == ("16", "48Gi")  # shm 16Gi + 32Gi


def test_limits_below_requests_are_one_line(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--out", str(out), "--train-memory", "32Gi", "--train-memory-limit", "16Gi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m pipelines compile: error: train memory limit 16Gi is below its request 32Gi"]
    assert main(["compile", "--out", str(out), "--train-cpu-limit", "many"]) == 2
    assert "not a Kubernetes quantity" in capsys.readouterr().err and not out.exists()
