"""The predict step: upstream detect.py on images — annotated copies and `labels/<stem>.txt`.

Numbers match detect.py --save-txt --save-conf: letterbox to the smallest stride-multiple rectangle, BGR->RGB,
/255 in fp32, NMS with one label per box, boxes scaled back to the original image, clipped and rounded to
whole pixels, then written normalised as `cls cx cy w h conf` with '%g', last detection first.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from yolo.boxes import non_max_suppression, scale_boxes, xyxy2xywh
from yolo.data.dataset import IMG_FORMATS
from yolo.data.image import letterbox, read_image
from yolo.device import select_device
from yolo.errors import UserError
from yolo.files import prepare_out_dir, write_bytes, write_text

LOG = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    weights: str
    source: Path
    out: Path
    imgsz: list[int] = field(default_factory=lambda: [640])  # one size (square) or h w, as upstream
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 1000
    device: str = ""
    classes: list[int] | None = None
    agnostic_nms: bool = False
    half: bool = False
    save_images: bool = True
    line_thickness: int = 3


@dataclass
class PredictSummary:
    images: int = 0
    detections: int = 0
    labels_written: int = 0
    unreadable: list[str] = field(default_factory=list)
    speed_ms: dict[str, float] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="checkpoint: ours or an upstream YOLOv5 .pt")
    parser.add_argument("--source", required=True, type=Path, help="an image or a folder of images")
    parser.add_argument("--out", required=True, type=Path, help="output folder (annotated images, labels/)")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640],
                        help="inference size: one number, or h w")  # fmt: skip
    parser.add_argument("--conf-thres", type=float, default=0.25)
    parser.add_argument("--iou-thres", type=float, default=0.45)
    parser.add_argument("--max-det", type=int, default=1000)
    parser.add_argument("--device", default="", help="cuda device (0 or 0,1) or cpu")
    parser.add_argument("--classes", nargs="+", type=int, help="keep only these class ids")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--half", action="store_true", help="fp16 inference (CUDA only)")
    parser.add_argument("--nosave", action="store_true", help="write labels only, no annotated images")
    parser.add_argument("--line-thickness", type=int, default=3, help="box line width in pixels")


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
        half=args.half,
        save_images=not args.nosave,
        line_thickness=args.line_thickness,
    )
    summary = predict(cfg)
    LOG.info(
        f"{summary.images} images, {summary.detections} detections, {summary.labels_written} label files "
        f"saved to {cfg.out / 'labels'}"
    )
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


def list_images(source: Path) -> list[Path]:
    """One image, or a folder's images sorted by path (non-images ignored, no recursion), as detect.py."""
    if source.is_dir():
        files = sorted(source.glob("*.*"), key=lambda p: str(p))
        # glob.glob('*.*') as upstream lists it: no hidden files (e.g. macOS '._x.jpg' resource forks)
        images = [
            p for p in files if p.is_file() and not p.name.startswith(".") and p.suffix[1:].lower() in IMG_FORMATS
        ]
        if not images:
            raise UserError(f"--source {source}: no images found (looked for {', '.join(sorted(IMG_FORMATS))})")
        return images
    if source.is_file():
        if source.suffix[1:].lower() not in IMG_FORMATS:
            raise UserError(f"--source {source} is not an image (supported: {', '.join(sorted(IMG_FORMATS))})")
        return [source]
    raise UserError(f"--source {source} does not exist")


def _check_thresholds(cfg: PredictConfig) -> None:
    if not 0 <= cfg.conf_thres <= 1:
        raise UserError(f"--conf-thres must lie in [0, 1], got {cfg.conf_thres}")
    if not 0 <= cfg.iou_thres <= 1:
        raise UserError(f"--iou-thres must lie in [0, 1], got {cfg.iou_thres}")
    if cfg.max_det < 1:
        raise UserError(f"--max-det must be >= 1, got {cfg.max_det}")


def _check_out_is_not_input(out: Path, images: list[Path]) -> None:
    # annotated copies keep the image's name: writing them into the source folder would overwrite it
    folders = {p.parent.resolve() for p in images}
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


def label_rows(det: torch.Tensor, im0_shape: tuple[int, ...]) -> str:
    """detect.py's --save-txt --save-conf text for detections already scaled to im0 (last row first)."""
    if not len(det):
        return ""
    det = det.flip(0).cpu()
    gn = torch.tensor(im0_shape)[[1, 0, 1, 0]]  # int64, so the division stays in float32 as upstream
    xywh = (xyxy2xywh(det[:, :4]) / gn).tolist()
    cls, conf = det[:, 5].float().tolist(), det[:, 4].float().tolist()
    lines = []
    for c, box, p in zip(cls, xywh, conf, strict=True):
        line = (c, *box, p)
        lines.append(("%g " * len(line)).rstrip() % line)
    return "\n".join(lines) + "\n"


