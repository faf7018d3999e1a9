"""The evaluate step: upstream-equal mAP on a split, reports, plots, COCO export and a promotion gate.

`evaluate_model` is the reusable core (the trainer calls it every epoch with its EMA model); `run` is
the CLI step around it: load weights and data, evaluate, write every output, decide the gate.

Numbers follow upstream val.py exactly: rect batches grouped at --batch-size (pad 0.5), upstream's
resize + letterbox, NMS (multi-label, conf 0.001, IoU 0.6), matching and AP in `yolo.metrics`.
Inference may run in smaller micro-batches of the same padded shape (much faster on CPU); the shapes,
and therefore the numbers, depend only on --batch-size and --imgsz.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from yolo.backend import Backend, load_backend, on_onnxruntime
from yolo.boxes import box_iou, non_max_suppression, scale_boxes, xywh2xyxy, xywhn2xyxy, xyxy2xywhn
from yolo.data.dataset import load_data_config
from yolo.data.image import letterbox, read_image, resize_long_side
from yolo.data.index import dataset_fingerprint_of, load_split
from yolo.data.rect import rect_batches
from yolo.device import cpu_threads, select_device
from yolo.engine.nonfinite import refuse_nonfinite_model
from yolo.errors import UserError
from yolo.files import prepare_out_dir, write_json, write_text
from yolo.imgsz import MAX_STRIDE, require_stride_multiple
from yolo.metrics import IOU_THRESHOLDS, ClassAP, ConfusionMatrix, ap_per_class, fitness, match_predictions
from yolo.plots.processes import PlotProcesses
from yolo.tta import augmented

LOG = logging.getLogger(__name__)
SPLITS = ("val", "test", "train")
# Everything the step writes besides plots, results last (removed at the start of a run, written at its end)
OUTPUTS = ("per_class.csv", "pr_curve.csv", "confusion_matrix.json", "predictions.json", "image_ids.json",
           "metrics.json", "gate.json")
VAL_BATCH_PLOTS = 3  # val_batch0..2_{labels,pred}.jpg, as upstream
VAL_BATCH_IMAGES = 16  # the images of a batch those plots show (upstream's plot_images max_subplots)
PR_CSV_POINTS = 101
TASKS = ("val", "test", "speed", "study")
VERBOSE_CLASSES = 50  # upstream prints per-class rows with --verbose or fewer classes than this  # the COCO recall grid AP is integrated on


# ------------------------------------------------------------------------------------------ configs
@dataclass
class EvalConfig:
    """What decides the numbers (imgsz ... single_cls) and what only decides the speed (the rest)."""

    imgsz: int = 640
    batch_size: int = 32  # rect grouping, as upstream val.py's --batch-size
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    single_cls: bool = False
    augment: bool = False  # test-time augmentation (yolo.tta), as upstream val.py --augment
    micro_batch: int = 0  # images per forward inside a rect batch; 0 = auto (CPU 4, else whole batch)
    workers: int = 4  # image-decoding threads
    channels_last: bool = True  # channels_last inputs on CPU (+20-30% there)
    collect_predictions: bool = False  # keep COCO-format detections for predictions.json


@dataclass
class ClassResult:
    class_id: int
    name: str
    images: int  # images with at least one label of this class
    instances: int
    precision: float
    recall: float
    map50: float
    map50_95: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("class_id")
        return d


@dataclass
class ValBatch:
    """The first images of one evaluated batch and their detections: what val_batch{k}_*.jpg draw."""

    k: int
    shape: tuple[int, int]  # the batch's padded (h, w)
    samples: list  # _Sample, at most VAL_BATCH_IMAGES
    detections: list[torch.Tensor]  # (n, 6) per sample, on the CPU


@dataclass
class EvalResult:
    """Totals, per class (classes that have labels), speeds; curves and matrix for reports and plots."""

    precision: float
    recall: float
    map50: float
    map50_95: float
    fitness: float
    images: int
    instances: int
    speed_ms: dict[str, float]  # per image: preprocess, inference, nms
    per_class: list[ClassResult]
    maps: np.ndarray  # (nc,) mAP50-95 per class, classes without labels get the mean (upstream `maps`)
    class_ap: ClassAP | None  # None when the split has no labels
    confusion: ConfusionMatrix
    names: list[str]
    predictions: list[dict] = field(default_factory=list)  # COCO results, when collected
    image_ids: dict[str, int | str] = field(default_factory=dict)  # file -> COCO image_id
    nonfinite_images: int = 0  # images whose raw outputs held NaN/inf (NMS silently drops those)
    losses: list[float] | None = None  # mean val box/obj/cls losses (train's validation only)
    val_batches: list[ValBatch] = field(default_factory=list)  # what val_batch*.jpg show (with plots=True)

    def totals(self) -> dict[str, float | int]:
        return {
            "precision": self.precision, "recall": self.recall, "map50": self.map50,
            "map50_95": self.map50_95, "fitness": self.fitness, "images": self.images,
            "instances": self.instances,
        }


# ------------------------------------------------------------------------------------------ loading
@dataclass
class _Sample:
    image: np.ndarray  # (3, H, W) uint8 RGB
    labels: np.ndarray  # (k, 5) float32 [class, cx, cy, w, h] normalised to the letterboxed image
    shape0: tuple[int, int]  # original (h, w)
    ratio_pad: tuple[tuple[float, float], tuple[float, float]]  # ((h/h0, w/w0), (padw, padh))


def _load_sample(index, i: int, imgsz: int, batch_shape: tuple[int, int], single_cls: bool) -> _Sample:
    """Upstream LoadImagesAndLabels.__getitem__ for rect evaluation, labels through the same round trip."""
    path = index.image_path(i)
    im = read_image(path)
    if im is None:
        raise UserError(f"cannot read image {path} (changed since it was indexed?)")
    h0, w0 = im.shape[:2]
    im = resize_long_side(im, imgsz, augment=False)
    h, w = im.shape[:2]
    im, ratio, pad = letterbox(im, batch_shape, auto=False, scaleup=False)
    labels = np.array(index.labels[i], dtype=np.float32).reshape(-1, 5)
    if single_cls:
        labels[:, 0] = 0
    if len(labels):
        # pixel xyxy in the letterboxed image, clipped inside it, back to normalised xywh: upstream does
        # this round trip, and the clip changes boxes that touch the border, so we do it too
        xyxy = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
        labels[:, 1:] = xyxy2xywhn(xyxy, w=im.shape[1], h=im.shape[0], clip=True, eps=1e-3)
    chw = np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])  # HWC BGR -> CHW RGB
    return _Sample(chw, labels, (h0, w0), ((h / h0, w / w0), pad))


def _rect_batch_stream(index, config: EvalConfig, stride: int) -> Iterator[tuple[np.ndarray, list[_Sample]]]:
    """(dataset indices, samples) per rect batch in upstream order, decoded by a thread pool that stays
    one batch ahead of the consumer (bounded memory for any split size)."""
    rect = rect_batches(index.shapes, config.batch_size, config.imgsz, stride=stride, pad=0.5)
    with ThreadPoolExecutor(max_workers=max(1, config.workers), thread_name_prefix="eval-load") as pool:
        pending: deque[tuple[np.ndarray, list[Future]]] = deque()

        def submit(b: int) -> None:
            shape = (int(rect.shapes[b][0]), int(rect.shapes[b][1]))
            members = rect.batch_indices(b)
            pending.append((members, [pool.submit(_load_sample, index, int(i), config.imgsz, shape,
                                                  config.single_cls) for i in members]))

        for b in range(min(2, len(rect))):
            submit(b)
        for b in range(len(rect)):
            members, futures = pending.popleft()
            if b + 2 < len(rect):
                submit(b + 2)
            yield members, [f.result() for f in futures]


@dataclass
class _Chunk:
    """One micro-batch: consecutive images of a rect batch, all of the batch's padded shape."""

    batch_number: int
    start: int  # position of its first image in the rect batch
    members: np.ndarray  # dataset indices
    samples: list[_Sample]
    shape: tuple[int, int]  # the rect batch's padded (h, w)


