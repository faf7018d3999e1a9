"""train: `yolo train` (torchrun when gpus > 1), checkpoints mirrored under checkpoint_root/{run identity}."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import pipeline_image


@dsl.component(base_image=pipeline_image(), install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    index: Input[Artifact],
    label_stats: Input[Artifact],
    model: Output[Model],
    cfg: str = "yolov5n.yaml",
    weights: str = "",
    epochs: int = 100,
    imgsz: int = 640,
    batch_size: int = 16,
    gpus: int = 0,
    workers: int = 8,
    checkpoint_root: str = "",
    run_key: str = "",
    extra_args: str = "",
) -> float:
    """Train; the Model artifact holds best.pt, train.json, results.csv. Returns the best mAP50.

    With checkpoint_root set, last.pt/best.pt go to checkpoint_root/<run identity> every epoch; a retried pod
    of the same pipeline run finds them there and resumes (the train step's run identity makes that safe).
    """
    from components.runtime import train as run_step

    return run_step(
        dataset,
        index,
        label_stats,
        cfg,
        weights,
        epochs,
        imgsz,
        batch_size,
        gpus,
        workers,
        checkpoint_root,
        run_key,
        extra_args,
        model,
    )
