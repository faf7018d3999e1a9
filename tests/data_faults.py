"""Builders for small real datasets on disk: one file per fault code plus the valid oddities."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

NAMES = ["circle", "square", "triangle"]


def image_array(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    im = np.full((h, w, 3), 90, np.uint8)
    im[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 255, 3, dtype=np.uint8)
    return im


def jpeg_bytes(im: np.ndarray, exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(im[..., ::-1])
    if exif_orientation is None:
        pil.save(buf, "JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation  # the Orientation tag, written by hand as a camera would
        pil.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def png_bytes(im: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".png", im)
    assert ok
    return enc.tobytes()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def write_yaml(root: Path, text: str | None = None, name: str = "data.yaml") -> Path:
    text = text if text is not None else (
        "path: .\ntrain: images/train\nval: images/val\nnames: [circle, square, triangle]\n")
    return write(root / name, text)


def add_pair(root: Path, split: str, stem: str, image: bytes, label: str | bytes | None, ext: str = "png") -> str:
    """Write images/SPLIT/STEM.EXT and (unless None) labels/SPLIT/STEM.txt; returns the image's relative path."""
    write(root / "images" / split / f"{stem}.{ext}", image)
    if label is not None:
        write(root / "labels" / split / f"{stem}.txt", label)
    return f"images/{split}/{stem}.{ext}"


GOOD_LABEL = "0 0.5 0.5 0.25 0.25\n1 0.3 0.6 0.2 0.3\n"

# fault name -> (file the problem names, code, action); the builder below writes each one
FAULTS = {
    "unreadable": ("images/train/unreadable.png", "image_unreadable", "skipped"),
    "truncated": ("images/train/truncated.jpg", "image_corrupt", "skipped"),
    "no_end_marker": ("images/train/no_end_marker.jpg", "image_corrupt", "kept"),
    "tiny": ("images/train/tiny.png", "image_too_small", "skipped"),
    "no_label": ("labels/train/no_label.txt", "label_missing", "kept_as_background"),
    "bad_row": ("labels/train/bad_row.txt", "label_bad_row", "skipped"),
    "out_of_bounds": ("labels/train/out_of_bounds.txt", "label_out_of_bounds", "skipped"),
    "class_range": ("labels/train/class_range.txt", "label_class_out_of_range", "skipped"),
    "duplicate": ("labels/train/duplicate.txt", "label_duplicate", "row_dropped"),
    "zero_size": ("labels/train/zero_size.txt", "label_zero_size", "row_dropped"),
}

# valid oddities: image relative path -> (height, width) after EXIF
ODDITIES = {
    "images/train/gray.png": (48, 64),
    "images/train/rgba.png": (48, 64),
    "images/train/deep16.png": (48, 64),
    "images/train/photo.webp": (48, 64),
    "images/train/rotated.jpg": (64, 48),  # stored 48x64 landscape, EXIF orientation 6 turns it upright
    "images/train/empty_label.png": (48, 64),
    "images/train/polygon.png": (48, 64),
}


def make_faults_dataset(root: Path) -> Path:
    """A dataset with one file per fault code and every valid oddity; returns its data.yaml."""
    im = image_array()
    jpg = jpeg_bytes(im)
    for i in range(3):
        add_pair(root, "train", f"good{i}", png_bytes(image_array(seed=i)), GOOD_LABEL)
        add_pair(root, "val", f"val{i}", jpeg_bytes(image_array(seed=10 + i)), GOOD_LABEL, "jpg")
    # valid oddities
    add_pair(root, "train", "gray", png_bytes(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY)), GOOD_LABEL)
    add_pair(root, "train", "rgba", png_bytes(cv2.cvtColor(im, cv2.COLOR_BGR2BGRA)), GOOD_LABEL)
    add_pair(root, "train", "deep16", png_bytes(im.astype(np.uint16) * 257), GOOD_LABEL)
    webp = io.BytesIO()
    Image.fromarray(im[..., ::-1]).save(webp, "WEBP", lossless=True)
    add_pair(root, "train", "photo", webp.getvalue(), GOOD_LABEL, "webp")
    add_pair(root, "train", "rotated", jpeg_bytes(im, exif_orientation=6), GOOD_LABEL, "jpg")
    add_pair(root, "train", "empty_label", png_bytes(im), "")
    add_pair(root, "train", "polygon", png_bytes(im), "2 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6\n")
    write(root / "images" / "train" / "notes.md", "not an image: ignored\n")
    write(root / "images" / "train" / "README", "no suffix: ignored\n")
    # faults
    add_pair(root, "train", "unreadable", b"\x89PNG this is not really a png" * 3, GOOD_LABEL)
    add_pair(root, "train", "truncated", jpg[: len(jpg) // 2], GOOD_LABEL, "jpg")
    add_pair(root, "train", "no_end_marker", jpg + b"\0\0", GOOD_LABEL, "jpg")
    add_pair(root, "train", "tiny", png_bytes(image_array(8, 30)), GOOD_LABEL)
    add_pair(root, "train", "no_label", png_bytes(im), None)
    add_pair(root, "train", "bad_row", png_bytes(im), "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n")
    add_pair(root, "train", "out_of_bounds", png_bytes(im), "0 1.2 0.5 0.2 0.2\n")
    add_pair(root, "train", "class_range", png_bytes(im), "3 0.5 0.5 0.2 0.2\n")
    add_pair(root, "train", "duplicate", png_bytes(im), GOOD_LABEL + "0 0.5 0.5 0.25 0.25\n")
    add_pair(root, "train", "zero_size", png_bytes(im), "0 0.5 0.5 0 0.2\n1 0.3 0.6 0.2 0.3\n")
    return write_yaml(root)


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under root with its mode, mtime and (for files) bytes: equal before and after = untouched."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[p.relative_to(root).as_posix()] = (st.st_mode, st.st_mtime_ns,
                                                  p.read_bytes() if p.is_file() else b"")
    return out


def make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    root.chmod(root.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_writable(root: Path) -> None:
    root.chmod(root.stat().st_mode | stat.S_IWUSR)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
