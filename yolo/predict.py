"""The predict step: upstream detect.py — annotated images and videos, `labels/<stem>.txt`, crops.

Sources (images, videos, folders, globs, lists, URLs, streams, webcams) are yolo.sources'; the model runs
through yolo.backend (.pt, ONNX, TorchScript); `--augment` is yolo.tta's. A video frame's labels are
`labels/<video stem>_<frame>.txt` with its 1-based frame number in the video.

Numbers match detect.py --save-txt --save-conf: letterbox to the smallest stride-multiple rectangle, BGR->RGB,
/255 in fp32, NMS with one label per box, boxes scaled back to the original image, clipped and rounded to
whole pixels, then written normalised as `cls cx cy w h conf` with '%g', last detection first.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from yolo.backend import Backend, load_backend
from yolo.boxes import clip_boxes, non_max_suppression, scale_boxes, xywh2xyxy, xyxy2xywh
from yolo.data.image import letterbox
from yolo.device import select_device
from yolo.errors import UserError
from yolo.files import prepare_out_dir, write_bytes, write_text
from yolo.sources import open_source
from yolo.tta import augmented

LOG = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    weights: str
    source: str | Path  # see yolo.sources: a file, folder, glob, .txt list, URL, stream or webcam index
    out: Path
    imgsz: list[int] = field(default_factory=lambda: [640])  # one size (square) or h w, as upstream
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 1000
    device: str = ""
    classes: list[int] | None = None
    agnostic_nms: bool = False
    augment: bool = False
    half: bool = False
    save_images: bool = True
    save_txt: bool = False
    save_conf: bool = False
    save_crop: bool = False
    line_thickness: int = 3
    hide_labels: bool = False
    hide_conf: bool = False
    vid_stride: int = 1


@dataclass
class PredictSummary:
    images: int = 0  # images and video frames run through the model
    detections: int = 0
    labels_written: int = 0
    videos: list[str] = field(default_factory=list)  # annotated videos written
    crops: int = 0
    unreadable: list[str] = field(default_factory=list)
    speed_ms: dict[str, float] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PredictConfig(weights="", source="", out=Path())
    parser.add_argument("--weights", required=True,
                        help="model: a checkpoint (ours or an upstream YOLOv5 .pt, an official name such as "
                             "yolov5s.pt, or a URL), or an export (.onnx, .torchscript)")
    parser.add_argument("--source", required=True,
                        help="an image, video, folder, quoted glob ('dir/*.jpg'), .txt list of those, "
                             "http(s) URL of an image or video (downloaded), stream URL (rtsp://, rtmp://, "
                             "http(s)://) or webcam index (0)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder: annotated images and videos, labels/, crops/")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=d.imgsz,
                        help="inference size: one number, or h w (default: %(default)s)")
    parser.add_argument("--conf-thres", type=float, default=d.conf_thres,
                        help="confidence threshold (default: %(default)s)")
    parser.add_argument("--iou-thres", type=float, default=d.iou_thres, help="NMS IoU threshold (default: %(default)s)")
    parser.add_argument("--max-det", type=int, default=d.max_det, help="maximum detections per image (default: %(default)s)")
    parser.add_argument("--device", default=d.device,
                        help="cuda device (0 or 0,1) or cpu (default: a GPU when there is one, else the CPU)")
    parser.add_argument("--save-txt", action="store_true", help="save labels/<name>.txt: cls cx cy w h, normalised")
    parser.add_argument("--save-conf", action="store_true", help="add the confidence to each --save-txt row")
    parser.add_argument("--save-crop", action="store_true", help="save each detection's crop under crops/<class>/")
    parser.add_argument("--nosave", action="store_true", help="do not save annotated images or videos")
    parser.add_argument("--classes", nargs="+", type=int, help="keep only these class ids (default: all)")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--augment", action="store_true",
                        help="test-time augmentation: scales 1, 0.83, 0.67 with a left-right flip at 0.83")
    parser.add_argument("--line-thickness", type=int, default=d.line_thickness,
                        help="box line width in pixels (default: %(default)s)")
    parser.add_argument("--hide-labels", action="store_true", help="draw boxes without class names")
    parser.add_argument("--hide-conf", action="store_true", help="draw class names without confidences")
    parser.add_argument("--half", action="store_true", help="fp16 inference (CUDA only: an error on the CPU)")
    parser.add_argument("--vid-stride", type=int, default=d.vid_stride,
                        help="read every n-th frame of videos and streams (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    cfg = PredictConfig(
        weights=args.weights,
        source=args.source,
        out=args.out,
        imgsz=list(args.imgsz),
        conf_thres=args.conf_thres,
        iou_thres=args.iou_thres,
        max_det=args.max_det,
        device=args.device,
        classes=args.classes,
        agnostic_nms=args.agnostic_nms,
        augment=args.augment,
        half=args.half,
        save_images=not args.nosave,
        save_txt=args.save_txt,
        save_conf=args.save_conf,
        save_crop=args.save_crop,
        line_thickness=args.line_thickness,
        hide_labels=args.hide_labels,
        hide_conf=args.hide_conf,
        vid_stride=args.vid_stride,
    )
    summary = predict(cfg)
    saved = [f"{summary.labels_written} label files in {cfg.out / 'labels'}"] if cfg.save_txt else []
    saved += [f"{len(summary.videos)} videos"] if summary.videos else []
    saved += [f"{summary.crops} crops"] if cfg.save_crop else []
    LOG.info(f"{summary.images} images, {summary.detections} detections; results saved to {cfg.out}"
             + (f" ({', '.join(saved)})" if saved else ""))
    return 0


def check_img_size(imgsz: list[int], stride: int) -> list[int]:
    """[h, w] rounded up to multiples of stride (upstream check_img_size); one number means square."""
    if len(imgsz) not in (1, 2) or any(s <= 0 for s in imgsz):
        raise UserError(f"--imgsz takes one size or h w, all positive; got {imgsz}")
    sizes = imgsz * 2 if len(imgsz) == 1 else list(imgsz)
    checked = [math.ceil(s / stride) * stride for s in sizes]
    if checked != sizes:
        LOG.warning(f"--imgsz {sizes} must be a multiple of max stride {stride}, updating to {checked}")
    return checked


def _check_thresholds(cfg: PredictConfig) -> None:
    if not 0 <= cfg.conf_thres <= 1:
        raise UserError(f"--conf-thres must lie in [0, 1], got {cfg.conf_thres}")
    if not 0 <= cfg.iou_thres <= 1:
        raise UserError(f"--iou-thres must lie in [0, 1], got {cfg.iou_thres}")
    if cfg.max_det < 1:
        raise UserError(f"--max-det must be >= 1, got {cfg.max_det}")


def _check_out_is_not_input(out: Path, files: list[Path]) -> None:
    # annotated copies keep the image's name: writing them into the source folder would overwrite it
    folders = {p.parent.resolve() for p in files}
    if out.resolve() in folders:
        raise UserError(f"--out {out} is the folder of the source images; choose another output folder")


def preprocess(im0: np.ndarray, imgsz: list[int], stride: int, device: torch.device, half: bool) -> torch.Tensor:
    """BGR HWC uint8 -> letterboxed RGB (1, 3, H, W) float in 0..1, as detect.py's LoadImages + loop."""
    im = letterbox(im0, imgsz, stride=stride, auto=True)[0]
    im = np.ascontiguousarray(im.transpose((2, 0, 1))[::-1])
    x = torch.from_numpy(im).to(device)
    x = x.half() if half else x.float()
    x /= 255
    return x[None]


