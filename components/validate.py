"""validate: `yolo validate` → the verified index (report.json, index/) and report.md as Markdown."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Output

from components import pipeline_image


@dsl.component(base_image=pipeline_image(), install_kfp_package=False)
def validate(
    dataset: Input[Dataset],
    index: Output[Artifact],
    report: Output[Markdown],
    summary: Output[Metrics],
    max_bad_fraction: float = 0.05,
    workers: int = 0,
) -> bool:
    """Verify every image and label; fails the run when the dataset is unusable. Returns report.ok."""
    from components.runtime import validate as run_step

    return run_step(dataset, max_bad_fraction, workers, index, report, summary)
