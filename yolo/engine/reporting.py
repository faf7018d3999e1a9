"""What a run shows and leaves behind besides checkpoints: the progress bar, one console line per epoch,
results.csv (every epoch) and results.png (once, at the end), TensorBoard scalars, the first batch plots.

Only rank 0 reports; on other ranks every method is a no-op. Nothing here changes a number the run
computes: losses are read back to the host only for the bar, at most every PROGRESS_REFRESH_S.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from yolo.engine.state import EpochLog
from yolo.errors import UserError
from yolo.files import write_text
from yolo.plots.processes import PlotProcesses

LOG = logging.getLogger(__name__)
PROGRESS_REFRESH_S = 0.5  # losses are read back to the host for the bar at most this often
TQDM_BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"


def history_row(epoch: int, mloss: torch.Tensor, metrics: dict[str, float] | None, lrs: list[float],
                epoch_log: EpochLog) -> dict[str, Any]:
    """One results.csv row: the epoch's mean losses, its validation metrics (if any), lr per group, speed."""
    box, obj, cls = mloss.tolist()
    m = metrics or {}
    row: dict[str, Any] = {
        "epoch": epoch,
        "train/box_loss": box,
        "train/obj_loss": obj,
        "train/cls_loss": cls,
        "metrics/precision": m.get("precision", ""),
        "metrics/recall": m.get("recall", ""),
        "metrics/mAP_0.5": m.get("map50", ""),
        "metrics/mAP_0.5:0.95": m.get("map50_95", ""),
        "val/box_loss": m.get("val/box_loss", ""),
        "val/obj_loss": m.get("val/obj_loss", ""),
        "val/cls_loss": m.get("val/cls_loss", ""),
        "fitness": m.get("fitness", ""),
    }
    for j, lr in enumerate(lrs):
        row[f"x/lr{j}"] = lr
    row["seconds"] = round(epoch_log.seconds, 3)
    row["images_per_s"] = round(epoch_log.images_per_s, 3)
    row["data_wait_share"] = round(epoch_log.data_wait_share, 4)
    row["skipped_steps"] = epoch_log.skipped_steps
    return row


