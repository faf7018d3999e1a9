"""The stats step: label statistics per split, label plots, and a seeded, recorded anchor fit.

`yolo-pipeline stats --data D --out DIR` writes DIR/label_stats.json, DIR/labels.png,
DIR/labels_correlogram.png and DIR/anchors.json (the anchors the train step takes with --anchors).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from yolo.anchors import AutoAnchorConfig, fit_anchors, label_wh, model_anchors_px
from yolo.argtypes import float_between, int_at_least
from yolo.errors import UserError
from yolo.files import prepare_out_dir, write_json

LOG = logging.getLogger(__name__)
DEFAULT_CFG = "yolov5s.yaml"  # every P5 variant shares these anchors
PERCENTILES = (0, 5, 25, 50, 75, 95, 100)
BOXES_PER_IMAGE_BINS = (0, 1, 2, 3, 4, 5, 6, 11, 21, 51, 101)  # lower bounds; the last bin is open
COCO_SMALL, COCO_MEDIUM = 32 ** 2, 96 ** 2  # area limits in pixels (COCO's small / medium / large)
ANCHOR_FIT_SPLIT = "train"  # as upstream: anchors fit the training labels


@dataclass(frozen=True)
class StatsConfig:
    data: Path
    out: Path
    index: Path | None = None
    cfg: str | None = None
    weights: str | None = None
    anchor_fit: AutoAnchorConfig = field(default_factory=AutoAnchorConfig)


# ------------------------------------------------------------------------------------------------ statistics
def _percentiles(values: np.ndarray, decimals: int) -> dict[str, float | None]:
    if not len(values):
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": round(float(v), decimals) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES),
                                                                 strict=True)}


def _bin_names() -> list[str]:
    edges = list(BOXES_PER_IMAGE_BINS)
    names = [str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:], strict=False)]
    return names + [f"{edges[-1]}+"]


def split_statistics(shapes_hw: np.ndarray, labels: list[np.ndarray], names: list[str], imgsz: int) -> dict:
    """label_stats.json's entry for one split; sizes in pixels with the image's long side = imgsz."""
    nc = len(names)
    per_image = np.fromiter((len(lb) for lb in labels), dtype=np.int64, count=len(labels))
    boxes = np.concatenate([np.asarray(lb, np.float32).reshape(-1, 5) for lb in labels]) if len(labels) \
        else np.zeros((0, 5), np.float32)
    cls = boxes[:, 0].astype(np.int64)
    image_of = np.repeat(np.arange(len(labels)), per_image)
    instances = np.bincount(cls, minlength=nc)[:nc]
    images_with = np.bincount(np.unique(image_of * max(nc, 1) + cls) % max(nc, 1), minlength=nc)[:nc]
    wh = label_wh(shapes_hw, labels, imgsz)
    area = wh.prod(1)
    hist = np.histogram(per_image, bins=[*BOXES_PER_IMAGE_BINS, max(BOXES_PER_IMAGE_BINS[-1], per_image.max(
        initial=0)) + 1])[0]
    return {
        "images": len(labels),
        "backgrounds": int((per_image == 0).sum()),
        "instances": int(len(boxes)),
        "per_class": [{"class": c, "name": names[c], "images": int(images_with[c]), "instances": int(instances[c])}
                      for c in range(nc)],
        "boxes_per_image_hist": {"bins": _bin_names(), "images": [int(v) for v in hist]},
        "wh_percentiles": {"w": _percentiles(wh[:, 0], 2), "h": _percentiles(wh[:, 1], 2)},
        "aspect_ratio_percentiles": _percentiles(wh[:, 0] / np.maximum(wh[:, 1], 1e-9), 4),  # w / h
        "size_buckets": {"small": int((area < COCO_SMALL).sum()),
                         "medium": int(((area >= COCO_SMALL) & (area < COCO_MEDIUM)).sum()),
                         "large": int((area >= COCO_MEDIUM).sum())},
        "empty_classes": [c for c in range(nc) if instances[c] == 0],
    }


def label_statistics(splits: dict[str, Any], names: list[str], imgsz: int) -> dict:
    """label_stats.json: every split's statistics; empty_classes lists classes with no training instance."""
    stats = {name: split_statistics(ix.shapes, ix.labels, names, imgsz) for name, ix in splits.items()}
    reference = stats.get(ANCHOR_FIT_SPLIT) or next(iter(stats.values()))
    empty = [{"class": c, "name": names[c]} for c in reference["empty_classes"]]
    return {"imgsz": imgsz, "nc": len(names), "names": list(names), "splits": stats, "empty_classes": empty}


