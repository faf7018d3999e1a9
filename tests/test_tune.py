"""`yolo-pipeline tune`: the search space file, pruning, samplers, and whole studies of real train runs
(tiny data, 64 px, one thread) that finish, continue without re-running trials, and resume a cut trial."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.conftest import REPO, run_cli
from yolo import cli
from yolo import train as train_step
from yolo.engine.preemption import EXIT_SIGTERM, StopRequested
from yolo.errors import UserError
from yolo.hyp import Hyp, load_hyp
from yolo.tune import study as tune_study
from yolo.tune.space import load_space

TRIALS, EPOCHS = 3, 2
# upstream's evolve keys named by the issue: lr, momentum, decay, warmup, loss gains, anchor_t, augmentation
DEFAULT_KEYS = {"lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
                "box", "cls", "obj", "anchor_t", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale",
                "shear", "flipud", "mosaic", "mixup"}  # fmt: skip


# ------------------------------------------------------------------------------------------ space
def test_default_space_is_upstreams_evolve_ranges():
    space = load_space(None)
    assert set(space.names) == DEFAULT_KEYS
    p = {q.name: q for q in space.params}
    assert (p["lr0"].low, p["lr0"].high, p["lr0"].log) == (1e-5, 0.1, True)
    assert (p["momentum"].low, p["momentum"].high) == (0.6, 0.98)
    assert (p["anchor_t"].low, p["anchor_t"].high) == (2.0, 8.0)
    assert all(q.high <= 1 for q in space.params if q.name in ("flipud", "mosaic", "mixup"))


@pytest.mark.parametrize(("text", "message"), [
    ("lr00: {low: 0.001, high: 0.1}", "unknown hyp key `lr00` (did you mean `lr0`?)"),
    ("lr0: {low: 0.1, high: 0.01}", "`low` (0.1) must be below `high` (0.01)"),
    ("mosaic: {low: 0.0, high: 1.5}", "probability and must be <= 1"),
    ("lr0: {low: 0.0, high: 0.1, log: true}", "a log range needs `low` > 0"),
    ("anchors: {low: 2, high: 5}", "give it as `choices"),
    ("anchor_t: {choices: [1.0, 4.0]}", "must be > 1"),
    ("lr0: {low: 0.001, hi: 0.1}", "unexpected `hi`"),
    ("lr0: [0.001, 0.1]", "expected {low: L, high: H}"),
    ("- lr0", "expected a mapping"),
    ("lr0: {low: 0.001, high: [0.1}", "not valid YAML"),
])  # fmt: skip
def test_bad_space_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UserError) as e:
        load_space(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_bad_space_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("mixup: {low: 0.0, high: 2.0}\n")
    data = tmp_path / "data.yaml"
    data.write_text("path: .\ntrain: images\nval: images\nnames: [a]\n")
    code = cli.main(["tune", "--data", str(data), "--space", str(space), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "mixup" in err, err
    assert not (tmp_path / "t").exists()


def test_train_evolve_points_to_tune(capsys):
    assert cli.main(["train", "--data", "d.yaml", "--evolve", "300"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "yolo-pipeline tune --sampler evolve" in err


def test_a_trial_hyp_keeps_the_base_values_outside_the_space():
    space = load_space(None)
    hyp = space.hyp_for(Hyp(fliplr=0.25), {"lr0": 0.02, "mosaic": 0.5})
    assert hyp == Hyp(fliplr=0.25, lr0=0.02, mosaic=0.5)
    with pytest.raises(UserError, match="`fliplr` is not in the search space"):
        space.hyp_for(Hyp(), {"fliplr": 0.1})


# ------------------------------------------------------------------------------------------ samplers, pruning
@pytest.mark.parametrize("kind", tune_study.SAMPLERS)
def test_each_trial_is_a_function_of_the_seed_and_the_trials_before_it(kind):
    space = load_space(None)

    def suggestions(seed: int) -> list[dict[str, float]]:
        study = optuna.create_study(direction="maximize")
        made = []
        for number in range(tune_study.EVOLVE_POPULATION + 2):  # past the startup/first generation
            study.sampler = tune_study.make_sampler(kind, tune_study.trial_seed(seed, number))
            trial = study.ask()
            values = space.suggest(trial)
            study.tell(trial, values["lr0"] * values["momentum"])  # any deterministic fitness
            made.append(values)
        return made

    first = suggestions(0)
    assert suggestions(0) == first
    assert suggestions(1) != first
    assert all(set(v) == set(space.names) for v in first)


def _results(path: Path, fitness: list[float]) -> None:
    rows = ["epoch,fitness"] + [f"{e},{f}" for e, f in enumerate(fitness)]
    path.write_text("\n".join(rows) + "\n")


def test_prune_check_reports_each_epoch_and_prunes_below_the_median(tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=tune_study.PRUNE_AFTER_TRIALS, n_warmup_steps=0))  # fmt: skip
    for _ in range(tune_study.PRUNE_AFTER_TRIALS):
        trial = study.ask()
        trial.report(0.5, 0)
        trial.report(0.6, 1)
        study.tell(trial, 0.6)
    good, bad = study.ask(), study.ask()
    _results(tmp_path / "good.csv", [0.7])
    _results(tmp_path / "bad.csv", [0.1])
    good_check = tune_study.PruneCheck(good, tmp_path / "good.csv", set())
    bad_check = tune_study.PruneCheck(bad, tmp_path / "bad.csv", set())
    assert not bad_check.poll(0, 3)  # mid-epoch: nothing to judge, nothing read
    assert study.trials[bad.number].intermediate_values == {}
    assert not good_check.poll(1, 0) and good_check.pruned_epoch is None
    assert bad_check.poll(1, 0) and bad_check.pruned_epoch == 0
    assert study.trials[bad.number].intermediate_values == {0: 0.1}
    assert study.trials[good.number].intermediate_values == {0: 0.7}


class _RowsAtEpochEnd(StopRequested):
    """Records, at each epoch-boundary poll, how many rows results.csv holds."""

    def __init__(self, results: Path) -> None:
        super().__init__()
        self.results, self.seen = results, []

    def poll(self, epoch: int, iteration: int) -> bool:
        if iteration == 0:
            self.seen.append((epoch, len(self.results.read_text().splitlines()) - 1))
        return super().poll(epoch, iteration)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune_data")
    made = run_cli("sample-data", "--out", root, "--train", 16, "--val", 8, "--imgsz", 64)
    assert made.returncode == 0, made.stderr
    return root / "data.yaml"


@pytest.mark.slow
def test_trainer_polls_at_each_epoch_end_after_writing_its_results_row(tmp_path, data, one_thread):
    """What PruneCheck relies on: poll(e, 0) comes after epoch e-1's row is in results.csv."""
    out = tmp_path / "run"
    check = _RowsAtEpochEnd(out / "results.csv")
    cfg = train_step.TrainConfig(data=data, out=out, cfg="yolov5n.yaml", epochs=3, imgsz=64, batch_size=8,
                                 workers=0, device="cpu")  # fmt: skip
    assert train_step.train(cfg, stop=check).exit_code == 0
    assert check.seen == [(1, 1), (2, 2)]  # the last epoch needs no poll: the run ends there


