"""The train step: upstream YOLOv5's training loop, resumable exactly, on one device or under torchrun.

    data -> forward (autocast on CUDA) -> loss -> scaled backward -> (every `accumulate` batches) step

and after each epoch, in order: validate the EMA model, write checkpoints, log. Everything a run needs
to continue lives in weights/last.pt (see `Trainer.training_state`), so a preempted run (SIGTERM: exit
143, SIGINT: exit 130) started again with the same command continues at the batch it reached and ends
with the same weights. The set-up (data, model, anchors, resume decision) is in `yolo.engine.setup`;
the pieces of the loop (schedules, EMA, sink, signals, DDP) in `yolo.engine`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from yolo.argtypes import float_between, int_at_least
from yolo.engine import distributed as dist_utils
from yolo.engine.checkpointing import CheckpointSink, capture_rng, restore_rng
from yolo.engine.ema import ModelEMA, unwrap
from yolo.engine.mirror import MidEpochMirror, interval_minutes
from yolo.engine.optim import OPTIMIZERS, Schedule, build_optimizer, scaled_weight_decay
from yolo.engine.preemption import EXIT_SIGTERM, StopRequested
from yolo.errors import UserError
from yolo.files import write_json, write_text
from yolo.redact import redact

LOG = logging.getLogger(__name__)

CLIP_GRAD_NORM = 10.0
NONFINITE_RECOVER_AFTER = 5  # consecutive non-finite steps before restoring the last good state
PROGRESS_REFRESH_S = 0.5  # losses are read back to the host for the bar at most this often
TQDM_BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"


# ------------------------------------------------------------------------------------------ config
@dataclass
class TrainConfig:
    """Every option of the train step (upstream train.py spelling and defaults)."""

    data: Path | None = None
    out: Path | None = Path("runs/train")
    cfg: str | None = None
    weights: str | None = None
    anchors: Path | None = None
    autoanchor: bool = False
    hyp: Path | None = None
    epochs: int = 100
    batch_size: int = 16
    imgsz: int = 640
    device: str | None = ""
    workers: int | None = 8
    optimizer: str = "SGD"
    cos_lr: bool = False
    label_smoothing: float = 0.0
    patience: int = 100
    freeze: list[int] = field(default_factory=lambda: [0])
    cache: str | None = "auto"  # decoded images in RAM when they fit (see the flag); None: decode every time
    rect: bool = False
    image_weights: bool = False
    quad: bool = False
    single_cls: bool = False
    noval: bool = False
    seed: int = 0
    deterministic: bool = False
    index: Path | None = None
    data_version: str | None = None
    tensorboard: bool = False
    checkpoint_uri: str | None = None
    checkpoint_every: float | None = None  # minutes between mid-epoch last.pt; None: yolo.engine.mirror's default
    resume: str | None = None  # None: automatic; "": this run's own last.pt; else a DIR, file or URI
    sync_bn: bool = False
    trust_unverified: bool = False  # resume from a stored last.pt without a recorded SHA-256
    epochs_given: bool = True  # False when --epochs was left at its default (resume keeps the run's own)

    # Arguments that decide the result; the run identity hashes these (plus data, cfg, hyp).
    RESULT_ARGS = (
        "epochs", "batch_size", "imgsz", "optimizer", "cos_lr", "label_smoothing", "patience", "freeze",
        "rect", "image_weights", "quad", "single_cls", "noval", "seed", "deterministic", "autoanchor", "sync_bn",
    )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain, secret-free dict (args.yaml, checkpoints): paths as strings, credentials stripped."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        if d["checkpoint_uri"]:
            d["checkpoint_uri"] = _strip_credentials(d["checkpoint_uri"])
        d.pop("epochs_given")
        return d


def _strip_credentials(uri: str) -> str:
    """s3://key:secret@bucket/... → s3://bucket/... (credentials never belong in args or checkpoints)."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"








