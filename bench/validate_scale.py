"""Validation at scale, whole commands side by side with upstream: images/s and peak RSS, linear in N?

    .venv/bin/python bench/validate_scale.py --upstream DIR --upstream-python PY [--sizes 5000 20000]
    .venv/bin/python bench/validate_scale.py --upstream DIR --upstream-python PY --dataset DATA_YAML [--rounds 3]

Writes N synthetic 640x480 JPEGs (smooth random colour fields with a few drawn boxes, ~60 KB each, like
photos in size) with YOLO labels into a scratch folder, all in the train split (plus a token val split), then times by
/usr/bin/time (wall, peak RSS), each once, on a quiet machine:
- ours: `yolo-pipeline validate` (every image decoded, JPEGs at 1/8 scale; sha256 of image and label, label checks,
  index written);
- ours: the loader's start-up over that index: load the split from the index and build the train loader
  (what `train` does before its first batch), in a fresh process;
- upstream: its label-cache build, `LoadImagesAndLabels(...)` from the checkout (PIL verify of headers,
  no pixel decode, a process pool), the cache file removed first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import side_by_side  # bench/: the same timing (/usr/bin/time, load average)

REPO = Path(__file__).resolve().parents[1]

LOADER_STARTUP = """
import sys
from yolo.data.dataset import load_data_config
from yolo.data.index import load_split
from yolo.data.loader import create_train_loader
from yolo.hyp import load_hyp
data = load_data_config(sys.argv[1])
index = load_split(data, "train", index_dir=sys.argv[2])
loader, dataset = create_train_loader(index, 640, 16, load_hyp(None), workers=2)
print(len(dataset), "images indexed")
"""

UPSTREAM_CACHE = """
import sys
sys.path.insert(0, sys.argv[1])
from utils.dataloaders import LoadImagesAndLabels
for folder in sys.argv[2:]:
    ds = LoadImagesAndLabels(folder, img_size=640, batch_size=16)
    print(len(ds), "images cached")
"""


def write_image(args: tuple[Path, str, int]) -> None:
    import cv2

    folder, split, i = args
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = cv2.resize(small, (640, 480), interpolation=cv2.INTER_CUBIC)
    image = cv2.add(image, rng.integers(0, 24, image.shape, dtype=np.uint8))  # some texture
    lines = []
    for _ in range(int(rng.integers(1, 6))):
        cx, cy, w, h = (
            rng.uniform(0.2, 0.8),
            rng.uniform(0.2, 0.8),
            rng.uniform(0.05, 0.3),
            rng.uniform(0.05, 0.3),
        )
        cv2.rectangle(
            image,
            (int((cx - w / 2) * 640), int((cy - h / 2) * 480)),
            (int((cx + w / 2) * 640), int((cy + h / 2) * 480)),
            (255, 255, 255),
            2,
        )
        lines.append(f"{int(rng.integers(0, 80))} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    cv2.imwrite(str(folder / "images" / split / f"{i:06d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    (folder / "labels" / split / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")


VAL_IMAGES = 16  # a token val split of its own: validate checks every split, upstream's cache build one


def make_dataset(folder: Path, n: int) -> Path:
    for sub in ("images/train", "labels/train", "images/val", "labels/val"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count()) as pool:
        pool.map(write_image, [(folder, "train", i) for i in range(n)], chunksize=64)
        pool.map(write_image, [(folder, "val", n + i) for i in range(VAL_IMAGES)])
    yaml_path = folder / "data.yaml"
    names = ", ".join(f"c{i}" for i in range(80))
    yaml_path.write_text(f"path: {folder}\ntrain: images/train\nval: images/val\nnc: 80\nnames: [{names}]\n")
    return yaml_path


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of `cmd`, with this checkout importable."""
    res = side_by_side.timed(cmd, cwd or REPO, {**os.environ, "PYTHONPATH": str(REPO)})
    return res["wall"], res["rss_gb"]


def existing_dataset(args: argparse.Namespace) -> int:
    """An existing dataset (coco128): ours validating every split against upstream's cache build of each
    split's image folder (its caches removed first), alternating, `--rounds` times."""
    import yaml

    doc = yaml.safe_load(args.dataset.read_text())
    root = (args.dataset.parent / doc.get("path", ".")).resolve()
    folders = [root / doc[split] for split in ("train", "val", "test") if doc.get(split)]
    out = args.work / "validated"
    print("| round | what | seconds | peak RSS GB | load average before |\n|---|---|---|---|---|")
    for r in range(args.rounds):
        for side in ("ours", "upstream") if r % 2 == 0 else ("upstream", "ours"):
            load = os.getloadavg()[0]
            if side == "ours":
                shutil.rmtree(out, ignore_errors=True)
                wall, rss = timed([str(REPO / ".venv/bin/yolo-pipeline"), "validate", "--data", str(args.dataset),
                                   "--out", str(out)])
            else:
                for folder in folders:
                    (folder.parent.parent / "labels" / f"{folder.name}.cache").unlink(missing_ok=True)
                wall, rss = timed([args.upstream_python, "-c", UPSTREAM_CACHE, str(args.upstream),
                                   *map(str, dict.fromkeys(folders))], cwd=args.upstream)
            print(f"| {r} | {side} | {wall:.2f} | {rss:.2f} | {load:.2f} |", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", type=Path, required=True)
    ap.add_argument("--upstream-python", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--dataset", type=Path, help="time an existing data.yaml instead (e.g. coco128)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "validate_scale")
    args = ap.parse_args()
    if args.dataset is not None:
        return existing_dataset(args)
    rows = []
    for n in args.sizes:
        shutil.rmtree(args.work, ignore_errors=True)
        yaml_path = make_dataset(args.work / "data", n)
        size = sum(f.stat().st_size for f in (args.work / "data/images/train").iterdir()) / n / 1e3
        load = os.getloadavg()[0]
        out = args.work / "validated"
        wall, rss = timed(
            [str(REPO / ".venv/bin/yolo-pipeline"), "validate", "--data", str(yaml_path), "--out", str(out)]
        )
        rows.append((n, "ours: `yolo-pipeline validate` (every JPEG decoded at 1/8 scale, sha256)", wall, rss, load))
        wall, rss = timed([sys.executable, "-c", LOADER_STARTUP, str(yaml_path), str(out / "index")])
        rows.append((n, "ours: loader start-up from the index", wall, rss, os.getloadavg()[0]))
        (args.work / "data/labels/train.cache").unlink(missing_ok=True)
        wall, rss = timed(
            [
                args.upstream_python,
                "-c",
                UPSTREAM_CACHE,
                str(args.upstream),
                str(args.work / "data/images/train"),
            ],
            cwd=args.upstream,
        )
        rows.append(
            (
                n,
                "upstream: LoadImagesAndLabels label-cache build (header verify)",
                wall,
                rss,
                os.getloadavg()[0],
            )
        )
        print(f"{n} images, {size:.0f} KB each on average", flush=True)
    print("\n| images | what | seconds | images/s | peak RSS GB | load average |")
    print("|---|---|---|---|---|---|")
    for n, what, wall, rss, load in rows:
        print(f"| {n} | {what} | {wall:.1f} | {n / wall:.0f} | {rss:.2f} | {load:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
