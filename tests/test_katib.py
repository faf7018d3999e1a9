"""`python -m pipelines tune`: the Katib Experiment against the v1beta1 fields, its trial run for real, and
--submit/--wait through the `kubernetes` client against a loopback stand-in of the API server.

Field sets from kubeflow/katib pkg/apis/controller/experiments/v1beta1/experiment_types.go and
common/v1beta1/common_types.go (ExperimentSpec, ObjectiveSpec, AlgorithmSpec, EarlyStoppingSpec,
ParameterSpec, FeasibleSpace, TrialTemplate, MetricsCollectorSpec) and the rules of its validating
webhook (pkg/webhook/v1beta1/experiment/validator): every trialParameter is used in the trialSpec and
every placeholder is declared, parameter values are strings, a metricsFormat has two groups.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import katib
from pipelines.__main__ import main
from tests import k8s_server
from tests.conftest import run_cli
from yolo.hyp import Hyp, load_hyp
from yolo.tune.space import load_space

EXPERIMENT_FIELDS = {"apiVersion", "kind", "metadata", "spec"}
SPEC_FIELDS = {
    "parameters", "objective", "algorithm", "earlyStopping", "trialTemplate", "parallelTrialCount",
    "maxTrialCount", "maxFailedTrialCount", "metricsCollectorSpec", "nasConfig", "resumePolicy",
}  # fmt: skip
REQUIRED_SPEC = {"parameters", "objective", "algorithm", "trialTemplate"}
OBJECTIVE_FIELDS = {"type", "goal", "objectiveMetricName", "additionalMetricNames", "metricStrategies"}
ALGORITHM_FIELDS = {"algorithmName", "algorithmSettings"}
KATIB_ALGORITHMS = {"random", "tpe", "multivariate-tpe", "grid", "hyperband", "bayesianoptimization", "cmaes",
                    "sobol", "enas", "darts", "pbt"}  # fmt: skip
EARLY_STOPPING = {"medianstop"}
PARAMETER_FIELDS = {"name", "parameterType", "feasibleSpace"}
PARAMETER_TYPES = {"int", "double", "categorical", "discrete"}
FEASIBLE_FIELDS = {"max", "min", "list", "step", "distribution"}
DISTRIBUTIONS = {"uniform", "logUniform", "normal", "logNormal"}
TEMPLATE_FIELDS = {"retain", "trialSpec", "configMap", "trialParameters", "primaryPodLabels",
                   "primaryContainerName", "successCondition", "failureCondition"}  # fmt: skip
TRIAL_PARAMETER_FIELDS = {"name", "description", "reference"}
COLLECTOR_KINDS = {"StdOut", "File", "TensorFlowEvent", "PrometheusMetric", "Custom", "None", "Push"}
PLACEHOLDER = re.compile(r"\$\{trialParameters\.([^}]+)\}")
IMAGE = "ghcr.io/org/yolo-pipeline:3f2a9c1"


def _write(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "experiment.yaml"
    assert main(["tune", "--out", str(out), *args]) == 0
    text = out.read_text()
    assert text.startswith("# Katib Experiment")
    return yaml.safe_load(text)


@pytest.fixture()
def experiment(tmp_path) -> dict:
    return _write(tmp_path, "--gpus", "1", "--trials", "12", "--parallel", "3", "--epochs-per-trial", "5",
                  "--image", IMAGE, "--name", "coco-tune", "--dataset-source", "s3://bucket/coco",
                  "--", "--cfg", "yolov5s.yaml", "--imgsz", "640", "--batch-size", "32")  # fmt: skip


def test_experiment_holds_the_v1beta1_fields_with_their_types(experiment):
    assert set(experiment) == EXPERIMENT_FIELDS
    assert experiment["apiVersion"] == "kubeflow.org/v1beta1" and experiment["kind"] == "Experiment"
    assert experiment["metadata"]["name"] == "coco-tune"
    spec = experiment["spec"]
    assert REQUIRED_SPEC <= set(spec) <= SPEC_FIELDS
    for key in ("parallelTrialCount", "maxTrialCount", "maxFailedTrialCount"):
        assert isinstance(spec[key], int) and not isinstance(spec[key], bool)
    assert (spec["maxTrialCount"], spec["parallelTrialCount"], spec["maxFailedTrialCount"]) == (12, 3, 3)

    objective = spec["objective"]
    assert set(objective) <= OBJECTIVE_FIELDS
    assert objective["type"] == "maximize" and objective["objectiveMetricName"] == "mAP50-95"
    assert objective["objectiveMetricName"] not in objective["additionalMetricNames"]
    assert {s["name"]: s["value"] for s in objective["metricStrategies"]} == {"mAP50-95": "max", "mAP50": "max"}

    for key, names in (("algorithm", KATIB_ALGORITHMS), ("earlyStopping", EARLY_STOPPING)):
        assert set(spec[key]) <= ALGORITHM_FIELDS and spec[key]["algorithmName"] in names
        assert all(set(s) == {"name", "value"} and isinstance(s["value"], str) for s in spec[key]["algorithmSettings"])
    assert spec["algorithm"]["algorithmName"] == "tpe"

    collector = spec["metricsCollectorSpec"]
    assert collector["collector"]["kind"] in COLLECTOR_KINDS
    for fmt in collector["source"]["filter"]["metricsFormat"]:
        assert re.compile(fmt).groups == 2  # Katib: metric name, metric value


def test_parameters_are_the_search_space_as_strings(experiment):
    space = load_space(None)
    params = experiment["spec"]["parameters"]
    assert [p["name"] for p in params] == space.names
    for p, expected in zip(params, space.params, strict=True):
        assert set(p) == PARAMETER_FIELDS and p["parameterType"] in PARAMETER_TYPES
        feasible = p["feasibleSpace"]
        assert set(feasible) <= FEASIBLE_FIELDS
        assert all(isinstance(v, str) for k, v in feasible.items() if k != "list")
        assert float(feasible["min"]) == expected.low and float(feasible["max"]) == expected.high
        assert feasible.get("distribution", "uniform") in DISTRIBUTIONS
        assert (feasible.get("distribution") == "logUniform") == expected.log
    # a YAML 1.2 reader (kubectl) must read every bound back as a string: no bare 1e-05
    lr0 = next(p for p in params if p["name"] == "lr0")["feasibleSpace"]
    assert lr0["min"] == "0.00001"


def test_trial_template_is_a_job_whose_placeholders_are_the_trial_parameters(experiment):
    template = experiment["spec"]["trialTemplate"]
    assert set(template) <= TEMPLATE_FIELDS
    declared = [t["name"] for t in template["trialParameters"]]
    assert all(set(t) == TRIAL_PARAMETER_FIELDS for t in template["trialParameters"])
    assert {t["reference"] for t in template["trialParameters"]} == {p["name"] for p in experiment["spec"]["parameters"]}
    job = template["trialSpec"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job" and "name" not in job.get("metadata", {})
    used = PLACEHOLDER.findall(json.dumps(job))
    assert sorted(set(used)) == sorted(declared) and len(used) == len(declared)
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert [c["name"] for c in pod["containers"]] == [template["primaryContainerName"]]
    main_container = pod["containers"][0]
    assert main_container["image"] == IMAGE
    assert main_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    command = main_container["command"]
    assert command[:4] == ["python", "-m", "yolo", "train"]
    assert command[command.index("--data") + 1] == "/data/data.yaml"
    assert command[command.index("--hyp") + 1] == katib.HYP_PATH
    assert command[command.index("--epochs") + 1] == "5" and command[command.index("--device") + 1] == "0"
    assert not PLACEHOLDER.search(json.dumps(command))  # values reach the step only through hyp.yaml
    assert [c["name"] for c in pod["initContainers"]] == ["import-data", "write-hyp"]


def _render(job: dict, values: dict[str, float]) -> dict:
    """What Katib does with a suggestion: every ${trialParameters.X} replaced by its value."""
    return json.loads(PLACEHOLDER.sub(lambda m: repr(values[m.group(1)]), json.dumps(job)))


def _local(command: list[str], work: Path) -> list[str]:
    """A container command as it runs here: this Python for `python`, a temp folder for the emptyDir."""
    return [sys.executable if a == "python" else a.replace(katib.WORK_DIR, str(work)) for a in command]


@pytest.mark.slow
def test_rendered_trial_runs_the_train_step_for_one_epoch_and_prints_the_metrics(tmp_path, one_thread):
    made = run_cli("sample-data", "--out", tmp_path / "data", "--train", 16, "--val", 8, "--imgsz", 64)
    assert made.returncode == 0, made.stderr
    data = tmp_path / "data" / "data.yaml"
    base = tmp_path / "base.yaml"
    base.write_text("fliplr: 0.25\n")  # a key outside the space: the trial's hyp.yaml keeps it
    experiment = _write(tmp_path, "--gpus", "0", "--trials", "2", "--parallel", "1", "--epochs-per-trial", "1",
                        "--hyp", str(base), "--", "--data", str(data), "--imgsz", "64", "--batch-size", "8",
                        "--workers", "0")  # fmt: skip
    space = load_space(None)
    values = {p.name: (p.low * p.high) ** 0.5 if p.log else (p.low + p.high) / 2 for p in space.params}
    job = _render(experiment["spec"]["trialTemplate"]["trialSpec"], values)
    pod = job["spec"]["template"]["spec"]
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for init in pod["initContainers"]:
        done = subprocess.run(_local(init["command"], work), env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    hyp = load_hyp(work / "hyp.yaml")
    assert hyp == Hyp().replace(fliplr=0.25, **values)
    # Katib's StdOut collector reads the container's stdout and stderr together
    ran = subprocess.run(_local(pod["containers"][0]["command"], work), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=600)  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-3000:]
    with open(work / "run" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    fmt = experiment["spec"]["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"][0]
    observed: dict[str, list[float]] = {}
    for line in ran.stdout.splitlines():
        for name, value in re.findall(fmt, line):
            observed.setdefault(name, []).append(float(value))
    assert observed == {"mAP50": [round(float(rows[0]["metrics/mAP_0.5"]), 3)],
                        "mAP50-95": [round(float(rows[0]["metrics/mAP_0.5:0.95"]), 3)]}  # fmt: skip


def test_hyp_writer_refuses_a_bad_value_in_one_line(tmp_path):
    out = tmp_path / "hyp.yaml"
    done = subprocess.run([sys.executable, "-m", "yolo.tune.trial_hyp", str(out), "lr0=0.01", "mosaic=1.5"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.count("\n") == 1 and "mosaic" in done.stderr and "<= 1" in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "1", "--", "--data", "d.yaml", "--epochs", "3"], "--epochs: set by the Experiment"),
    (["--gpus", "1"], "no data"),
    (["--gpus", "3", "--", "--data", "d.yaml"], "gpus=3"),
    (["--gpus", "1", "--trials", "2", "--parallel", "3", "--", "--data", "d.yaml"], "--parallel 3"),
    (["--gpus", "1", "--nodes", "2", "--", "--data", "d.yaml"], "--nodes 2"),
    (["--gpus", "1", "--wait", "--", "--data", "d.yaml"], "--wait needs --submit"),
    (["--gpus", "1", "--", "--data", "my data.yaml"], "no spaces"),
])  # fmt: skip
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "experiment.yaml"
    assert main(["tune", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


@pytest.fixture()
def kube(monkeypatch, tmp_path):
    state = k8s_server.start()
    config = tmp_path / "kubeconfig"
    config.write_text(state.kubeconfig(namespace="team-a"))
    monkeypatch.setenv("KUBECONFIG", str(config))
    yield state
    state.stop()


def _finish(obj: dict, gets: int) -> None:
    """The stand-in's Katib controller: running on the first read, succeeded with a best trial on the third."""
    if gets == 1:
        obj["status"] = {"conditions": [{"type": "Running", "status": "True"}], "trialsRunning": 2}
    elif gets >= 3:
        obj["status"] = {
            "conditions": [{"type": "Running", "status": "False"}, {"type": "Succeeded", "status": "True"}],
            "currentOptimalTrial": {
                "bestTrialName": "yolo-tune-7x2kq",
                "parameterAssignments": [{"name": "lr0", "value": "0.0123"}, {"name": "mosaic", "value": "0.5"}],
                "observation": {"metrics": [{"name": "mAP50-95", "min": "0.1", "max": "0.412", "latest": "0.4"},
                                            {"name": "mAP50", "min": "0.2", "max": "0.6", "latest": "0.59"}]},
            },
            "trialsSucceeded": 9, "trialsEarlyStopped": 3,
        }  # fmt: skip


