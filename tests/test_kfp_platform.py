"""Issue 15: the pipeline as a platform team runs it — versions, volumes, templates, concurrent runs.

Against the loopback KFP stand-in (tests/submit_server.py) where a server is needed.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from types import SimpleNamespace

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from components import datasets, runtime
from components.sources import DATASET_MOUNT
from pipelines.__main__ import main
from tests import submit_server
from tests.conftest import REPO
from yolo.engine.lease import PIPELINE_RUN_ENV, Holder, Lease
from yolo.errors import UserError
from yolo.storage import open_storage

kfp = pytest.importorskip("kfp")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

IMAGE = "ghcr.io/yolo-pipeline/yolo-pipeline:3f2a9c1"


# ------------------------------------------------------------------------ fix 5: versions of kfp and KFP
def _pipeline_extra() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["optional-dependencies"]["pipeline"])}


def test_kfp_and_kfp_kubernetes_are_pinned_to_the_versions_whose_features_are_used():
    """use_secret_as_env(optional=...) exists from kfp-kubernetes 2.15: a lower floor installs an SDK
    that cannot compile the pipeline (or a backend-era mismatch that leaves pods hanging)."""
    from kfp import kubernetes

    extra = _pipeline_extra()
    for name in ("kfp", "kfp-kubernetes"):
        spec = extra[name].specifier
        assert not spec.contains("2.14.6"), f"{name} {spec} allows a release without optional secrets"
        assert spec.contains("2.15.0") and spec.contains(version(name)), (name, spec)
        assert not spec.contains("3.0.0"), f"{name} {spec}: a major release may change the IR"
    assert "optional" in inspect.signature(kubernetes.use_secret_as_env).parameters
    assert Version(version("kfp-kubernetes")) >= Version("2.15")


def _submit(state, *extra: str) -> int:
    return main(["submit", "--host", state.url, "--image", IMAGE, "--epochs", "3", *extra])


@pytest.mark.parametrize(
    ("backend", "extra", "refused_for"),
    [
        ("2.14.0", (), "2.15.0"),  # the optional S3 secret
        ("v2.14.6", (), "2.15.0"),
        ("2.4.1", ("--s3-secret", ""), "2.5.0"),  # no secret: still the retry policy
    ],
)
def test_submit_refuses_a_backend_older_than_the_pipeline_needs(capsys, backend, extra, refused_for):
    state = submit_server.start(version=backend)
    try:
        assert _submit(state, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"older than {refused_for}" in err[0] and backend.lstrip("v") in err[0]
        assert ("optional S3 secret" if refused_for == "2.15.0" else "retry policy") in err[0]
        assert not state.created_runs()
    finally:
        state.stop()


@pytest.mark.parametrize(("backend", "extra"), [("2.15.0", ()), ("2.14.0", ("--s3-secret", "")), ("2.17.3", ())])
def test_submit_accepts_a_backend_that_has_what_the_pipeline_needs(backend, extra):
    state = submit_server.start(version=backend)
    try:
        assert _submit(state, *extra) == 0
        assert len(state.created_runs()) == 1
    finally:
        state.stop()


def test_submit_warns_when_the_backend_does_not_say_its_version(capsys):
    state = submit_server.start(version="")
    try:
        assert _submit(state) == 0
        assert "did not say its KFP version" in capsys.readouterr().err
        assert len(state.created_runs()) == 1
    finally:
        state.stop()


# ------------------------------------------------------------------------- fix 7: a dataset on a PVC
def _compile(tmp_path, *args: str) -> tuple[dict, dict]:
    """`python -m pipelines compile ARGS` in a fresh interpreter (as submit does): (PipelineSpec, executors)."""
    out = tmp_path / "pipeline.yaml"
    proc = subprocess.run([sys.executable, "-m", "pipelines", "compile", "--out", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pipeline, platform = yaml.safe_load_all(out.read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


DATA_STEPS = ("exec-resolve-dataset-version", "exec-import-data", "exec-validate", "exec-stats", "exec-train",
              "exec-evaluate")  # fmt: skip


def test_dataset_pvc_is_mounted_in_every_step_that_reads_data(tmp_path):
    _, executors = _compile(tmp_path, "--dataset-pvc", "datasets:coco/2024")
    for name in DATA_STEPS:
        (mount,) = executors[name]["pvcMount"]
        assert mount["mountPath"] == DATASET_MOUNT and mount["subPath"] == "coco/2024", name
        assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == "datasets", name
    assert "pvcMount" not in executors.get("exec-promote", {})


@pytest.mark.parametrize("bad", ["Data_Set", "data:../etc", "data:/a/../b", "-x", ""])
def test_dataset_pvc_refuses_bad_names_in_one_line(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exit_:
        main(["compile", "--out", str(tmp_path / "p.yaml"), "--dataset-pvc", bad])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dataset-pvc" in err[0]
    assert not (tmp_path / "p.yaml").exists()


def test_a_mounted_dataset_is_referenced_not_copied(tmp_path, monkeypatch):
    """import_data of a source on the volume writes only a data.yaml pointing at it: no copy through the
    pipeline root, and the mounted folder is not touched."""
    mount = tmp_path / "mnt"
    root = mount / "coco"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        (root / "images" / split / "a.png").write_bytes(b"png")
        (root / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [thing]\n")
    before = sorted((p.relative_to(mount), p.stat().st_mtime_ns) for p in mount.rglob("*"))
    monkeypatch.setattr(datasets, "DATASET_MOUNT", str(mount))
    artifact = SimpleNamespace(path=str(tmp_path / "artifact"), metadata={})
    meta = datasets.import_data(str(root), "local-1", artifact)
    assert meta["mounted"] == str(mount)
    assert sorted(p.name for p in (tmp_path / "artifact").rglob("*")) == ["data.yaml"]
    data = yaml.safe_load((tmp_path / "artifact" / "data.yaml").read_text())
    assert data["path"] == str(root) and data["train"] == "images/train"
    assert sorted((p.relative_to(mount), p.stat().st_mtime_ns) for p in mount.rglob("*")) == before
    # outside the mount, a local source is still copied
    copied = SimpleNamespace(path=str(tmp_path / "copy"), metadata={})
    monkeypatch.setattr(datasets, "DATASET_MOUNT", str(tmp_path / "elsewhere"))
    assert "mounted" not in datasets.import_data(str(root), "local-1", copied)
    assert (tmp_path / "copy" / "labels" / "val" / "a.txt").is_file()


def test_pytorchjob_mounts_the_dataset_pvc_read_only(tmp_path):
    out = tmp_path / "job.yaml"
    assert main(["pytorchjob", "--nodes", "2", "--gpus", "1", "--checkpoint-uri", "s3://b/c", "--out", str(out),
                 "--dataset-pvc", "datasets:coco", "--", "--data", f"{DATASET_MOUNT}/data.yaml"]) == 0  # fmt: skip
    job = yaml.safe_load(out.read_text())
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert {"name": "dataset", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}} in pod["volumes"]
        mount = {"name": "dataset", "mountPath": DATASET_MOUNT, "readOnly": True, "subPath": "coco"}
        assert mount in pod["containers"][0]["volumeMounts"]


# ------------------------------------------------------------- fix 8: production.yaml is a template
def test_the_production_template_fails_fast_naming_the_placeholder(capsys):
    """pipelines/production.yaml named a DVC dataset and buckets that do not exist; it is now a marked
    template, and submitting it unfilled is one line before anything reaches the server."""
    state = submit_server.start()
    try:
        code = main(["submit", "--host", state.url, "--image", IMAGE,
                     "--params-file", str(REPO / "pipelines" / "production.yaml")])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert "production.yaml: `dataset-source` still holds the template placeholder <REPO-URL>" in err[0]
        assert state.requests == []  # refused before healthz
    finally:
        state.stop()


def test_the_production_template_filled_in_is_accepted(tmp_path):
    from pipelines import submit as sub

    text = (REPO / "pipelines" / "production.yaml").read_text()
    assert "TEMPLATE" in text and "<BUCKET>" in text
    filled = tmp_path / "production.yaml"
    filled.write_text(text.replace("dvc://<REPO-URL>#data/<DATASET>", "sample:")
                      .replace("<BUCKET>", "team-bucket").replace("<DATASET>", "coco"))  # fmt: skip
    args = sub.argparse.Namespace(**{**_submit_defaults(), "params_file": filled})
    request = sub.request_from_args(args)
    assert request.parameters["checkpoint_root"] == "s3://team-bucket/checkpoints"
    # a flag replaces a placeholder left in the file
    partly = tmp_path / "partly.yaml"
    partly.write_text(text.replace("<BUCKET>", "b").replace("<DATASET>", "coco"))
    args = sub.argparse.Namespace(**{**_submit_defaults(), "params_file": partly, "dataset_source": "sample:"})
    assert sub.request_from_args(args).parameters["dataset_source"] == "sample:"


def _submit_defaults() -> dict:
    from pipelines.__main__ import build_parser

    return vars(build_parser().parse_args(["submit", "--host", "http://localhost:1"]))


# ---------------------------------------------- fix 9: concurrent runs vs a retry of the same run
IDENTITY = "0123456789abcdef"  # the same data and parameters: the same checkpoint folder {run_id}


@pytest.mark.timeout(60)
def test_a_retry_of_the_same_pipeline_run_takes_over_its_own_lease_at_once(tmp_path, caplog):
    """KFP starts a retry only after the previous pod ended: its lease (live for up to a TTL) is the same
    pipeline run's, and the retry resumes at once instead of waiting it out."""
    store = open_storage(tmp_path / "ckpt")
    killed = Holder(IDENTITY, "pod-attempt-1", 7, "/tmp/yolo-train", time.time(), time.time() + 3600,
                    pipeline_run="kfp-run-A")  # fmt: skip
    assert store.create_lease(killed.to_bytes()) is not None
    caplog.set_level("WARNING")
    retry = Lease(store, IDENTITY, "/tmp/yolo-train", ttl=3600, pipeline_run="kfp-run-A").acquire()
    try:
        assert "took over an earlier attempt's lease" in caplog.text
        holder = Holder.from_bytes(store.read_lease()[0])
        assert holder.pipeline_run == "kfp-run-A" and holder.pid == os.getpid()
    finally:
        retry.release()