# ------------------------------------------------------------------------------------------------ model anchors
def model_anchors(cfg: str | None, weights: str | None) -> tuple[np.ndarray, list[float], str]:
    """(anchors px (nl, na*2), strides, source) of --weights W, else --cfg C, else the default cfg."""
    if weights:
        from yolo.model.checkpoint import load_checkpoint, model_from_checkpoint

        model = model_from_checkpoint(load_checkpoint(weights))
        anchors, strides = model_anchors_px(model)
        return anchors, strides, f"weights:{weights}"
    from yolo.model.cfg import load_cfg
    from yolo.model.yolo import DetectionModel

    name = cfg or DEFAULT_CFG
    model_cfg = load_cfg(name)
    model = DetectionModel(model_cfg)  # the strides come from a probe forward, as upstream
    anchors, strides = model_anchors_px(model)
    if isinstance(model_cfg.get("anchors"), int):  # `anchors: 3`: no anchors given, autoanchor must make them
        anchors = np.zeros_like(anchors)
    return anchors, strides, f"cfg:{name}"


# ------------------------------------------------------------------------------------------------ the step
def run_stats(config: StatsConfig) -> dict[str, Path]:
    """Write label_stats.json, labels.png, labels_correlogram.png and anchors.json under config.out."""
    from yolo.data.dataset import load_data_config
    from yolo.data.index import load_split
    from yolo.plots.labels import plot_correlogram, plot_labels

    data = load_data_config(config.data)
    if ANCHOR_FIT_SPLIT not in data.splits:
        raise UserError(f"{data.yaml_path}: no `{ANCHOR_FIT_SPLIT}` split to fit anchors to")
    anchors_px, strides, source = model_anchors(config.cfg, config.weights)  # bad cfg/weights: fail early
    out = prepare_out_dir(config.out)
    for name in ("label_stats.json", "anchors.json"):  # an earlier run's results must never pass for this one's
        (out / name).unlink(missing_ok=True)
    splits = {name: load_split(data, name, config.index) for name in data.splits}
    imgsz = config.anchor_fit.imgsz
    stats = label_statistics(splits, data.names, imgsz)
    train = splits[ANCHOR_FIT_SPLIT]
    for name, s in stats["splits"].items():
        LOG.info(f"stats: {name}: {s['images']} images ({s['backgrounds']} backgrounds), "
                    f"{s['instances']} instances, {len(s['empty_classes'])} classes without instances")
    fit = fit_anchors(train.shapes, train.labels, anchors_px, strides, config.anchor_fit)
    anchors_json = {**fit.to_json(), "anchors_source": source}
    paths = {"label_stats": out / "label_stats.json", "anchors": out / "anchors.json",
             "labels_png": out / "labels.png", "correlogram_png": out / "labels_correlogram.png"}
    write_json(paths["label_stats"], stats)
    boxes = np.concatenate([lb.reshape(-1, 5) for lb in train.labels]) if train.labels else np.zeros((0, 5))
    plot_labels(boxes, data.names, paths["labels_png"], seed=config.anchor_fit.seed)
    plot_correlogram(boxes, paths["correlogram_png"])
    write_json(paths["anchors"], anchors_json)
    LOG.info(f"stats: anchors ({source}) BPR {fit.bpr_before:.4f} -> {fit.bpr_after:.4f}, "
                f"{'changed' if fit.changed else 'unchanged'}; wrote {', '.join(p.name for p in paths.values())} "
                f"to {out}")
    return paths


# ------------------------------------------------------------------------------------------------ CLI












def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = AutoAnchorConfig()
    parser.add_argument("--data", type=Path, required=True, help="data.yaml (upstream YOLOv5 format)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: label_stats.json, anchors.json, labels.png, labels_correlogram.png")
    parser.add_argument("--index", type=Path, default=None, help="validate's DIR/index to reuse (optional)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--cfg", default=None, help=f"model cfg whose anchors are checked (default {DEFAULT_CFG})")
    source.add_argument("--weights", default=None, help="checkpoint whose anchors are checked")
    parser.add_argument("--imgsz", "--img-size", type=int_at_least(1), default=defaults.imgsz,
                        help="training image size: label sizes in pixels with the long side at imgsz")
    parser.add_argument("--anchor-thr", type=float_between(1, low_open=True), default=defaults.thr,
                        help="hyp anchor_t: a label fits an anchor within this width/height ratio")
    parser.add_argument("--bpr-target", type=float_between(0, 1), default=defaults.bpr_target,
                        help="evolve anchors when the best possible recall is below this")
    parser.add_argument("--generations", type=int_at_least(0), default=defaults.generations,
                        help="generations of the genetic anchor search")
    parser.add_argument("--seed", type=int_at_least(0), default=defaults.seed, help="seed of every random draw")
    parser.add_argument("--force", action="store_true", help="evolve anchors even when the BPR meets the target")


def run(args: argparse.Namespace) -> int:
    config = StatsConfig(
        data=args.data, out=args.out, index=args.index, cfg=args.cfg, weights=args.weights,
        anchor_fit=AutoAnchorConfig(imgsz=args.imgsz, thr=args.anchor_thr, bpr_target=args.bpr_target,
                                    generations=args.generations, seed=args.seed, force=args.force))
    run_stats(config)
    return 0
