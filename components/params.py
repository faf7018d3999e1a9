"""Pipeline parameter checks, shared by `python -m pipelines` (before anything runs) and the pipeline's
first step (so a run submitted from the KFP UI with bad values stops before it imports any data)."""

from __future__ import annotations

from components.runtime import MODEL_NAME_PATTERN, parse_source
from yolo.errors import UserError

VALID_GPUS = (0, 1, 2, 4, 8)
STRIDE = 32  # the largest YOLOv5 stride: image sizes must be multiples of it


def check_gpus(gpus: int) -> None:
    if gpus not in VALID_GPUS:
        raise UserError(f"gpus={gpus}: must be one of {', '.join(map(str, VALID_GPUS))}")


def _check_location(name: str, value: str) -> None:
    if not value or value.startswith("s3://"):
        if value.startswith("s3://") and not value[len("s3://") :].split("/", 1)[0]:
            raise UserError(f"{name}={value!r}: no bucket (expected s3://bucket/prefix)")
        return
    if "://" in value and not value.startswith("file://"):
        raise UserError(f"{name}={value!r}: use s3://bucket/prefix or a folder path")


def check_parameters(
    dataset_source: str,
    imgsz: int,
    epochs: int,
    batch_size: int,
    gpus: int = 0,
    min_map50: float = 0.0,
    max_bad_fraction: float = 0.05,
    model_name: str = "yolov5",
    cfg: str = "yolov5n.yaml",
    weights: str = "",
    checkpoint_root: str = "",
    registry_uri: str = "",
    workers: int = 0,
) -> None:
    """Raise UserError (one line, the first problem) for parameters the pipeline cannot run with."""
    check_gpus(gpus)
    parse_source(dataset_source)
    if imgsz <= 0 or imgsz % STRIDE:
        raise UserError(f"imgsz={imgsz}: must be a positive multiple of {STRIDE}")
    if epochs < 1:
        raise UserError(f"epochs={epochs}: must be >= 1")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be >= 1")
    if gpus > 1 and batch_size % gpus:
        raise UserError(f"batch_size={batch_size}: must be a multiple of gpus={gpus} (one share per GPU)")
    if workers < 0:
        raise UserError(f"workers={workers}: must be >= 0")
    if not 0.0 <= min_map50 <= 1.0:
        raise UserError(f"min_map50={min_map50}: must be in [0, 1]")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"max_bad_fraction={max_bad_fraction}: must be in [0, 1]")
    if not MODEL_NAME_PATTERN.match(model_name):
        raise UserError(f"model_name={model_name!r}: use letters, digits, '.', '_' or '-' (max 63)")
    if not cfg and not weights:
        raise UserError("cfg and weights are both empty: give a model cfg (yolov5n.yaml ...) or weights")
    _check_location("checkpoint_root", checkpoint_root)
    _check_location("registry_uri", registry_uri)
