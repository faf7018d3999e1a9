"""The bare training step of yolov5n on this CPU, and what moves it: the ceiling the loop is measured against.

    .venv/bin/python bench/step_ceiling.py [--imgsz 320] [--batch-size 16] [--rounds 4] [--variants eager foreach ema compile]

One process, yolov5n.pt fine-tune settings (train mode, channels_last, the trainer's loss, SGD Nesterov
momentum 0.937 over upstream's three parameter groups), random images and ~8 random boxes per image, the
threads of yolo.device.cpu_threads(). Per variant: the first step (one-time costs: allocator, compile)
and the median of the following steps, as images/s; then what a 20-epoch coco128 run (128 images per
epoch) would spend in steps: 20 * 128 / rate + first-step overhead. Variants:
- eager: what the trainer runs (optimizer over for-loops: torch's CPU default);
- foreach: the same with SGD(foreach=True) (multi-tensor kernels);
- compile: torch.compile(model) (inductor, default mode), eager optimizer;
- ema: eager plus the trainer's EMA update after every step (its cost inside the loop).
Compare with the loop's img/s in a run's train.json (`images_per_s`) for the fraction of the ceiling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from yolo.device import cpu_threads  # noqa: E402
from yolo.engine.ema import ModelEMA  # noqa: E402
from yolo.engine.optim import split_param_groups  # noqa: E402
from yolo.hyp import load_hyp  # noqa: E402
from yolo.loss import YoloLoss, detect_head, scale_loss_gains  # noqa: E402
from yolo.model.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402

WEIGHTS = REPO.parent / "shared/weights/yolov5n.pt"


def build(variant: str, imgsz: int):
    torch.manual_seed(0)
    model = model_from_checkpoint(load_checkpoint(WEIGHTS)).train().to(memory_format=torch.channels_last)
    hyp = load_hyp(None)
    loss = YoloLoss(model, scale_loss_gains(hyp, nl=detect_head(model).nl, nc=80, imgsz=imgsz))
    biases, decayed, norms = split_param_groups(model)
    foreach = variant == "foreach"
    opt = torch.optim.SGD(biases, lr=0.01, momentum=0.937, nesterov=True, foreach=foreach)
    opt.add_param_group({"params": decayed, "weight_decay": 5e-4})
    opt.add_param_group({"params": norms})
    forward = torch.compile(model) if variant == "compile" else model
    ema = ModelEMA(model) if variant == "ema" else None
    return model, forward, loss, opt, ema


def batch(g: torch.Generator, bs: int, imgsz: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(bs, 3, imgsz, imgsz, generator=g).contiguous(memory_format=torch.channels_last)
    n = 8 * bs
    targets = torch.cat(
        [
            torch.randint(0, bs, (n, 1), generator=g).float(),
            torch.randint(0, 80, (n, 1), generator=g).float(),
            0.2 + 0.6 * torch.rand(n, 2, generator=g),
            0.05 + 0.3 * torch.rand(n, 2, generator=g),
        ],
        1,
    )
    return images, targets


def step(parts, images: torch.Tensor, targets: torch.Tensor) -> float:
    model, forward, compute_loss, opt, ema = parts
    t = time.perf_counter()
    loss, _ = compute_loss(forward(images), targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)
    return time.perf_counter() - t


def run(variants: list[str], args) -> list[dict]:
    """Every variant built once; then rounds of `steps` steps per variant, the order rotating each round
    (a shared machine drifts: interleaving gives each variant the same conditions); median step time."""
    g = torch.Generator().manual_seed(1)
    built = {v: build(v, args.imgsz) for v in variants}
    first = {v: step(built[v], *batch(g, args.batch_size, args.imgsz)) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            times[v] += [step(built[v], *batch(g, args.batch_size, args.imgsz)) for _ in range(args.steps)]
    rows = []
    for v in variants:
        steady = statistics.median(times[v])
        rate = args.batch_size / steady
        rows.append(
            {
                "variant": v,
                "first_s": first[v],
                "img_s": rate,
                "twenty_epochs_s": 20 * 128 / rate + max(first[v] - steady, 0.0),
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["eager", "foreach", "ema"],
        help="also: compile (minutes of compile time on 2 cores)",
    )
    args = ap.parse_args()
    torch.set_num_threads(cpu_threads())
    load = os.getloadavg()[0]
    rows = run(args.variants, args)
    print(
        f"\nbatch {args.batch_size} x {args.imgsz}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| variant | first step s | steady img/s | 20 coco128 epochs in steps, s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['first_s']:.2f} | {r['img_s']:.1f} | {r['twenty_epochs_s']:.0f} |")
    print(f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