class RunReport:
    """Progress, results and TensorBoard of one run; `publish(path, key)` mirrors what it writes."""

    def __init__(self, out: Path, is_main: bool, epochs: int, batches_per_epoch: int, device: torch.device,
                 names: list[str], publish, tensorboard: bool = False, train_labels=(),
                 plotter: PlotProcesses | None = None) -> None:
        self.out, self.is_main, self.epochs, self.nb, self.device = out, is_main, epochs, batches_per_epoch, device
        self.names = names
        self.publish = publish
        self.plotter = plotter if plotter is not None else PlotProcesses(0)  # matplotlib figures go there
        self.tb = self._tensorboard(train_labels) if tensorboard and is_main else None
        self._bar = None
        self._last_refresh = 0.0

    def _tensorboard(self, train_labels):
        try:  # an optional extra: imported only when asked for
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'yolo-pipeline[tensorboard]'") from None
        writer = SummaryWriter(str(self.out / "tensorboard"))
        labels = np.concatenate([lb[:, 0] for lb in train_labels] or [np.zeros(0)])
        if len(labels):
            writer.add_histogram("classes", labels, 0)
        return writer

    # ------------------------------------------------------------------------------ the progress bar
    def open_bar(self, epoch: int, start: int) -> None:
        if not self.is_main:
            return
        LOG.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size"))
        self._bar = tqdm(total=self.nb, initial=start, bar_format=TQDM_BAR_FORMAT, mininterval=PROGRESS_REFRESH_S)
        self._last_refresh = 0.0

    def step(self, now: float, epoch: int, iteration: int, ni: int, mloss: torch.Tensor, instances: int,
             size: int) -> None:
        """After a batch (`iteration` done): refresh the bar and the step scalars at most every 0.5 s."""
        if self._bar is None or not (now - self._last_refresh > PROGRESS_REFRESH_S or iteration == self.nb):
            return
        self._last_refresh = now
        mem = torch.cuda.memory_reserved(self.device) / 1e9 if self.device.type == "cuda" else 0.0
        losses = mloss.tolist()  # the only host read-back of the losses
        self._bar.set_description(
            ("%11s" * 2 + "%11.4g" * 5) % (f"{epoch}/{self.epochs - 1}", f"{mem:.3g}G", *losses, instances, size),
            refresh=False,
        )
        self._bar.n = iteration
        self._bar.refresh()
        if self.tb is not None:
            self.tb.add_scalars("train_step", dict(zip(("box", "obj", "cls"), losses, strict=True)), ni)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def plot_labels(self, train_labels, seed: int) -> None:
        """labels.jpg and labels_correlogram.jpg of the training labels, as upstream: handed to the plotting
        processes, drawn while the run starts (a figure never fails the run)."""
        if not self.is_main:
            return
        from yolo.plots.labels import plot_correlogram, plot_labels  # matplotlib itself: in the plotter

        boxes = np.concatenate([np.asarray(lb)[:, :5] for lb in train_labels] or [np.zeros((0, 5))])
        self.plotter.submit("labels.jpg", plot_labels, boxes, list(self.names), self.out / "labels.jpg", seed)
        self.plotter.submit("labels_correlogram.jpg", plot_correlogram, boxes, self.out / "labels_correlogram.jpg")

    def plot_batch(self, imgs, targets, paths, i: int) -> None:
        """train_batch{i}.jpg for the first batches of the first epoch (never fails the run)."""
        if not self.is_main:
            return
        path = self.out / f"train_batch{i}.jpg"
        try:
            from yolo.plots.batches import plot_batch  # matplotlib/OpenCV drawing: only when drawing

            plot_batch(imgs, targets, self.names, path, paths=paths)
        except Exception as e:  # noqa: BLE001 - a plot must never stop training
            LOG.warning(f"{path.name} not drawn: {e}")

    # ------------------------------------------------------------------------------ per epoch, at the end
    def log_epoch(self, epoch: int, metrics: dict[str, float] | None, history: list[dict[str, Any]],
                  epoch_log: EpochLog) -> None:
        """results.csv, tensorboard scalars, one console line."""
        if not self.is_main:
            return
        self.write_results(history)
        line = (f"epoch {epoch}: {epoch_log.images_per_s:.1f} img/s, data wait "
                f"{100 * epoch_log.data_wait_share:.0f}% of {epoch_log.seconds:.1f}s")
        if metrics is not None:
            line += (f"; P {metrics['precision']:.3f} R {metrics['recall']:.3f} mAP50 {metrics['map50']:.3f} "
                     f"mAP50-95 {metrics['map50_95']:.3f}")
        if epoch_log.skipped_steps:
            line += f"; {epoch_log.skipped_steps} non-finite step(s) skipped"
        LOG.info(line)
        if self.tb is not None:
            for k, v in history[-1].items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, epoch)
            self.tb.flush()

    def write_results(self, history: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        columns = list(history[0]) if history else []
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        write_text(self.out / "results.csv", buf.getvalue())
        self.publish(self.out / "results.csv", "results.csv")

    def plot_results(self, history: list[dict[str, Any]]) -> None:
        """results.png, once at the end (matplotlib costs seconds, too much for every epoch): handed to the
        plotting processes; `finish_figures` waits for it."""
        if not self.is_main:
            return
        from yolo.plots.results import plot_results  # matplotlib itself: in the plotter

        self.plotter.submit("results.png", plot_results, [dict(row) for row in history], self.out / "results.png")

    def finish_figures(self, names: tuple[str, ...] = ()) -> None:
        """Wait for every figure handed to the plotter, then mirror results.png and `names` (files in the
        run folder) where the checkpoints go."""
        if not self.is_main:
            return
        self.plotter.wait()
        for name in ("results.png", *names):
            if (self.out / name).is_file():
                self.publish(self.out / name, name)

    def close(self) -> None:
        self.close_bar()
        if self.tb is not None:
            self.tb.close()
