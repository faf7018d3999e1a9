"""Hyperparameter search: the search space (space.py), the Optuna study of train-step trials (study.py),
and what a study writes (report.py). Katib, the same search on Kubeflow, is in pipelines/katib.py.

The pruning rule both share (Optuna's median pruner here, Katib's medianstop there): a trial is judged
against the median of earlier trials at the same epoch once PRUNE_AFTER_TRIALS trials have finished,
and not before its first third of epochs — early fitness mostly reflects the warmup, which the search
itself varies (warmup_epochs 0..5).
"""

PRUNE_AFTER_TRIALS = 2


def first_prunable_epoch(epochs_per_trial: int) -> int:
    """The first epoch (0-based) whose fitness may prune a trial."""
    return epochs_per_trial // 3
