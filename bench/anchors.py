"""Benchmark: k-means + genetic anchor evolution on coco128 train labels, ours vs upstream's serial loop.

The baseline is a faithful re-implementation of upstream's kmean_anchors evolution (utils/autoanchor.py):
one mutation per generation, fitness through torch on (N, 9, 2) ratio tensors, kept when fitter. scipy is
not installed here, so both sides start from the same k-means (ours); the k-means time is reported apart.
Quality is compared too: BPR (on jittered labels, as check_anchors measures it) and fitness, over seeds.

    .venv/bin/python bench/anchors.py [--data ../shared/datasets/coco128/data.yaml] [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolo.anchors import (  # noqa: E402
    MIN_LABEL_PX,
    FitnessEvaluator,
    evolve_anchors,
    fit_figures,
    jitter_scales,
    kmeans,
    label_wh,
    sort_by_area,
)
from yolo.data.dataset import load_data_config  # noqa: E402
from yolo.data.index import load_split  # noqa: E402


def upstream_evolve(k: np.ndarray, wh: np.ndarray, thr: float, generations: int, seed: int) -> np.ndarray:
    """Upstream's serial genetic loop, step for step (torch fitness, numpy mutations)."""
    npr = np.random.RandomState(seed)
    wh_t = torch.tensor(wh, dtype=torch.float32)
    inv_thr = 1 / thr

    def fitness(anchors):
        r = wh_t[:, None] / torch.tensor(anchors, dtype=torch.float32)[None]
        best = torch.min(r, 1 / r).min(2)[0].max(1)[0]
        return (best * (best > inv_thr).float()).mean()

    f, shape, mp, s = fitness(k), k.shape, 0.9, 0.1
    for _ in range(generations):
        v = np.ones(shape)
        while (v == 1).all():
            v = ((npr.random(shape) < mp) * npr.random() * npr.randn(*shape) * s + 1).clip(0.3, 3.0)
        kg = (k.copy() * v).clip(min=2.0)
        fg = fitness(kg)
        if fg > f:
            f, k = fg, kg.copy()
    return sort_by_area(k)


class Clock:
    """Wall and process-CPU seconds since creation (the machine is shared: CPU time is the steadier one)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __call__(self, plus: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
        return plus[0] + time.perf_counter() - self.wall, plus[1] + time.process_time() - self.cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/coco128/data.yaml"))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--default-thread-seeds", type=int, default=2, help="the slow torch-default-threads baseline")
    ap.add_argument("--generations", type=int, default=1000)
    ap.add_argument("--populations", default="1,4,8")
    ap.add_argument("--imgsz", default="320,640")
    ap.add_argument("--thr", type=float, default=4.0)
    args = ap.parse_args()

    index = load_split(load_data_config(args.data), "train")
    populations = [int(p) for p in args.populations.split(",")]
    default_threads = torch.get_num_threads()
    print(f"torch default threads {default_threads}; {len(index)} images; {args.generations} generations")
    rows = []
    for imgsz in (int(s) for s in args.imgsz.split(",")):
        wh0 = label_wh(index.shapes, index.labels, imgsz)
        wh = wh0[(wh0 >= MIN_LABEL_PX).any(1)].astype(np.float32)
        fitness = FitnessEvaluator(wh, args.thr)
        sigma = wh.std(0).astype(np.float64)
        results: dict[str, list[tuple[float, float, float]]] = {}

        def record(name, seconds, k, jit, results=results, fitness=fitness):
            k = sort_by_area(k)
            results.setdefault(name, []).append((*seconds, float(fitness(k)[0]), fit_figures(jit, k, args.thr)[0]))

        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            jit = label_wh(index.shapes, index.labels, imgsz, jitter_scales(len(index), rng))
            clock = Clock()
            k0 = sort_by_area(kmeans(wh / sigma, 9, rng)[0] * sigma)
            t_kmeans = clock()
            record("k-means alone (30 restarts, ours, numpy)", t_kmeans, k0, jit)
            baselines = [(1, "1 thread")]
            if seed < args.default_thread_seeds:
                baselines.append((default_threads, f"{default_threads} threads (torch default)"))
            for threads, label in baselines:
                torch.set_num_threads(threads)
                clock = Clock()
                k = upstream_evolve(k0.copy(), wh, args.thr, args.generations, seed)
                record(f"upstream serial loop, torch {label}", clock(t_kmeans), k, jit)
            torch.set_num_threads(default_threads)
            for p in populations:
                clock = Clock()
                k, _ = evolve_anchors(k0, fitness, args.generations, p, np.random.default_rng(seed))
                record(f"ours, {p} side-by-side run(s)", clock(t_kmeans), k, jit)
        for name, rs in results.items():
            wall, cpu, fit, bpr = zip(*rs, strict=True)
            rows.append((imgsz, name, len(rs), statistics.median(wall), statistics.median(cpu), statistics.mean(fit),
                         min(fit), statistics.mean(bpr), min(bpr), sum(b < 0.98 for b in bpr)))
    print("| imgsz | k-means + generations | seeds | median wall s | median CPU s | mean fitness | min fitness "
          "| mean BPR | min BPR | BPR < 0.98 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.4f} | {r[6]:.4f} | {r[7]:.4f} "
              f"| {r[8]:.4f} | {r[9]} |")


if __name__ == "__main__":
    main()