def _chunks(batches: Iterator[tuple[np.ndarray, list[_Sample]]], micro: int) -> Iterator[_Chunk]:
    for batch_number, (members, batch) in enumerate(batches):
        shape = (int(batch[0].image.shape[1]), int(batch[0].image.shape[2]))
        for i in range(0, len(batch), micro):
            yield _Chunk(batch_number, i, members[i:i + micro], batch[i:i + micro], shape)


def _ahead(items: Iterator, fn: Callable, overlap: bool) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item)) in order. With overlap, fn runs one item ahead in a worker thread: the caller's
    work on item k (NMS, matching: single-threaded) then fills the core that fn(item k+1) leaves idle.
    That pays for ONNX Runtime, whose own thread pool releases the GIL and yields (evaluate at 640 on 2
    cores: -1.5 to -2.7 s of ~17); eager PyTorch on the CPU got slower (4.5 -> 5.2 s at 320: two OpenMP
    teams on two cores), so it runs in order. At most two results exist at a time. The worker keeps the
    caller's intra-op thread count and runs in inference mode (both are per thread in torch)."""
    threads = torch.get_num_threads()
    if not overlap:
        for item in items:
            yield item, fn(item)
        return

    def call(item):
        with torch.inference_mode():
            return fn(item)

    with ThreadPoolExecutor(1, thread_name_prefix="eval-forward", initializer=torch.set_num_threads,
                            initargs=(threads,)) as pool:
        pending: tuple[Any, Future] | None = None
        for item in items:
            future = pool.submit(call, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()


# --------------------------------------------------------------------------------------- evaluation
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _coco_image_ids(files: Sequence[str]) -> dict[str, int | str]:
    """COCO image_id per file: the numeric stem (COCO's own files) when every stem is numeric and unique,
    else the 1-based position in the split's sorted file list."""
    stems = [Path(f).stem for f in files]
    if stems and all(s.isdigit() for s in stems) and len(set(stems)) == len(stems):
        return {f: int(s) for f, s in zip(files, stems, strict=True)}
    return {f: i + 1 for i, f in enumerate(files)}


def _coco_records(image_id: int | str, boxes_xyxy: np.ndarray, conf: np.ndarray, cls: np.ndarray) -> list[dict]:
    xywh = boxes_xyxy.astype(np.float64)
    xywh[:, 2:] -= xywh[:, :2]  # top-left corner + size, original pixels
    return [
        {"image_id": image_id, "category_id": int(c), "bbox": [round(v, 3) for v in b], "score": round(s, 5)}
        for b, s, c in zip(xywh.tolist(), conf.astype(np.float64).tolist(), cls.tolist(), strict=True)
    ]


def _images_per_class(labels: Sequence[np.ndarray], classes: np.ndarray, single_cls: bool) -> np.ndarray:
    present = [np.unique(lb[:, 0] * (not single_cls)).astype(int) for lb in labels if len(lb)]
    counts = np.bincount(np.concatenate(present), minlength=int(classes.max()) + 1) if present else np.zeros(1)
    return counts[classes] if len(classes) else np.zeros(0, int)


def _to_batch(batch: Sequence[_Sample], device: torch.device, dtype: torch.dtype,
              memory_format: torch.memory_format) -> torch.Tensor:
    """The samples as one float batch in 0..1 in the wanted layout: one uint8 transfer to the device, then
    dtype and layout change in a single copy."""
    stacked = torch.from_numpy(np.stack([s.image for s in batch])).to(device, non_blocking=True)
    images = torch.empty(stacked.shape, dtype=dtype, device=device, memory_format=memory_format)
    return images.copy_(stacked).div_(255)


def _nonfinite_rows(out: torch.Tensor) -> int:
    """Images of a decoded batch holding NaN or inf. A sum is finite only if every value is (the
    values are pixel coordinates and probabilities: far from overflowing), so the exact per-image
    count runs only when something is wrong."""
    if bool(torch.isfinite(out.sum())):
        return 0
    return int((~torch.isfinite(out)).flatten(1).any(1).sum())


class _Scoring:
    """What evaluate_model accumulates per image: matching stats, the confusion matrix, COCO records."""

    def __init__(self, nc: int, config: EvalConfig, index, image_ids: dict) -> None:
        self.config, self.index, self.image_ids = config, index, image_ids
        self.confusion = ConfusionMatrix(nc=nc)
        self.stats: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.predictions: list[dict] = []
        self.seen = 0
        self.nonfinite_images = 0

    def add(self, members, batch: Sequence[_Sample], detections: Sequence[torch.Tensor], shape) -> None:
        height, width = shape
        for dataset_i, sample, det in zip(members, batch, detections, strict=True):
            self.seen += 1
            labels = sample.labels
            label_cls = labels[:, 0]
            det = det.float().cpu().numpy()
            if not len(det):
                if len(labels):
                    self.stats.append((np.zeros((0, len(IOU_THRESHOLDS)), bool), np.zeros(0, np.float32),
                                       np.zeros(0, np.float32), label_cls))
                    self.confusion.update_missed(label_cls)
                continue
            if self.config.single_cls:
                det[:, 5] = 0
            boxes = scale_boxes((height, width), det[:, :4].copy(), sample.shape0, sample.ratio_pad)
            if len(labels):
                label_boxes = xywh2xyxy(labels[:, 1:] * np.array([width, height, width, height], np.float32))
                scale_boxes((height, width), label_boxes, sample.shape0, sample.ratio_pad)
                iou = box_iou(label_boxes, boxes)
                correct = match_predictions(iou, label_cls, det[:, 5])
                self.confusion.update(iou, label_cls, det[:, 5], det[:, 4])
            else:
                correct = np.zeros((len(det), len(IOU_THRESHOLDS)), bool)
            self.stats.append((correct, det[:, 4], det[:, 5], label_cls))
            if self.config.collect_predictions:
                image_id = self.image_ids[self.index.files[int(dataset_i)]]
                self.predictions += _coco_records(image_id, boxes, det[:, 4], det[:, 5].astype(int))


@torch.inference_mode()
def evaluate_model(
    model: torch.nn.Module,
    index,
    config: EvalConfig,
    device: torch.device | str,
    names: Sequence[str],
    out_dir: str | os.PathLike | None = None,
    plots: bool = False,
    compute_loss=None,
    progress: bool = False,
    plotter: PlotProcesses | None = None,
) -> EvalResult:
    """Evaluate `model` (already on `device`, fp16 on CUDA if wanted) on a SplitIndex; writes nothing unless
    out_dir is given (then plots when plots=True). With plots=True the result also keeps the first batches'
    images (result.val_batches) so that `save_plots` can draw them later. The model's train/eval mode is
    restored afterwards.
    `compute_loss` (train's YoloLoss, a torch model only): also the mean val box/obj/cls losses, as upstream.
    `progress`: a tqdm bar over the batches (on stderr). `plotter`: where the matplotlib figures are drawn
    (see save_plots)."""
    device = torch.device(device)
    if len(index) == 0:
        raise UserError(f"split {getattr(index, 'split', '') or '?'} has no usable images to evaluate")
    names = list(names)
    nc = 1 if config.single_cls else len(names)
    backend = model if isinstance(model, Backend) else Backend.from_module(model)
    model = backend.module  # the torch model (None for an export): its train/eval mode is restored below
    dtype, stride = backend.meta.dtype, backend.meta.stride
    forward = augmented(backend) if config.augment else backend
    require_stride_multiple(config.imgsz, stride)  # one rule everywhere (yolo.imgsz): refused, never rounded
    micro = config.micro_batch or (4 if device.type == "cpu" else config.batch_size)
    channels_last = config.channels_last and device.type == "cpu" and backend.meta.kind == "pytorch"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    image_ids = _coco_image_ids(index.files) if config.collect_predictions else {}

    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    scoring = _Scoring(nc, config, index, image_ids)
    val_batches: list[ValBatch] = []
    seconds = np.zeros(3)  # preprocess, inference, nms
    loss_batches = 0
    losses = torch.zeros(3, device=device) if compute_loss is not None and model is not None else None
    batches = _rect_batch_stream(index, config, stride)
    if progress:
        batches = tqdm(batches, total=math.ceil(len(index) / max(config.batch_size, 1)), desc="validating",
                       bar_format="{l_bar}{bar:10}{r_bar}", leave=False)

    def run_chunk(chunk: _Chunk) -> tuple[torch.Tensor, float, float]:
        """The forward pass of one micro-batch (and its val losses): runs one chunk ahead of the caller."""
        nonlocal losses, loss_batches
        t0 = time.perf_counter()
        images = _to_batch(chunk.samples, device, dtype, memory_format)
        _sync(device)
        t1 = time.perf_counter()
        if losses is not None and not config.augment:
            decoded, maps = model(images)
            losses += compute_loss([m.float() for m in maps], _loss_targets(chunk.samples, device))[1]
            loss_batches += 1
        else:
            decoded = forward(images)
        _sync(device)
        return decoded, t1 - t0, time.perf_counter() - t1

    try:
        overlap = backend.meta.kind == "onnxruntime"
        for chunk, (decoded, t_pre, t_forward) in _ahead(_chunks(batches, micro), run_chunk, overlap):
            t2 = time.perf_counter()
            scoring.nonfinite_images += _nonfinite_rows(decoded)
            # per image, the rows NMS keeps first (objectness > conf_thres): the rest is freed right away
            candidates = [image[image[:, 4] > config.conf_thres] for image in decoded]
            del decoded
            detections = [non_max_suppression(c[None], config.conf_thres, config.iou_thres, multi_label=True,
                                              agnostic=config.single_cls, max_det=config.max_det)[0]
                          for c in candidates]
            _sync(device)
            seconds += (t_pre, t_forward, time.perf_counter() - t2)
            if plots and chunk.batch_number < VAL_BATCH_PLOTS and chunk.start < VAL_BATCH_IMAGES:
                if chunk.start == 0:
                    val_batches.append(ValBatch(chunk.batch_number, chunk.shape, [], []))
                room = VAL_BATCH_IMAGES - chunk.start
                val_batches[-1].samples += chunk.samples[:room]
                val_batches[-1].detections += [d.cpu() for d in detections[:room]]
            scoring.add(chunk.members, chunk.samples, detections, chunk.shape)
    finally:
        if model is not None:
            model.train(was_training)

    result = _summarize(scoring.stats, index, names, nc, scoring.confusion, seconds, scoring.seen,
                        scoring.predictions, image_ids)
    result.nonfinite_images = scoring.nonfinite_images
    result.val_batches = val_batches
    if plots and out_dir is not None:
        save_plots(result, Path(out_dir), plotter)
    if losses is not None:
        result.losses = (losses / max(loss_batches, 1)).tolist()
    return result


def save_plots(result: EvalResult, out_dir: Path, plotter: PlotProcesses | None = None) -> None:
    """Everything evaluate draws, into out_dir: val_batch*_{labels,pred}.jpg (from result.val_batches),
    the PR/F1/P/R curves and the confusion matrix. The matplotlib figures go to `plotter`'s processes
    (drawn here without one) while this process draws the val_batch images (OpenCV); returns when all
    are written. The trainer calls it once, for its best epoch."""
    from yolo.plots.evaluation import evaluation_figures  # matplotlib only when drawing

    if plotter is None:
        plotter = PlotProcesses(0)
    for what, fn, args in evaluation_figures(result.class_ap, result.confusion.normalized(), result.names, out_dir):
        plotter.submit(what, fn, *args)
    for batch in result.val_batches:
        _plot_val_batch(out_dir, batch, result.names)
    plotter.wait()


def _plot_val_batch(out_dir: Path, batch: ValBatch, names) -> None:
    """val_batch{k}_labels.jpg and val_batch{k}_pred.jpg as upstream (a plot never fails the evaluation)."""
    k, samples = batch.k, batch.samples
    try:
        from yolo.plots.batches import plot_batch  # OpenCV drawing: only when drawing

        height, width = batch.shape
        scale = np.array([width, height, width, height], np.float32)
        rows = []
        for j, det in enumerate(batch.detections):
            det = det.float().cpu().numpy()[:, :6]
            det = det[det[:, 4] > 0.25]  # upstream draws predictions above conf 0.25
            xyxy = det[:, :4] / scale
            xywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                             xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1) if len(det) else np.zeros((0, 4))
            rows.append(np.concatenate([np.full((len(det), 1), j), det[:, 5:6], xywh], 1))
        pred = np.concatenate(rows, 0) if rows else np.zeros((0, 6))
        pixels = np.stack([s.image for s in samples])  # the uint8 images as loaded
        labels = _loss_targets(samples, torch.device("cpu"))
        plot_batch(pixels, labels, names, out_dir / f"val_batch{k}_labels.jpg")
        plot_batch(pixels, pred.astype(np.float32), names, out_dir / f"val_batch{k}_pred.jpg")
    except Exception as e:  # noqa: BLE001 - drawing must never fail an evaluation
        LOG.warning(f"val_batch{k} images not drawn: {e}")


