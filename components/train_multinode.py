"""train_multinode: the train step for nodes > 1 — a Training Operator PyTorchJob, followed to its end."""

from kfp import dsl
from kfp.dsl import Model, Output

from components import pipeline_image


@dsl.component(base_image=pipeline_image(), install_kfp_package=False)
def train_multinode(
    job: str,
    dataset_source: str,
    dataset_version: str,
    model: Output[Model],
    cfg: str = "yolov5n.yaml",
    weights: str = "",
    epochs: int = 100,
    imgsz: int = 640,
    batch_size: int = 16,
    workers: int = 8,
    checkpoint_root: str = "",
    run_key: str = "",
    extra_args: str = "",
) -> float:
    """Create the PyTorchJob (`job`: its compiled settings, JSON), follow it, hand on its best.pt.

    See components/launcher.py. Returns the best mAP50, as the one-pod train step does.
    """
    from components.launcher import train_multinode as run_step

    return run_step(job, dataset_source, dataset_version, cfg, weights, epochs, imgsz, batch_size, workers,
                    checkpoint_root, run_key, extra_args, model)  # fmt: skip