def label_rows(det: torch.Tensor, im0_shape: tuple[int, ...], conf: bool = True) -> str:
    """detect.py's --save-txt text (with --save-conf: conf last) for detections already scaled to im0,
    last row first."""
    if not len(det):
        return ""
    det = det.flip(0).cpu()
    gn = torch.tensor(im0_shape)[[1, 0, 1, 0]]  # int64, so the division stays in float32 as upstream
    xywh = (xyxy2xywh(det[:, :4]) / gn).tolist()
    cls, confs = det[:, 5].float().tolist(), det[:, 4].float().tolist()
    lines = []
    for c, box, p in zip(cls, xywh, confs, strict=True):
        line = (c, *box, p) if conf else (c, *box)
        lines.append(("%g " * len(line)).rstrip() % line)
    return "\n".join(lines) + "\n"


def _palette(c: int) -> tuple[int, int, int]:
    """A stable, distinct BGR colour per class id (golden-ratio hue steps)."""
    hue = int((c * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 200, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def annotate(im0: np.ndarray, det: torch.Tensor, names: list[str], line_width: int = 3,
             hide_labels: bool = False, hide_conf: bool = False) -> np.ndarray:
    """Draw boxes and 'name conf' labels (OpenCV Hershey font: nothing to fetch) on a copy of im0."""
    im = im0.copy()
    font_scale = line_width / 3
    thickness = max(line_width - 1, 1)
    for *xyxy, conf, cls in det.flip(0).tolist():
        c = int(cls)
        color = _palette(c)
        p1, p2 = (int(xyxy[0]), int(xyxy[1])), (int(xyxy[2]), int(xyxy[3]))
        cv2.rectangle(im, p1, p2, color, thickness=line_width, lineType=cv2.LINE_AA)
        if hide_labels:
            continue
        name = names[c] if c < len(names) else str(c)
        label = name if hide_conf else f"{name} {conf:.2f}"
        w, h = cv2.getTextSize(label, 0, fontScale=font_scale, thickness=thickness)[0]
        outside = p1[1] - h >= 3  # label above the box when it fits, else inside
        p2_label = (p1[0] + w, p1[1] - h - 3 if outside else p1[1] + h + 3)
        cv2.rectangle(im, p1, p2_label, color, -1, cv2.LINE_AA)
        text_org = (p1[0], p1[1] - 2 if outside else p1[1] + h + 2)
        cv2.putText(im, label, text_org, 0, font_scale, (255, 255, 255), thickness=thickness, lineType=cv2.LINE_AA)
    return im


def _encode(im: np.ndarray, name: str) -> tuple[bytes, str]:
    """Encode in the image's own format when OpenCV can write it, else as JPEG (name gets .jpg)."""
    suffix = Path(name).suffix.lower()
    try:
        ok, buf = cv2.imencode(suffix, im)
    except cv2.error:
        ok = False
    if ok:
        return buf.tobytes(), name
    ok, buf = cv2.imencode(".jpg", im)
    return buf.tobytes(), f"{Path(name).stem}.jpg"


def crop_box(im: np.ndarray, xyxy: list[float], gain: float = 1.02, pad: int = 10) -> np.ndarray:
    """The box grown by `gain` and `pad` pixels, clipped to the image (upstream save_one_box, BGR)."""
    b = xyxy2xywh(torch.tensor(xyxy, dtype=torch.float32).view(-1, 4))
    b[:, 2:] = b[:, 2:] * gain + pad
    x1, y1, x2, y2 = clip_boxes(xywh2xyxy(b).long(), im.shape[:2])[0].tolist()
    return im[y1:y2, x1:x2]


def _safe_folder_name(name: str) -> str:
    """A class name as one folder name: the checkpoint must not decide where crops go (no '/', '..')."""
    return re.sub(r"[^\w\- ]", "_", name).strip() or "_"


class _VideoOut:
    """An annotated video, written beside its final name and published by rename when complete."""

    def __init__(self, final: Path, fps: float, width: int, height: int):
        self.final = final
        self.partial = final.with_name(f".{final.stem}.partial{final.suffix}")  # keeps .mp4: picks the container
        self.writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not self.writer.isOpened():
            self.writer.release()
            self.partial.unlink(missing_ok=True)
            raise UserError(f"cannot write video {final}: OpenCV has no mp4v encoder here (use --nosave)")
        self.size = (width, height)

    def write(self, im: np.ndarray) -> None:
        if (im.shape[1], im.shape[0]) != self.size:  # a stream may change resolution mid-way
            im = cv2.resize(im, self.size)
        self.writer.write(im)

    def close(self, publish: bool = True) -> None:
        self.writer.release()
        if publish and self.partial.exists():
            os.replace(self.partial, self.final)
        else:
            self.partial.unlink(missing_ok=True)


def _check_imgsz_fits(backend: Backend, imgsz: list[int]) -> None:
    fixed = backend.meta.fixed_shape
    if fixed is not None and (imgsz[0] > fixed[2] or imgsz[1] > fixed[3]):
        raise UserError(f"--imgsz {imgsz[0]} {imgsz[1]} is larger than the {fixed[2]}x{fixed[3]} input "
                        f"{backend.meta.kind} model was exported with: pass --imgsz {fixed[2]} {fixed[3]}")


def predict(cfg: PredictConfig) -> PredictSummary:
    """Run detection on every frame of cfg.source; write annotated images/videos, labels and crops under cfg.out."""
    _check_thresholds(cfg)
    source = open_source(os.fspath(cfg.source), cfg.vid_stride)
    _check_out_is_not_input(Path(cfg.out), source.files)
    device = select_device(cfg.device)
    if cfg.half and device.type != "cuda":
        raise UserError("--half needs a CUDA device (fp16 inference is not supported on the CPU)")
    backend = load_backend(cfg.weights, device, half=cfg.half)
    stride = backend.meta.stride
    imgsz = check_img_size(cfg.imgsz, stride)
    _check_imgsz_fits(backend, imgsz)
    infer = augmented(backend) if cfg.augment else backend
    names = backend.meta.names
    out = prepare_out_dir(cfg.out)
    labels_dir = out / "labels"
    if cfg.save_txt:
        labels_dir.mkdir(exist_ok=True)

    summary = PredictSummary()
    label_text: dict[str, str] = {}  # stem -> rows; like detect.py, two images with one stem share a file
    crop_counts: dict[tuple[str, str], int] = {}
    seconds = np.zeros(3)
    video: _VideoOut | None = None
    n_files = len(source)
    file_n = 0
    try:
        for frame in source:
            if frame.frame is None or frame.frame == 1:
                file_n += 1
            if video is not None and (frame.video is None or video.final.name != frame.video.name or frame.frame == 1):
                video.close()
                summary.videos.append(str(video.final))
                video = None
            im0 = frame.image
            if im0 is None:
                if n_files == 1:
                    raise UserError(f"--source {frame.origin}: cannot decode it")
                LOG.warning(f"skipping {frame.origin}: cannot decode it")
                summary.unreadable.append(frame.origin)
                continue
            t0 = time.perf_counter()
            x = preprocess(im0, imgsz, stride, device, backend.meta.dtype == torch.float16)
            t1 = time.perf_counter()
            with torch.inference_mode():
                pred = infer(x)
            t2 = time.perf_counter()
            det = non_max_suppression(
                pred, cfg.conf_thres, cfg.iou_thres, cfg.classes, cfg.agnostic_nms, max_det=cfg.max_det
            )[0]
            if len(det):
                det[:, :4] = scale_boxes(x.shape[2:], det[:, :4], im0.shape).round()
            seconds += (t1 - t0, t2 - t1, time.perf_counter() - t2)
            summary.images += 1
            summary.detections += len(det)

            if cfg.save_txt:
                _write_labels(labels_dir, frame.label_stem, label_rows(det, im0.shape, cfg.save_conf), label_text)
            if cfg.save_crop:
                summary.crops += _save_crops(out / "crops", frame.label_stem, im0, det, names, crop_counts)
            if cfg.save_images:
                drawn = annotate(im0, det, names, cfg.line_thickness, cfg.hide_labels, cfg.hide_conf)
                if frame.video is None:
                    data, name = _encode(drawn, frame.name)
                    write_bytes(out / name, data)
                else:
                    if video is None:
                        video = _VideoOut(out / frame.video.name, frame.video.fps, im0.shape[1], im0.shape[0])
                    video.write(drawn)
            counts = ", ".join(
                f"{int(k)} {names[int(c)] if int(c) < len(names) else int(c)}{'s' * (int(k) > 1)}"
                for c, k in zip(*det[:, 5].unique(return_counts=True), strict=True)
            )
            where = f"image {file_n}/{n_files}" if frame.frame is None else (
                f"video {file_n}/{n_files} (frame {frame.frame}"
                + (f"/{frame.video.frames})" if frame.video and frame.video.frames else ")"))
            LOG.info(f"{where} {frame.origin}: {x.shape[2]}x{x.shape[3]} {counts or '(no detections)'}")
    finally:
        if video is not None:  # also on Ctrl-C: a stream's video so far is kept
            video.close()
            summary.videos.append(str(video.final))

    summary.labels_written = len(label_text)
    if summary.images:
        pre, inf, nms = (seconds / summary.images * 1000).tolist()
        summary.speed_ms = {"preprocess": pre, "inference": inf, "nms": nms}
        LOG.info(f"Speed: {pre:.1f}ms pre-process, {inf:.1f}ms inference, {nms:.1f}ms NMS per image at {imgsz}")
    return summary


def _write_labels(labels_dir: Path, stem: str, text: str, label_text: dict[str, str]) -> None:
    label_path = labels_dir / f"{stem}.txt"
    if text or stem in label_text:
        label_text[stem] = label_text.get(stem, "") + text
        write_text(label_path, label_text[stem])
    elif label_path.exists():  # a stale file from an earlier run would claim detections we did not make
        label_path.unlink()


def _save_crops(crops_dir: Path, stem: str, im0: np.ndarray, det: torch.Tensor, names: list[str],
                counts: dict[tuple[str, str], int]) -> int:
    """crops/<class>/<stem>.jpg, then <stem>2.jpg, ... for more of one class (upstream's naming)."""
    saved = 0
    for *xyxy, _conf, cls in det.flip(0).tolist():
        c = int(cls)
        folder = _safe_folder_name(names[c] if c < len(names) else str(c))
        crop = crop_box(im0, xyxy)
        if crop.size == 0:
            continue
        k = counts[(folder, stem)] = counts.get((folder, stem), 0) + 1
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if ok:
            write_bytes(crops_dir / folder / f"{stem}{k if k > 1 else ''}.jpg", buf.tobytes())
            saved += 1
    return saved