def _loss_targets(samples, device: torch.device) -> torch.Tensor:
    """Train's target rows (image, class, x, y, w, h normalised to the batch image) of a micro-batch."""
    rows = [np.concatenate([np.full((len(s.labels), 1), j, np.float32), s.labels.astype(np.float32)], 1)
            for j, s in enumerate(samples) if len(s.labels)]
    return torch.from_numpy(np.concatenate(rows, 0) if rows else np.zeros((0, 6), np.float32)).to(device)


def _summarize(stats, index, names, nc, confusion, seconds, seen, predictions, image_ids) -> EvalResult:
    if stats:
        tp, conf, pred_cls, target_cls = (np.concatenate(x, 0) for x in zip(*stats, strict=True))
    else:
        tp, conf, pred_cls, target_cls = np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.zeros(0)
    names = ["item"] if nc == 1 and len(names) != 1 else names
    class_ap = ap_per_class(tp, conf, pred_cls, target_cls) if len(target_cls) else None
    per_class: list[ClassResult] = []
    mp = mr = map50 = map50_95 = 0.0
    maps = np.zeros(nc)
    if class_ap is not None:
        if not tp.any():  # upstream reports zeros when nothing was found at all (P/R curves are degenerate)
            class_ap.precision[:] = class_ap.recall[:] = class_ap.f1[:] = 0.0
        mp, mr = float(class_ap.precision.mean()), float(class_ap.recall.mean())
        map50, map50_95 = float(class_ap.ap50.mean()), float(class_ap.ap50_95.mean())
        maps += map50_95
        maps[class_ap.classes] = class_ap.ap50_95
        images_per_class = _images_per_class(index.labels, class_ap.classes, single_cls=nc == 1)
        for k, c in enumerate(class_ap.classes):
            per_class.append(ClassResult(
                int(c), names[c] if c < len(names) else str(c), int(images_per_class[k]),
                int(class_ap.instances[k]), float(class_ap.precision[k]), float(class_ap.recall[k]),
                float(class_ap.ap50[k]), float(class_ap.ap50_95[k])))
    seen = max(seen, 1)
    result = EvalResult(
        precision=mp, recall=mr, map50=map50, map50_95=map50_95, fitness=fitness(map50, map50_95),
        images=len(index), instances=int(len(target_cls)),
        speed_ms={k: float(v) * 1e3 / seen for k, v in zip(("preprocess", "inference", "nms"), seconds, strict=True)},
        per_class=per_class, maps=maps, class_ap=class_ap, confusion=confusion, names=list(names),
        predictions=predictions, image_ids=image_ids,
    )
    return result


