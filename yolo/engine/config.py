"""The train step's typed configuration: every option, its flag, and the checks that need no model.

`TrainConfig` is what a run is asked to do (upstream train.py's spelling and defaults); the flags live
beside it (`add_arguments`) so they cannot drift apart; `validate_config` refuses a bad combination
before anything is built (the image size against the stride first).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from yolo.argtypes import float_between, int_at_least
from yolo.engine.optim import OPTIMIZERS
from yolo.errors import UserError
from yolo.imgsz import MAX_STRIDE, require_stride_multiple
from yolo.redact import strip_credentials
from yolo.storage import open_storage

RUN_ID_PLACEHOLDER = "{run_id}"
AUTOBATCH_LINE = ("--batch-size -1: autobatch needs a GPU to measure memory and is not built here; pass a batch "
                  "size (upstream's autobatch targets 60% of GPU memory)")  # in --checkpoint-uri: replaced by the run identity


@dataclass
class TrainConfig:
    """Every option of the train step (upstream train.py spelling and defaults)."""

    data: Path | None = None
    out: Path | None = None  # None: PROJECT/NAME with increment (yolo.engine.run_folders)
    project: Path = Path("runs/train")
    name: str = "exp"
    exist_ok: bool = False
    cfg: str | None = None
    weights: str | None = None
    anchors: Path | None = None
    autoanchor: bool = False  # off by default: the pipeline fits anchors in its stats step (see --autoanchor)
    multi_scale: bool = False
    save_period: int = -1
    hyp: Path | None = None
    epochs: int = 100
    batch_size: int = 16
    imgsz: int = 640
    device: str | None = ""
    workers: int | None = 8
    optimizer: str = "SGD"
    cos_lr: bool = False
    label_smoothing: float = 0.0
    patience: int = 100
    freeze: list[int] = field(default_factory=lambda: [0])
    cache: str | None = "auto"  # decoded images in RAM when they fit (see the flag); None: decode every time
    rect: bool = False
    image_weights: bool = False
    quad: bool = False
    single_cls: bool = False
    noval: bool = False
    seed: int = 0
    deterministic: bool = False
    index: Path | None = None
    data_version: str | None = None
    tensorboard: bool = False
    checkpoint_uri: str | None = None
    checkpoint_every: float | None = None  # minutes between mid-epoch last.pt; None: yolo.engine.mirror's default
    resume: str | None = None  # None: automatic; "": this run's own last.pt; else a DIR, file or URI
    sync_bn: bool = False
    trust_unverified: bool = False  # resume from a stored last.pt without a recorded SHA-256
    epochs_given: bool = True  # False when --epochs was left at its default (resume keeps the run's own)

    # Arguments that decide the result; the run identity hashes these (plus data, cfg, hyp).
    RESULT_ARGS = (
        "epochs", "batch_size", "imgsz", "optimizer", "cos_lr", "label_smoothing", "patience", "freeze",
        "rect", "image_weights", "quad", "single_cls", "noval", "seed", "deterministic", "autoanchor", "sync_bn",
    )  # fmt: skip
    # Added later: hashed only when set, so that the identities of runs started before them do not change.
    NEW_RESULT_ARGS = ("multi_scale",)

    def to_dict(self) -> dict[str, Any]:
        """Plain, secret-free dict (args.yaml, checkpoints): paths as strings, credentials stripped."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        if d["checkpoint_uri"]:
            d["checkpoint_uri"] = strip_credentials(d["checkpoint_uri"])
        d.pop("epochs_given")
        return d


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = parser.add_argument
    a("--data", type=Path, help="data.yaml (upstream format); optional with --resume")
    a("--out", type=Path, help="run folder, used exactly as given (the pipeline's way); a best.pt already there "
                               "is never replaced (refused unless the run resumes). Default: --project/--name")
    a("--project", type=Path, default=d.project, help=f"parent of the run folders (default {d.project})")
    a("--name", default=d.name, help=f"run folder name under --project: NAME, NAME2, ... (default {d.name})")
    a("--exist-ok", action="store_true", help="reuse --project/--name instead of picking the next NAME<n>")
    a("--cfg", help="model cfg (yolov5n.yaml ... or a path); default: the --weights' cfg, else yolov5n.yaml")
    a("--weights", help="initial weights: our .pt, an upstream YOLOv5 .pt, or a known name. Default: none, from "
                        "scratch (upstream fine-tunes yolov5s.pt; here nothing is downloaded unless named)")
    a("--anchors", type=Path, help="anchors.json from the stats step (beats --cfg's and the checkpoint's)")
    anchor_flags = parser.add_mutually_exclusive_group()
    anchor_flags.add_argument(
        "--autoanchor", action="store_true",
        help="check anchor fit on the training labels and evolve if poor. Off by default, unlike upstream: the "
             "pipeline fits anchors in its stats step (--anchors anchors.json), visibly and once")
    anchor_flags.add_argument("--noautoanchor", action="store_true",
                              help="do not check anchors (the default here; accepted for upstream commands)")
    a("--multi-scale", action="store_true", help="each batch at a random size in 0.5-1.5x --imgsz (stride multiple)")
    a("--save-period", type=int, default=d.save_period, metavar="N",
      help="also save weights/epochN.pt every N epochs (default -1: off)")
    a("--hyp", type=Path, help="hyperparameter yaml (default: upstream hyp.scratch-low values)")
    a("--epochs", type=int_at_least(1), default=None, help=f"total epochs (default {d.epochs})")
    a("--batch-size", type=batch_size_arg, default=d.batch_size,
      help=f"total batch size for all processes (default {d.batch_size}); -1: autobatch (GPU only)")
    a("--imgsz", "--img", "--img-size", type=int_at_least(1), default=d.imgsz, help="train/val image size (px)")
    a("--device", help="cpu, 0, 0,1 ... (default: first GPU if any, else cpu)")
    a("--workers", type=int_at_least(0), help=f"loader workers per process, at most (default {d.workers})")
    a("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimizer")
    a("--cos-lr", action="store_true", help="cosine one-cycle lr schedule (default linear)")
    a("--label-smoothing", type=float_between(0, 1, high_open=True), default=d.label_smoothing,
      help="class label smoothing epsilon")
    a("--patience", type=int_at_least(0), default=d.patience, help="epochs without improvement before stopping")
    a("--freeze", type=int_at_least(0), nargs="+", default=d.freeze,
      help="freeze the first N layers (one number) or the listed layer indices")
    a("--cache", nargs="?", const="ram", choices=("auto", "ram", "disk", "off"), default="auto",
      help="decoded images: auto (default: RAM when they need <= 25%% of free memory; on a 2-core machine "
           "decoding is half the loader's work), ram (what a bare --cache means, as upstream), disk, off")
    a("--rect", action="store_true", help="rectangular training batches")
    a("--image-weights", action="store_true", help="sample images weighted by class difficulty")
    a("--quad", action="store_true", help="quad collate (4 images per 2x-size image)")
    a("--single-cls", action="store_true", help="train every class as one")
    a("--noval", action="store_true", help="validate only after the last epoch")
    a("--seed", type=int, default=d.seed, help="global training seed")
    a("--deterministic", action="store_true", help="deterministic algorithms (exact resume on CPU)")
    a("--index", type=Path, help="validate step's DIR/index to reuse")
    a("--data-version", help="opaque data version label recorded in outputs (a DVC md5, a git SHA)")
    a("--tensorboard", action="store_true", help="log to OUT/tensorboard (needs the tensorboard extra)")
    a("--checkpoint-uri", help="mirror checkpoints to s3://bucket/prefix (or a folder) and resume from it; "
                               "{run_id} in it becomes the run identity (ROOT/{run_id}: restarts resume)")
    a("--resume", nargs="?", const="", default=None, metavar="DIR|URI",
      help="continue a run: its folder, last.pt or s3:// URI (no value: --out / --checkpoint-uri)")
    a("--checkpoint-every", type=float_between(0), metavar="MINUTES",
      help="also write last.pt mid-epoch every MINUTES (0: off; default 10 with a remote --checkpoint-uri, else off)")
    a("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (GPU only)")
    a("--trust-unverified", action="store_true",
      help="resume from a stored last.pt that has no recorded SHA-256 (rewritten by another tool)")


