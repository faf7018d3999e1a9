"""Training throughput: fine-tune yolov5n on coco128 (defaults: 320 px, batch 16, 2 workers, CPU).

    .venv/bin/python bench/train.py [--epochs 3] [--threads 1 2] [--device cpu|0] [--amp-check]

Runs the real train step in-process (validation off: `--noval` validates only after the last epoch,
and that time is not part of an epoch's seconds), once per --threads value, and prints per-epoch
images/s and data-wait share from results.csv, the median over epochs after the first (the first
carries one-time costs: worker start-up, allocator warm-up) and the ratio to upstream's measured
~11.3 img/s (upstream train.py, same settings, this machine; design.md). Paste the table into
docs/benchmarks.md. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
UPSTREAM_IMG_S = 11.3  # upstream YOLOv5 train.py, yolov5n fine-tune, coco128 @320, batch 16, 2 workers, CPU


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "datasets/coco128/data.yaml"))
    p.add_argument("--weights", default=str(SHARED / "weights/yolov5n.pt"))
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, nargs="+", default=[0], help="intra-op threads to compare (0: default)")
    p.add_argument("--out", default=str(REPO / "bench/out/train"))
    args = p.parse_args()
    sys.path.insert(0, str(REPO))

    rows = []
    for threads in args.threads:
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)  # the trainer honours it (see engine/setup.py)
        else:
            os.environ.pop("OMP_NUM_THREADS", None)
        rows.append(run_once(args, threads))
    print()
    print("| threads | epochs | img/s per epoch | median img/s (epochs 2..) | data wait | vs upstream 11.3 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads'] or 'default'} | {r['epochs']} | {', '.join(f'{x:.1f}' for x in r['per_epoch'])} "
              f"| {r['median']:.1f} | {100 * r['wait']:.0f}% | {r['median'] / UPSTREAM_IMG_S:.2f}x |")
    load = os.getloadavg()
    print(f"\nload average during the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} ({os.cpu_count()} cpus)")
    return 0


def run_once(args, threads: int) -> dict:
    import torch

    from yolo.train import TrainConfig, train

    out = Path(args.out) / f"threads{threads or 'default'}"
    cfg = TrainConfig(data=Path(args.data), weights=args.weights, out=out, imgsz=args.imgsz,
                      batch_size=args.batch_size, workers=args.workers, epochs=args.epochs, device=args.device,
                      noval=True)
    # a fresh run every time (a finished run with the same identity starts clean anyway)
    for name in ("weights/last.pt", "results.csv"):
        (out / name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    assert result.exit_code == 0
    with open(out / "results.csv") as f:
        epochs = list(csv.DictReader(f))
    per_epoch = [float(r["images_per_s"]) for r in epochs]
    waits = [float(r["data_wait_share"]) for r in epochs]
    later = per_epoch[1:] or per_epoch
    doc = json.loads((out / "train.json").read_text())
    print(f"threads {threads or torch.get_num_threads()}: {per_epoch} img/s, wall {wall:.0f}s, "
          f"final mAP50-95 {doc['final']['map50_95']:.4f}")
    return {"threads": threads, "epochs": len(epochs), "per_epoch": per_epoch, "median": statistics.median(later),
            "wait": statistics.median(waits[1:] or waits)}


if __name__ == "__main__":
    raise SystemExit(main())