@pytest.mark.timeout(60)
def test_a_concurrent_pipeline_run_with_the_same_data_and_params_is_refused_naming_it(tmp_path):
    """Two runs with the same data and parameters share checkpoint_root/{run_id}: the second must not
    overwrite the first's checkpoints. It waits one TTL (the holder might be a lost pod) and is refused."""
    store = open_storage(tmp_path / "ckpt")
    first = Lease(store, IDENTITY, "/pod-a", ttl=1.5, pipeline_run="kfp-run-A").acquire()  # renews itself
    try:
        with pytest.raises(UserError, match=r"in use by run 0123456789abcdef of pipeline run kfp-run-A"):
            Lease(store, IDENTITY, "/pod-b", ttl=1.5, pipeline_run="kfp-run-B").acquire()
        assert Holder.from_bytes(store.read_lease()[0]).pipeline_run == "kfp-run-A"
        assert first.lost_to is None
    finally:
        first.release()


def test_the_train_step_names_its_pipeline_run_to_yolo_train(tmp_path, monkeypatch):
    seen: dict = {}

    def run_yolo(step, args, gpus=0, allowed_exit_codes=(0,), forward_signals=False, env=None):
        seen.update(step=step, env=env)
        raise RuntimeError("stop here")

    monkeypatch.setattr(runtime, "run_yolo", run_yolo)
    art = SimpleNamespace(path=str(tmp_path / "a"), metadata={})
    with pytest.raises(RuntimeError, match="stop here"):
        runtime.train(art, art, art, "yolov5n.yaml", "", 1, 64, 8, 0, 0, "s3://b/ckpt", "kfp-run-A", "",
                      art, out_dir=str(tmp_path / "run"))  # fmt: skip
    assert seen == {"step": "train", "env": {PIPELINE_RUN_ENV: "kfp-run-A"}}


