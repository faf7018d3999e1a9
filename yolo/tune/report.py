"""What a study leaves in --out: best_hyp.yaml, trials.csv, tune.json, and three PNG plots.

The summary files are rewritten after every trial (an interrupted study still shows what it found);
the plots, which cost seconds each, once at the end.
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import yaml

from yolo.files import atomic_path, write_json, write_text

LOG = logging.getLogger(__name__)

PARALLEL_MAX_PARAMS = 8  # a parallel-coordinate plot of more axes than this cannot be read


def _states():
    import optuna

    return optuna.trial.TrialState


def trial_dir(out: Path, number: int) -> Path:
    """The folder of trial `number`: the train step's --out for that trial."""
    return out / "trials" / f"{number:04d}"


def _folder(number: int) -> str:
    return str(trial_dir(Path("."), number))


def counts(study) -> dict[str, int]:
    """Trials by how they ended: done (complete), pruned, failed, running (cut off or in progress)."""
    s = _states()
    trials = study.get_trials(deepcopy=False)
    by = {state: sum(t.state == state for t in trials) for state in s}
    return {"total": len(trials), "done": by[s.COMPLETE], "pruned": by[s.PRUNED], "failed": by[s.FAIL],
            "running": by[s.RUNNING]}  # fmt: skip


def best_trial(study):
    """The complete trial with the highest fitness (the lowest number among equals), or None."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == _states().COMPLETE]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def write_summary(study, cfg, out: Path, storage_shown: str) -> None:
    """trials.csv, tune.json and (once a trial completed) best_hyp.yaml."""
    names = cfg.space.names
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial", "state", "fitness", "epochs", "seconds", "folder", *names])
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.value is not None else (t.intermediate_values[t.last_step] if t.last_step is not None else "")
        writer.writerow([t.number, t.state.name.lower(), value, len(t.intermediate_values),
                         t.user_attrs.get("seconds", ""), _folder(t.number), *(t.params.get(n, "") for n in names)])
    write_text(out / "trials.csv", buf.getvalue())

    best = best_trial(study)
    doc: dict[str, Any] = {
        "study": study.study_name,
        "storage": storage_shown,
        "sampler": cfg.sampler,
        "seed": cfg.seed,
        "epochs_per_trial": cfg.epochs_per_trial,
        "trials_wanted": cfg.trials,
        "trials": counts(study),
        "best_trial": best.number if best else None,
        "best_fitness": best.value if best else None,
        "best_params": dict(best.params) if best else None,
        "best_folder": _folder(best.number) if best else None,
        "space_file": cfg.space.source,
        "space": cfg.space.to_dict(),
    }
    write_json(out / "tune.json", doc)
    if best is not None:
        hyp = cfg.space.hyp_for(cfg.base_hyp, best.params)
        header = (f"# best of {doc['trials']['done']} complete trial(s) of study {study.study_name!r}: trial "
                  f"{best.number}, fitness {best.value:.6g} ({cfg.epochs_per_trial} epochs). "
                  f"Use: yolo-pipeline train --hyp best_hyp.yaml ...\n")
        body = yaml.safe_dump({k: v for k, v in hyp.to_dict().items() if v is not None}, sort_keys=False)
        write_text(out / "best_hyp.yaml", header + body)


def write_plots(study, cfg, out: Path) -> list[Path]:
    """fitness.png, importance.png, parallel.png; a plot that cannot be drawn is a warning, never a failure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    written = []
    for name, draw in (("fitness.png", _plot_fitness), ("importance.png", _plot_importance),
                       ("parallel.png", _plot_parallel)):  # fmt: skip
        try:
            if draw(study, cfg, out / name):
                written.append(out / name)
        except Exception as e:  # noqa: BLE001 - a plot must never fail the study
            LOG.warning(f"{name} not drawn: {type(e).__name__}: {e}")
    return written


def _save(fig, path: Path) -> bool:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    plt.close(fig)
    return True


def _plot_fitness(study, cfg, path: Path) -> bool:
    """Fitness of every trial (pruned ones at their last reported epoch) and the best so far."""
    import matplotlib.pyplot as plt

    s = _states()
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [t for t in study.get_trials(deepcopy=False) if t.state == s.COMPLETE]
    pruned = [t for t in study.get_trials(deepcopy=False) if t.state == s.PRUNED and t.last_step is not None]
    if not done and not pruned:
        plt.close(fig)
        return False
    ax.scatter([t.number for t in done], [t.value for t in done], label="complete", zorder=3)
    ax.scatter([t.number for t in pruned], [t.intermediate_values[t.last_step] for t in pruned],
               marker="x", color="tab:orange", label="pruned (last epoch reported)", zorder=3)
    best, xs, ys = None, [], []
    for t in sorted(done, key=lambda t: t.number):
        best = t.value if best is None else max(best, t.value)
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness (0.1 mAP50 + 0.9 mAP50-95)")
    ax.set_title(f"{len(done)} complete, {len(pruned)} pruned; sampler {cfg.sampler}, seed {cfg.seed}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def importances(study) -> dict[str, float]:
    """Hyperparameter importance by PED-ANOVA (Optuna's evaluator that needs no scikit-learn)."""
    import optuna

    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    with warnings.catch_warnings():  # equal fitness everywhere: equal shares, which the plot title says
        warnings.simplefilter("ignore", UserWarning)
        return optuna.importance.get_param_importances(study, evaluator=evaluator)


def _plot_importance(study, cfg, path: Path) -> bool:
    import matplotlib.pyplot as plt

    scores = importances(study)
    if not scores:
        return False
    names = list(scores)[::-1]  # most important on top
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(names) + 1)))
    ax.barh(names, [scores[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (PED-ANOVA, share of the total)")
    equal = len(set(scores.values())) == 1
    ax.set_title("all equal: the trials' fitness did not separate them" if equal
                 else "which hyperparameters decided the fitness")
    return _save(fig, path)


def _plot_parallel(study, cfg, path: Path) -> bool:
    """Parallel coordinates of the complete trials over the most important hyperparameters."""
    import matplotlib.pyplot as plt
    import numpy as np

    done = [t for t in study.get_trials(deepcopy=False) if t.state == _states().COMPLETE]
    if len(done) < 2:
        return False
    try:
        names = list(importances(study))[:PARALLEL_MAX_PARAMS]
    except Exception:  # noqa: BLE001 - importance needs varied results; fall back to the file's order
        names = []
    names = names or cfg.space.names[:PARALLEL_MAX_PARAMS]
    lows = {p.name: p for p in cfg.space.params}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 2), 4.5))
    values = np.array([t.value for t in done])
    span = float(values.max() - values.min()) or 1.0
    cmap = plt.get_cmap("viridis")
    for t in sorted(done, key=lambda t: t.value):
        ys = []
        for n in names:
            p, v = lows[n], float(t.params[n])
            lo, hi = (min(p.choices), max(p.choices)) if p.choices is not None else (p.low, p.high)
            if p.log:
                lo, hi, v = np.log10(lo), np.log10(hi), np.log10(v)
            ys.append((v - lo) / (hi - lo) if hi > lo else 0.5)
        ax.plot(range(len(names)), ys, color=cmap((t.value - values.min()) / span), alpha=0.8)
    ax.set_xticks(range(len(names)), [f"{n}{' (log)' if lows[n].log else ''}" for n in names],
                  rotation=30, ha="right")
    ax.set_ylabel("position in its range (0 = low, 1 = high)")
    ax.set_title("complete trials; colour = fitness (yellow best)")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(values.min(), values.min() + span))
    fig.colorbar(sm, ax=ax, label="fitness")
    return _save(fig, path)
