"""The pipeline's parameters, once: name, type, default, check and help of each (`PARAMETERS`).

Generated from it: submit's and retrain's flags and params-file keys, run-local's flags, and the checks
every entry point runs (`check_parameters`: `python -m pipelines submit|retrain|run-local` before anything
runs, and the pipeline's first step, so a run started from the KFP UI with bad values stops before it
imports any data). Checked against it by tests/test_params_schema.py, because KFP reads them from Python
signatures: the pipeline function (pipelines/training.py) and the resolve step's component.

Submit-time code imports this module: it imports nothing that only runs inside a step's container.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components.sources import CONTROL_CHARS, check_argument, check_rev, parse_source, redact
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


# ------------------------------------------------------------------------------------ value checks
def check_gpus(gpus: int) -> None:
    if gpus not in VALID_GPUS:
        raise UserError(f"gpus={gpus}: must be one of {', '.join(map(str, VALID_GPUS))}")


def _at_least(low: int) -> Callable[[str, Any], None]:
    def check(name: str, value: int) -> None:
        if value < low:
            raise UserError(f"{name}={value}: must be >= {low}")

    return check


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name}={value}: must be in [0, 1]")


def _image_size(name: str, value: int) -> None:
    if value <= 0 or value % STRIDE:
        raise UserError(f"{name}={value}: must be a positive multiple of {STRIDE}")


def _model_name(name: str, value: str) -> None:
    if not MODEL_NAME_PATTERN.match(value):
        raise UserError(f"{name}={value!r}: use letters, digits, '.', '_' or '-' (max 63)")


def _location(name: str, value: str) -> None:
    """'' (none), s3://bucket/prefix, or a folder path (file:// allowed)."""
    check_argument(name, value)
    if not value or value.startswith("s3://"):
        if value.startswith("s3://") and not value[len("s3://") :].split("/", 1)[0]:
            raise UserError(f"{name}={redact(value)!r}: no bucket (expected s3://bucket/prefix)")
        return
    if "://" in value and not value.startswith("file://"):
        raise UserError(f"{name}={redact(value)!r}: use s3://bucket/prefix or a folder path")


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


# ------------------------------------------------------------------------------------------ schema
@dataclass(frozen=True)
class Parameter:
    """One pipeline parameter. `check(name, value)` raises UserError (one line) for a bad value."""

    name: str
    type: type  # str, int or float: what KFP declares (STRING, NUMBER_INTEGER, NUMBER_DOUBLE)
    default: Any
    help: str
    check: Callable[[str, Any], None] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "dataset_source",
        str,
        "sample:",
        "sample:[train=N,val=N,imgsz=N,seed=N] | PATH | dvc://REPO#PATH | s3://bucket/prefix",
        lambda _name, value: parse_source(value),
    ),
    Parameter(
        "dataset_rev",
        str,
        "",
        "git rev of a dvc:// source (branch, tag, SHA; '' = HEAD), resolved to a commit SHA",
        lambda _name, value: check_rev(value),
    ),
    Parameter("cfg", str, "yolov5n.yaml", "model cfg (yolov5n.yaml ... or a path)", check_argument),
    Parameter(
        "weights", str, "", "initial weights (beats cfg): a .pt path, URI or known name", check_argument
    ),
    Parameter("epochs", int, 100, "total epochs", _at_least(1)),
    Parameter("imgsz", int, 640, f"train/val image size (px), a multiple of {STRIDE}", _image_size),
    Parameter("batch_size", int, 16, "total batch size (a multiple of the train pod's GPUs)", _at_least(1)),
    Parameter("workers", int, 8, "data loader workers per training process", _at_least(0)),
    Parameter(
        "checkpoint_root",
        str,
        "",
        "checkpoint mirror: s3://bucket/prefix or a folder ('' = none); the run resumes from it",
        _location,
    ),
    Parameter(
        "registry_uri", str, "", "model registry: s3://bucket/prefix or a folder ('' = none)", _location
    ),
    Parameter(
        "min_map50", float, 0.5, "promotion floor: the least mAP50 to promote (0 accepts any finite model)", _fraction
    ),
    Parameter("max_bad_fraction", float, 0.05, "validate fails above this share of bad images", _fraction),
    Parameter("model_name", str, "yolov5", "registry name: models/<name>/v<N>/", _model_name),
    Parameter(
        "train_extra_args",
        str,
        "",
        "more `yolo train` flags, e.g. '--seed 1 --deterministic' (never one the pipeline sets)",
        lambda _name, value: check_train_extra_args(value),
    ),
)
NAMES: tuple[str, ...] = tuple(p.name for p in PARAMETERS)
DEFAULTS: dict[str, Any] = {p.name: p.default for p in PARAMETERS}


def check_parameters(gpus: int = 0, **values: Any) -> None:
    """Raise UserError (one line, the first problem) for parameters the pipeline cannot run with.

    `values` are pipeline parameters by name (a missing one takes its default); `gpus` (per train pod) is
    the compile-time option some of them depend on.
    """
    unknown = sorted(set(values) - set(NAMES))
    if unknown:
        raise TypeError(f"check_parameters: not pipeline parameters: {', '.join(unknown)}")
    values = DEFAULTS | values
    check_gpus(gpus)
    for parameter in PARAMETERS:
        if parameter.check is not None:
            parameter.check(parameter.name, values[parameter.name])
    if gpus > 1 and values["batch_size"] % gpus:
        raise UserError(
            f"batch_size={values['batch_size']}: must be a multiple of gpus={gpus} (one share per GPU)"
        )
    if not values["cfg"] and not values["weights"]:
        raise UserError("cfg and weights are both empty: give a model cfg (yolov5n.yaml ...) or weights")
