"""evaluate: `yolo evaluate` → metrics, confusion matrix, and the promotion gate vs the current model."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import pipeline_image


@dsl.component(base_image=pipeline_image(), install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    index: Input[Artifact],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    imgsz: int = 640,
    batch_size: int = 32,
    min_map50: float = 0.5,
    registry_uri: str = "",
    model_name: str = "yolov5",
) -> bool:
    """Evaluate on val; the baseline is registry_uri's models/<name>/current.json. Returns promote."""
    from components.runtime import evaluate as run_step

    return run_step(
        dataset,
        index,
        model,
        imgsz,
        batch_size,
        min_map50,
        registry_uri,
        model_name,
        evaluation,
        metrics,
        confusion,
    )