# ------------------------------------------------------------------------------------------ reports
def format_table(result: EvalResult, include_classes: bool = True) -> str:
    """The per-class table upstream val.py prints (Class, Images, Instances, P, R, mAP50, mAP50-95)."""
    head = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
    row = "%22s" + "%11i" * 2 + "%11.3g" * 4
    lines = [head, row % ("all", result.images, result.instances, result.precision, result.recall,
                          result.map50, result.map50_95)]
    if include_classes and len(result.names) > 1:
        lines += [row % (c.name[:22], c.images, c.instances, c.precision, c.recall, c.map50, c.map50_95)
                  for c in result.per_class]
    return "\n".join(lines)


def metrics_document(result: EvalResult, dataset_fingerprint: str, data_version: str | None, weights: str,
                     skipped: Sequence[str] = ()) -> dict[str, Any]:
    """metrics.json (contract in design.md), plus the images the index skipped."""
    return {
        **result.totals(),
        "speed_ms": result.speed_ms,
        "per_class": [c.to_json() for c in result.per_class],
        "dataset_fingerprint": dataset_fingerprint,
        "data_version": data_version,
        "weights": weights,
        "skipped_images": list(skipped),
    }


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def per_class_csv(result: EvalResult) -> str:
    header = ["class", "name", "images", "instances", "precision", "recall", "map50", "map50_95"]
    return _csv([header] + [[c.class_id, c.name, c.images, c.instances, f"{c.precision:.6f}", f"{c.recall:.6f}",
                             f"{c.map50:.6f}", f"{c.map50_95:.6f}"] for c in result.per_class])