def test_submit_and_wait_report_the_best_trial(kube, tmp_path, capsys):
    kube.progress = _finish
    best = tmp_path / "best_hyp.yaml"
    code = main(["tune", "--out", str(tmp_path / "e.yaml"), "--gpus", "0", "--trials", "12", "--submit", "--wait",
                 "--poll-interval", "0.01", "--best-hyp", str(best), "--", "--data", "/mnt/d/data.yaml"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    posts = [r for r in kube.requests if r.method == "POST"]
    assert len(posts) == 1
    assert posts[0].path == "/apis/kubeflow.org/v1beta1/namespaces/team-a/experiments"
    assert posts[0].headers["authorization"] == "Bearer test-token"
    written = yaml.safe_load((tmp_path / "e.yaml").read_text())
    assert posts[0].body["spec"] == written["spec"] and posts[0].body["metadata"]["namespace"] == "team-a"
    report = json.loads(captured.out)
    assert report["state"] == "Succeeded" and report["best_trial"] == "yolo-tune-7x2kq"
    assert report["metrics"] == {"mAP50-95": 0.412, "mAP50": 0.6}
    assert report["params"] == {"lr0": 0.0123, "mosaic": 0.5}
    assert report["trials"]["succeeded"] == 9 and report["trials"]["earlyStopped"] == 3
    assert load_hyp(best) == Hyp(lr0=0.0123, mosaic=0.5)
    assert kube.gets == 3


def test_submit_of_an_existing_experiment_is_one_line(kube, tmp_path, capsys):
    args = ["tune", "--out", str(tmp_path / "e.yaml"), "--gpus", "0", "--namespace", "ml", "--submit",
            "--", "--data", "/mnt/d/data.yaml"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # after the "wrote e.yaml" line
    assert "HTTP 409" in last and "already exists" in last and "namespace ml" in last, err


def test_submit_without_a_reachable_api_is_one_line(kube, tmp_path, capsys):
    kube.stop()
    code = main(["tune", "--out", str(tmp_path / "e.yaml"), "--gpus", "0", "--submit", "--",
                 "--data", "/mnt/d/data.yaml"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "cannot reach the Kubernetes API" in err.splitlines()[-1], err
