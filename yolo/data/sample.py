"""The embedded sample dataset: coloured shapes on cluttered, noisy backgrounds, fully synthetic.

Four classes (circle, square, triangle, cross) with a colour per class (jittered), sizes from small to
large, random rotations, partial overlaps and cluttered backgrounds, so a small model trained from
scratch on a CPU learns it in minutes and its mAP means something. Every image draws from its own
generator seeded by (seed, split, index): the same seed writes the same bytes, and a smaller --train
writes a prefix of a larger one.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np

from yolo.argtypes import int_at_least
from yolo.errors import UserError
from yolo.files import prepare_out_dir

LOG = logging.getLogger(__name__)
CLASS_NAMES = ("circle", "square", "triangle", "cross")
CLASS_COLOURS_BGR = ((50, 50, 220), (60, 200, 60), (220, 110, 40), (40, 210, 235))  # red, green, blue, yellow
SPLIT_IDS = {"train": 0, "val": 1}
MIN_SIZE, MAX_SIZE = 10 / 128, 60 / 128  # object extent as a fraction of the image side (10-60 px at 128)
MAX_OBJECTS = 6
MAX_OVERLAP = 0.3  # partial overlaps allowed, hiding a shape under another not
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # noisy images barely compress; level 1 is fastest


@dataclass(frozen=True)
class SampleConfig:
    out: Path
    seed: int = 0
    train: int = 384
    val: int = 96
    imgsz: int = 128




def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (data.yaml, images/, labels/)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--train", type=int_at_least(1), default=384, help="training images (default %(default)s)")
    parser.add_argument("--val", type=int_at_least(1), default=96, help="validation images (default %(default)s)")
    parser.add_argument("--imgsz", type=int_at_least(32), default=128, help="image side in pixels (default %(default)s)")


def run(args: argparse.Namespace) -> None:
    write_sample_dataset(SampleConfig(out=args.out, seed=args.seed, train=args.train, val=args.val,
                                      imgsz=args.imgsz))


# ---------------------------------------------------------------------------------------------- drawing
def _rotated(points: np.ndarray, angle: float, centre: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]]) + centre


def _shape_polygon(cls: int, extent: float, angle: float, centre: np.ndarray) -> np.ndarray | None:
    """Vertices (n, 2) of the class's polygon whose unrotated extent is `extent` px; None for the circle."""
    h = extent / 2
    if cls == 0:
        return None
    if cls == 1:
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif cls == 2:
        a = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        pts = np.stack([np.cos(a), np.sin(a)], 1) * h
    else:
        t = h / 3  # arm half-thickness
        pts = np.array([[-t, -h], [t, -h], [t, -t], [h, -t], [h, t], [t, t], [t, h], [-t, h], [-t, t], [-h, t],
                        [-h, -t], [-t, -t]])
    return _rotated(pts, angle, centre)


