"""Training loader throughput (images/s) on coco128 train: mosaic at 320 and 640, and without augmentation.

    python bench/loader.py [--data ../shared/datasets/coco128/data.yaml] [--workers 2] [--passes 5]
                           [--cache none ram disk] [--upstream DIR]

Each configuration builds the real loader (create_train_loader, persistent workers), runs `passes` epochs and
reports the median images/s over all but the first (worker start-up and first decodes excluded). Prints a
markdown table with the ratio to upstream YOLOv5's loader: to the figures measured on an idle machine, and,
with --upstream DIR (an unpacked upstream package, e.g. the `yolov5` wheel from PyPI), to upstream's
create_dataloader run side by side in the same process on a private copy of the split (upstream writes a
labels .cache beside the labels, so it never sees the real dataset). The machine is shared: only side-by-side
ratios are comparable between runs.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from yolo.data.dataset import load_data_config  # noqa: E402
from yolo.data.index import load_split  # noqa: E402
from yolo.data.loader import create_train_loader  # noqa: E402
from yolo.hyp import Hyp  # noqa: E402

# upstream YOLOv5 create_dataloader, 2 workers, coco128 train, this machine (docs/benchmarks.md, issue 6)
UPSTREAM = {("mosaic", 320): 100.0, ("mosaic", 640): 68.0, ("none", 320): 285.0, ("none", 640): 285.0}
CONFIGS = [("mosaic", 320), ("mosaic", 640), ("none", 320), ("none", 640)]


def measure(
    index, mode: str, imgsz: int, cache: str | None, workers: int, passes: int, batch_size: int, cache_dir
):
    t0 = time.perf_counter()
    loader, dataset = create_train_loader(
        index, imgsz, batch_size, Hyp(), augment=mode == "mosaic", workers=workers, seed=0,
        cache=cache, cache_dir=cache_dir,
    )  # fmt: skip
    setup_s = time.perf_counter() - t0
    rates = []
    for epoch in range(passes):
        loader.set_epoch(epoch)
        t = time.perf_counter()
        n = sum(len(b[0]) for b in loader)
        rates.append(n / (time.perf_counter() - t))
    del loader  # stop the persistent workers before the next configuration
    return statistics.median(rates[1:]) if passes > 1 else rates[0], setup_s


def import_upstream(folder: Path):
    """upstream's utils.dataloaders from an unpacked package; modules it imports but never uses on the data
    path (pandas, pkg_resources, ultralytics checks) are stubbed so no extra install is needed."""
    sys.path.insert(0, str(folder))
    stubs = (
        "pandas",
        "pkg_resources",
        "seaborn",
        "thop",
        "ultralytics",
        "ultralytics.utils",
        "ultralytics.utils.checks",
    )
    for name in stubs:
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                stub = types.ModuleType(name)
                stub.__spec__, stub.__path__ = importlib.machinery.ModuleSpec(name, None), []
                sys.modules[name] = stub
    sys.modules["ultralytics.utils.checks"].check_requirements = getattr(
        sys.modules["ultralytics.utils.checks"], "check_requirements", lambda *a, **k: None
    )
    pkg = sys.modules["pkg_resources"]
    if not hasattr(pkg, "parse_version"):
        from packaging.version import parse

        pkg.parse_version = parse
    pd = sys.modules["pandas"]
    if not hasattr(pd, "options"):
        pd.options = types.SimpleNamespace(display=types.SimpleNamespace(max_columns=10))
    from yolov5.utils import dataloaders

    return dataloaders


def copy_split(index, dest: Path) -> Path:
    """images/ and labels/ of the split under dest (upstream needs /images/ -> /labels/ paths)."""
    for i in range(len(index)):
        src = index.image_path(i)
        img = dest / "images" / src.name
        img.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, img)
        lb = Path("/labels/".join(str(src).rsplit("/images/", 1))).with_suffix(".txt")
        if lb.exists():
            (dest / "labels").mkdir(exist_ok=True)
            shutil.copyfile(lb, dest / "labels" / lb.name)
    return dest / "images"


def measure_upstream(
    dataloaders, images: Path, mode: str, imgsz: int, cache, workers: int, passes: int, bs: int
):
    t0 = time.perf_counter()
    loader, _ = dataloaders.create_dataloader(
        str(images), imgsz, bs, 32, hyp=Hyp().to_dict(), augment=mode == "mosaic", cache=cache or False,
        workers=workers, shuffle=True, prefix="upstream: ",
    )  # fmt: skip
    setup_s = time.perf_counter() - t0
    rates = []
    for _ in range(passes):
        t = time.perf_counter()
        n = sum(len(b[0]) for b in loader)
        rates.append(n / (time.perf_counter() - t))
    del loader
    return statistics.median(rates[1:]) if passes > 1 else rates[0], setup_s


class _ReplayRandom:
    """Stands in for upstream's `random` module, replaying the draws our generator made, in our order."""

    def __init__(self, unit: list[float], partners=(), order=()):
        self.unit, self.partners, self.order = list(unit), list(partners), list(order)

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.unit.pop(0)

    def choices(self, population, k: int):
        return self.partners[:k]

    def shuffle(self, x: list) -> None:
        x[:] = [x[j] for j in self.order]


