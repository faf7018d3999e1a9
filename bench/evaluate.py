"""Benchmark: the evaluate step on coco128 val (yolov5n, CPU): wall time and ms/img pre-process, inference, NMS.

Runs `evaluate_model` (the code the CLI and the trainer use) several ways on the same warm process, so the
rows compare like with like on a shared machine:
- `upstream-like`: one forward per rect batch of --batch-size, default memory format — what val.py does;
- `ours`: the defaults (CPU micro-batches of 4 inside each rect batch, channels_last);
- further micro-batch sizes.
Each row also prints mAP50 / mAP50-95: the rect shapes depend only on --batch-size, so they must agree
(to float noise of the convolution algorithms) whatever the micro-batch.

The machine is shared, and under load two OpenMP threads spend most of their time waiting for each other
at barriers (worse for small batches), so wall times swing 5x with other people's work. Two measurements:
1. the work per image: forward passes alone on the split's real rect batches (decoded once), ONE intra-op
   thread, CPU time of that thread (what the layouts cost, nearly independent of the load), the
   configurations interleaved for --rounds rounds, best round kept;
2. full `evaluate_model` runs (decode, pre-process, inference, NMS, matching) with 2 threads and with 1,
   interleaved, --repeats times, fastest kept. The load average is recorded beside the tables.

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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolo.data.dataset import load_data_config  # noqa: E402
from yolo.data.index import load_split  # noqa: E402
from yolo.evaluate import EvalConfig, _rect_batch_stream, evaluate_model  # noqa: E402
from yolo.model.checkpoint import load_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def run_once(model, index, names, imgsz: int, batch_size: int, micro: int, channels_last: bool, threads: int) -> dict:
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.set_num_threads(threads)
    config = EvalConfig(imgsz=imgsz, batch_size=batch_size, micro_batch=micro, channels_last=channels_last)
    t = time.perf_counter()
    result = evaluate_model(model, index, config, "cpu", names)
    wall = time.perf_counter() - t
    return {"wall_s": wall, **result.speed_ms, "map50": result.map50, "map50_95": result.map50_95}


@torch.inference_mode()
def forward_cpu_ms(model, batches: list[torch.Tensor], runs, rounds: int) -> dict[str, float]:
    """Best round's single-thread CPU ms per image of the forward passes, per (label, micro, channels_last)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n = sum(len(b) for b in batches)
    best = {label: float("inf") for label, _, _ in runs}
    try:
        for _ in range(rounds):
            for label, micro, cl in runs:
                fmt = torch.channels_last if cl else torch.contiguous_format
                model.to(memory_format=fmt)
                inputs = [b.contiguous(memory_format=fmt) for b in batches]
                t = time.thread_time()
                for x in inputs:
                    for i in range(0, len(x), micro):
                        model(x[i:i + micro])
                best[label] = min(best[label], (time.thread_time() - t) * 1e3 / n)
    finally:
        torch.set_num_threads(threads)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "datasets" / "coco128" / "data.yaml"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n.pt"))
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    args = parser.parse_args()

    data = load_data_config(args.data)
    index = load_split(data, "val")
    model, _ = load_model(args.weights, torch.device("cpu"), fuse=True)
    runs = [("upstream-like: 1 forward per rect batch, contiguous", args.batch_size, False)]
    runs += [(f"ours: micro-batch {m}, channels_last", m, True) for m in args.micro]
    runs += [(f"micro-batch {args.micro[0]}, contiguous", args.micro[0], False),
             (f"batch {args.batch_size}, channels_last", args.batch_size, True)]
    load_before = os.getloadavg()[0]
    config = EvalConfig(imgsz=args.imgsz, batch_size=args.batch_size)
    batches = [torch.from_numpy(np.stack([s.image for s in samples])).float().div_(255)
               for _, samples in _rect_batch_stream(index, config, stride=32)]
    work = forward_cpu_ms(model, batches, runs, args.rounds)
    del batches
    for label, _, _ in runs:
        print(f"forward, 1 thread CPU  {label:55s} {work[label]:6.1f} ms/img", flush=True)

    full_runs = [(f"{label}, {t} thread{'s' * (t > 1)}", micro, cl, t)
                 for (label, micro, cl) in (runs[0], runs[1]) for t in (2, 1)]
    best: dict[str, dict] = {}
    for rep in range(args.repeats):
        for label, micro, cl, threads in full_runs:
            r = run_once(model, index, data.names, args.imgsz, args.batch_size, micro, cl, threads)
            print(f"[{rep}] {label:65s} wall {r['wall_s']:6.1f}s  pre {r['preprocess']:5.1f}  inf {r['inference']:6.1f}  "
                  f"nms {r['nms']:5.1f} ms/img  mAP50 {r['map50']:.5f}  mAP50-95 {r['map50_95']:.5f}", flush=True)
            if label not in best or r["wall_s"] < best[label]["wall_s"]:
                best[label] = r
    load_after = os.getloadavg()[0]

    if args.write:
        lines = [
            "",
            f"## Evaluate: yolov5n on coco128 val ({len(index)} images), imgsz {args.imgsz}, batch {args.batch_size}, CPU "
            "(`bench/evaluate.py`, evaluate engineer)",
            "",
            f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores shared with other engineers, torch "
            f"{torch.__version__}; load average {load_before:.1f} before, {load_after:.1f} after.",
            "",
            f"Work per image: forward passes only, 1 intra-op thread, thread CPU time, best of {args.rounds} "
            "interleaved rounds (robust to the load):",
            "",
            "| forward layout | CPU ms/img |",
            "|---|---:|",
        ]
        lines += [f"| {label} | {work[label]:.1f} |" for label, _, _ in runs]
        lines += [
            "",
            f"Full `evaluate_model` runs, wall clock, fastest of {args.repeats} interleaved repeats (ms per image; "
            "wall includes decoding in a thread pool and matching):",
            "",
            "| run | wall s | pre-process | inference | NMS | mAP50 | mAP50-95 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {label} | {best[label]['wall_s']:.1f} | {best[label]['preprocess']:.1f} | "
                  f"{best[label]['inference']:.1f} | {best[label]['nms']:.1f} | {best[label]['map50']:.4f} | "
                  f"{best[label]['map50_95']:.4f} |" for label, _, _, _ in full_runs]
        DOC.parent.mkdir(parents=True, exist_ok=True)
        header = "" if DOC.exists() else "# Benchmarks\n"
        with open(DOC, "a", encoding="utf-8") as f:
            f.write(header + "\n".join(lines) + "\n")
        print(f"appended to {DOC}")


if __name__ == "__main__":
    main()