def _palette(c: int) -> tuple[int, int, int]:
    """A stable, distinct BGR colour per class id (golden-ratio hue steps)."""
    hue = int((c * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 200, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def annotate(im0: np.ndarray, det: torch.Tensor, names: list[str], line_width: int = 3) -> np.ndarray:
    """Draw boxes and 'name conf' labels (OpenCV Hershey font: nothing to fetch) on a copy of im0."""
    im = im0.copy()
    font_scale = line_width / 3
    thickness = max(line_width - 1, 1)
    for *xyxy, conf, cls in det.flip(0).tolist():
        c = int(cls)
        color = _palette(c)
        p1, p2 = (int(xyxy[0]), int(xyxy[1])), (int(xyxy[2]), int(xyxy[3]))
        cv2.rectangle(im, p1, p2, color, thickness=line_width, lineType=cv2.LINE_AA)
        label = f"{names[c] if c < len(names) else c} {conf:.2f}"
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


def _class_names(ckpt: dict, model: torch.nn.Module, nc: int) -> list[str]:
    names = ckpt.get("names") if isinstance(ckpt, dict) else None
    if names is None:
        names = getattr(model, "names", None)
    if isinstance(names, dict):
        names = [str(names.get(i, names.get(str(i), i))) for i in range(nc)]
    names = [str(n) for n in (names or [])]
    return names if len(names) == nc else [str(i) for i in range(nc)]


def predict(cfg: PredictConfig) -> PredictSummary:
    """Run detection on every image of cfg.source; write labels (and annotated images) under cfg.out."""
    _check_thresholds(cfg)
    images = list_images(Path(cfg.source))
    _check_out_is_not_input(Path(cfg.out), images)
    device = select_device(cfg.device)
    if cfg.half and device.type != "cuda":
        raise UserError("--half needs a CUDA device (fp16 inference is not supported on the CPU)")
    from yolo.model.checkpoint import load_model  # heavy: imported once the cheap checks have passed

    model, ckpt = load_model(cfg.weights, device, fuse=True)
    model = model.float().eval()
    if cfg.half:
        model.half()
    detect = model.model[-1]
    stride = max(int(model.stride.max()), 32)
    imgsz = check_img_size(cfg.imgsz, stride)
    names = _class_names(ckpt, model, int(detect.nc))
    out = prepare_out_dir(cfg.out)
    labels_dir = out / "labels"
    labels_dir.mkdir(exist_ok=True)

    summary = PredictSummary()
    label_text: dict[str, str] = {}  # stem -> rows; like detect.py, two images with one stem share a file
    seconds = np.zeros(3)
    for n, path in enumerate(images, 1):
        im0 = read_image(path)
        if im0 is None:
            if len(images) == 1:
                raise UserError(f"--source {path}: cannot decode the image")
            LOG.warning(f"skipping {path}: cannot decode the image")
            summary.unreadable.append(str(path))
            continue
        t0 = time.perf_counter()
        x = preprocess(im0, imgsz, stride, device, cfg.half)
        t1 = time.perf_counter()
        with torch.inference_mode():
            pred = model(x)[0]
        t2 = time.perf_counter()
        det = non_max_suppression(
            pred, cfg.conf_thres, cfg.iou_thres, cfg.classes, cfg.agnostic_nms, max_det=cfg.max_det
        )[0]
        if len(det):
            det[:, :4] = scale_boxes(x.shape[2:], det[:, :4], im0.shape).round()
        seconds += (t1 - t0, t2 - t1, time.perf_counter() - t2)
        summary.images += 1
        summary.detections += len(det)

        text = label_rows(det, im0.shape)
        label_path = labels_dir / f"{path.stem}.txt"
        if text or path.stem in label_text:
            label_text[path.stem] = label_text.get(path.stem, "") + text
            write_text(label_path, label_text[path.stem])
        elif label_path.exists():  # a stale file from an earlier run would claim detections we did not make
            label_path.unlink()
        if cfg.save_images:
            data, name = _encode(annotate(im0, det, names, cfg.line_thickness), path.name)
            write_bytes(out / name, data)
        counts = ", ".join(
            f"{int(k)} {names[int(c)]}{'s' * (int(k) > 1)}"
            for c, k in zip(*det[:, 5].unique(return_counts=True), strict=True)
        )
        LOG.info(f"image {n}/{len(images)} {path}: {x.shape[2]}x{x.shape[3]} {counts or '(no detections)'}")

    summary.labels_written = len(label_text)
    if summary.images:
        pre, inf, nms = (seconds / summary.images * 1000).tolist()
        summary.speed_ms = {"preprocess": pre, "inference": inf, "nms": nms}
        LOG.info(f"Speed: {pre:.1f}ms pre-process, {inf:.1f}ms inference, {nms:.1f}ms NMS per image at {imgsz}")
    return summary