def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = parser.add_argument
    a("--data", type=Path, help="data.yaml (upstream format); optional with --resume")
    a("--out", type=Path, help=f"run folder: weights/, results.csv, train.json (default {d.out})")
    a("--cfg", help="model cfg (yolov5n.yaml ... or a path); default: the --weights' cfg, else yolov5n.yaml")
    a("--weights", help="initial weights: our .pt, an upstream YOLOv5 .pt, or a known name")
    a("--anchors", type=Path, help="anchors.json from the stats step (beats --cfg's and the checkpoint's)")
    a("--autoanchor", action="store_true", help="check anchor fit on the training labels and evolve if poor")
    a("--hyp", type=Path, help="hyperparameter yaml (default: upstream hyp.scratch-low values)")
    a("--epochs", type=int_at_least(1), default=None, help=f"total epochs (default {d.epochs})")
    a("--batch-size", type=int_at_least(1), default=d.batch_size, help="total batch size for all processes")
    a("--imgsz", "--img", "--img-size", type=int_at_least(1), default=d.imgsz, help="train/val image size (px)")
    a("--device", help="cpu, 0, 0,1 ... (default: first GPU if any, else cpu)")
    a("--workers", type=int_at_least(0), help=f"loader workers per process, at most (default {d.workers})")
    a("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimizer")
    a("--cos-lr", action="store_true", help="cosine one-cycle lr schedule (default linear)")
    a("--label-smoothing", type=float_between(0, 1, high_open=True), default=d.label_smoothing,
      help="class label smoothing epsilon")
    a("--patience", type=int_at_least(0), default=d.patience, help="epochs without improvement before stopping")
    a("--freeze", type=int_at_least(0), nargs="+", default=d.freeze,
      help="freeze the first N layers (one number) or the listed layer indices")
    a("--cache", nargs="?", const="ram", choices=("auto", "ram", "disk", "off"), default="auto",
      help="decoded images: auto (default: RAM when they need <= 25%% of free memory; on a 2-core machine "
           "decoding is half the loader's work), ram (what a bare --cache means, as upstream), disk, off")
    a("--rect", action="store_true", help="rectangular training batches")
    a("--image-weights", action="store_true", help="sample images weighted by class difficulty")
    a("--quad", action="store_true", help="quad collate (4 images per 2x-size image)")
    a("--single-cls", action="store_true", help="train every class as one")
    a("--noval", action="store_true", help="validate only after the last epoch")
    a("--seed", type=int, default=d.seed, help="global training seed")
    a("--deterministic", action="store_true", help="deterministic algorithms (exact resume on CPU)")
    a("--index", type=Path, help="validate step's DIR/index to reuse")
    a("--data-version", help="opaque data version label recorded in outputs (a DVC md5, a git SHA)")
    a("--tensorboard", action="store_true", help="log to OUT/tensorboard (needs the tensorboard extra)")
    a("--checkpoint-uri", help="mirror checkpoints to s3://bucket/prefix (or a folder) and resume from it; "
                               "{run_id} in it becomes the run identity (ROOT/{run_id}: restarts resume)")
    a("--resume", nargs="?", const="", default=None, metavar="DIR|URI",
      help="continue a run: its folder, last.pt or s3:// URI (no value: --out / --checkpoint-uri)")
    a("--checkpoint-every", type=float_between(0), metavar="MINUTES",
      help="also write last.pt mid-epoch every MINUTES (0: off; default 10 with a remote --checkpoint-uri, else off)")
    a("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (GPU only)")
    a("--trust-unverified", action="store_true",
      help="resume from a stored last.pt that has no recorded SHA-256 (rewritten by another tool)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags. Options --resume may change are None when not given, so a resumed
    run keeps its own values; `out` stays None here and is settled by the resume logic."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["epochs_given"] = args.epochs is not None
    if values.get("cache") == "off":
        values["cache"] = None
    defaults = TrainConfig()
    for name in ("epochs", "device", "workers"):
        if values.get(name) is None and args.resume is None:
            values[name] = getattr(defaults, name)
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    return train(config_from_args(args)).exit_code


# ------------------------------------------------------------------------------------------ results
@dataclass
class TrainResult:
    exit_code: int
    out: Path
    epochs_run: int
    best_epoch: int | None
    best: dict[str, float] | None
    final: dict[str, float] | None
    run_id: str


@dataclass
class EpochLog:
    """What one epoch's training measured (summed in host floats at the end of the epoch)."""

    images: int = 0
    seconds: float = 0.0
    data_wait: float = 0.0
    skipped_steps: int = 0

    @property
    def data_wait_share(self) -> float:
        return self.data_wait / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train(cfg: TrainConfig, stop: StopRequested | None = None) -> TrainResult:
    """Run the train step described by `cfg` (the CLI's `train`); `stop` decides when to stop early
    (default: on SIGTERM/SIGINT)."""
    from yolo.engine.setup import prepare_run  # data, model, anchors, resume decision

    ctx = dist_utils.context_from_env()
    trainer = None
    # process-wide torch settings a run changes (--deterministic, threads): restored for library callers
    saved = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    setup = None
    try:
        setup = prepare_run(cfg, ctx)
        trainer = Trainer(setup)
        with stop or StopRequested() as active:
            return trainer.fit(active)
    finally:
        if trainer is not None:
            trainer.close()
        elif setup is not None:
            setup.release()
        dist_utils.shutdown(ctx)
        torch.use_deterministic_algorithms(saved[0])
        torch.set_num_threads(saved[1])


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """The loop and its end-of-epoch hooks. Built from a prepared `RunSetup` (yolo.engine.setup)."""

    def __init__(self, setup) -> None:
        self.s = setup
        cfg, ctx = setup.cfg, setup.ctx
        self.cfg, self.ctx, self.device = cfg, ctx, setup.device
        self.out = setup.out
        self.weights_dir = self.out / "weights"
        self.hyp = setup.hyp
        self.amp = self.device.type == "cuda"
        self.model: nn.Module = setup.model
        self.epochs = cfg.epochs

        # optimiser: decay scaled to the images per step (--batch-size is the total over all ranks, as
        # upstream's accumulation uses it); the schedule sets lr/momentum every step
        wd = scaled_weight_decay(self.hyp.weight_decay, cfg.batch_size)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.hyp.lr0, self.hyp.momentum, wd)
        self.ema = ModelEMA(self.model) if ctx.is_main else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.loader, self.dataset = setup.train_loader, setup.train_dataset
        self.nb = len(self.loader)
        self.schedule = Schedule(
            lr0=self.hyp.lr0, lrf=self.hyp.lrf, momentum=self.hyp.momentum, warmup_epochs=self.hyp.warmup_epochs,
            warmup_momentum=self.hyp.warmup_momentum, warmup_bias_lr=self.hyp.warmup_bias_lr, epochs=self.epochs,
            batches_per_epoch=self.nb, batch_size=cfg.batch_size, cos_lr=cfg.cos_lr,
        )  # fmt: skip
        self.compute_loss = setup.compute_loss
        self.train_model = self._wrap_ddp(self.model)

        # loop state (everything here is in last.pt)
        self.epoch = 0  # epoch in progress (or next to start)
        self.iteration = 0  # batches of `epoch` already done
        self.last_opt_step = -1
        self.best_fitness = 0.0
        self.best_epoch: int | None = None
        self.stopper_best = (0.0, 0)  # (fitness, epoch) of upstream's EarlyStopping
        self.lr_scale = 1.0
        self.history: list[dict[str, Any]] = []
        self.mloss = torch.zeros(3, device=self.device)
        self.epoch_log = EpochLog()
        self.nonfinite_run = 0  # consecutive non-finite steps
        self.nonfinite_total = 0
        self.batches_run = 0  # batches trained over the whole run (the all-skipped check)
        self._bad_on_device = torch.zeros((), dtype=torch.int64, device=self.device)  # CUDA bookkeeping
        self._bad_seen = 0
        self._window_start = 0
        self.finished = False
        self.best_metrics: dict[str, float] | None = None
        self.final_metrics: dict[str, float] | None = None
        self.run_images = 0
        self.run_seconds = 0.0
        self.run_wait = 0.0
        self.resumed_from: str | None = None
        self._resumed_epoch_seconds = 0.0  # time already spent in a mid-epoch-resumed epoch

        self.sink = CheckpointSink(cfg.checkpoint_uri if ctx.is_main else None)
        self.mirror = MidEpochMirror(interval_minutes(cfg.checkpoint_uri, cfg.checkpoint_every) if ctx.is_main else 0)
        self.tb = self._tensorboard()
        if setup.resume_state is not None:
            self.load_training_state(setup.resume_state)
            self.resumed_from = setup.resumed_from
        self.good_state = self._snapshot()

    # -------------------------------------------------------------------------------- set-up helpers
    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if not self.ctx.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, output_device=ids[0] if ids else None)

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.ctx.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'yolo-pipeline[tensorboard]'") from None
        writer = SummaryWriter(str(self.out / "tensorboard"))
        labels = np.concatenate([lb[:, 0] for lb in self.s.train_index.labels] or [np.zeros(0)])
        if len(labels):
            writer.add_histogram("classes", labels, 0)
        return writer

    # -------------------------------------------------------------------------------- the run
    def fit(self, stop: StopRequested) -> TrainResult:
        cfg = self.cfg
        if self.ctx.is_main:
            LOG.info(
                f"run {self.s.run_id}: {self.epochs} epochs, batch {cfg.batch_size} "
                f"({self.ctx.world_size} process(es)), accumulate to {self.schedule.accumulate(10**9)} batches, "
                f"imgsz {cfg.imgsz}, {self.device}, {self.loader.num_workers} loader workers -> {self.out}"
            )
        start_epoch = self.epoch
        for epoch in range(start_epoch, self.epochs):
            self.epoch = epoch
            completed = self.train_epoch(epoch, stop)
            if not completed:
                return self._preempted(stop)
            metrics = self.validate(epoch)  # hook 1
            stop_early = self.end_epoch(epoch, metrics)  # hook 2: state, checkpoints
            self.log_epoch(epoch, metrics)  # hook 3: results.csv/png, tensorboard, console
            if dist_utils.broadcast_object(stop_early, self.ctx):
                LOG.info(f"early stopping: no improvement in {cfg.patience} epochs; best epoch {self.best_epoch}")
                break
            if epoch + 1 < self.epochs and self._should_stop(stop, epoch + 1, 0):
                return self._preempted(stop)
        return self._finish()

    # -------------------------------------------------------------------------------- one epoch
    def train_epoch(self, epoch: int, stop: StopRequested) -> bool:
        """Train `epoch` from batch self.iteration; False when a stop was requested mid-epoch."""
        model, device, cfg, ctx = self.train_model, self.device, self.cfg, self.ctx
        model.train()
        start = self.iteration
        if start == 0:
            self.mloss.zero_()
            self.epoch_log = EpochLog()
            self.optimizer.zero_grad(set_to_none=True)  # upstream discards a partial accumulation here
        if cfg.image_weights and start == 0 and self.history:
            # upstream: sampling weights from the class weights and (1 - last per-class mAP)^2
            self.dataset.update_image_weights(dist_utils.broadcast_object(self.s.last_maps, ctx))
        batches = self.s.epoch_batches(epoch, start)
        nw = self.schedule.warmup_iterations
        self.schedule.apply(self.optimizer, epoch * self.nb + start, epoch, self.lr_scale)
        bar = self._progress_bar(epoch, start)
        last_refresh = 0.0
        log = self.epoch_log
        t_epoch = time.perf_counter()
        t_wait = t_epoch
        for i, (imgs, targets, paths, _) in enumerate(batches, start=start):
            now = time.perf_counter()
            log.data_wait += now - t_wait
            ni = i + self.nb * epoch
            if ni <= nw:
                self.schedule.apply(self.optimizer, ni, epoch, self.lr_scale)
            accumulate = self.schedule.accumulate(ni)
            step_now = ni - self.last_opt_step >= accumulate
            if i < 3 and epoch == 0 and ctx.is_main:
                self.s.plot_batch(imgs, targets, paths, self.out / f"train_batch{i}.jpg")
            # uint8 -> device -> channels_last -> float: the conversion runs once, on the device
            imgs = imgs.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last).float().div_(255)
            targets = targets.to(device, non_blocking=True)

            sync = contextlib.nullcontext() if step_now or not ctx.enabled else model.no_sync()
            with sync:
                with torch.autocast(device.type, enabled=self.amp):
                    preds = model(imgs)
                    loss, items = self.compute_loss(preds, targets)
                    if ctx.enabled:
                        loss = loss * ctx.world_size  # DDP averages gradients; upstream scales back up
                    if cfg.quad:
                        loss = loss * 4.0
                finite = self._loss_is_finite(loss)
                if finite:
                    self.scaler.scale(loss).backward()
            if finite and step_now:
                finite = self._optimizer_step()
                self.last_opt_step = ni
            if self.device.type == "cuda":
                self._track_nonfinite_on_device(loss, items, epoch, i)
            elif not finite:
                log.skipped_steps += 1
                self._on_nonfinite(epoch, i)
            else:
                self.nonfinite_run = 0
                self.mloss.mul_(i).add_(items.float()).div_(i + 1)  # running mean, stays on the device

            self.iteration = i + 1
            self.batches_run += 1
            log.images += imgs.shape[0] * (4 if cfg.quad else 1) * ctx.world_size  # source images, all ranks
            if bar is not None and (now - last_refresh > PROGRESS_REFRESH_S or i + 1 == self.nb):
                last_refresh = now
                losses = self._refresh_bar(bar, epoch, targets.shape[0], imgs.shape[-1])
                if self.tb is not None:
                    self.tb.add_scalars("train_step", dict(zip(("box", "obj", "cls"), losses, strict=True)), ni)
            if i + 1 < self.nb and self._should_stop(stop, epoch, i + 1):
                self._close_bar(bar)
                self._account_epoch_time(t_epoch)
                return False
            if i + 1 < self.nb and self.mirror.due():  # a node lost without SIGTERM costs <= N minutes
                self.save_last()
            t_wait = time.perf_counter()
        self._close_bar(bar)
        self._account_epoch_time(t_epoch)
        return True

    def _account_epoch_time(self, t_epoch: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t_epoch
        self.epoch_log.seconds = self._resumed_epoch_seconds + elapsed
        self._resumed_epoch_seconds = 0.0

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        # On the CPU this check costs nothing; on CUDA it would sync every step, so there the GradScaler
        # (which skips steps with inf/nan gradients) does the work and the bar reports it.
        if self.device.type == "cuda":
            return True
        ok = bool(torch.isfinite(loss))
        if self.ctx.enabled:  # every rank must skip together or DDP's all-reduce would hang
            ok = not dist_utils.any_rank(not ok, self.ctx, self.device)
        return ok

    def _optimizer_step(self) -> bool:
        """Unscale, clip to norm 10, step, update EMA; False when the gradients were not finite."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=CLIP_GRAD_NORM)
        if self.device.type != "cuda" and not bool(torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return True

    def _track_nonfinite_on_device(self, loss: torch.Tensor, items: torch.Tensor, epoch: int, i: int) -> None:
        """CUDA: count non-finite losses without a sync (GradScaler skips their steps); every 10 batches
        read the count back and, after NONFINITE_RECOVER_AFTER in a row, recover as on the CPU."""
        finite = torch.isfinite(loss.detach())
        self._bad_on_device += (~finite).int()
        new_mean = (self.mloss * i + items.float()) / (i + 1)
        self.mloss.copy_(torch.where(finite, new_mean, self.mloss))
        if (i + 1) % 10 and i + 1 != self.nb:
            return
        total = int(self._bad_on_device.item())
        new, self._bad_seen = total - self._bad_seen, total
        window, self._window_start = (i + 1) - self._window_start, (i + 1) % self.nb
        if new:
            LOG.warning(f"{new} non-finite loss(es) up to epoch {epoch} batch {i}: GradScaler skipped the steps")
            self.epoch_log.skipped_steps += new
            self.nonfinite_total += new
            self.nonfinite_run = self.nonfinite_run + new if new == window else new
        else:
            self.nonfinite_run = 0
        # every rank votes at the same batches, so all of them recover together or none does
        if dist_utils.any_rank(self.nonfinite_run >= NONFINITE_RECOVER_AFTER, self.ctx, self.device):
            self._recover(epoch, i)

    def _on_nonfinite(self, epoch: int, i: int) -> None:
        """CPU: the step was skipped; after NONFINITE_RECOVER_AFTER in a row, recover."""
        self.nonfinite_run += 1
        self.nonfinite_total += 1
        if self.nonfinite_run == 1:
            LOG.warning(f"non-finite loss at epoch {epoch} batch {i}: step skipped")
        if self.nonfinite_run >= NONFINITE_RECOVER_AFTER:
            self._recover(epoch, i)

    def _recover(self, epoch: int, i: int) -> None:
        """Back to the last good state with half the learning rate (repeated non-finite steps)."""
        self.restore_good_state()
        self.lr_scale *= 0.5
        self.nonfinite_run = 0
        LOG.warning(
            f"{NONFINITE_RECOVER_AFTER} non-finite steps in a row: restored the state of "
            f"{self.good_state['label']} and lowered the learning rate to x{self.lr_scale:g}"
        )
        self.schedule.apply(self.optimizer, i + self.nb * epoch, epoch, self.lr_scale)

    def _should_stop(self, stop: StopRequested, epoch: int, iteration: int) -> bool:
        # Under DDP all ranks must stop at the same batch: agree every step on CPU (a tiny gloo
        # all-reduce), every 10 steps on CUDA (each check syncs the stream), and at every epoch end.
        wanted = stop.poll(epoch, iteration)
        if not self.ctx.enabled:
            return wanted
        if self.device.type == "cuda" and iteration % 10:
            return False
        return dist_utils.any_rank(wanted, self.ctx, self.device)

    # -------------------------------------------------------------------------------- progress bar
    def _progress_bar(self, epoch: int, start: int):
        if not self.ctx.is_main:
            return None
        from tqdm import tqdm

        LOG.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size"))
        return tqdm(total=self.nb, initial=start, bar_format=TQDM_BAR_FORMAT, mininterval=PROGRESS_REFRESH_S)

    def _refresh_bar(self, bar, epoch: int, instances: int, size: int) -> None:
        mem = torch.cuda.memory_reserved(self.device) / 1e9 if self.device.type == "cuda" else 0.0
        losses = self.mloss.tolist()  # the only host read-back of the losses, at most every 0.5 s
        bar.set_description(
            ("%11s" * 2 + "%11.4g" * 5) % (f"{epoch}/{self.epochs - 1}", f"{mem:.3g}G", *losses, instances, size),
            refresh=False,
        )
        bar.n = self.iteration
        bar.refresh()
        return losses

    @staticmethod
    def _close_bar(bar) -> None:
        if bar is not None:
            bar.close()

    # -------------------------------------------------------------------------------- hooks
    def validate(self, epoch: int) -> dict[str, float] | None:
        """Hook 1: mAP of the EMA model on the val split (rank 0; --noval: last epoch only)."""
        final_epoch = epoch + 1 == self.epochs or self._possible_stop(epoch)
        if not self.ctx.is_main or (self.cfg.noval and not final_epoch):
            return None
        model = self.ema.ema
        if self.amp:
            model = copy.deepcopy(model).half()
        result = self.s.evaluate(model)
        self.s.last_maps = result.maps
        return result.totals()

    def end_epoch(self, epoch: int, metrics: dict[str, float] | None) -> bool:
        """Hook 2: update best/patience, history, and write last.pt (+ best.pt). Returns early-stop."""
        self.run_images += self.epoch_log.images
        self.run_seconds += self.epoch_log.seconds
        self.run_wait += self.epoch_log.data_wait
        self.epoch += 1
        self.iteration = 0
        improved = False
        stop_early = False
        if metrics is not None:
            fi = metrics["fitness"]
            improved = fi > self.best_fitness or self.best_epoch is None
            if improved:
                self.best_fitness, self.best_epoch, self.best_metrics = fi, epoch, metrics
            self.final_metrics = metrics
            # upstream EarlyStopping: >= so that zero fitness early on still moves the best epoch
            if fi >= self.stopper_best[0]:
                self.stopper_best = (fi, epoch)
            stop_early = self.cfg.patience > 0 and epoch - self.stopper_best[1] >= self.cfg.patience
        self.history.append(self._history_row(epoch, metrics))
        if self.ctx.is_main:
            self.finished = self.epoch >= self.epochs or stop_early
            self.save_last()
            if improved:
                self.save_best(epoch, metrics)
        self.good_state = self._snapshot()
        return stop_early

    def _possible_stop(self, epoch: int) -> bool:
        return self.cfg.patience > 0 and epoch - self.stopper_best[1] >= self.cfg.patience - 1

    def _history_row(self, epoch: int, metrics: dict[str, float] | None) -> dict[str, Any]:
        box, obj, cls = self.mloss.tolist()
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
            "fitness": m.get("fitness", ""),
        }
        for j, group in enumerate(self.optimizer.param_groups):
            row[f"x/lr{j}"] = group["lr"]
        row["seconds"] = round(self.epoch_log.seconds, 3)
        row["images_per_s"] = round(self.epoch_log.images_per_s, 3)
        row["data_wait_share"] = round(self.epoch_log.data_wait_share, 4)
        row["skipped_steps"] = self.epoch_log.skipped_steps
        return row

    def log_epoch(self, epoch: int, metrics: dict[str, float] | None) -> None:
        """Hook 3: results.csv, results.png, tensorboard scalars, one console line."""
        if not self.ctx.is_main:
            return
        self.write_results()
        row = self.history[-1]
        line = (f"epoch {epoch}: {self.epoch_log.images_per_s:.1f} img/s, data wait "
                f"{100 * self.epoch_log.data_wait_share:.0f}% of {self.epoch_log.seconds:.1f}s")
        if metrics is not None:
            line += (f"; P {metrics['precision']:.3f} R {metrics['recall']:.3f} mAP50 {metrics['map50']:.3f} "
                     f"mAP50-95 {metrics['map50_95']:.3f}")
        if self.epoch_log.skipped_steps:
            line += f"; {self.epoch_log.skipped_steps} non-finite step(s) skipped"
        LOG.info(line)
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, epoch)
            self.tb.flush()

    def write_results(self) -> None:
        buf = io.StringIO()
        columns = list(self.history[0]) if self.history else []
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        write_text(self.out / "results.csv", buf.getvalue())
        self.sink.publish(self.out / "results.csv", "results.csv")

    def plot_results(self) -> None:
        """results.png, drawn once at the end (matplotlib costs seconds, too much for every epoch)."""
        from yolo.plots.results import plot_results

        try:
            if plot_results(self.history, self.out / "results.png") is not None:
                self.sink.publish(self.out / "results.png", "results.png")
        except Exception as e:  # noqa: BLE001 - a plot must never fail the run
            LOG.warning(f"results.png not drawn: {e}")

    # -------------------------------------------------------------------------------- checkpoints
    def training_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly (the `train` entry of last.pt)."""
        grads = None
        if self.iteration > 0 and self.last_opt_step < self.epoch * self.nb + self.iteration - 1:
            # mid-accumulation: gradients of the batches since the last step
            grads = [p.grad.detach().clone() if p.grad is not None else None for p in self.model.parameters()]
        return {
            "model": _cpu(unwrap(self.model).state_dict()),
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": _cpu(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "batches_per_epoch": self.nb,
            "last_opt_step": self.last_opt_step,
            "grads": _cpu(grads),
            "mloss": self.mloss.detach().cpu(),
            "epoch_log": asdict(self.epoch_log),
            "best_fitness": self.best_fitness,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "final_metrics": self.final_metrics,
            "stopper_best": list(self.stopper_best),
            "lr_scale": self.lr_scale,
            "nonfinite_total": self.nonfinite_total,
            "batches_run": self.batches_run,
            "history": self.history,
            "run_totals": [self.run_images, self.run_seconds, self.run_wait],
            "finished": self.finished,
            "world_size": self.ctx.world_size,
            "rng": capture_rng(),
            "last_maps": None if self.s.last_maps is None else torch.as_tensor(self.s.last_maps),
        }

    def load_training_state(self, ckpt: dict[str, Any]) -> None:
        st = ckpt["train"]
        unwrap(self.model).load_state_dict(st["model"])
        if self.ema is not None:
            self.ema.ema.load_state_dict(ckpt["model"])
            self.ema.updates = int(st["ema_updates"])
        self.optimizer.load_state_dict(st["optimizer"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.epoch, self.iteration = int(st["epoch"]), int(st["iteration"])
        self.last_opt_step = int(st["last_opt_step"])
        if self.iteration and int(st["batches_per_epoch"]) != self.nb:
            # another world size or batch size changed the batches per epoch: restart this epoch
            LOG.warning(f"batches per epoch changed ({st['batches_per_epoch']} -> {self.nb}); "
                        f"epoch {self.epoch} restarts from its first batch")
            self.iteration = 0
            st = {**st, "grads": None, "mloss": torch.zeros(3)}
        if st.get("grads") is not None:
            for p, g in zip(self.model.parameters(), st["grads"], strict=True):
                p.grad = None if g is None else g.to(p.device)
        self.mloss = st["mloss"].to(self.device)
        self.epoch_log = EpochLog(**st["epoch_log"])
        self._resumed_epoch_seconds = self.epoch_log.seconds if self.iteration else 0.0
        self.best_fitness = float(st["best_fitness"])
        self.best_epoch = st["best_epoch"]
        self.best_metrics, self.final_metrics = st.get("best_metrics"), st.get("final_metrics")
        self.stopper_best = (float(st["stopper_best"][0]), int(st["stopper_best"][1]))
        self.lr_scale = float(st["lr_scale"])
        self.nonfinite_total = int(st["nonfinite_total"])
        self.batches_run = int(st.get("batches_run", 0))
        self.history = list(st["history"])
        self.run_images, self.run_seconds, self.run_wait = st["run_totals"]
        if st.get("last_maps") is not None:
            self.s.last_maps = st["last_maps"].numpy()
        restore_rng(st["rng"])

    def save_last(self) -> None:
        ckpt = self.s.checkpoint_base(self.ema.ema if self.ema is not None else unwrap(self.model), half=False)
        ckpt["epoch"] = self.epoch - 1  # the last completed epoch, as upstream
        ckpt["train"] = self.training_state()
        path = self.weights_dir / "last.pt"
        self.s.save_checkpoint(path, ckpt)
        self.sink.publish(path, "weights/last.pt")
        self.mirror.reset()

    def save_best(self, epoch: int, metrics: dict[str, float] | None) -> None:
        ckpt = self.s.checkpoint_base(self.ema.ema, half=True)
        ckpt["epoch"] = epoch
        ckpt["metrics"] = metrics
        path = self.weights_dir / "best.pt"
        self.s.save_checkpoint(path, ckpt)
        self.sink.publish(path, "weights/best.pt")

    # -------------------------------------------------------------------------------- recovery
    def _snapshot(self) -> dict[str, Any]:
        """An in-memory copy of the last good state (CPU), for non-finite recovery."""
        return {
            "label": f"the end of epoch {self.epoch - 1}" if self.epoch else "the start of training",
            "model": _cpu(unwrap(self.model).state_dict(), clone=True),
            "ema": _cpu(self.ema.ema.state_dict(), clone=True) if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": _cpu(self.optimizer.state_dict(), clone=True),
        }

    def restore_good_state(self) -> None:
        good = self.good_state
        unwrap(self.model).load_state_dict(good["model"])
        if self.ema is not None and good["ema"] is not None:
            self.ema.ema.load_state_dict(good["ema"])
            self.ema.updates = good["ema_updates"]
        self.optimizer.load_state_dict(good["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)

    # -------------------------------------------------------------------------------- endings
    def _preempted(self, stop: StopRequested) -> TrainResult:
        if self.ctx.is_main:
            self.finished = False
            if self.iteration:  # at an epoch end last.pt was written a moment ago
                self.save_last()
            self.plot_results()
            LOG.warning(
                f"stopped by {'signal' if stop.requested else 'request'} at epoch {self.epoch} batch "
                f"{self.iteration}/{self.nb}: weights/last.pt holds the state; run the same command to continue"
            )
        self._close_sink()
        code = stop.exit_code if stop.requested else EXIT_SIGTERM
        return self._result(code)

    def _finish(self) -> TrainResult:
        if self.batches_run and self.nonfinite_total >= self.batches_run:
            raise UserError(f"every training step had a non-finite loss ({self.nonfinite_total} skipped): the "
                            f"weights were never updated; check the data, --hyp and the initial weights")
        if self.ctx.is_main:
            doc = self.train_json()
            write_json(self.out / "train.json", doc)
            self.sink.publish(self.out / "train.json", "train.json")
            self.sink.publish(self.out / "args.yaml", "args.yaml")
            self.plot_results()
            LOG.info(
                f"{len(self.history)} epochs done in {self.run_seconds / 60:.1f} min "
                f"({doc['images_per_s']:.1f} img/s, data wait {100 * doc['data_wait_share']:.0f}%); "
                f"best epoch {self.best_epoch}: fitness {self.best_fitness:.4f} -> {self.weights_dir / 'best.pt'}"
            )
        self._close_sink()
        return self._result(0)

    def _close_sink(self) -> None:
        if self.sink.enabled:
            LOG.info(redact(f"waiting for the checkpoint upload to {self.sink.uri} ..."))
            if not self.sink.close(timeout=float(os.environ.get("YOLO_FINAL_UPLOAD_TIMEOUT", "600"))):
                raise UserError(redact(f"final checkpoint upload to {self.sink.uri} did not complete "
                                       f"(see warnings above)"))

    def train_json(self) -> dict[str, Any]:
        return {
            "epochs_run": len(self.history),
            "best_epoch": self.best_epoch,
            "best": self.best_metrics,
            "final": self.final_metrics,
            "images_per_s": self.run_images / self.run_seconds if self.run_seconds else 0.0,
            "data_wait_share": self.run_wait / self.run_seconds if self.run_seconds else 0.0,
            "run_id": self.s.run_id,
            "checkpoint_uri": _strip_credentials(self.cfg.checkpoint_uri) if self.cfg.checkpoint_uri else None,
            "resumed_from": self.resumed_from,
            "dataset_fingerprint": self.s.dataset_fingerprint,
            "data_version": self.cfg.data_version,
            "world_size": self.ctx.world_size,
            "cpu_threads": torch.get_num_threads(),  # yolo.device.cpu_threads; decides float summation order
            "nonfinite_steps": self.nonfinite_total,
            "peak_gpu_memory_gb": (torch.cuda.max_memory_reserved(self.device) / 1e9
                                   if self.device.type == "cuda" else None),
        }

    def _result(self, code: int) -> TrainResult:
        return TrainResult(code, self.out, len(self.history), self.best_epoch, self.best_metrics,
                           self.final_metrics, self.s.run_id)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        # normally already closed; after an error, give the newest checkpoint a minute to reach the store
        self.sink.close(timeout=60)
        self.s.release()


def _cpu(obj: Any, clone: bool = False) -> Any:
    """Tensors moved to the CPU (cloned when asked), recursively through dicts and lists."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        t = t.cpu() if t.device.type != "cpu" else t
        return t.clone() if clone else t
    if isinstance(obj, dict):
        return {k: _cpu(v, clone) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v, clone) for v in obj)
    return obj
