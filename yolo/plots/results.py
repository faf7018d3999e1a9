"""results.png: one small panel per column of the training results table (losses, P, R, mAP, lr)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from yolo.files import atomic_path

# Panels in upstream's order where the column exists; anything else numeric follows.
_PREFERRED = (
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
_SKIP = {"epoch"}


def plot_results(rows: Sequence[dict[str, float | str | None]], path: str | Path) -> Path | None:
    """Draw each numeric column of `rows` against epoch into `path` (atomic); None when no rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    columns = [c for c in _PREFERRED if c in rows[0]]
    columns += [c for c in rows[0] if c not in columns and c not in _SKIP and not c.startswith("x/")]
    columns += [c for c in rows[0] if c.startswith("x/")]
    epochs = [int(r["epoch"]) for r in rows]
    series = {c: [_number(r.get(c)) for r in rows] for c in columns}
    columns = [c for c in columns if any(v is not None for v in series[c])]
    ncols = 5
    nrows = max(1, math.ceil(len(columns) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 2.6 * nrows), squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        xs = [e for e, v in zip(epochs, series[column], strict=True) if v is not None]
        ys = [v for v in series[column] if v is not None]
        ax.plot(xs, ys, marker=".", linewidth=1.5, markersize=6)
        ax.set_title(column, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
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
