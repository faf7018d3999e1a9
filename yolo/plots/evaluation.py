"""Evaluation figures: PR, F1/P/R-vs-confidence curves and the normalised confusion matrix.

Built on `matplotlib.figure.Figure` (the Agg canvas, no pyplot), so drawing from a worker thread or a
headless container needs no backend set-up and leaves no global state behind. Files are written
atomically. Layout follows upstream's figures so they read the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from yolo.files import atomic_path
from yolo.metrics import ClassAP, ap_per_class, smooth

LEGEND_MAX_CLASSES = 20  # a legend per class only while it stays readable (upstream: < 21)
# the files evaluation_figures writes, in the order it hands them out (the longest first)
EVALUATION_FIGURES = ("confusion_matrix.png", "PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png")
# fixed margins (room for the legend on the right): tight_layout would draw every figure twice
CURVE_MARGINS = {"left": 0.08, "right": 0.7, "bottom": 0.1, "top": 0.93}


def _figure(width: float, height: float):
    """A new Agg figure. matplotlib is imported here, not with the module: a step that hands its figures
    to plotting processes (yolo.plots.processes) never pays for the import itself."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        # zlib level 1: a third of the encode time of the default 6 for ~1.3x the bytes (curves and
        # a matrix compress well at any level)
        fig.savefig(tmp, format="png", dpi=150, pil_kwargs={"compress_level": 1})


def _class_labels(class_ap: ClassAP, names: Sequence[str]) -> list[str]:
    return [names[c] if c < len(names) else str(c) for c in class_ap.classes]


def plot_pr_curve(class_ap: ClassAP, names: Sequence[str], path: Path) -> None:
    """Precision vs recall at IoU 0.5 per class, with the mean curve and mAP50 in the legend."""
    fig = _figure(9, 6)
    fig.subplots_adjust(**CURVE_MARGINS)
    ax = fig.subplots()
    recall, curves = class_ap.conf_grid, class_ap.pr_curve
    labels = _class_labels(class_ap, names)
    if 0 < len(labels) <= LEGEND_MAX_CLASSES:
        for label, y, ap in zip(labels, curves, class_ap.ap50, strict=True):
            ax.plot(recall, y, linewidth=1, label=f"{label} {ap:.3f}")
    elif len(labels):
        ax.plot(recall, curves.T, linewidth=1, color="grey")
    if len(labels):
        ax.plot(recall, curves.mean(0), linewidth=3, color="blue",
                label=f"all classes {class_ap.ap50.mean():.3f} mAP@0.5")
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Precision-Recall Curve")
    _save(fig, path)


def plot_confidence_curve(
    class_ap: ClassAP, curves: np.ndarray, names: Sequence[str], path: Path, ylabel: str
) -> None:
    """A metric (F1, precision or recall) vs confidence per class, with the smoothed mean and its peak."""
    fig = _figure(9, 6)
    fig.subplots_adjust(**CURVE_MARGINS)
    ax = fig.subplots()
    conf = class_ap.conf_grid
    labels = _class_labels(class_ap, names)
    if 0 < len(labels) <= LEGEND_MAX_CLASSES:
        for label, y in zip(labels, curves, strict=True):
            ax.plot(conf, y, linewidth=1, label=label)
    elif len(labels):
        ax.plot(conf, curves.T, linewidth=1, color="grey")
    if len(labels):
        mean = smooth(curves.mean(0), 0.05)
        ax.plot(conf, mean, linewidth=3, color="blue",
                label=f"all classes {mean.max():.2f} at {conf[mean.argmax()]:.3f}")
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_xlabel("Confidence")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{ylabel}-Confidence Curve")
    _save(fig, path)


def plot_confusion_matrix(normalized: np.ndarray, names: Sequence[str], path: Path) -> None:
    """Column-normalised confusion matrix (rows predicted, columns true), background last."""
    n = normalized.shape[0]
    shown = np.where(normalized < 0.005, np.nan, normalized)  # blank instead of a wall of 0.00
    fig = _figure(12, 9)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.14, top=0.95)
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = [*names, "background"] if len(names) == n - 1 and n < 100 else None
    if ticks is not None:
        size = 8 if n < 30 else max(2, int(240 / n))
        ax.set_xticks(range(n), ticks, rotation=90, fontsize=size)
        ax.set_yticks(range(n), ticks, fontsize=size)
    if n < 30:  # values fit in the cells only for small matrices
        rows, cols = np.nonzero(~np.isnan(shown))
        for r, c in zip(rows, cols, strict=True):
            value = shown[r, c]
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value > 0.5 else "black")
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title("Confusion Matrix")
    _save(fig, path)


def evaluation_figures(
    class_ap: ClassAP | None, confusion_normalized: np.ndarray, names: Sequence[str], out_dir: Path
) -> list[tuple[str, Callable, tuple]]:
    """(what, function, args) for PR_curve, F1_curve, P_curve, R_curve and confusion_matrix PNGs in out_dir:
    each one independent of the others, to be drawn here or in a plotting process."""
    out_dir = Path(out_dir)
    if class_ap is None:  # no labels: draw empty axes so the outputs always exist
        class_ap = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.zeros(0))
    names = list(names)
    confusion, pr, f1, p, r = (out_dir / name for name in EVALUATION_FIGURES)
    return [
        (confusion.name, plot_confusion_matrix, (confusion_normalized, names, confusion)),
        (pr.name, plot_pr_curve, (class_ap, names, pr)),
        (f1.name, plot_confidence_curve, (class_ap, class_ap.f1_curve, names, f1, "F1")),
        (p.name, plot_confidence_curve, (class_ap, class_ap.p_curve, names, p, "Precision")),
        (r.name, plot_confidence_curve, (class_ap, class_ap.r_curve, names, r, "Recall")),
    ]
