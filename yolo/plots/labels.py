"""labels.png and labels_correlogram.png: what the labels of a split look like (plain matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from yolo.files import atomic_path

MAX_DRAWN_BOXES = 1000  # upstream draws at most this many boxes in the box-shape panel
MAX_NAMED_CLASSES = 30  # beyond this the class axis shows ids, not names
HIST_BINS = 50
PNG_METADATA = {"Software": None}  # no matplotlib version in the file: same input, same bytes


def _save(fig, path: Path, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata=PNG_METADATA)
    return path


def _density(ax, x: np.ndarray, y: np.ndarray) -> None:
    from matplotlib.colors import LogNorm

    if len(x):  # log colours: a few crowded cells would otherwise wash out everything else
        ax.hist2d(x, y, bins=HIST_BINS, range=[[0, 1], [0, 1]], cmap="Blues", cmin=1, norm=LogNorm())


def _hist2d(ax, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str) -> None:
    _density(ax, x, y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def plot_labels(boxes: np.ndarray, names: Sequence[str], path: str | Path, seed: int = 0) -> Path:
    """The 2x2 label overview as upstream: instances per class, a sample of box shapes drawn centred at
    their normalised sizes, centre x/y and width/height 2D histograms. boxes: (N, 5) [class, x, y, w, h]."""
    from matplotlib import colormaps
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    nc = len(names)
    cls = boxes[:, 0].astype(np.int64)
    counts = np.bincount(cls, minlength=nc)[:nc]
    colors = colormaps["tab20"](np.arange(max(nc, 1)) % 20)

    fig = Figure(figsize=(8, 8))  # no pyplot: the trainer draws this in a background thread
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    ax.bar(np.arange(nc), counts, color=colors[:nc], width=0.8)
    ax.set_ylabel("instances")
    if nc <= MAX_NAMED_CLASSES:
        ax.set_xticks(np.arange(nc), list(names), rotation=90, fontsize=7)
    else:
        ax.set_xlabel("class")
    ax.set_title(f"{len(boxes)} instances, {int((counts > 0).sum())}/{nc} classes", fontsize=9)

    ax = axes[0, 1]
    rng = np.random.default_rng(seed)
    drawn = boxes if len(boxes) <= MAX_DRAWN_BOXES else boxes[np.sort(rng.choice(len(boxes), MAX_DRAWN_BOXES,
                                                                                  replace=False))]
    patches = [Rectangle((0.5 - w / 2, 0.5 - h / 2), w, h) for w, h in drawn[:, 3:5]]
    ax.add_collection(PatchCollection(patches, facecolor="none", linewidth=0.6, alpha=0.5,
                                      edgecolor=colors[drawn[:, 0].astype(np.int64) % len(colors)]))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"box shapes ({len(drawn)} drawn)", fontsize=9)

    _hist2d(axes[1, 0], boxes[:, 1], boxes[:, 2], "x", "y")
    _hist2d(axes[1, 1], boxes[:, 3], boxes[:, 4], "width", "height")
    fig.tight_layout()
    return _save(fig, Path(path), dpi=150)


def plot_correlogram(boxes: np.ndarray, path: str | Path) -> Path:
    """Pairwise x, y, width, height of every label: histograms on the diagonal, 2D histograms elsewhere."""
    from matplotlib.figure import Figure

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    columns = ("x", "y", "width", "height")
    fig = Figure(figsize=(8, 8))
    axes = fig.subplots(4, 4, sharex="col")
    for i in range(4):
        for j in range(4):
            ax = axes[i, j]
            if i == j:
                ax.hist(boxes[:, 1 + i], bins=HIST_BINS, range=(0, 1), color="steelblue")
            else:
                _density(ax, boxes[:, 1 + j], boxes[:, 1 + i])
                ax.set_ylim(0, 1)
            ax.set_xlim(0, 1)
            if i == 3:
                ax.set_xlabel(columns[j])
            if j == 0:
                ax.set_ylabel(columns[i])
            ax.tick_params(labelsize=6)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.06, top=0.98, wspace=0.3, hspace=0.15)  # no layout pass
    return _save(fig, Path(path), dpi=120)
