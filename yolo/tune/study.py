"""`yolo-pipeline tune`: a hyperparameter search whose every trial is a real run of the train step.

Optuna does the searching (samplers, pruning, a resumable study in SQLite or any database URL); this
module only decides what a trial is: the train step (`yolo.train.train`, the same function `train`
runs) in OUT/trials/NNNN with that trial's hyp.yaml, for --epochs-per-trial epochs. The trainer polls
its stop request at every epoch end, right after writing results.csv; `PruneCheck` answers that poll
by reporting the epoch's fitness to Optuna and asking to stop when the pruner calls the trial hopeless.

Interrupted and started again with the same arguments, the study continues: finished trials are never
run again, and a trial cut off mid-way is *resumed*, not failed: its folder holds the trainer's
last.pt with the same run identity, so the train step continues it at the batch it reached and ends
with the weights an uninterrupted trial would have had. Failing it instead would spend its epochs
twice and, under a fixed seed, make the study depend on when it was interrupted.

Same seed, space and data -> the same trials: each trial's sampler is seeded by (seed, trial number),
so a suggestion depends only on the finished trials before it, not on how many processes ran them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import gc
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from yolo import train as train_step
from yolo.argtypes import int_at_least
from yolo.engine.preemption import StopRequested
from yolo.errors import UserError
from yolo.files import prepare_out_dir, write_text
from yolo.hyp import Hyp, load_hyp
from yolo.tune import PRUNE_AFTER_TRIALS, first_prunable_epoch
from yolo.tune.report import best_trial, trial_dir, write_plots, write_summary
from yolo.tune.space import DEFAULT_SPACE, SearchSpace, load_space

LOG = logging.getLogger(__name__)

STUDY_NAME = "yolo-tune"
SAMPLERS = ("tpe", "random", "evolve")
TPE_STARTUP_TRIALS = 4  # random trials before TPE models the rest (Optuna's 10 is most of a short study)
EVOLVE_POPULATION = 8  # NSGA-II generation size for --sampler evolve
# train flags that tune sets per trial (or that make no sense for a trial)
_SET_BY_TUNE = {"out", "epochs", "resume", "checkpoint_uri", "tensorboard", "project", "name", "exist_ok"}


@dataclass(frozen=True)
class TuneConfig:
    """Every option of the tune step; `train` holds what every trial shares (out and hyp set per trial)."""

    out: Path
    trials: int
    epochs_per_trial: int
    space: SearchSpace
    sampler: str
    storage: str | None
    seed: int
    train: train_step.TrainConfig
    base_hyp: Hyp

    def identity(self) -> dict[str, Any]:
        """What makes two invocations the same study (--trials may grow; device and workers may change)."""
        t = self.train
        return {
            "space": self.space.to_dict(),
            "sampler": self.sampler,
            "seed": self.seed,
            "epochs_per_trial": self.epochs_per_trial,
            "base_hyp": {k: v for k, v in self.base_hyp.to_dict().items() if v is not None},
            "train": {"data": str(t.data), "cfg": t.cfg, "weights": t.weights,
                      "anchors": None if t.anchors is None else str(t.anchors),
                      **{k: getattr(t, k) for k in train_step.TrainConfig.RESULT_ARGS if k != "epochs"},
                      **{k: getattr(t, k) for k in train_step.TrainConfig.NEW_RESULT_ARGS if getattr(t, k)}},
        }  # fmt: skip

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--out", type=Path, default=Path("runs/tune"),
      help="study folder: trials/NNNN (one train run each), best_hyp.yaml, trials.csv, tune.json, plots")
    a("--trials", type=int_at_least(1), default=30, help="trials in the study in all (default 30)")
    a("--epochs-per-trial", type=int_at_least(1), default=10, help="train epochs of each trial (default 10)")
    a("--space", type=Path, help=f"search space YAML (default: upstream's evolve ranges, {DEFAULT_SPACE.name})")
    a("--sampler", choices=SAMPLERS, default="tpe",
      help="tpe (default), random, or evolve (Optuna's genetic NSGA-II; upstream train.py --evolve's role)")
    a("--storage", help="Optuna storage URL shared by parallel workers, e.g. postgresql://... "
                        "(default: sqlite:///OUT/study.db)")
    # Every train flag except those tune sets per trial: one definition, in yolo.train.
    scratch = argparse.ArgumentParser(add_help=False)
    train_step.add_arguments(scratch)
    group = parser.add_argument_group("train options (the same for every trial)")
    for action in scratch._actions:
        if action.dest in _SET_BY_TUNE:
            continue
        action.help = {
            "data": "data.yaml (upstream format)",
            "seed": "seeds the sampler and every trial's training (default 0)",
            "hyp": "base hyperparameters: the values of keys outside the search space",
        }.get(action.dest, action.help)
        group._add_action(action)


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    if args.data is None:
        raise UserError("--data is required")
    per_trial = argparse.Namespace(**vars(args))
    per_trial.epochs, per_trial.resume, per_trial.out = args.epochs_per_trial, None, None
    per_trial.checkpoint_uri, per_trial.tensorboard = None, False
    train_cfg = train_step.config_from_args(per_trial)
    return TuneConfig(
        out=args.out, trials=args.trials, epochs_per_trial=args.epochs_per_trial, space=load_space(args.space),
        sampler=args.sampler, storage=args.storage, seed=args.seed, train=train_cfg,
        base_hyp=load_hyp(train_cfg.hyp),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    return tune(config_from_args(args))


# ------------------------------------------------------------------------------------------ the study
def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("tune needs Optuna: pip install 'yolo-pipeline[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our log says what each trial did
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number`: a pure function of (seed, number), so restarts repeat it."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def make_sampler(kind: str, seed: int):
    optuna = _optuna()
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=EVOLVE_POPULATION)


def open_study(cfg: TuneConfig, owner: str):
    """The study in cfg's storage (created on first use), checked to be this configuration's. A study
    without a finished trial (say its first trial failed on a mistyped --cfg) takes the new arguments;
    `owner`'s cut-off trials from the old ones are failed."""
    optuna = _optuna()
    from sqlalchemy.engine import make_url  # optuna's own dependency

    try:
        shown = make_url(cfg.storage_url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any unparsable URL
        raise UserError(f"--storage {cfg.storage!r}: not a database URL (e.g. sqlite:///study.db)") from None
    try:
        study = optuna.create_study(
            study_name=STUDY_NAME, storage=cfg.storage_url, direction="maximize", load_if_exists=True,
            pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS,
                                               n_warmup_steps=first_prunable_epoch(cfg.epochs_per_trial)),
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - driver missing, server unreachable, not a database, ...
        raise UserError(f"--storage {shown}: cannot open the study ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    wanted = cfg.identity()
    found = study.user_attrs.get("identity")
    if found is None:
        study.set_user_attr("identity", wanted)
    elif found != wanted:
        key = next(k for k in wanted if found.get(k) != wanted.get(k))
        states = optuna.trial.TrialState
        if any(t.state in (states.COMPLETE, states.PRUNED) for t in study.get_trials(deepcopy=False)):
            raise UserError(f"study {STUDY_NAME!r} in {shown} was started with another `{key}`; "
                            f"use another --out (or --storage) for a new study")
        for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            if t.user_attrs.get("out") == owner:
                study.tell(t.number, state=states.FAIL)
        study.set_user_attr("identity", wanted)
        LOG.warning(f"study {STUDY_NAME!r} had no finished trial: continuing it with the new `{key}`")
    return study, shown


def counted_trials(study) -> int:
    """Trials that count toward --trials: all but failed ones. A failure stops the process that met it
    (the error is the user's to see); the same command then runs a new trial in its place."""
    failed = _optuna().trial.TrialState.FAIL
    return sum(t.state != failed for t in study.get_trials(deepcopy=False))


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One tune process per --out, so a RUNNING trial recorded for it belongs to a process that died."""
    with open(out / ".tune.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `yolo-pipeline tune` is running with --out {out}") from None
        yield


def tune(cfg: TuneConfig) -> int:
    """Run (or continue) the study until it holds cfg.trials trials; write the outputs. Returns the exit code."""
    optuna = _optuna()
    if not Path(cfg.train.data).is_file():  # before the study records this path in its identity
        raise UserError(f"--data {cfg.train.data}: no such file")
    out = prepare_out_dir(cfg.out)
    owner = str(out.resolve())
    # SIGTERM/SIGINT between trials stops the study there; during a trial the trainer's own handler
    # (PruneCheck) stops the trial at the next step and leaves it to be resumed
    with _exclusive(out), StopRequested() as between_trials:
        study, shown = open_study(cfg, owner)
        LOG.info(f"study {STUDY_NAME!r} in {shown}: {counted_trials(study)} of {cfg.trials} trial(s) so far, "
                 f"sampler {cfg.sampler}, seed {cfg.seed}, {len(cfg.space.params)} hyperparameters")
        running = optuna.trial.TrialState.RUNNING
        while not between_trials.requested:
            stale = [t for t in study.get_trials(deepcopy=False, states=(running,)) if t.user_attrs.get("out") == owner]
            if stale:  # cut off by an earlier process: resume it in its folder
                frozen = stale[0]
                trial = optuna.trial.Trial(study, frozen._trial_id)
                values, reported = dict(frozen.params), set(frozen.intermediate_values)
                spent = float(frozen.user_attrs.get("seconds", 0.0))
                LOG.info(f"trial {frozen.number}: resuming (it was cut off mid-way)")
            elif counted_trials(study) >= cfg.trials:
                break
            else:
                study.sampler = make_sampler(cfg.sampler, trial_seed(cfg.seed, len(study.trials)))
                trial = study.ask()
                trial.set_user_attr("out", owner)
                values, reported, spent = cfg.space.suggest(trial), set(), 0.0
            try:
                code = run_trial(study, trial, values, reported, spent, cfg, out)
            finally:  # also after a failed trial: tune.json says so
                write_summary(study, cfg, out, shown)
            if code:
                return code
            gc.collect()  # the finished trial's model and loaders, before the next one allocates its own
        if between_trials.requested:
            LOG.warning("stopped between trials: run the same command to continue the study")
            return between_trials.exit_code
        write_summary(study, cfg, out, shown)
        write_plots(study, cfg, out)
    return 0


# ------------------------------------------------------------------------------------------ one trial
class PruneCheck(StopRequested):
    """The trainer's stop request, extended: at each epoch end report the epoch's fitness to the trial
    and stop when the pruner says so. SIGTERM/SIGINT still stop the trial as they stop `train`."""

    def __init__(self, trial, results_csv: Path, reported: set[int]) -> None:
        super().__init__()
        self.trial, self.results_csv, self.reported = trial, results_csv, reported
        self.pruned_epoch: int | None = None

    def poll(self, epoch: int, iteration: int) -> bool:
        if self.requested:
            return True
        if iteration == 0 and epoch > 0:  # epoch-1 has just ended; its row is in results.csv
            self.report_epochs()
            if self.trial.should_prune():
                self.pruned_epoch = epoch - 1
                return True
        return False

    def report_epochs(self) -> None:
        """Report every validated epoch in results.csv not reported yet (also those before a resume)."""
        try:
            with open(self.results_csv, newline="") as f:
                rows = list(csv.DictReader(f))
        except FileNotFoundError:
            return
        for row in rows:
            epoch, fitness = int(row["epoch"]), row.get("fitness", "")
            if fitness != "" and epoch not in self.reported:
                self.trial.report(float(fitness), epoch)
                self.reported.add(epoch)


def run_trial(study, trial, values: dict[str, float], reported: set[int], spent: float, cfg: TuneConfig,
              out: Path) -> int:
    """Train one trial and tell the study how it ended; non-zero when the run was interrupted.
    `reported`: epochs already reported, `spent`: seconds already spent (by a run cut off earlier)."""
    optuna = _optuna()
    folder = trial_dir(out, trial.number)
    folder.mkdir(parents=True, exist_ok=True)
    hyp = cfg.space.hyp_for(cfg.base_hyp, values)
    hyp_path = folder / "hyp.yaml"
    write_text(hyp_path, yaml.safe_dump({k: v for k, v in hyp.to_dict().items() if v is not None}, sort_keys=False))
    check = PruneCheck(trial, folder / "results.csv", reported)
    started = time.perf_counter()
    try:
        result = train_step.train(replace(cfg.train, out=folder, hyp=hyp_path), stop=check)
    except Exception:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)  # the error itself goes to the user
        raise
    seconds = time.perf_counter() - started
    trial.set_user_attr("seconds", round(spent + seconds, 3))
    check.report_epochs()
    if result.exit_code != 0 and check.pruned_epoch is None:
        LOG.warning(f"trial {trial.number} interrupted: run the same command to resume it and finish the study")
        return result.exit_code
    if check.pruned_epoch is not None:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        what = (f"pruned after epoch {check.pruned_epoch} (fitness below the median of earlier trials "
                f"at that epoch)")
    else:
        fitness = float(result.best["fitness"]) if result.best else 0.0
        study.tell(trial, fitness)
        what = f"fitness {fitness:.4f}"
    best = best_trial(study)
    LOG.info(f"trial {trial.number}: {what} in {seconds:.0f} s; {counted_trials(study)} of {cfg.trials} done"
             + (f", best: trial {best.number} ({best.value:.4f})" if best else ""))
    return 0
