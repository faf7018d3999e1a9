"""Components: typed KFP interfaces, image settings, and the runtime glue they call (no pipeline run here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import runtime
from components.params import check_parameters
from yolo.errors import UserError

pytest_plugins = ("tests.s3_server",)
REPO = Path(__file__).resolve().parents[1]
kfp = pytest.importorskip("kfp")


class FakeArtifact:
    """What the runtime uses of a KFP artifact: path, metadata, log_metric, log_confusion_matrix."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.metadata: dict = {}

    def log_metric(self, name: str, value: float) -> None:
        self.metadata[name] = value

    def log_confusion_matrix(self, categories: list[str], matrix: list[list[int]]) -> None:
        self.metadata["confusionMatrix"] = {"categories": categories, "matrix": matrix}


# ------------------------------------------------------------------------------------- KFP interfaces
def _component_spec(component):
    """(inputs: {name: type}, outputs: {name: type}) of a component, from its compiled PipelineSpec."""
    spec = component.pipeline_spec
    (comp,) = spec.components.values()
    inputs = {n: a.artifact_type.schema_title for n, a in comp.input_definitions.artifacts.items()}
    inputs |= {n: p.parameter_type for n, p in comp.input_definitions.parameters.items()}
    outputs = {n: a.artifact_type.schema_title for n, a in comp.output_definitions.artifacts.items()}
    outputs |= {n: p.parameter_type for n, p in comp.output_definitions.parameters.items()}
    (executor,) = spec.deployment_spec["executors"].values()
    return inputs, outputs, executor["container"]


def test_component_io_types():
    from kfp.pipeline_spec import pipeline_spec_pb2 as pb

    from components.evaluate import evaluate
    from components.import_data import import_data, resolve_dataset_version
    from components.promote import promote
    from components.stats import stats
    from components.train import train
    from components.validate import validate

    STRING, NUMBER, INT, BOOL = (
        pb.ParameterType.STRING,
        pb.ParameterType.NUMBER_DOUBLE,
        pb.ParameterType.NUMBER_INTEGER,
        pb.ParameterType.BOOLEAN,
    )
    expected = {
        resolve_dataset_version: ({"source": STRING, "rev": STRING, "imgsz": INT}, {"Output": STRING}),
        import_data: ({"source": STRING, "version": STRING}, {"dataset": "system.Dataset"}),
        validate: (
            {"dataset": "system.Dataset", "max_bad_fraction": NUMBER},
            {
                "index": "system.Artifact",
                "report": "system.Markdown",
                "summary": "system.Metrics",
                "Output": BOOL,
            },
        ),
        stats: (
            {"dataset": "system.Dataset", "index": "system.Artifact", "imgsz": INT},
            {"label_stats": "system.Artifact", "anchor_fit": "system.Metrics", "Output": BOOL},
        ),
        train: (
            {
                "dataset": "system.Dataset",
                "label_stats": "system.Artifact",
                "gpus": INT,
                "epochs": INT,
                "checkpoint_root": STRING,
                "run_key": STRING,
            },
            {"model": "system.Model", "Output": NUMBER},
        ),
        evaluate: (
            {
                "model": "system.Model",
                "dataset": "system.Dataset",
                "min_map50": NUMBER,
                "registry_uri": STRING,
            },
            {
                "metrics": "system.Metrics",
                "confusion": "system.ClassificationMetrics",
                "evaluation": "system.Artifact",
                "Output": BOOL,
            },
        ),
        promote: ({"model": "system.Model", "evaluation": "system.Artifact"}, {"Output": STRING}),
    }
    for component, (want_in, want_out) in expected.items():
        inputs, outputs, container = _component_spec(component)
        assert {k: inputs.get(k) for k in want_in} == want_in, component.name
        assert outputs == want_out, component.name
        script = " ".join(container["command"])
        assert "pip install" not in script, component.name  # no packages_to_install, no kfp install
        assert container["image"] == os.environ.get(
            "YOLO_PIPELINE_IMAGE", "ghcr.io/yolo-pipeline/yolo-pipeline:latest"
        )