def pr_curve_csv(result: EvalResult) -> str:
    """recall, all (mean), one column per class: the precision envelope at IoU 0.5 on the 101-point grid."""
    recall = np.linspace(0, 1, PR_CSV_POINTS)
    header = ["recall", "all"]
    columns = [recall]
    if result.class_ap is not None and len(result.class_ap.classes):
        grid = result.class_ap.conf_grid
        curves = np.stack([np.interp(recall, grid, y) for y in result.class_ap.pr_curve])
        columns += [curves.mean(0), *curves]
        header += [c.name for c in result.per_class]
    else:
        columns.append(np.zeros_like(recall))
    return _csv([header] + [[f"{v:.6f}" for v in r] for r in np.stack(columns, 1)])


def confusion_document(result: EvalResult) -> dict[str, Any]:
    """Labels and counts with rows = true class, columns = predicted (KFP/sklearn orientation)."""
    labels = [*result.names, "background"] if len(result.names) == result.confusion.nc else \
        [*map(str, range(result.confusion.nc)), "background"]
    return {"labels": labels, "rows": "true", "columns": "predicted",
            "matrix": result.confusion.matrix.T.astype(int).tolist(),
            "conf_thres": result.confusion.conf, "iou_thres": result.confusion.iou_thres}


# --------------------------------------------------------------------------------------------- gate
def promotion_gate(metrics: dict, baseline: dict | None = None, baseline_path: str | None = None,
                   min_map50: float | None = None, max_class_drop: float = 0.05,
                   tolerance: float = 1e-6, promote_without_gate: bool = False) -> dict[str, Any]:
    """gate.json: promote when mAP50 >= min_map50 (if set) and, against a baseline metrics.json, fitness does
    not fall and no class's mAP50-95 falls by more than max_class_drop. `tolerance` absorbs float noise.
    With neither criterion nothing is promoted unless promote_without_gate says so."""
    reasons: list[str] = []
    promote = True
    if min_map50 is not None:
        ok = metrics["map50"] >= min_map50
        promote &= ok
        reasons.append(f"mAP50 {metrics['map50']:.4f} {'>=' if ok else '<'} --min-map50 {min_map50:g}")
    delta: dict[str, float | None] = {"map50": None, "map50_95": None, "fitness": None}
    regressed: list[dict] = []
    if baseline is not None:
        delta = {k: float(metrics[k]) - float(baseline[k]) for k in delta}
        ok = delta["fitness"] >= -tolerance
        promote &= ok
        reasons.append(f"fitness {metrics['fitness']:.4f} {'>=' if ok else '<'} baseline {baseline['fitness']:.4f}")
        before = {int(c["class"]): c for c in baseline.get("per_class", [])}
        for c in metrics.get("per_class", []):
            old = before.get(int(c["class"]))
            if old is not None and old["map50_95"] - c["map50_95"] > max_class_drop + tolerance:
                regressed.append({"class": int(c["class"]), "name": c["name"],
                                  "before": float(old["map50_95"]), "after": float(c["map50_95"])})
        if regressed:
            promote = False
            reasons.append(f"{len(regressed)} class(es) lost more than {max_class_drop:g} mAP50-95: "
                           + ", ".join(r["name"] for r in regressed[:10]))
        else:
            reasons.append(f"no class lost more than {max_class_drop:g} mAP50-95")
    if min_map50 is None and baseline is None:
        promote = promote_without_gate
        reasons.append("no gate configured (--min-map50, --baseline): " + (
            "promoted (--promote-without-gate)" if promote else "not promoted (--promote-without-gate to promote)"))
    return {"promote": bool(promote), "reasons": reasons, "min_map50": min_map50, "baseline": baseline_path,
            "delta": delta, "regressed_classes": regressed}


