"""stats: `yolo stats` → label statistics and (auto)anchors; best possible recall as metrics."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components import pipeline_image


@dsl.component(base_image=pipeline_image(), install_kfp_package=False)
def stats(
    dataset: Input[Dataset],
    index: Input[Artifact],
    label_stats: Output[Artifact],
    anchor_fit: Output[Metrics],
    cfg: str = "yolov5n.yaml",
    weights: str = "",
    imgsz: int = 640,
) -> bool:
    """label_stats.json, anchors.json, labels.png; returns whether autoanchor changed the anchors."""
    from components.runtime import stats as run_step

    return run_step(dataset, index, cfg, weights, imgsz, label_stats, anchor_fit)
