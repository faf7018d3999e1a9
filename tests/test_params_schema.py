"""One schema of the pipeline's parameters (components.params.PARAMETERS): every place that lists them is
generated from it or checked here, so a parameter added in one place only fails a test."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import yaml

from components.params import DEFAULTS, NAMES, PARAMETERS, check_parameters
from tests.conftest import REPO
from yolo.errors import UserError

pytest.importorskip("kfp")

KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE"}
RESOLVE_NAMES = {"dataset_source": "source", "dataset_rev": "rev"}  # the resolve step's own spelling
# one bad value per checked parameter, and the start of the one line it is refused with
BAD = {
    "dataset_source": ("gs://bucket/data", "dataset source 'gs://bucket/data': unknown scheme"),
    "dataset_rev": ("--all", "dataset rev '--all': not a git rev"),
    "cfg": ("--out=/x", "cfg '--out=/x': must not begin with '-'"),
    "weights": ("-x", "weights '-x': must not begin with '-'"),
    "epochs": (0, "epochs=0: must be >= 1"),
    "imgsz": (100, "imgsz=100: must be a positive multiple of 32"),
    "batch_size": (0, "batch_size=0: must be >= 1"),
    "workers": (-1, "workers=-1: must be >= 0"),
    "checkpoint_root": ("gs://b/c", "checkpoint_root='gs://b/c': use s3://bucket/prefix or a folder"),
    "registry_uri": ("gs://b/r", "registry_uri='gs://b/r': use s3://bucket/prefix or a folder"),
    "min_map50": (1.5, "min_map50=1.5: must be in [0, 1]"),
    "max_bad_fraction": (2.0, "max_bad_fraction=2.0: must be in [0, 1]"),
    "model_name": ("bad name", "model_name='bad name': use letters"),
    "train_extra_args": ("--out /x", "train_extra_args: --out is set by the pipeline"),
}


def test_every_checked_parameter_has_a_bad_example():
    assert set(BAD) == {p.name for p in PARAMETERS if p.check is not None}
    assert set(NAMES) == {p.name for p in PARAMETERS} and len(NAMES) == len(set(NAMES))
    check_parameters(**DEFAULTS)  # the defaults pass
    with pytest.raises(TypeError, match="not pipeline parameters: epoch"):
        check_parameters(epoch=3)


def test_pipeline_function_signature_is_the_schema():
    from pipelines.training import ClusterOptions, build_pipeline

    signature = inspect.signature(build_pipeline(ClusterOptions(gpus=0, s3_secret="")).pipeline_func)
    assert list(signature.parameters) == list(NAMES)
    for p in PARAMETERS:
        declared = signature.parameters[p.name]
        assert (declared.annotation, declared.default) == (p.type, p.default), p.name


def test_resolve_step_takes_and_checks_every_parameter(tmp_path):
    """The compiled pipeline hands each of its parameters to the resolve step, whose check refuses a bad
    value of each (the drift this schema ended: `workers` never reached it)."""
    from components.import_data import resolve_dataset_version

    inputs = resolve_dataset_version.component_spec.inputs
    expected = {RESOLVE_NAMES.get(n, n) for n in NAMES} | {"gpus"}
    assert set(inputs) == expected

    package = tmp_path / "p.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "compile", "--out", str(package), "--gpus", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    spec = next(yaml.safe_load_all(package.read_text()))
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert {n: root[n]["parameterType"] for n in root} == {p.name: KFP_TYPES[p.type] for p in PARAMETERS}
    assert {n: root[n].get("defaultValue", "") for n in root} == {
        p.name: p.default for p in PARAMETERS
    }  # KFP leaves '' out, and writes 0.0 as 0.0
    task = spec["root"]["dag"]["tasks"]["resolve-dataset-version"]["inputs"]["parameters"]
    for name in NAMES:
        assert task[RESOLVE_NAMES.get(name, name)] == {"componentInputParameter": name}

    good = {RESOLVE_NAMES.get(n, n): v for n, v in DEFAULTS.items()} | {"gpus": 0}
    assert resolve_dataset_version.python_func(**good).startswith("sample-")
    for name, (value, message) in BAD.items():
        with pytest.raises(UserError) as refused:
            resolve_dataset_version.python_func(**(good | {RESOLVE_NAMES.get(name, name): value}))
        assert str(refused.value).startswith(message), name


def test_submit_and_run_local_flags_are_the_schema():
    from pipelines import submit
    from pipelines.__main__ import RUN_LOCAL_DEFAULTS, build_parser

    assert submit.PIPELINE_FLAGS == tuple((p.name, p.type) for p in PARAMETERS)
    argv = []
    for p in PARAMETERS:
        argv += [p.flag, str({str: "x", int: 3, float: 0.5}[p.type])]
    args = build_parser().parse_args(["submit", "--host", "http://h", *argv])
    request = submit.request_from_args(args)
    assert set(request.parameters) == set(NAMES)

    assert set(RUN_LOCAL_DEFAULTS) <= set(NAMES)
    local = build_parser().parse_args(["run-local"])
    for p in PARAMETERS:
        assert getattr(local, p.name) == RUN_LOCAL_DEFAULTS.get(p.name, p.default), p.name
    assert build_parser().parse_args(["run-local", "--registry", "r"]).registry_uri == "r"  # the old spelling


def test_params_file_keys_are_the_schema(tmp_path):
    from pipelines.submit import load_params_file

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"parameters": {p.flag[2:]: p.default for p in PARAMETERS}}))
    assert load_params_file(path).parameters == DEFAULTS