def test_image_comes_from_env_and_flag(tmp_path):
    env = {**os.environ, "YOLO_PIPELINE_IMAGE": "registry.example/yolo:abc123"}
    out = tmp_path / "p.yaml"
    code = "from components.train import train; print(train.component_spec.implementation.container.image)"
    shown = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.stdout.strip() == "registry.example/yolo:abc123", shown.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines",
            "compile",
            "--out",
            str(out),
            "--image",
            "registry.example/yolo:flag",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/yolo:flag"}


# ------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "change, message",
    [
        ({"gpus": 3}, "gpus=3: must be one of 0, 1, 2, 4, 8"),
        ({"imgsz": 100}, "imgsz=100: must be a positive multiple of 32"),
        ({"dataset_source": "gs://bucket/data"}, "unknown scheme 'gs'"),
        ({"dataset_source": "dvc://repo-without-path"}, "expected dvc://REPO#PATH"),
        ({"dataset_source": "sample:train=lots"}, "sample source option 'train=lots'"),
        ({"gpus": 2, "batch_size": 15}, "batch_size=15: must be a multiple of gpus=2"),
        ({"epochs": 0}, "epochs=0"),
        ({"min_map50": 1.5}, "min_map50=1.5"),
        ({"model_name": "bad name/x"}, "model_name='bad name/x'"),
        ({"registry_uri": "gs://b/x"}, "registry_uri='gs://b/x'"),
    ],
)
def test_bad_parameters_refused(change, message):
    params = {"dataset_source": "sample:", "imgsz": 640, "epochs": 1, "batch_size": 16, "gpus": 1} | change
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_parameters(**params)


def test_good_parameters_pass():
    for source in (
        "sample:",
        "sample:train=8,val=4",
        "/data/coco128",
        "rel/data.yaml",
        "file:///x",
        "dvc://https://github.com/org/repo.git#data/coco128",
        "s3://bucket/datasets/coco128",
    ):
        check_parameters(dataset_source=source, imgsz=640, epochs=1, batch_size=16, gpus=8)