# ------------------------------------------------------ every cluster option at once, with --image
ALL_OPTIONS = ("--image", IMAGE, "--namespace", "team-a", "--service-account", "trainer",
               "--image-pull-secret", "regcred", "--node-selector", "pool=gpu",
               "--toleration", "nvidia.com/gpu:NoSchedule", "--dataset-pvc", "datasets:coco",
               "--gpus", "2", "--nodes", "2")  # fmt: skip


def test_one_compile_with_every_option_at_once(tmp_path):
    """The acceptance compile: each option is found in the IR — the PlatformSpec's executors for what the
    pipeline's own pods get, the PyTorchJob's compiled settings (the train task's `job` input) for the
    training pods of a multi-node run."""
    pipeline, executors = _compile(tmp_path, *ALL_OPTIONS)
    images = {e["container"]["image"] for e in pipeline["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}
    for name, executor in executors.items():  # every task's pod pulls with the secret
        assert executor["imagePullSecret"] == [{"secretName": "regcred", "secretNameParameter": {
            "runtimeValue": {"constant": "regcred"}}}], name  # fmt: skip
    for name in set(DATA_STEPS) - {"exec-train"}:
        (mount,) = executors[name]["pvcMount"]
        assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == "datasets" and mount["subPath"] == "coco"
    train = pipeline["root"]["dag"]["tasks"]["train-multinode"]
    assert "retryPolicy" in train and "exec-train" not in executors
    job = json.loads(train["inputs"]["parameters"]["job"]["runtimeValue"]["constant"])
    assert (job["nodes"], job["gpus"], job["image"]) == (2, 2, IMAGE)
    assert (job["namespace"], job["service_account"], job["image_pull_secrets"]) == ("team-a", "trainer", ["regcred"])
    assert job["node_selector"] == {"pool": "gpu"}
    assert job["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert job["dataset_pvc"] == {"name": "datasets", "sub_path": "coco"}
    launcher_inputs = train["inputs"]["parameters"]
    assert launcher_inputs["dataset_version"]["taskOutputParameter"]["producerTask"] == "resolve-dataset-version"
    assert set(train["dependentTasks"]) >= {"validate", "stats"}


def test_every_option_at_once_single_node(tmp_path):
    """nodes 1: node selector and toleration go on the train pod itself."""
    pipeline, executors = _compile(tmp_path, *ALL_OPTIONS[:-2], "--nodes", "1")
    train = executors["exec-train"]
    assert train["nodeSelector"]["labels"] == {"pool": "gpu"}
    assert train["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert train["pvcMount"][0]["subPath"] == "coco" and train["imagePullSecret"][0]["secretName"] == "regcred"
    resources = pipeline["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "2"


def test_submit_passes_the_service_account_to_the_run(capsys):
    state = submit_server.start()
    try:
        assert _submit(state, "--service-account", "trainer", "--image-pull-secret", "regcred") == 0
        (run,) = state.created_runs()
        assert run.body["service_account"] == "trainer"
        executors = run.body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert executors["exec-train"]["imagePullSecret"][0]["secretName"] == "regcred"
    finally:
        state.stop()


# ------------------------------------------------------ requests and limits per task, ephemeral storage
def test_every_task_has_requests_and_limits_and_no_scratch_limit_by_default(tmp_path):
    pipeline, executors = _compile(tmp_path)
    containers = {k: e["container"]["resources"] for k, e in pipeline["deploymentSpec"]["executors"].items()}
    for name, r in containers.items():
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(r)
        assert all(m["mountPath"] != "/tmp" for m in executors.get(name, {}).get("emptyDirMounts", [])), name


def test_resources_per_task(tmp_path):
    pipeline, executors = _compile(tmp_path, "--resources", "import:memory=16Gi/24Gi,ephemeral-storage=50Gi/100Gi",
                                   "--resources", "evaluate:cpu=3", "--train-cpu", "6")  # fmt: skip
    r = {k: e["container"]["resources"] for k, e in pipeline["deploymentSpec"]["executors"].items()}
    imported = r["exec-import-data"]
    assert (imported["resourceMemoryRequest"], imported["resourceMemoryLimit"]) == ("16Gi", "24Gi")
    assert (imported["resourceCpuRequest"], imported["resourceCpuLimit"]) == ("2", "4")  # the step defaults
    assert (r["exec-evaluate"]["resourceCpuRequest"], r["exec-evaluate"]["resourceMemoryRequest"]) == ("3", "8Gi")
    assert r["exec-train"]["resourceCpuRequest"] == "6"
    (scratch,) = [m for m in executors["exec-import-data"]["emptyDirMounts"] if m["mountPath"] == "/tmp"]
    assert scratch["sizeLimit"] == "100Gi"


@pytest.mark.parametrize(("spec", "message"), [
    ("import:memory=16Gi/8Gi", "import memory limit 8Gi is below its request 16Gi"),
    ("import:ephemeral-storage=lots", "not a Kubernetes quantity"),
    ("preprocess:cpu=1", "TASK one of"),
    ("train:gpu=1", "KIND one of"),
])  # fmt: skip
def test_bad_resources_are_one_line(tmp_path, capsys, spec, message):
    try:
        code = main(["compile", "--out", str(tmp_path / "p.yaml"), "--resources", spec])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_pytorchjob_pods_get_the_train_resources_with_ephemeral_storage():
    from pipelines import pytorchjob as pj
    from pipelines.cluster import ClusterOptions

    options = ClusterOptions(gpus=1, nodes=2, task_resources={"train": {"ephemeral_limit": "80Gi"}})
    settings = options.job_settings()
    job = pj.build_manifest(pj.JobOptions(**{**settings, "resources": pj.Resources(**settings["resources"])},
                                          train_args=["--data", "/x/data.yaml"], checkpoint_uri="s3://b/c"))  # fmt: skip
    resources = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "8", "memory": "32Gi", "ephemeral-storage": "20Gi", "nvidia.com/gpu": 1}
    assert resources["limits"] == {"cpu": "16", "memory": "48Gi", "ephemeral-storage": "80Gi", "nvidia.com/gpu": 1}
    default = ClusterOptions(gpus=1, nodes=2).resources("train")
    assert (default.ephemeral, default.ephemeral_limit) == ("20Gi", "200Gi")


def test_multinode_submit_needs_a_checkpoint_root(capsys):
    state = submit_server.start()
    try:
        assert _submit(state, "--nodes", "2", "--gpus", "2", "--batch-size", "16") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--nodes > 1 needs --checkpoint-root" in err[0]
        assert not state.created_runs()
        assert _submit(state, "--nodes", "2", "--gpus", "2", "--batch-size", "16",
                       "--checkpoint-root", "s3://b/ckpt") == 0  # fmt: skip
        (run,) = state.created_runs()
        tasks = run.body["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
        assert "train-multinode" in tasks and "train" not in tasks
    finally:
        state.stop()
