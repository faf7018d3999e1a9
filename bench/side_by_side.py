"""Whole commands side by side with upstream YOLOv5, alternating, on a quiet machine: wall time and peak RSS.

    .venv/bin/python bench/side_by_side.py --upstream DIR --upstream-python PY [--rounds 3] [--tasks evaluate train]

DIR is an upstream checkout (bench/upstream_setup.sh makes one with its own venv, PY); the data and
weights are ../shared's coco128 and yolov5n.pt, copied to a scratch folder (upstream writes label caches
next to the labels). Each round runs every task upstream-then-ours or ours-then-upstream (the order
alternates between rounds, so neither side always follows the other's heat), timed by /usr/bin/time
(wall seconds, peak RSS). The load average is read before and after every command: figures are only
worth recording when it stays low (nothing else running). Prints a markdown table of medians.

- evaluate: `val.py --weights yolov5n.pt --data coco128 --img 640 --batch-size 32 --device cpu` vs
  `yolo-pipeline evaluate` with the same settings (its defaults);
- train: `train.py --weights yolov5n.pt --img 320 --batch-size 16 --epochs 2 --device cpu` (a fine-tune,
  per-epoch validation, final best.pt validation, plots) vs `yolo-pipeline train` with the same.
Upstream's mAP at full precision: bench/upstream_map.py (in-process val.run), compared in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    before = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        proc = subprocess.run(
            ["/usr/bin/time", "-o", t.name, "-f", "%e %M", *cmd],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
        )
        wall, rss_kb = t.read().split()[-2:]
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {"wall": float(wall), "rss_gb": int(rss_kb) / 1e6, "load": (before, os.getloadavg()[0])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", type=Path, required=True, help="upstream yolov5 checkout")
    ap.add_argument("--upstream-python", required=True, help="python of upstream's venv")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tasks", nargs="+", default=["evaluate", "train"], choices=["evaluate", "train"])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "side_by_side")
    args = ap.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    data_dir = args.work / "coco128"
    shutil.copytree(SHARED / "datasets/coco128", data_dir)
    weights = args.work / "yolov5n.pt"
    shutil.copy(SHARED / "weights/yolov5n.pt", weights)
    ours_yaml = data_dir / "data.yaml"
    upstream_yaml = (
        args.work / "coco128-upstream.yaml"
    )  # upstream resolves a relative `path` from its checkout
    doc = yaml.safe_load(ours_yaml.read_text())
    upstream_yaml.write_text(yaml.safe_dump({**doc, "path": str(data_dir)}))
    ours = str(REPO / ".venv/bin/yolo-pipeline")
    commands = {
        "evaluate": (
            [
                args.upstream_python,
                "val.py",
                "--weights",
                str(weights),
                "--data",
                str(upstream_yaml),
                "--img",
                "640",
                "--batch-size",
                "32",
                "--device",
                "cpu",
                "--project",
                str(args.work / "up"),
                "--exist-ok",
            ],
            [
                ours,
                "evaluate",
                "--data",
                str(ours_yaml),
                "--weights",
                str(weights),
                "--imgsz",
                "640",
                "--batch-size",
                "32",
                "--device",
                "cpu",
                "--out",
                str(args.work / "ours-eval"),
            ],
        ),
        "train": (
            [
                args.upstream_python,
                "train.py",
                "--weights",
                str(weights),
                "--data",
                str(upstream_yaml),
                "--img",
                "320",
                "--batch-size",
                "16",
                "--epochs",
                "2",
                "--device",
                "cpu",
                "--project",
                str(args.work / "up"),
                "--name",
                "train",
                "--exist-ok",
            ],
            [
                ours,
                "train",
                "--data",
                str(ours_yaml),
                "--weights",
                str(weights),
                "--imgsz",
                "320",
                "--batch-size",
                "16",
                "--epochs",
                "2",
                "--device",
                "cpu",
                "--out",
                str(args.work / "ours-train"),
            ],
        ),
    }
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # both sides: their own thread rule
    # a first, untimed run of each side: upstream builds its label cache, both warm the page cache
    for task in args.tasks:
        for cmd, cwd in zip(commands[task], (args.upstream, REPO), strict=True):
            if task == "train":
                shutil.rmtree(args.work / "ours-train", ignore_errors=True)
            timed(cmd, cwd, env)
    results = {task: {"upstream": [], "ours": []} for task in args.tasks}
    for r in range(args.rounds):
        for task in args.tasks:
            sides = [("upstream", commands[task][0], args.upstream), ("ours", commands[task][1], REPO)]
            for side, cmd, cwd in sides if r % 2 == 0 else sides[::-1]:
                if side == "ours" and task == "train":
                    shutil.rmtree(args.work / "ours-train", ignore_errors=True)  # a fresh run, not a resume
                res = timed(cmd, cwd, env)
                results[task][side].append(res)
                print(
                    f"round {r} {task} {side}: {res['wall']:.2f} s, {res['rss_gb']:.2f} GB, "
                    f"load {res['load'][0]:.2f} -> {res['load'][1]:.2f}",
                    flush=True,
                )
    print(
        "\n| task | upstream s (median) | ours s (median) | speed-up | peak RSS upstream / ours GB | load before..after |"
    )
    print("|---|---|---|---|---|---|")
    for task, sides in results.items():
        up = statistics.median(x["wall"] for x in sides["upstream"])
        us = statistics.median(x["wall"] for x in sides["ours"])
        rss = (
            statistics.median(x["rss_gb"] for x in sides["upstream"]),
            statistics.median(x["rss_gb"] for x in sides["ours"]),
        )
        loads = [v for side in sides.values() for x in side for v in x["load"]]
        print(
            f"| {task} | {up:.1f} | {us:.1f} | {up / us:.2f}x | {rss[0]:.2f} / {rss[1]:.2f} | "
            f"{min(loads):.2f}..{max(loads):.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