def test_run_local_refuses_bad_parameters_before_anything_runs(tmp_path):
    root = tmp_path / "root"
    for flags, message in (
        (["--gpus", "3"], "gpus=3"),
        (["--imgsz", "100"], "imgsz=100"),
        (["--dataset-source", "ftp://host/data"], "unknown scheme 'ftp'"),
        (["--dataset-source", "/no/such/data.yaml"], "no such folder or data.yaml"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "pipelines", "run-local", "--pipeline-root", str(root), *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m pipelines run-local: error:"), result.stderr
        assert message in lines[0]
    assert not root.exists()


# ------------------------------------------------------------------------------------- dataset sources
def _tiny_dataset(root: Path, yaml_path: Path | None = None, path_entry: str = ".") -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        (root / "images" / split / "a.jpg").write_bytes(b"jpg")
        (root / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    yaml_path = yaml_path or root / "data.yaml"
    yaml_path.write_text(
        yaml.safe_dump({"path": path_entry, "train": "images/train", "val": "images/val", "names": ["thing"]})
    )
    return yaml_path


def test_parse_source_kinds():
    assert runtime.parse_source("sample:") == runtime.Source("sample", "")
    assert runtime.parse_source("dvc://git@host:org/r.git#data/x/") == runtime.Source(
        "dvc", "git@host:org/r.git", "data/x"
    )
    assert runtime.parse_source("s3://b/p/").kind == "s3"
    assert runtime.parse_source("file:///mnt/pvc").location == "/mnt/pvc"
    assert runtime.parse_source("./data").kind == "local"


def test_sample_version_is_stable_and_follows_options():
    assert runtime.resolve_version("sample:train=8,val=4") == runtime.resolve_version("sample:val=4,train=8")
    assert runtime.resolve_version("sample:train=8") != runtime.resolve_version("sample:train=9")


def test_local_source_version_follows_content_and_copy_rewrites_yaml(tmp_path):
    root = tmp_path / "datasets" / "tiny"
    yaml_path = _tiny_dataset(root, yaml_path=tmp_path / "tiny.yaml", path_entry="datasets/tiny")
    first = runtime.resolve_version(str(yaml_path))
    assert first == runtime.resolve_version(str(yaml_path))
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.3 0.3\n")
    second = runtime.resolve_version(str(yaml_path))
    assert second != first

    artifact = FakeArtifact(tmp_path / "out" / "dataset")
    meta = runtime.import_data(str(yaml_path), second, artifact)
    copied = Path(artifact.path)
    assert yaml.safe_load((copied / "data.yaml").read_text())["path"] == "."
    assert (copied / "labels" / "train" / "a.txt").read_text() == "0 0.5 0.5 0.3 0.3\n"
    assert meta["version"] == second and artifact.metadata["source"] == str(yaml_path)
    assert artifact.metadata["files"] == 5  # 2 images, 2 labels, data.yaml


def test_git_rev_resolves_to_commit_sha(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "f").write_text("1")
    subprocess.run([*git, "add", "f"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=repo, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    assert runtime.resolve_version(f"dvc://{repo}#data", "main") == sha
    assert runtime.resolve_version(f"dvc://{repo}#data", "") == sha
    with pytest.raises(UserError, match="git rev-parse"):
        runtime.resolve_version(f"dvc://{repo}#data", "no-such-branch")


def test_s3_source_is_downloaded_and_versioned_by_content(s3_env, s3_bucket, tmp_path):
    from yolo.storage import open_storage

    local = tmp_path / "src"
    _tiny_dataset(local)
    storage = open_storage(f"s3://{s3_bucket}/datasets/tiny")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.put(path, path.relative_to(local).as_posix())
    version = runtime.resolve_version(f"s3://{s3_bucket}/datasets/tiny")
    assert version.startswith("s3-")
    artifact = FakeArtifact(tmp_path / "dataset")
    runtime.import_data(f"s3://{s3_bucket}/datasets/tiny", version, artifact)
    assert artifact.metadata["objects"] == 5
    assert (Path(artifact.path) / "images" / "val" / "a.jpg").read_bytes() == b"jpg"
    storage.put_bytes(b"changed", "images/val/a.jpg")
    assert runtime.resolve_version(f"s3://{s3_bucket}/datasets/tiny") != version
    with pytest.raises(UserError, match="no objects"):
        runtime.resolve_version(f"s3://{s3_bucket}/datasets/none")


# ------------------------------------------------------------------------------------- step glue
def test_yolo_command_uses_torchrun_for_several_gpus():
    assert runtime.yolo_command("train", ["--epochs", "1"]) == [
        sys.executable,
        "-m",
        "yolo",
        "train",
        "--epochs",
        "1",
    ]
    argv = runtime.yolo_command("train", ["--device", "0,1"], gpus=2)
    assert argv[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv[5:] == ["-m", "yolo", "train", "--device", "0,1"]
    assert [runtime.train_device(g) for g in (0, 1, 4)] == ["cpu", "0", "0,1,2,3"]
    assert runtime.checkpoint_uri("s3://b/ckpt/") == "s3://b/ckpt/{run_id}"  # yolo train fills in its identity
    assert runtime.checkpoint_uri("") == ""


def _fake_step(calls: list, writes: dict[str, object], code: int = 0):
    def run_yolo(step, args, gpus=0, allowed_exit_codes=(0,), forward_signals=False):
        calls.append((step, [str(a) for a in args], gpus))
        out = Path(str(args[args.index("--out") + 1]))
        for name, content in writes.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            (out / name).write_bytes(data)
        assert code in allowed_exit_codes
        return code

    return run_yolo


def test_train_glue_fills_model_artifact(monkeypatch, tmp_path):
    calls: list = []
    train_json = {
        "best": {"map50": 0.42, "map50_95": 0.2},
        "run_id": "abc",
        "data_version": "v9",
        "epochs_run": 3,
    }
    monkeypatch.setattr(
        runtime, "run_yolo", _fake_step(calls, {"weights/best.pt": b"pt", "train.json": train_json})
    )
    dataset = FakeArtifact(tmp_path / "ds")
    dataset.metadata = {"version": "v9", "data_yaml": "data.yaml"}
    model = FakeArtifact(tmp_path / "model")
    best = runtime.train(
        dataset,
        FakeArtifact(tmp_path / "idx"),
        FakeArtifact(tmp_path / "st"),
        "yolov5s.yaml",
        "",
        3,
        64,
        8,
        2,
        4,
        "s3://b/ckpt",
        "job-1",
        "--seed 7",
        model,
        out_dir=str(tmp_path / "run"),
    )
    assert best == 0.42
    step, args, gpus = calls[0]
    assert (step, gpus) == ("train", 2)
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs["--device"] == "0,1" and pairs["--checkpoint-uri"] == "s3://b/ckpt/{run_id}"
    assert pairs["--cfg"] == "yolov5s.yaml" and pairs["--data-version"] == "v9" and pairs["--seed"] == "7"
    assert pairs["--anchors"] == str(tmp_path / "st" / "anchors.json")
    assert (Path(model.path) / "best.pt").read_bytes() == b"pt"
    assert model.metadata["map50"] == 0.42 and model.metadata["run_id"] == "abc"
    assert model.metadata["pipeline_run"] == "job-1"


def _eval_outputs(map50: float, promote: bool) -> dict:
    metrics = {
        "precision": 0.5,
        "recall": 0.4,
        "map50": map50,
        "map50_95": map50 / 2,
        "fitness": map50 / 2,
        "per_class": [],
    }
    return {
        "metrics.json": metrics,
        "gate.json": {"promote": promote, "reasons": ["r"], "baseline": None},
        "confusion_matrix.json": {"labels": ["a", "background"], "matrix": [[1, 0], [2, 0]]},
    }


def test_evaluate_glue_uses_registry_baseline_and_failed_gate_is_not_an_error(monkeypatch, tmp_path):
    from yolo.storage import open_storage

    registry = open_storage(tmp_path / "registry")
    registry.put_bytes(b'{"map50": 0.9, "fitness": 0.5}', "models/m/v3/metrics.json")
    registry.put_bytes(
        json.dumps({"version": "v3", "metrics_key": "models/m/v3/metrics.json"}).encode(),
        "models/m/current.json",
    )
    calls: list = []
    monkeypatch.setattr(runtime, "run_yolo", _fake_step(calls, _eval_outputs(0.3, False), code=2))
    metrics, confusion, evaluation = (
        FakeArtifact(tmp_path / n) for n in ("metrics", "confusion", "evaluation")
    )
    dataset = FakeArtifact(tmp_path / "ds")
    promote = runtime.evaluate(
        dataset,
        FakeArtifact(tmp_path / "idx"),
        FakeArtifact(tmp_path / "model"),
        64,
        8,
        0.5,
        str(tmp_path / "registry"),
        "m",
        evaluation,
        metrics,
        confusion,
    )
    assert promote is False
    args = calls[0][1]
    baseline = Path(args[args.index("--baseline") + 1])
    assert json.loads(baseline.read_text())["map50"] == 0.9
    assert args[args.index("--min-map50") + 1] == "0.5"
    assert metrics.metadata == {
        "precision": 0.5,
        "recall": 0.4,
        "map50": 0.3,
        "map50_95": 0.15,
        "fitness": 0.15,
    }
    # Also written at the artifact's path: an existing file is what lets kfp.local's cache reuse the task.
    assert json.loads(Path(metrics.path).read_text()) == metrics.metadata
    assert confusion.metadata["confusionMatrix"]["categories"] == ["a", "background"]
    assert evaluation.metadata["baseline_version"] == "v3"


def test_evaluate_exit_2_without_gate_is_a_failure(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "run_yolo", _fake_step([], {}, code=2))
    with pytest.raises(RuntimeError, match="exit code 2"):
        runtime.evaluate(
            FakeArtifact(tmp_path / "ds"),
            FakeArtifact(tmp_path / "idx"),
            FakeArtifact(tmp_path / "model"),
            64,
            8,
            0.0,
            "",
            "m",
            FakeArtifact(tmp_path / "ev"),
            FakeArtifact(tmp_path / "m"),
            FakeArtifact(tmp_path / "c"),
        )


def test_promote_versions_and_current_json(tmp_path):
    model = FakeArtifact(tmp_path / "model")
    Path(model.path).mkdir()
    (Path(model.path) / "best.pt").write_bytes(b"weights-1")
    model.metadata = {"run_id": "run-a"}
    evaluation = FakeArtifact(tmp_path / "evaluation")
    Path(evaluation.path).mkdir()
    for name, content in _eval_outputs(0.6, True).items():
        (Path(evaluation.path) / name).write_text(json.dumps(content))
    registry = tmp_path / "registry"

    assert runtime.promote(model, evaluation, str(registry), "det", "img:1", "job-1") == "v1"
    (Path(model.path) / "best.pt").write_bytes(b"weights-2")
    assert runtime.promote(model, evaluation, str(registry), "det", "img:2", "job-2") == "v2"

    current = json.loads((registry / "models/det/current.json").read_text())
    assert current["version"] == "v2" and current["metrics"]["map50"] == 0.6
    assert (registry / current["weights_key"]).read_bytes() == b"weights-2"
    assert (registry / "models/det/v1/best.pt").read_bytes() == b"weights-1"
    card = json.loads((registry / current["card_key"]).read_text())
    assert (card["image"], card["pipeline_run"], card["run_id"]) == ("img:2", "job-2", "run-a")
    assert runtime.current_model(str(registry), "det")["version"] == "v2"
    assert runtime.current_model(str(registry), "other") is None


def test_dvc_source_imports_the_resolved_commit(tmp_path, monkeypatch):
    """`dvc get` from a DVC repo (a local one, its cache standing in for a remote) at the resolved SHA."""
    if not Path(sys.executable).with_name("dvc").exists():
        pytest.skip("dvc is not installed in this environment")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo = tmp_path / "repo"
    repo.mkdir()

    def sh(*argv: str) -> str:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    git = ("git", "-c", "user.email=t@t", "-c", "user.name=t")
    sh(*git, "init", "-q", "-b", "main")
    sh("dvc", "init", "-q")
    _tiny_dataset(repo / "data" / "tiny")
    sh("dvc", "add", "-q", "data/tiny")
    sh(*git, "add", "-A")
    sh(*git, "commit", "-qm", "v1 of the data")
    first = sh("git", "rev-parse", "HEAD")
    (repo / "data" / "tiny" / "labels" / "val" / "a.txt").write_text("0 0.4 0.4 0.1 0.1\n")
    sh("dvc", "add", "-q", "data/tiny")
    sh(*git, "commit", "-qam", "v2 of the data")

    source = f"dvc://{repo}#data/tiny"
    assert runtime.resolve_version(source, "main") != first
    assert runtime.resolve_version(source, first) == first  # a full SHA is used as given
    artifact = FakeArtifact(tmp_path / "dataset")
    runtime.import_data(source, first, artifact)
    assert artifact.metadata["commit"] == first and artifact.metadata["path"] == "data/tiny"
    assert (Path(artifact.path) / "labels" / "val" / "a.txt").read_text() == "0 0.5 0.5 0.2 0.2\n"  # v1 bytes
    with pytest.raises(UserError, match="not a commit SHA"):
        runtime.import_data(source, "main", FakeArtifact(tmp_path / "other"))
