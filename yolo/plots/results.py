"""results.png: upstream's ten panels of the training results table (train/val losses, P, R, mAP), raw and smoothed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from yolo.files import atomic_path

# Upstream's ten panels (2 x 5: train losses, P, R / val losses, mAP); lr and speed stay in results.csv where the column exists; the three lr groups share one panel.
_PANELS = (
    "train/box_loss",
    "train/obj_loss",
    "train/cls_loss",
    "metrics/precision",
    "metrics/recall",
    "val/box_loss",
    "val/obj_loss",
    "val/cls_loss",
    "metrics/mAP_0.5",
    "metrics/mAP_0.5:0.95",
)


def plot_results(rows: Sequence[dict[str, float | str | None]], path: str | Path) -> Path | None:
    """Draw the training curves of `rows` (results.csv rows) against epoch into `path` (atomic PNG)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(2, 5, figsize=(12, 5))
    for ax, panel in zip(axes.flat, _PANELS, strict=True):
        points = [(e, _number(r.get(panel))) for e, r in zip(epochs, rows, strict=True)]
        points = [(e, v) for e, v in points if v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=".", linewidth=1.5, markersize=6, label="results")
            if len(ys) > 2:  # upstream's dotted smoothed curve beside the raw one
                ax.plot(xs, _smooth(ys), ":", linewidth=2, label="smooth")
        ax.set_title(panel, fontsize=10)
    # fixed margins: tight_layout measures every tick label and costs more than the drawing itself
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.93, wspace=0.35, hspace=0.35)
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


def _number(value: float | str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _smooth(values, width: float = 3.0) -> np.ndarray:
    """A Gaussian-weighted moving average (sigma `width` epochs) of each point's neighbours."""
    y = np.asarray(values, float)
    x = np.arange(len(y))
    weights = np.exp(-0.5 * ((x[:, None] - x[None, :]) / width) ** 2)
    return weights @ y / weights.sum(1)