def read_baseline(path: str | os.PathLike) -> dict:
    """A previous metrics.json; UserError with the file when it is missing or not one."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--baseline {p}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--baseline {p}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--baseline {p}: not JSON (line {e.lineno}): {e.msg}") from None
    missing = [k for k in ("map50", "map50_95", "fitness") if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise UserError(f"--baseline {p}: not a metrics.json (missing {', '.join(missing)})")
    return doc


# ---------------------------------------------------------------------------------------- the step
@dataclass
class EvaluateStepConfig:
    data: Path
    weights: str
    out: Path
    split: str = "val"
    device: str = ""
    index: Path | None = None
    data_version: str | None = None
    min_map50: float | None = None
    baseline: Path | None = None
    max_class_drop: float = 0.05
    promote_without_gate: bool = False
    task: str = "val"  # val/test: evaluate that split; speed: timing only (nothing written)
    half: bool = False  # fp16 (CUDA only; CUDA evaluates in fp16 anyway, as upstream val.py)
    verbose: bool = False  # per-class rows even with >= VERBOSE_CLASSES classes
    eval: EvalConfig = field(default_factory=EvalConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    parser.add_argument("--data", required=True, help="data.yaml")
    parser.add_argument("--weights", required=True,
                        help="model: a .pt (ours or upstream YOLOv5), or an export (.onnx, .torchscript)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="val", choices=SPLITS, help="split to evaluate")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=d.imgsz, help="inference size (pixels)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="rect batch grouping (decides the padded shapes, hence mAP), as upstream")
    parser.add_argument("--conf-thres", type=float, default=d.conf_thres, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=d.iou_thres, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=d.max_det, help="maximum detections per image")
    parser.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    parser.add_argument("--augment", action="store_true",
                        help="test-time augmentation: scales 1, 0.83, 0.67 with a left-right flip at 0.83")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu (default: a GPU when there is one, else the CPU)")
    parser.add_argument("--workers", type=int, default=d.workers, help="image decoding threads")
    parser.add_argument("--micro-batch", type=int, default=d.micro_batch,
                        help="images per forward pass inside a rect batch (speed only); 0 = auto")
    parser.add_argument("--index", default=None, help="validate's DIR/index to reuse")
    parser.add_argument("--data-version", default=None, help="opaque data version to record (DVC md5, git SHA)")
    parser.add_argument("--min-map50", type=float, default=None, help="exit 2 (after writing outputs) below this")
    parser.add_argument("--baseline", default=None, help="the current model's metrics.json for the gate")
    parser.add_argument("--max-class-drop", type=float, default=0.05,
                        help="largest per-class mAP50-95 drop vs --baseline that still promotes")
    parser.add_argument("--promote-without-gate", action="store_true",
                        help="promote when neither --min-map50 nor --baseline is given (default: do not)")
    parser.add_argument("--task", choices=TASKS, default="val",
                        help="val/test: evaluate that split (as --split); speed: time pre-process, inference and NMS "
                             "at conf 0.25, IoU 0.45 and write nothing; study: not supported here")
    parser.add_argument("--verbose", action="store_true",
                        help=f"print the per-class rows (printed anyway with fewer than {VERBOSE_CLASSES} classes)")
    parser.add_argument("--save-json", action="store_true",
                        help="accepted for upstream commands: predictions.json (COCO detections) is always written")
    parser.add_argument("--half", action="store_true",
                        help="fp16 inference (CUDA only, where it is the default anyway; an error on the CPU)")


def _config_from_args(args: argparse.Namespace) -> EvaluateStepConfig:
    if args.task == "study":
        raise UserError("--task study (mAP and speed over image sizes, as upstream) is not supported here; run "
                        "evaluate once per --imgsz instead")
    split, conf, iou = args.split, args.conf_thres, args.iou_thres
    if args.task == "test":
        split = "test"
    elif args.task == "speed":
        conf, iou = 0.25, 0.45  # upstream's speed settings
    require_stride_multiple(args.imgsz, MAX_STRIDE)  # before anything is read (the model's own stride: later)
    for flag, value, low in (("--batch-size", args.batch_size, 1),
                             ("--max-det", args.max_det, 1), ("--workers", args.workers, 0),
                             ("--micro-batch", args.micro_batch, 0)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--conf-thres", args.conf_thres), ("--iou-thres", args.iou_thres),
                        ("--max-class-drop", args.max_class_drop)):
        if not 0 <= value <= 1:
            raise UserError(f"{flag} must lie in [0, 1], got {value}")
    return EvaluateStepConfig(
        data=Path(args.data), weights=str(args.weights), out=Path(args.out), split=split, task=args.task,
        half=args.half, verbose=args.verbose,
        device=args.device, index=Path(args.index) if args.index else None, data_version=args.data_version,
        min_map50=args.min_map50, baseline=Path(args.baseline) if args.baseline else None,
        max_class_drop=args.max_class_drop, promote_without_gate=args.promote_without_gate,
        eval=EvalConfig(imgsz=args.imgsz, batch_size=args.batch_size, conf_thres=conf,
                        iou_thres=iou, max_det=args.max_det, single_cls=args.single_cls, augment=args.augment,
                        micro_batch=args.micro_batch, workers=args.workers, collect_predictions=True),
    )


def evaluate_step(cfg: EvaluateStepConfig) -> tuple[EvalResult, dict]:
    """Load, evaluate, write every output under cfg.out; returns the result and gate.json's content."""
    baseline = read_baseline(cfg.baseline) if cfg.baseline else None  # fail fast, before the work
    device = select_device(cfg.device)
    if cfg.half and device.type != "cuda":
        raise UserError("--half needs a CUDA device (fp16 inference is not supported on the CPU)")
    speed_only = cfg.task == "speed"
    out = cfg.out if speed_only else prepare_out_dir(cfg.out)
    for name in () if speed_only else OUTPUTS:  # an earlier run's results must never pass for this one's
        (out / name).unlink(missing_ok=True)
    data = load_data_config(cfg.data)
    if cfg.split not in data.splits:
        raise UserError(f"{data.yaml_path}: no `{cfg.split}` split defined")
    if speed_only:
        index, model = _load(cfg, device, data)
        return _evaluate(cfg, device, data, index, model, out, None), {}
    # the plotting processes start now: their imports overlap loading the data and the model
    with PlotProcesses() as plotter:
        index, model = _load(cfg, device, data)
        # the dataset fingerprint (lineage) also covers the other splits: verified in the background while
        # the model runs (hashing and decoding release the GIL); started after every check of the inputs
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fingerprint") as background:
            pending = background.submit(dataset_fingerprint_of, data, cfg.index, {cfg.split: index.fingerprint})
            result = _evaluate(cfg, device, data, index, model, out, plotter)
            fingerprint = pending.result()
    return _write_outputs(cfg, result, index, fingerprint, baseline, out)