def check_exact(dataloaders, index, images: Path) -> None:
    """Our samples equal upstream's bit for bit when fed the same random draws: random_perspective (affine and
    perspective), HSV, whole letterbox samples, and mosaic + perspective."""
    import numpy as np
    import torch
    from yolov5.utils import augmentations as up_aug

    from yolo.data import augment
    from yolo.data.loader import TrainDataset

    hyp = Hyp(degrees=10, shear=3, translate=0.1, scale=0.5)
    for perspective in (0.0, 0.0005):
        h = hyp.replace(perspective=perspective)
        for seed in range(5):
            im = np.random.default_rng(seed + 100).integers(0, 255, (200, 240, 3), dtype=np.uint8)
            lb = np.array([[1, 10, 20, 100, 150], [2, 50, 60, 230, 190], [3, 0, 0, 5, 4]], np.float32)
            up_aug.random = _ReplayRandom(np.random.default_rng(seed).random(8).tolist())
            args = (h.degrees, h.translate, h.scale, h.shear, h.perspective)
            uim, ulb = up_aug.random_perspective(im.copy(), lb.copy(), (), *args, border=(-20, -30))
            oim, olb = augment.random_perspective(
                im.copy(), lb.copy(), np.random.default_rng(seed), h, (-20, -30)
            )
            assert np.array_equal(uim, oim) and np.allclose(ulb, olb, atol=1e-4), (
                f"random_perspective seed {seed}"
            )
    for seed in range(5):
        im = np.random.default_rng(seed).integers(0, 255, (64, 80, 3), dtype=np.uint8)
        np.random.seed(seed)
        gains = np.random.uniform(-1, 1, 3) * [0.015, 0.7, 0.4] + 1
        a, b = im.copy(), im.copy()
        np.random.seed(seed)
        up_aug.augment_hsv(a, 0.015, 0.7, 0.4)
        augment.apply_hsv(b, gains)
        assert np.array_equal(a, b), f"hsv seed {seed}"
    up_ds = dataloaders.LoadImagesAndLabels(str(images), 320, 16, augment=False, hyp=Hyp().to_dict())
    our_ds = TrainDataset(index, 320, Hyp(), augment=False)
    assert [Path(f).name for f in up_ds.im_files] == [Path(p).name for p in our_ds.paths]
    for i in range(0, len(our_ds), 5):
        (ui, ul, _, us), (oi, ol, _, os_) = up_ds[i], our_ds[i]
        assert torch.equal(ui, oi) and torch.allclose(ul, ol, atol=1e-6), f"letterbox sample {i}"
        assert us[0] == os_[0] and np.allclose(us[1][0], os_[1][0]) and np.allclose(us[1][1], os_[1][1])
    up_ds = dataloaders.LoadImagesAndLabels(str(images), 320, 16, augment=True, hyp=hyp.to_dict())
    our_ds = TrainDataset(index, 320, hyp)
    for i in range(8):
        replay = np.random.default_rng(i)  # what load_mosaic draws from its generator, in its order
        centre = replay.random(2)  # uniform(s/2, 3s/2) for yc, xc
        partners, order, unit = replay.integers(0, len(index), 3), replay.permutation(4), replay.random(8)
        dataloaders.random = up_aug.random = _ReplayRandom(
            [*centre, *unit], partners.tolist(), order.tolist()
        )
        uim, ulb = up_ds.load_mosaic(i)
        oim, olb = our_ds.load_mosaic(i, np.random.default_rng(i))
        assert np.array_equal(uim, oim) and np.allclose(ulb, olb, atol=1e-3), f"mosaic {i}"
    print(
        "exact: random_perspective, HSV, letterbox samples and mosaic + perspective equal upstream's",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared/datasets/coco128/data.yaml"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache", nargs="+", default=["none", "ram", "disk"], choices=["none", "ram", "disk"])
    ap.add_argument("--repeats", type=int, default=1, help="alternate ours/upstream this often; best of each")
    ap.add_argument("--upstream", type=Path, help="unpacked upstream yolov5 package to run side by side")
    ap.add_argument("--check-exact", action="store_true", help="with --upstream: compare samples, then stop")
    args = ap.parse_args(argv)
    if args.check_exact and not args.upstream:
        ap.error("--check-exact needs --upstream DIR")
    index = load_split(load_data_config(args.data), "train")
    dataloaders = import_upstream(args.upstream) if args.upstream else None
    run = (args.workers, args.passes, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        images = copy_split(index, Path(tmp) / "upstream") if dataloaders else None
        if args.check_exact:
            check_exact(dataloaders, index, images)
            return 0
        print(
            f"# {len(index)} train images, {args.workers} workers, batch {args.batch_size}, {args.passes} passes"
        )
        head = "| augmentation | imgsz | cache | img/s | upstream idle, no cache | ratio |"
        if dataloaders:
            head += " upstream now, same cache | ratio | upstream now, no cache | ratio |"
        print(head)
        print("|---" * (head.count("|") - 1) + "|")
        upstream_default: dict[tuple[str, int], float] = {}
        for cache in args.cache:
            for mode, imgsz in CONFIGS:
                mode_cache = None if cache == "none" else cache
                rate = same = 0.0
                for _ in range(args.repeats):  # alternating, best of each: the machine is shared
                    rate = max(rate, measure(index, mode, imgsz, mode_cache, *run, Path(tmp) / "cache")[0])
                    if dataloaders:
                        same = max(
                            same, measure_upstream(dataloaders, images, mode, imgsz, mode_cache, *run)[0]
                        )
                idle = UPSTREAM[(mode, imgsz)]
                aug = "mosaic + perspective + HSV + flip" if mode == "mosaic" else "none (letterbox)"
                row = f"| {aug} | {imgsz} | {cache} | {rate:.0f} | {idle:.0f} | {rate / idle:.2f}x |"
                if dataloaders:
                    if cache == "none":
                        upstream_default[(mode, imgsz)] = same
                    default = upstream_default.get((mode, imgsz))
                    row += f" {same:.0f} | {rate / same:.2f}x |"
                    row += f" {default:.0f} | {rate / default:.2f}x |" if default else " - | - |"
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