# ------------------------------------------------------------------------------------------ whole studies
def _tune_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["tune", "--data", str(data), "--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--trials", str(TRIALS), "--epochs-per-trial", str(EPOCHS),
            "--seed", "0", "--out", str(out), *extra]  # fmt: skip


def _trials(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def _params(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    names = load_space(None).names
    return [{n: r[n] for n in names} for r in rows]


@pytest.fixture(scope="module")
def study_out(tmp_path_factory, data) -> Path:
    """One uninterrupted study of TRIALS trials, shared by the tests below."""
    out = tmp_path_factory.mktemp("study") / "t"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the trainer's thread count (it restores torch's afterwards)
        assert cli.main(_tune_args(data, out)) == 0
    return out


@pytest.mark.slow
def test_study_writes_its_outputs(study_out):
    doc = json.loads((study_out / "tune.json").read_text())
    assert doc["trials"] == {"total": TRIALS, "done": TRIALS, "pruned": 0, "failed": 0, "running": 0}
    assert doc["seed"] == 0 and doc["sampler"] == "tpe" and doc["epochs_per_trial"] == EPOCHS
    assert doc["space"] == load_space(None).to_dict()
    rows = _trials(study_out)
    assert [r["trial"] for r in rows] == [str(i) for i in range(TRIALS)]
    assert all(r["state"] == "complete" and r["epochs"] == str(EPOCHS) for r in rows)
    best = rows[doc["best_trial"]]
    assert float(best["fitness"]) == doc["best_fitness"] == max(float(r["fitness"]) for r in rows)
    for row in rows:  # every trial is a train run in its own folder, with its own hyp.yaml
        folder = study_out / row["folder"]
        assert json.loads((folder / "train.json").read_text())["epochs_run"] == EPOCHS
        hyp = load_hyp(folder / "hyp.yaml")
        assert {n: getattr(hyp, n) for n in load_space(None).names} == {k: float(v) for k, v in _params([row])[0].items()}
    assert load_hyp(study_out / "best_hyp.yaml") == Hyp().replace(**doc["best_params"])
    for name in ("fitness.png", "importance.png", "parallel.png"):
        assert (study_out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_best_hyp_is_accepted_by_train(study_out, data):
    ran = run_cli("train", "--data", data, "--hyp", study_out / "best_hyp.yaml", "--imgsz", 64, "--epochs", 1,
                  "--batch-size", 8, "--workers", 0, "--device", "cpu", "--out", study_out.parent / "check",
                  env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    args = (study_out.parent / "check" / "args.yaml").read_text()
    assert "best_hyp.yaml" in args


@pytest.mark.slow
def test_the_same_command_again_runs_no_trial(study_out, data, caplog):
    stamps = {p: p.stat().st_mtime_ns for p in study_out.glob("trials/*/results.csv")}
    assert len(stamps) == TRIALS
    before = _trials(study_out)
    assert cli.main(_tune_args(data, study_out)) == 0
    assert _trials(study_out) == before
    assert {p: p.stat().st_mtime_ns for p in study_out.glob("trials/*/results.csv")} == stamps


@pytest.mark.slow
def test_a_study_cut_mid_trial_resumes_that_trial_and_ends_as_if_never_cut(tmp_path, data, study_out):
    out = tmp_path / "t"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "yolo", *_tune_args(data, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    first_epoch = out / "trials" / "0001" / "results.csv"
    deadline = time.monotonic() + 600
    while not first_epoch.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # trial 1 is in its second epoch: the trainer stops at the next step
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_SIGTERM, err[-3000:]
    doc = json.loads((out / "tune.json").read_text())
    assert doc["trials"]["running"] == 1 and doc["trials"]["done"] == 1, doc["trials"]

    again = subprocess.run([sys.executable, "-m", "yolo", *_tune_args(data, out)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trial 1: resuming" in again.stderr
    rows = _trials(out)
    assert len(rows) == TRIALS and all(r["state"] == "complete" for r in rows)
    resumed = json.loads((out / "trials" / "0001" / "train.json").read_text())
    assert resumed["resumed_from"] and resumed["epochs_run"] == EPOCHS
    # same seed, same data: the same trials as the uninterrupted study, and the same fitness
    reference = _trials(study_out)
    assert _params(rows) == _params(reference)
    assert [r["fitness"] for r in rows] == [r["fitness"] for r in reference]


# ------------------------------------------------------------------------------------------ refusals
def _config(data: Path, out: Path, *extra: str) -> tune_study.TuneConfig:
    parser = cli.build_parser("tune")
    return tune_study.config_from_args(parser.parse_args(_tune_args(data, out, *extra)[1:]))


def test_a_study_refuses_other_arguments_once_a_trial_finished(tmp_path, data):
    out = tmp_path / "t"
    out.mkdir()
    owner = str(out.resolve())
    study, _ = tune_study.open_study(_config(data, out), owner)
    failed = study.ask()  # say a mistyped --cfg failed the first trial, and another was cut off
    failed.set_user_attr("out", owner)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    study.ask().set_user_attr("out", owner)
    study, _ = tune_study.open_study(_config(data, out, "--seed", "1"), owner)  # nothing finished: taken
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"] and tune_study.counted_trials(study) == 0
    trial = study.ask()
    study.tell(trial, 0.5)
    tune_study.open_study(_config(data, out, "--seed", "1", "--trials", "10"), owner)  # more trials: same study
    with pytest.raises(UserError, match="started with another `seed`"):
        tune_study.open_study(_config(data, out), owner)
    space = tmp_path / "space.yaml"
    space.write_text("lr0: {low: 0.001, high: 0.01}\n")
    with pytest.raises(UserError, match="started with another `space`"):
        tune_study.open_study(_config(data, out, "--seed", "1", "--space", str(space)), owner)


def test_a_failing_trial_is_recorded_and_reported_in_one_line(tmp_path, data, capsys):
    out = tmp_path / "t"
    args = _tune_args(data, out)
    args[args.index("yolov5n.yaml")] = "yolov5q.yaml"
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "yolov5q.yaml" in err.splitlines()[-1], err  # after the study's info line
    assert json.loads((out / "tune.json").read_text())["trials"]["failed"] == 1


def test_one_process_per_out_folder(tmp_path, data, capsys):
    out = tmp_path / "t"
    out.mkdir()
    with tune_study._exclusive(out):
        assert cli.main(_tune_args(data, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another `yolo-pipeline tune` is running" in err


def test_bad_storage_is_one_line(tmp_path, data, capsys):
    assert cli.main(_tune_args(data, tmp_path / "t", "--storage", "nosuchdb://user:secret@host/db")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--storage" in err and "secret" not in err, err
