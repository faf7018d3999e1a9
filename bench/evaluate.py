"""Benchmark: the evaluate step on coco128 val (yolov5n, CPU): wall time and ms/img pre-process, inference, NMS.

Runs `evaluate_model` (the code the CLI and the trainer use) several ways on the same warm process, so the
rows compare like with like on a shared machine:
- `upstream-like`: one forward per rect batch of --batch-size, default memory format — what val.py does;
- `ours`: the defaults (CPU micro-batches of 4 inside each rect batch, channels_last);
- further micro-batch sizes.
Each row also prints mAP50 / mAP50-95: the rect shapes depend only on --batch-size, so they must agree
(to float noise of the convolution algorithms) whatever the micro-batch.

The machine is shared: the configurations run interleaved, --repeats times, and each row keeps its fastest
repeat (the one least disturbed by other load); the load average is recorded beside the table.

    .venv/bin/python bench/evaluate.py [--imgsz 640] [--batch-size 32] [--micro 4 8] [--repeats 2] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolo.data.dataset import load_data_config, load_split  # noqa: E402
from yolo.evaluate import EvalConfig, evaluate_model  # noqa: E402
from yolo.model.checkpoint import load_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def run_once(model, index, names, imgsz: int, batch_size: int, micro: int, channels_last: bool) -> dict:
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    config = EvalConfig(imgsz=imgsz, batch_size=batch_size, micro_batch=micro, channels_last=channels_last,
                        workers=os.cpu_count() or 2)
    t = time.perf_counter()
    result = evaluate_model(model, index, config, "cpu", names)
    wall = time.perf_counter() - t
    return {"wall_s": wall, **result.speed_ms, "map50": result.map50, "map50_95": result.map50_95}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "datasets" / "coco128" / "data.yaml"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n.pt"))
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    args = parser.parse_args()

    data = load_data_config(args.data)
    index = load_split(data, "val")
    model, _ = load_model(args.weights, torch.device("cpu"), fuse=True)
    runs = [("upstream-like (1 forward per batch, contiguous)", args.batch_size, False)]
    runs += [(f"ours: micro-batch {m}, channels_last", m, True) for m in args.micro]
    runs += [(f"micro-batch {m}, contiguous", m, False) for m in args.micro[:1]]
    load_before = os.getloadavg()[0]
    best: dict[str, dict] = {}
    for rep in range(args.repeats):
        for label, micro, cl in runs:
            r = run_once(model, index, data.names, args.imgsz, args.batch_size, micro, cl)
            print(f"[{rep}] {label:50s} wall {r['wall_s']:6.1f}s  pre {r['preprocess']:5.1f}  inf {r['inference']:6.1f}  "
                  f"nms {r['nms']:5.1f} ms/img  mAP50 {r['map50']:.5f}  mAP50-95 {r['map50_95']:.5f}", flush=True)
            if label not in best or r["wall_s"] < best[label]["wall_s"]:
                best[label] = r
    rows = [(label, best[label]) for label, _, _ in runs]
    load_after = os.getloadavg()[0]

    if args.write:
        lines = [
            "",
            f"## evaluate: yolov5n on coco128 val ({len(index)} images), imgsz {args.imgsz}, batch {args.batch_size}, "
            "CPU",
            "",
            f"`bench/evaluate.py` on {datetime.date.today()}, {platform.machine()} with {os.cpu_count()} cores "
            f"(shared machine: compare rows of one run only), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average {load_before:.1f} before, {load_after:.1f} after; fastest "
            f"of {args.repeats} interleaved repeats. ms per image; wall includes decoding (thread pool) and matching.",
            "",
            "| run | wall s | pre-process | inference | NMS | mAP50 | mAP50-95 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {label} | {r['wall_s']:.1f} | {r['preprocess']:.1f} | {r['inference']:.1f} | {r['nms']:.1f} | "
                  f"{r['map50']:.4f} | {r['map50_95']:.4f} |" for label, r in rows]
        DOC.parent.mkdir(parents=True, exist_ok=True)
        header = "" if DOC.exists() else "# Benchmarks\n"
        with open(DOC, "a", encoding="utf-8") as f:
            f.write(header + "\n".join(lines) + "\n")
        print(f"appended to {DOC}")


if __name__ == "__main__":
    main()
