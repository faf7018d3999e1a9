"""Hyperparameter search: the search space (space.py), the Optuna study of train-step trials (study.py),
and what a study writes (report.py). Katib, the same search on Kubeflow, is in pipelines/katib.py."""