def _load(cfg: EvaluateStepConfig, device: torch.device, data) -> tuple[Any, Backend]:
    """The split's index and the model, checked, on the backend evaluation runs it with."""
    index = load_split(data, cfg.split, index_dir=cfg.index, single_cls=cfg.eval.single_cls)
    if index.skipped:
        LOG.warning(f"{cfg.split}: skipped {len(index.skipped)} unusable image(s), e.g. {index.skipped[0]}")
    if len(index) == 0:
        raise UserError(f"{data.yaml_path}: split `{cfg.split}` has no usable images")

    model = load_backend(cfg.weights, device, half=device.type == "cuda")
    if model.module is not None:  # NaN weights score 0 and would still promote
        refuse_nonfinite_model(model.module, f"--weights {cfg.weights}")
    if not cfg.eval.single_cls and model.nc != data.nc:
        raise UserError(f"--weights {cfg.weights} predicts {model.nc} classes but {data.yaml_path} has "
                        f"{data.nc}; pass weights trained on this data (or --single-cls)")
    if device.type != "cuda":
        threads = cpu_threads()  # yolo.device's one rule; recorded in metrics.json
        torch.set_num_threads(threads)
        model = on_onnxruntime(model, threads)
        if cfg.eval.channels_last and model.meta.kind == "pytorch":
            model.module.to(memory_format=torch.channels_last)
    return index, model


