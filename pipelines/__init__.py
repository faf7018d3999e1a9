"""The Kubeflow training pipeline and `python -m pipelines` (compile, run-local)."""
