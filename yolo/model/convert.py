"""`yolo-pipeline convert`: any readable weights (upstream YOLOv5 .pt included) to this project's format."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from yolo.errors import UserError
from yolo.files import prepare_out_dir

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertConfig:
    weights: str  # local file, official name (yolov5s.pt) or URL
    out: Path  # the .pt to write (torch.load(out, weights_only=True) reads it)
    half: bool = True  # store fp16 weights, as upstream's released files do


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="upstream YOLOv5 .pt, our .pt, official name or URL")
    parser.add_argument("--out", required=True, type=Path, help="output .pt in this project's format")
    parser.add_argument("--fp32", action="store_true", help="store float32 weights instead of float16")


def run(args: argparse.Namespace) -> int:
    convert(ConvertConfig(weights=args.weights, out=args.out, half=not args.fp32))
    return 0


def convert(config: ConvertConfig) -> dict:
    """Read, rebuild (which checks weights against cfg) and write atomically; returns the written dict."""
    from yolo.engine.checkpointing import write_checkpoint
    from yolo.model.checkpoint import checkpoint_dict, load_checkpoint, model_from_checkpoint

    if config.out.is_dir():
        raise UserError(f"--out {config.out} is a folder; give the .pt file to write (e.g. {config.out / 'model.pt'})")
    prepare_out_dir(config.out.parent)  # missing or read-only: one line before the work
    ckpt = load_checkpoint(config.weights)
    model = model_from_checkpoint(ckpt)
    extra = {"source": ckpt["source"]} if isinstance(ckpt.get("source"), dict) else {}
    out = checkpoint_dict(model, half=config.half, **extra)
    write_checkpoint(config.out, out)
    LOG.info("Wrote %s (%d classes, %d tensors, %s)", config.out, len(out["names"]), len(out["model"]),
             "fp16" if config.half else "fp32")
    return out