def _evaluate(cfg: EvaluateStepConfig, device: torch.device, data, index, model: Backend, out: Path,
              plotter: PlotProcesses | None) -> EvalResult:
    """evaluate_model with the step's settings; plots into `out` when given a plotter."""
    LOG.info(f"evaluating {cfg.weights} on {len(index)} {cfg.split} images at {cfg.eval.imgsz} "
             f"(batch {cfg.eval.batch_size}) on {device}")
    t = time.perf_counter()
    result = evaluate_model(model, index, cfg.eval, device, list(data.names), out_dir=out,
                            plots=plotter is not None, progress=True, plotter=plotter)
    LOG.info(f"evaluated in {time.perf_counter() - t:.1f}s")
    return result


def _write_outputs(cfg: EvaluateStepConfig, result: EvalResult, index, fingerprint: str, baseline: dict | None,
                   out: Path) -> tuple[EvalResult, dict]:
    """Every output besides the plots, results last; returns the result and gate.json's content."""
    if result.nonfinite_images:
        raise UserError(f"--weights {cfg.weights}: the outputs for {result.nonfinite_images} image(s) hold NaN or "
                        f"infinite values; not scored, not promoted")
    metrics = metrics_document(result, fingerprint, cfg.data_version, str(cfg.weights), index.skipped)
    metrics["cpu_threads"] = torch.get_num_threads()
    gate = promotion_gate(metrics, baseline, str(cfg.baseline) if cfg.baseline else None, cfg.min_map50,
                          cfg.max_class_drop, promote_without_gate=cfg.promote_without_gate)
    write_text(out / "per_class.csv", per_class_csv(result))
    write_text(out / "pr_curve.csv", pr_curve_csv(result))
    write_json(out / "confusion_matrix.json", confusion_document(result))
    write_text(out / "predictions.json", json.dumps(result.predictions) + "\n")
    write_json(out / "image_ids.json", result.image_ids)
    write_json(out / "metrics.json", metrics)  # the results last: their presence means the step completed
    write_json(out / "gate.json", gate)
    return result, gate


def run(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    result, gate = evaluate_step(cfg)
    s = result.speed_ms
    speed = (f"Speed: {s['preprocess']:.1f}ms pre-process, {s['inference']:.1f}ms inference, {s['nms']:.1f}ms NMS "
             f"per image at batch {cfg.eval.batch_size}, imgsz {cfg.eval.imgsz}")
    if cfg.task == "speed":
        print(speed + " (--task speed: nothing written)")
        return 0
    print(format_table(result, include_classes=cfg.verbose or len(result.names) < VERBOSE_CLASSES))
    print(speed)
    print(f"Results saved to {cfg.out}; gate: {'promote' if gate['promote'] else 'do not promote'} "
          f"({'; '.join(gate['reasons'])})")
    if cfg.min_map50 is not None and result.map50 < cfg.min_map50:
        raise UserError(f"mAP50 {result.map50:.4f} is below --min-map50 {cfg.min_map50:g} "
                        f"(outputs written to {cfg.out})")
    return 0