def batch_size_arg(text: str) -> int:
    value = int_at_least(-1)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1 (or -1 for autobatch)")
    return value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags. Options --resume may change are None when not given, so a resumed
    run keeps its own values; `out` stays None here and is settled by the resume logic."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["epochs_given"] = args.epochs is not None
    values.pop("noautoanchor", None)  # the default; exclusive with --autoanchor (argparse checks)
    if values.get("cache") == "off":
        values["cache"] = None
    defaults = TrainConfig()
    for name in ("epochs", "device", "workers"):
        if values.get(name) is None and args.resume is None:
            values[name] = getattr(defaults, name)
    return TrainConfig(**values)


def validate_config(cfg: TrainConfig, world_size: int) -> None:
    """The checks that need neither data nor model, before anything is built (a bad --imgsz fails before
    anchors are rescaled or the loss is scaled; the model's own stride is checked again once built)."""
    require_stride_multiple(cfg.imgsz, MAX_STRIDE)
    if cfg.batch_size == -1:
        raise UserError(AUTOBATCH_LINE)
    if cfg.checkpoint_uri:
        # parsed only (no network): credentials, `..` or reserved segments are refused before any work
        open_storage(cfg.checkpoint_uri.replace(RUN_ID_PLACEHOLDER, "0" * 16))
    if cfg.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes "
                        f"({world_size})")
    if cfg.resume is not None and cfg.weights:
        raise UserError("--weights cannot be combined with --resume: the run continues from its last.pt")

