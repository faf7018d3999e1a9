"""Benchmark: the validate step's verification speed (images/s), ours vs an emulation of upstream's cache build.

Generates a synthetic dataset (the sample-data generator, small PNGs) in a temp folder, then times:
- ours: `verify_split` over every image (full decode with OpenCV, sha256 of image and label bytes, label
  checks), threads (the default) and processes, all cores and one core;
- the same on coco128 (640 px JPEGs) when ../shared is present;
- reuse: `load_split` served from the written index (stat only) and from a copied dataset (re-hash only);
- upstream: a re-implementation of the steps of upstream's `cache_labels` / `verify_image_label` for
  comparison (PIL open + verify + EXIF size from the header, JPEG end-marker check, label parse, duplicate check, in a
  `multiprocessing.Pool` of min(8, cpus) processes with `imap`), written for this bench — not upstream code.

    .venv/bin/python bench/validate.py [--images 10000] [--imgsz 96] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolo.data.dataset import label_path_for, list_split_images, load_data_config  # noqa: E402
from yolo.data.index import available_cpus, load_split, verify_split  # noqa: E402
from yolo.data.sample import SampleConfig, write_sample_dataset  # noqa: E402
from yolo.data.validate import ValidateConfig, validate  # noqa: E402

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "coco128" / "data.yaml"


def upstream_style_verify(paths: tuple[str, str]) -> tuple:
    """PIL-verify one image and parse its label the way upstream's cache build does (for timing only)."""
    from PIL import Image

    image_file, label_file = paths
    try:
        im = Image.open(image_file)
        im.verify()
        shape = im.size
        if Image.open(image_file).getexif().get(0x0112) in (6, 8):  # header only, as upstream's exif_size
            shape = shape[::-1]
        if min(shape) < 10:
            raise ValueError("small")
        if im.format == "JPEG":
            with open(image_file, "rb") as f:
                f.seek(-2, 2)
                if f.read() != b"\xff\xd9":
                    raise ValueError("corrupt")
        if os.path.isfile(label_file):
            with open(label_file) as f:
                rows = [x.split() for x in f.read().strip().splitlines() if len(x)]
            lb = np.array(rows, dtype=np.float32)
            if len(lb):
                if lb.shape[1] != 5 or (lb < 0).any() or (lb[:, 1:] > 1).any():
                    raise ValueError("bad")
                _, i = np.unique(lb, axis=0, return_index=True)
                lb = lb[i] if len(i) < len(lb) else lb
        else:
            lb = np.zeros((0, 5), np.float32)
        return image_file, lb, shape
    except Exception:
        return None, None, None


def time_it(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_dataset(name: str, yaml_path: Path, repeats: int, work: Path) -> list[tuple[str, int, float]]:
    cfg = load_data_config(yaml_path)
    splits = list(cfg.splits)
    n = sum(len(list_split_images(cfg, s)) for s in splits)
    cpus = available_cpus()
    rows = []

    def ours(workers: int, executor: str):
        return lambda: [verify_split(cfg, s, workers=workers, executor=executor, progress=False) for s in splits]

    for label, fn in [(f"ours, threads x{cpus}", ours(0, "thread")),
                      (f"ours, processes x{cpus}", ours(0, "process")),
                      ("ours, 1 thread", ours(1, "thread"))]:
        rows.append((f"{name}: {label}", n, time_it(fn, repeats)))

    pairs = [(str(p), str(label_path_for(p))) for s in splits for p in list_split_images(cfg, s)]
    workers = min(8, os.cpu_count() or 1)  # upstream's NUM_THREADS

    def upstream():
        with Pool(workers) as pool:
            return list(pool.imap(upstream_style_verify, pairs))

    rows.append((f"{name}: upstream-style PIL verify, Pool x{workers}", n, time_it(upstream, repeats)))

    out = work / f"{name}-validate"
    validate(ValidateConfig(data=yaml_path, out=out, max_bad_fraction=1.0))
    rows.append((f"{name}: load_split from the index (unchanged files)", n,
                 time_it(lambda: [load_split(cfg, s, index_dir=out / "index") for s in splits], repeats)))
    copy = work / f"{name}-copy"
    shutil.copytree(cfg.root, copy, copy_function=shutil.copy)  # new mtimes: every file is re-hashed
    if cfg.yaml_path.parent != cfg.root:
        shutil.copy(cfg.yaml_path, copy / cfg.yaml_path.name)
    copied = load_data_config(copy / cfg.yaml_path.name)
    rows.append((f"{name}: load_split from the index (copied dataset, re-hash)", n,
                 time_it(lambda: [load_split(copied, s, index_dir=out / "index") for s in splits], 1)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="synthetic images (90 %% train, 10 %% val)")
    parser.add_argument("--imgsz", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"cpus: {available_cpus()}, load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        n_val = args.images // 10
        yaml_path = write_sample_dataset(SampleConfig(work / "synthetic", train=args.images - n_val, val=n_val,
                                                      imgsz=args.imgsz))
        print(f"generated {args.images} images ({args.imgsz} px PNG) in {time.perf_counter() - t:.1f} s")
        rows = bench_dataset(f"synthetic {args.images}", yaml_path, args.repeats, work)
        if COCO128.exists():
            rows += bench_dataset("coco128", COCO128, max(3, args.repeats), work)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("| what | images | seconds | images/s |\n|---|---:|---:|---:|")
    for what, n, seconds in rows:
        print(f"| {what} | {n} | {seconds:.2f} | {n / seconds:.0f} |")


if __name__ == "__main__":
    main()