def _overlap(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over the smaller box's area: a small shape hidden under a big one scores 1, not ~0."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.minimum(area(box), area(boxes))


def _clip_colour(values) -> tuple[float, float, float]:
    return tuple(min(255.0, max(0.0, float(v))) for v in values)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A tinted gradient with low-saturation clutter (lines, blobs) and sensor-like noise."""
    base = (rng.uniform(70, 180) + rng.uniform(-20, 20, 3)).astype(np.float32)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]) * np.float32(rng.uniform(10, 40))
    im = np.clip(base[None, None, :] + grad[..., None], 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(4, 12))):  # clutter: grey-ish, so it never looks like a class colour
        colour = _clip_colour(float(rng.uniform(40, 220)) + rng.uniform(-15, 15, 3))
        p = rng.uniform(0, size, 4).astype(int)
        if rng.random() < 0.5:
            cv2.line(im, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            axes = (int(rng.integers(2, max(3, size // 12))), int(rng.integers(2, max(3, size // 12))))
            cv2.ellipse(im, (int(p[0]), int(p[1])), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    noisy = rng.standard_normal(im.shape, dtype=np.float32)
    noisy *= np.float32(rng.uniform(4, 12))
    noisy += im
    return np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)


def draw_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (BGR uint8, size x size) and its labels (k, 5) [class, cx, cy, w, h] normalised."""
    im = _background(rng, size)
    boxes: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _attempt in range(20):
            cls = int(rng.integers(len(CLASS_NAMES)))
            extent = size * float(np.exp(rng.uniform(np.log(MIN_SIZE), np.log(MAX_SIZE))))  # small ones common
            angle = float(rng.uniform(0, 2 * np.pi))
            centre = rng.uniform(extent * 0.75, size - extent * 0.75, 2)
            poly = _shape_polygon(cls, extent, angle, centre)
            if poly is None:
                lo, hi = centre - extent / 2, centre + extent / 2
            else:
                lo, hi = poly.min(0), poly.max(0)
            box = np.concatenate([np.maximum(lo, 0), np.minimum(hi, size)])
            if boxes and _overlap(box, np.stack(boxes)).max() > MAX_OVERLAP:
                continue
            colour = _clip_colour(np.add(CLASS_COLOURS_BGR[cls], rng.uniform(-30, 30, 3)))
            if poly is None:
                cv2.circle(im, (int(round(centre[0] * 16)), int(round(centre[1] * 16))), int(round(extent * 8)),
                           colour, -1, cv2.LINE_AA, shift=4)
            else:
                cv2.fillPoly(im, [np.round(poly * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)
            boxes.append(box)
            classes.append(cls)
            break
    if rng.random() < 0.3:
        im = cv2.GaussianBlur(im, (3, 3), 0)
    b = np.stack(boxes)
    labels = np.column_stack([classes, (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                              b[:, 3] - b[:, 1]])
    labels[:, 1:] /= size
    return im, labels


def _label_text(labels: np.ndarray) -> str:
    return "".join(f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)


# ---------------------------------------------------------------------------------------------- writing
def write_sample_dataset(cfg: SampleConfig) -> Path:
    """Write DIR/data.yaml, DIR/images/{train,val}/*.png and DIR/labels/...; returns the data.yaml path."""
    out = prepare_out_dir(cfg.out)
    tmp = out / f".sample.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        tasks = []
        for split, count in (("train", cfg.train), ("val", cfg.val)):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            tasks += [(tmp, split, i, cfg.seed, cfg.imgsz) for i in range(count)]
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        with ThreadPool(workers) as pool:  # encoding and writing release the GIL; each image owns its rng
            for _ in pool.imap_unordered(_write_one, tasks, chunksize=16):
                pass
        names = ", ".join(CLASS_NAMES)
        (tmp / "data.yaml").write_text(
            f"# synthetic sample data: yolo-pipeline sample-data --seed {cfg.seed} --train {cfg.train} "
            f"--val {cfg.val} --imgsz {cfg.imgsz}\npath: .\ntrain: images/train\nval: images/val\n"
            f"nc: {len(CLASS_NAMES)}\nnames: [{names}]\n", encoding="ascii")
        for name in ("images", "labels", "data.yaml"):  # swap each part in whole, data.yaml last
            _replace(tmp / name, out / name)
    except OSError as e:
        raise UserError(f"cannot write the sample dataset into {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    LOG.info(f"sample dataset: {cfg.train} train + {cfg.val} val images ({cfg.imgsz} px) in {out}")
    return out / "data.yaml"


def _write_one(task: tuple[Path, str, int, int, int]) -> None:
    folder, split, i, seed, imgsz = task
    im, labels = draw_sample(np.random.default_rng([seed, SPLIT_IDS[split], i]), imgsz)
    ok, png = cv2.imencode(".png", im, PNG_PARAMS)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    (folder / "images" / split / f"{i:06d}.png").write_bytes(png.tobytes())
    (folder / "labels" / split / f"{i:06d}.txt").write_text(_label_text(labels), encoding="ascii")


def _replace(new: Path, final: Path) -> None:
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old.{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
