"""`python -m pipelines pytorchjob`: the manifest against the fields Kubeflow's PyTorchJob (kubeflow.org/v1) defines.

Field sets from kubeflow/training-operator pkg/apis/kubeflow.org/v1/{pytorch_types.go, common_types.go}
(PyTorchJobSpec, ElasticPolicy, ReplicaSpec, RunPolicy) and its validation (pytorch_validation.go: replica
types Master/Worker only, one Master, a container named `pytorch` with an image in every replica).
"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from pipelines import pytorchjob as pj
from pipelines.__main__ import main
from yolo.errors import UserError

JOB_FIELDS = {"apiVersion", "kind", "metadata", "spec"}
SPEC_FIELDS = {"runPolicy", "elasticPolicy", "pytorchReplicaSpecs", "nprocPerNode"}
ELASTIC_FIELDS = {
    "minReplicas", "maxReplicas", "rdzvBackend", "rdzvPort", "rdzvHost", "rdzvId", "rdzvConf",
    "standalone", "nProcPerNode", "maxRestarts", "metrics",
}  # fmt: skip
RDZV_BACKENDS = {"c10d", "etcd", "etcd-v2"}
REPLICA_FIELDS = {"replicas", "template", "restartPolicy"}
REPLICA_TYPES = {"Master", "Worker"}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
RUN_POLICY_FIELDS = {
    "cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit", "schedulingPolicy",
    "suspend", "managedBy",
}  # fmt: skip
CLEAN_POD_POLICIES = {"All", "Running", "None"}
POD_SPEC_FIELDS = {
    "containers",
    "initContainers",
    "volumes",
    "nodeSelector",
    "tolerations",
}  # the ones we use
CONTAINER_FIELDS = {
    "name",
    "image",
    "command",
    "args",
    "env",
    "envFrom",
    "ports",
    "resources",
    "volumeMounts",
}


def _write(tmp_path, *args: str) -> dict:
    out = tmp_path / "job.yaml"
    assert main(["pytorchjob", "--out", str(out), *args]) == 0
    text = out.read_text()
    assert text.startswith("# PyTorchJob")
    return yaml.safe_load(text)


@pytest.fixture()
def job(tmp_path) -> dict:
    return _write(
        tmp_path, "--nodes", "3", "--gpus", "4", "--min-nodes", "2", "--name", "coco-4x",
        "--image", "ghcr.io/org/yolo-pipeline:3f2a9c1", "--checkpoint-uri", "s3://bucket/ckpt/coco-4x",
        "--s3-endpoint", "http://minio:9000", "--node-selector", "pool=a100", "--toleration", "nvidia.com/gpu:NoSchedule",
        "--", "--data", "/mnt/coco/data.yaml", "--cfg", "yolov5s.yaml", "--epochs", "300", "--batch-size", "96",
    )  # fmt: skip


def test_manifest_uses_only_pytorchjob_fields(job):
    assert set(job) == JOB_FIELDS
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == "coco-4x"
    spec = job["spec"]
    assert set(spec) <= SPEC_FIELDS and {"pytorchReplicaSpecs", "elasticPolicy"} <= set(spec)
    assert set(spec["runPolicy"]) <= RUN_POLICY_FIELDS
    assert spec["runPolicy"]["cleanPodPolicy"] in CLEAN_POD_POLICIES
    elastic = spec["elasticPolicy"]
    assert (
        set(elastic) <= ELASTIC_FIELDS and "nProcPerNode" not in elastic
    )  # deprecated; rejected with nprocPerNode
    assert elastic["rdzvBackend"] == "c10d" and elastic["rdzvBackend"] in RDZV_BACKENDS
    assert (elastic["minReplicas"], elastic["maxReplicas"]) == (2, 3)
    assert elastic["rdzvHost"] == "coco-4x-master-0" and isinstance(elastic["rdzvPort"], int)
    assert spec["nprocPerNode"] == "4"  # a string in the API (auto, cpu, gpu or an integer)
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == REPLICA_TYPES
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2  # nodes in all
    for replica in replicas.values():
        assert set(replica) == REPLICA_FIELDS and replica["restartPolicy"] in RESTART_POLICIES
        pod = replica["template"]["spec"]
        assert set(pod) <= POD_SPEC_FIELDS
        (container,) = pod["containers"]
        assert set(container) <= CONTAINER_FIELDS
        assert container["name"] == "pytorch" and container["image"] == "ghcr.io/org/yolo-pipeline:3f2a9c1"
        assert {
            "name": "pytorchjob-port",
            "containerPort": elastic["rdzvPort"],
            "protocol": "TCP",
        } in container["ports"]


def test_pod_has_gpus_shm_secret_and_placement(job):
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        env = {e["name"]: e for e in container["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {
                "name": "yolo-s3-credentials",
                "key": key,
                "optional": True,
            }
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
        assert pod["nodeSelector"] == {"pool": "a100"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_command_is_torchrun_of_the_train_step_with_the_checkpoint_uri(job):
    command = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "torchrun"
    launcher = command[: command.index("-m")]
    assert (
        "--nnodes=2:3" in launcher and "--nproc-per-node=4" in launcher and "--rdzv-backend=c10d" in launcher
    )
    assert not any(a.startswith("--rdzv-endpoint") for a in launcher)  # PET_RDZV_ENDPOINT from the operator
    assert command[command.index("-m") : command.index("-m") + 3] == ["-m", "yolo", "train"]
    train = command[command.index("train") + 1 :]
    assert train[:8] == [
        "--data",
        "/mnt/coco/data.yaml",
        "--cfg",
        "yolov5s.yaml",
        "--epochs",
        "300",
        "--batch-size",
        "96",
    ]
    assert train[train.index("--checkpoint-uri") + 1] == "s3://bucket/ckpt/coco-4x"
    assert train[train.index("--device") + 1] == "0,1,2,3"
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert master == command  # every node runs the same command; torchrun assigns the ranks


def test_dataset_source_is_imported_by_an_init_container(tmp_path):
    job = _write(tmp_path, "--nodes", "2", "--gpus", "1", "--checkpoint-uri", "s3://b/c", "--dataset-source",
                 "sample:train=8,val=4", "--", "--epochs", "1")  # fmt: skip
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["python", "-c"] and init["command"][3:] == [
        "sample:train=8,val=4",
        "sample",
        "/data",
    ]
    compile(init["command"][2], "<import>", "exec")  # the snippet is valid Python
    assert {"name": "data", "mountPath": "/data"} in init["volumeMounts"]
    command = pod["containers"][0]["command"]
    assert command[command.index("train") + 1 : command.index("train") + 3] == ["--data", "/data/data.yaml"]
    assert job["spec"]["elasticPolicy"]["minReplicas"] == 2  # default: a fixed-size job


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "2", "--gpus", "3"], "gpus=3"),
        (["--nodes", "2", "--gpus", "2", "--min-nodes", "3"], "--min-nodes 3"),
        (["--nodes", "2", "--gpus", "2", "--name", "Bad_Name"], "DNS-1035"),
        (["--nodes", "2", "--gpus", "2", "--", "--data", "d.yaml", "--device", "0"], "--device: set by the manifest"),
        (["--nodes", "2", "--gpus", "2", "--", "--epochs", "3"], "no data"),
        (["--nodes", "3", "--gpus", "2", "--min-nodes", "2", "--", "--data", "d", "--batch-size", "16"],
         r"multiple of every world size .*4, 6"),
    ],
)  # fmt: skip
def test_bad_jobs_are_refused_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "job.yaml"
    assert main(["pytorchjob", "--checkpoint-uri", "s3://b/c", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not out.exists()


def test_single_node_job_has_only_a_master():
    options = pj.JobOptions(
        nodes=1, gpus=8, checkpoint_uri="s3://b/c", image="img:1", train_args=["--data", "d"]
    )
    manifest = pj.build_manifest(options)
    assert set(manifest["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    assert shlex.join(pj.train_command(options)).startswith("torchrun --nnodes=1:1 --nproc-per-node=8 ")
    with pytest.raises(UserError, match="--checkpoint-uri is required"):
        pj.build_manifest(pj.JobOptions(nodes=2, gpus=1, image="i:1", train_args=["--data", "d"]))


@pytest.mark.parametrize("nodes", [1, 2, 3])
def test_elastic_policy_only_with_a_worker(nodes):
    """Issue 15, fix 4: the Training Operator's webhook (v1.9, pytorchjob_webhook.go validateSpec) refuses
    an elasticPolicy without a Worker replica; `--nodes 1` wrote one."""
    options = pj.JobOptions(
        nodes=nodes, gpus=2, checkpoint_uri="s3://b/c", image="img:1", train_args=["--data", "d"]
    )
    spec = pj.build_manifest(options)["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    assert ("elasticPolicy" in spec) == ("Worker" in replicas) == (nodes > 1)
    assert replicas["Master"]["replicas"] == 1 and replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
    assert spec["nprocPerNode"] == "2"
