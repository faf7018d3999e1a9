"""Pipeline parameter checks, shared by `python -m pipelines` (before anything runs) and the pipeline's
first step (so a run submitted from the KFP UI with bad values stops before it imports any data)."""

from __future__ import annotations

import re
import shlex

from components.sources import CONTROL_CHARS, check_argument, parse_source, redact
from yolo.errors import UserError

VALID_GPUS = (0, 1, 2, 4, 8)
STRIDE = 32  # the largest YOLOv5 stride: image sizes must be multiples of it
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# `yolo train` flags the train step sets from the pipeline's parameters and artifacts (and --resume: the
# step resumes through the checkpoint URI it sets). train_extra_args may add flags, never replace these:
# otherwise a parameter could send outputs, checkpoints or uploads somewhere the run's parameters do not say.
PIPELINE_TRAIN_FLAGS = (
    "--data",
    "--out",
    "--index",
    "--anchors",
    "--epochs",
    "--imgsz",
    "--img",
    "--img-size",
    "--batch-size",
    "--device",
    "--workers",
    "--data-version",
    "--weights",
    "--cfg",
    "--checkpoint-uri",
    "--resume",
)


def reserved_flags_given(args: list[str], reserved: tuple[str, ...]) -> list[str]:
    """The flags of `reserved` that `args` sets (as `--flag VALUE` or `--flag=VALUE`)."""
    return [a.split("=", 1)[0] for a in args if a.split("=", 1)[0] in reserved]


def check_train_extra_args(text: str) -> list[str]:
    """train_extra_args split like a shell would; UserError for a flag the pipeline sets itself."""
    if CONTROL_CHARS.search(text):
        raise UserError("train_extra_args: control characters (newline, tab, ...) are not allowed")
    try:
        args = shlex.split(text)
    except ValueError as e:
        raise UserError(f"train_extra_args {redact(text)!r}: {e}") from None
    clashes = reserved_flags_given(args, PIPELINE_TRAIN_FLAGS)
    if clashes:
        raise UserError(
            f"train_extra_args: {', '.join(clashes)} is set by the pipeline (from its parameters); "
            "use the pipeline parameter instead"
        )
    return args


def check_gpus(gpus: int) -> None:
    if gpus not in VALID_GPUS:
        raise UserError(f"gpus={gpus}: must be one of {', '.join(map(str, VALID_GPUS))}")


def _check_location(name: str, value: str) -> None:
    check_argument(name, value)
    if not value or value.startswith("s3://"):
        if value.startswith("s3://") and not value[len("s3://") :].split("/", 1)[0]:
            raise UserError(f"{name}={redact(value)!r}: no bucket (expected s3://bucket/prefix)")
        return
    if "://" in value and not value.startswith("file://"):
        raise UserError(f"{name}={redact(value)!r}: use s3://bucket/prefix or a folder path")


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
    train_extra_args: str = "",
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
    for name, value in (("cfg", cfg), ("weights", weights)):
        check_argument(name, value)
    _check_location("checkpoint_root", checkpoint_root)
    _check_location("registry_uri", registry_uri)
    check_train_extra_args(train_extra_args)
