"""results.png: one small panel per column of the training results table (losses, P, R, mAP, lr)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from yolo.files import atomic_path

# Upstream's ten panels (2 x 5) where the column exists; the three lr groups share one panel.
_PANELS = (
    "train/box_loss",
    "train/obj_loss",
    "train/cls_loss",
    "metrics/precision",
    "metrics/recall",
    "metrics/mAP_0.5",
    "metrics/mAP_0.5:0.95",
    "fitness",
    "x/lr",
    "data_wait_share",
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
        columns = sorted(c for c in rows[0] if c.startswith(panel)) if panel == "x/lr" else [panel]
        for column in columns:
            points = [(e, _number(r.get(column))) for e, r in zip(epochs, rows, strict=True)]
            points = [(e, v) for e, v in points if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", linewidth=1.5, markersize=6,
                        label=column[2:] if panel == "x/lr" else None)
        ax.set_title(panel, fontsize=10)
        if panel == "x/lr" and len(columns) > 1:
            ax.legend(fontsize=7)
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
