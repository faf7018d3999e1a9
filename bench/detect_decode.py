"""Detect-head decode cost per eval batch: ours (cached grids, in-place) vs upstream's per-call formula.

Run: .venv/bin/python bench/detect_decode.py [--batch 16 --imgsz 640 --repeats 20]
Only the decode is timed (the raw maps are precomputed), on the real yolov5n head shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from yolo.model import DetectionModel, load_cfg


def upstream_decode(detect, maps):
    """Upstream v7.0's Detect eval branch after the convs: a fresh grid, split, cat."""
    z = []
    for i, x in enumerate(maps):
        bs, na, ny, nx, no = x.shape
        yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
        grid = torch.stack((xv, yv), 2).expand((1, na, ny, nx, 2)).float() - 0.5
        anchor_grid = (detect.anchors[i] * detect.stride[i]).view((1, na, 1, 1, 2)).expand((1, na, ny, nx, 2))
        xy, wh, conf = x.sigmoid().split((2, 2, detect.nc + 1), 4)
        xy = (xy * 2 + grid) * detect.stride[i]
        wh = (wh * 2) ** 2 * anchor_grid
        z.append(torch.cat((xy, wh, conf), 4).view(bs, na * nx * ny, no))
    return torch.cat(z, 1)


def ours_decode(detect, maps):
    return torch.cat([detect._decode(i, x).view(x.shape[0], -1, detect.no) for i, x in enumerate(maps)], 1)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    detect = DetectionModel(load_cfg("yolov5n")).eval().model[-1]
    maps = [torch.randn(args.batch, 3, args.imgsz // s, args.imgsz // s, 85) for s in (8, 16, 32)]
    with torch.no_grad():
        assert torch.equal(upstream_decode(detect, maps), ours_decode(detect, maps))
        ours_decode(detect, maps)  # fill the grid cache, as every batch after the first finds it
        up = timed(lambda: upstream_decode(detect, maps), args.repeats)
        ours = timed(lambda: ours_decode(detect, maps), args.repeats)
    print(f"decode batch {args.batch} at {args.imgsz}: upstream {up:.1f} ms, ours {ours:.1f} ms "
          f"({up / ours:.2f}x), threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
