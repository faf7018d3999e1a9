"""The train step: upstream YOLOv5's training loop, resumable exactly, on one device or under torchrun.

    data -> forward (autocast on CUDA) -> loss -> scaled backward -> (every `accumulate` batches) step

and after each epoch, in this fixed order (exact resume relies on it): validate the EMA model, write
checkpoints, log. A preempted run (SIGTERM: exit 143, SIGINT: exit 130) started again with the same
command continues at the batch it reached and ends with the same weights.

The pieces, one idea per module in `yolo.engine`: config (TrainConfig and its flags), setup (what a run is
built from), resume, state (TrainState: counters, best/early-stop, history, RNG), checkpointing (a run's
last.pt/best.pt and their upload), nonfinite (the guard), reporting (bar, results, TensorBoard), optim,
ema, preemption, distributed, lease. What is left here: `train_one_epoch` and the driver around it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from yolo.data.loader import TrainLoader
from yolo.engine import distributed as dist_utils
from yolo.engine import resume
from yolo.engine import setup as run_setup
from yolo.engine.checkpointing import RunCheckpoints
from yolo.engine.config import TrainConfig, add_arguments, config_from_args
from yolo.engine.ema import ModelEMA, unwrap
from yolo.engine.mirror import MidEpochMirror, interval_minutes
from yolo.engine.nonfinite import NonFiniteGuard, cpu_copy
from yolo.engine.optim import Schedule, build_optimizer, scaled_weight_decay
from yolo.engine.preemption import EXIT_SIGTERM, StopRequested
from yolo.engine.reporting import RunReport, history_row
from yolo.engine.setup import RunSetup
from yolo.engine.state import EpochLog, TrainState, restore_rng
from yolo.errors import UserError
from yolo.evaluate import EvalConfig, EvalResult, evaluate_model, save_plots
from yolo.files import write_json
from yolo.model.checkpoint import load_checkpoint, model_from_checkpoint
from yolo.plots.evaluation import EVALUATION_FIGURES
from yolo.plots.processes import PlotProcesses
from yolo.redact import redact, strip_credentials

__all__ = ["TrainConfig", "TrainResult", "add_arguments", "config_from_args", "run", "train"]

LOG = logging.getLogger(__name__)
CLIP_GRAD_NORM = 10.0


def run(args: argparse.Namespace) -> int:
    return train(config_from_args(args)).exit_code


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
class Loop:
    """The parts the epochs work on: the run's record, the torch objects built from it, and its state."""

    setup: RunSetup
    model: nn.Module  # the raw model (its parameters are what the optimiser steps)
    train_model: nn.Module  # the same, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    ema: ModelEMA | None  # rank 0 only
    scaler: torch.amp.GradScaler
    schedule: Schedule
    state: TrainState
    guard: NonFiniteGuard
    report: RunReport
    checkpoints: RunCheckpoints
    amp: bool
    nb: int  # batches per epoch
    stride: int  # the model's largest stride (--multi-scale sizes are multiples of it)
    mirror: MidEpochMirror  # when to write last.pt mid-epoch (rank 0; off elsewhere)
    resumed_epoch_seconds: float = 0.0  # time already spent in a mid-epoch-resumed epoch
    last_eval: EvalResult | None = None  # this process's latest validation (rank 0)
    best_eval: EvalResult | None = None  # the validation of the epoch best.pt holds, if this process ran it


# ------------------------------------------------------------------------------------------ driver
def train(cfg: TrainConfig, stop: StopRequested | None = None) -> TrainResult:
    """Run the train step described by `cfg` (the CLI's `train`); `stop` decides when to stop early
    (default: on SIGTERM/SIGINT)."""
    ctx = dist_utils.context_from_env()
    # rank 0's plotting processes fork first, while this process has no other thread (yolo.plots.processes)
    plotter = PlotProcesses() if ctx.is_main else PlotProcesses(0)
    # torch.optim imports torch._dynamo when the optimizer is built (~2 s on a 2-core CPU): start that
    # import now, so that it overlaps reading the data and building the model instead of following them
    threading.Thread(target=importlib.import_module, args=("torch._dynamo",), name="import-dynamo").start()
    # process-wide torch settings a run changes (--deterministic, threads): restored for library callers
    saved = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    setup = loop = None
    try:
        setup = run_setup.prepare_run(cfg, ctx)
        loop = build_loop(setup, plotter)
        with stop or StopRequested() as active:
            return fit(loop, active)
    finally:
        if loop is not None:
            loop.report.close()
            # normally already closed; after an error, give the newest checkpoint a minute to reach the store
            loop.checkpoints.close(timeout=60)
        plotter.close()  # figures still pending are drawn before the run ends
        if setup is not None:
            setup.release()
        dist_utils.shutdown(ctx)
        torch.use_deterministic_algorithms(saved[0])
        torch.set_num_threads(saved[1])


def build_loop(setup: RunSetup, plotter: PlotProcesses) -> Loop:
    """Optimiser, EMA, scaler, schedule and DDP for the prepared run; the resumed state put back last."""
    cfg, ctx, device, hyp, model = setup.cfg, setup.ctx, setup.device, setup.hyp, setup.model
    amp = device.type == "cuda"
    # decay scaled to the images per step (--batch-size is the total over all ranks, as upstream's
    # accumulation uses it); the schedule sets lr/momentum every step
    wd = scaled_weight_decay(hyp.weight_decay, cfg.batch_size)
    optimizer = build_optimizer(model, cfg.optimizer, hyp.lr0, hyp.momentum, wd)
    ema = ModelEMA(model) if ctx.is_main else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    nb = len(setup.train_loader)
    schedule = Schedule(
        lr0=hyp.lr0, lrf=hyp.lrf, momentum=hyp.momentum, warmup_epochs=hyp.warmup_epochs,
        warmup_momentum=hyp.warmup_momentum, warmup_bias_lr=hyp.warmup_bias_lr, epochs=cfg.epochs,
        batches_per_epoch=nb, batch_size=cfg.batch_size, cos_lr=cfg.cos_lr,
    )  # fmt: skip
    train_model = model
    if ctx.enabled:
        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)
    checkpoints = RunCheckpoints(setup)
    report = RunReport(setup.out, ctx.is_main, cfg.epochs, nb, device, setup.names, checkpoints.publish,
                       tensorboard=cfg.tensorboard, train_labels=setup.train_index.labels, plotter=plotter)
    state = TrainState(mloss=torch.zeros(3, device=device))
    resumed_seconds = 0.0
    if setup.resume_state is not None:
        state = resume.restore_parts(setup.resume_state, model, ema, optimizer, scaler, nb, device)
        state.finished = False  # an extended finished run is running again (its mid-epoch last.pt too)
        resumed_seconds = state.epoch_log.seconds if state.iteration else 0.0
    guard = NonFiniteGuard(model, ema, optimizer, schedule, state, ctx, device, nb)
    if setup.resume_state is not None:
        restore_rng(setup.resume_state["train"]["rng"])  # last: nothing may draw between here and step one
    mirror = MidEpochMirror(interval_minutes(cfg.checkpoint_uri, cfg.checkpoint_every) if ctx.is_main else 0)
    stride = max(int(unwrap(model).stride.max()), 32)
    return Loop(setup, model, train_model, optimizer, ema, scaler, schedule, state, guard, report, checkpoints,
                amp, nb, stride, mirror, resumed_seconds)


def fit(loop: Loop, stop: StopRequested) -> TrainResult:
    """Epochs from where the state is to the end: train, then validate -> checkpoint -> log."""
    setup, state = loop.setup, loop.state
    cfg, ctx = setup.cfg, setup.ctx
    if ctx.is_main:
        LOG.info(
            f"run {setup.run_id}: {cfg.epochs} epochs, batch {cfg.batch_size} ({ctx.world_size} process(es)), "
            f"accumulate to {loop.schedule.accumulate(10**9)} batches, imgsz {cfg.imgsz}, {setup.device}, "
            f"{setup.train_loader.num_workers} loader workers -> {setup.out}"
        )
    if state.epoch == 0 and state.iteration == 0:
        loop.report.plot_labels(setup.train_index.labels, cfg.seed)  # drawn beside the first epoch
    return run_epochs(loop, stop)


def run_epochs(loop: Loop, stop: StopRequested) -> TrainResult:
    """The epochs from state.epoch on, then the run's end (or its preemption)."""
    setup, state = loop.setup, loop.state
    cfg, ctx = setup.cfg, setup.ctx
    for epoch in range(state.epoch, cfg.epochs):
        state.epoch = epoch
        if not train_one_epoch(loop, epoch, stop):
            return preempted(loop, stop)
        metrics = validate(loop, epoch)
        stop_early = end_epoch(loop, epoch, metrics)
        loop.report.log_epoch(epoch, metrics, state.history, state.epoch_log)
        if dist_utils.broadcast_object(stop_early, ctx):
            LOG.info(f"early stopping: no improvement in {cfg.patience} epochs; best epoch {state.best_epoch}")
            break
        if epoch + 1 < cfg.epochs and should_stop(loop, stop, epoch + 1, 0):
            return preempted(loop, stop)
    return finish(loop)


# ------------------------------------------------------------------------------------------ one epoch
def train_one_epoch(loop: Loop, epoch: int, stop: StopRequested) -> bool:
    """Train `epoch` from batch state.iteration on; False when a stop was requested mid-epoch."""
    setup, state, guard = loop.setup, loop.state, loop.guard
    cfg, ctx, device, model = setup.cfg, setup.ctx, setup.device, loop.train_model
    model.train()
    start = state.iteration
    if start == 0:
        state.mloss.zero_()
        state.epoch_log = EpochLog()
        loop.optimizer.zero_grad(set_to_none=True)  # upstream discards a partial accumulation here
    if cfg.image_weights and start == 0 and state.history:
        # upstream: sampling weights from the class weights and (1 - last per-class mAP)^2
        setup.train_dataset.update_image_weights(dist_utils.broadcast_object(state.last_maps, ctx))
    batches = epoch_batches(setup.train_loader, epoch, start)
    nw = loop.schedule.warmup_iterations
    loop.schedule.apply(loop.optimizer, epoch * loop.nb + start, epoch, state.lr_scale)
    loop.report.open_bar(epoch, start)
    log = state.epoch_log
    t_epoch = time.perf_counter()
    t_wait = t_epoch
    for i, (imgs, targets, paths, _) in enumerate(batches, start=start):
        now = time.perf_counter()
        log.data_wait += now - t_wait
        ni = i + loop.nb * epoch
        if ni <= nw:
            loop.schedule.apply(loop.optimizer, ni, epoch, state.lr_scale)
        step_now = ni - state.last_opt_step >= loop.schedule.accumulate(ni)
        if i < 3 and epoch == 0:
            loop.report.plot_batch(imgs, targets, paths, i)
        # uint8 -> device -> channels_last -> float: the conversion runs once, on the device
        imgs = imgs.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last).float().div_(255)
        if cfg.multi_scale:
            imgs = multi_scale(imgs, cfg.imgsz, loop.stride)
        targets = targets.to(device, non_blocking=True)

        sync = contextlib.nullcontext() if step_now or not ctx.enabled else model.no_sync()
        with sync:
            with torch.autocast(device.type, enabled=loop.amp):
                preds = model(imgs)
                loss, items = setup.compute_loss(preds, targets)
                if ctx.enabled:
                    loss = loss * ctx.world_size  # DDP averages gradients; upstream scales back up
                if cfg.quad:
                    loss = loss * 4.0
            finite = guard.loss_is_finite(loss)
            if finite:
                loop.scaler.scale(loss).backward()
        if finite and step_now:
            finite = optimizer_step(loop)
            state.last_opt_step = ni
        guard.account(loss, items, finite, epoch, i)

        state.iteration = i + 1
        state.batches_run += 1
        log.images += imgs.shape[0] * (4 if cfg.quad else 1) * ctx.world_size  # source images, all ranks
        loop.report.step(now, epoch, i + 1, ni, state.mloss, targets.shape[0], imgs.shape[-1])
        if i + 1 < loop.nb and should_stop(loop, stop, epoch, i + 1):
            loop.report.close_bar()
            account_epoch_time(loop, t_epoch)
            return False
        if i + 1 < loop.nb and loop.mirror.due():  # a node lost without SIGTERM costs <= N minutes
            save_last(loop)
        t_wait = time.perf_counter()
    loop.report.close_bar()
    account_epoch_time(loop, t_epoch)
    return True


def multi_scale(imgs: torch.Tensor, imgsz: int, stride: int) -> torch.Tensor:
    """Upstream's --multi-scale: the batch resized to a random stride multiple in [0.5, 1.5] x imgsz. The size
    is drawn from Python's `random`, whose state last.pt carries, so a resumed run draws the same sizes."""
    size = random.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + stride) // stride * stride
    size = max(size, stride)
    scale = size / max(imgs.shape[2:])
    if scale == 1:
        return imgs
    shape = [math.ceil(x * scale / stride) * stride for x in imgs.shape[2:]]
    return nn.functional.interpolate(imgs, size=shape, mode="bilinear", align_corners=False)


def optimizer_step(loop: Loop) -> bool:
    """Unscale, clip to norm 10, step, update EMA; False when the gradients were not finite."""
    loop.scaler.unscale_(loop.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(loop.model.parameters(), max_norm=CLIP_GRAD_NORM)
    if loop.setup.device.type != "cuda" and not bool(torch.isfinite(norm)):
        loop.optimizer.zero_grad(set_to_none=True)
        return False
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.ema is not None:
        loop.ema.update(loop.model)
    return True


def account_epoch_time(loop: Loop, t_epoch: float) -> None:
    if loop.setup.device.type == "cuda":
        torch.cuda.synchronize(loop.setup.device)
    loop.state.epoch_log.seconds = loop.resumed_epoch_seconds + time.perf_counter() - t_epoch
    loop.resumed_epoch_seconds = 0.0


def should_stop(loop: Loop, stop: StopRequested, epoch: int, iteration: int) -> bool:
    # Under DDP all ranks must stop at the same batch: agree every step on CPU (a tiny gloo
    # all-reduce), every 10 steps on CUDA (each check syncs the stream), and at every epoch end.
    wanted = stop.poll(epoch, iteration)
    ctx, device = loop.setup.ctx, loop.setup.device
    if not ctx.enabled:
        return wanted
    if device.type == "cuda" and iteration % 10:
        return False
    return dist_utils.any_rank(wanted, ctx, device)


def epoch_batches(loader: TrainLoader, epoch: int, start: int = 0) -> DataLoader:
    """The batches of `epoch` from batch `start` on (same order and augmentations as from 0)."""
    loader.set_epoch(epoch)
    if start == 0:
        return loader
    skip = _SkipSampler(loader.sampler, start * loader.batch_size)
    return TrainLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=skip, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
    )  # fmt: skip


class _SkipSampler(Sampler):
    """A sampler's keys for the current epoch without the first `skip` (a mid-epoch resume)."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.keys = list(sampler)[skip:]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


# ------------------------------------------------------------------------------------------ end of an epoch
def validate(loop: Loop, epoch: int) -> dict[str, float] | None:
    """mAP of the EMA model on the val split (rank 0; --noval: the last epoch only), with upstream's
    in-training settings (batch 2x the per-rank batch, conf 0.001)."""
    setup, state = loop.setup, loop.state
    cfg, ctx = setup.cfg, setup.ctx
    final_epoch = epoch + 1 == cfg.epochs or state.may_stop_after(epoch, cfg.patience)
    if not ctx.is_main or (cfg.noval and not final_epoch):
        return None
    model = loop.ema.ema
    if loop.amp:
        model = copy.deepcopy(model).half()
    config = EvalConfig(imgsz=cfg.imgsz, batch_size=max(cfg.batch_size // ctx.world_size * 2, 1),
                        single_cls=cfg.single_cls)
    result = evaluate_model(model, setup.val_index, config, setup.device, setup.names,
                            compute_loss=setup.compute_loss, plots=True, progress=True)
    loop.last_eval = result
    state.last_maps = result.maps
    losses = dict(zip(("val/box_loss", "val/obj_loss", "val/cls_loss"), result.losses or (), strict=False))
    return {**result.totals(), **losses}


def end_epoch(loop: Loop, epoch: int, metrics: dict[str, float] | None) -> bool:
    """Update best/patience and history, write last.pt (+ best.pt); returns early-stop."""
    state, ctx = loop.state, loop.setup.ctx
    improved, stop_early = state.end_epoch(epoch, metrics, loop.setup.cfg.patience)
    lrs = [group["lr"] for group in loop.optimizer.param_groups]
    state.history.append(history_row(epoch, state.mloss, metrics, lrs, state.epoch_log))
    if ctx.is_main:
        state.finished = state.epoch >= loop.setup.cfg.epochs or stop_early
        save_last(loop)
        if improved:
            loop.checkpoints.save_best(loop.ema.ema, epoch, metrics)
            loop.best_eval = loop.last_eval if metrics is not None else None
        period = loop.setup.cfg.save_period
        if period > 0 and (epoch + 1) % period == 0:
            loop.checkpoints.save_epoch(loop.ema.ema, epoch, metrics)
    loop.guard.mark_good()
    return stop_early


def save_last(loop: Loop) -> None:
    """last.pt: the EMA, and everything needed to continue exactly (the `train` entry)."""
    state = loop.state
    grads = None
    if state.iteration > 0 and state.last_opt_step < state.epoch * loop.nb + state.iteration - 1:
        # mid-accumulation: gradients of the batches since the last step
        grads = [p.grad.detach().clone() if p.grad is not None else None for p in loop.model.parameters()]
    entry = {
        "model": cpu_copy(unwrap(loop.model).state_dict()),
        "ema_updates": loop.ema.updates if loop.ema is not None else 0,
        # a finished run's last.pt drops the optimizer state (as upstream's strip_optimizer: several MB); an
        # extension (--resume --epochs N) then starts the optimizer afresh (yolo.engine.resume.restore_parts)
        "optimizer": None if state.finished else cpu_copy(loop.optimizer.state_dict()),
        "scaler": loop.scaler.state_dict(),
        "batches_per_epoch": loop.nb,
        "grads": cpu_copy(grads),
        "world_size": loop.setup.ctx.world_size,
        **state.to_dict(),
    }
    weights = loop.ema.ema if loop.ema is not None else unwrap(loop.model)
    loop.checkpoints.save_last(weights, state.epoch - 1, entry)
    loop.mirror.reset()


# ------------------------------------------------------------------------------------------ endings
def preempted(loop: Loop, stop: StopRequested) -> TrainResult:
    state = loop.state
    if loop.setup.ctx.is_main:
        state.finished = False
        if state.iteration:  # at an epoch end last.pt was written a moment ago
            save_last(loop)
        loop.report.plot_results(state.history)
        loop.report.finish_figures()
        LOG.warning(
            f"stopped by {'signal' if stop.requested else 'request'} at epoch {state.epoch} batch "
            f"{state.iteration}/{loop.nb}: weights/last.pt holds the state; run the same command to continue"
        )
    close_sink(loop)
    return result(loop, stop.exit_code if stop.requested else EXIT_SIGTERM)


def finish(loop: Loop) -> TrainResult:
    state, setup = loop.state, loop.setup
    if state.batches_run and state.nonfinite_total >= state.batches_run:
        raise UserError(f"every training step had a non-finite loss ({state.nonfinite_total} skipped): the "
                        f"weights were never updated; check the data, --hyp and the initial weights")
    if setup.ctx.is_main:
        doc = train_json(loop)
        write_json(setup.out / "train.json", doc)
        loop.checkpoints.publish(setup.out / "train.json", "train.json")
        loop.checkpoints.publish(setup.out / "args.yaml", "args.yaml")
        loop.report.plot_results(state.history)
        validate_best(loop)
        loop.report.finish_figures(EVALUATION_FIGURES)
        LOG.info(
            f"{len(state.history)} epochs done in {state.run_seconds / 60:.1f} min "
            f"({doc['images_per_s']:.1f} img/s, data wait {100 * doc['data_wait_share']:.0f}%); best epoch "
            f"{state.best_epoch}: fitness {state.best_fitness:.4f} -> {setup.out / 'weights' / 'best.pt'}"
        )
    close_sink(loop)
    return result(loop, 0)


def validate_best(loop: Loop) -> None:
    """The plots of the best model (confusion matrix, PR/F1/P/R curves, val_batch images) in the run
    folder, as upstream draws them at the end of training. Numbers are not recorded again. Upstream
    validates best.pt once more for them; the validation of the best epoch already ran in this process
    (the EMA that best.pt stores in fp16), so its kept results are drawn instead: a whole validation
    saved. A run resumed after its best epoch has no such results and validates best.pt as upstream."""
    setup = loop.setup
    best = setup.out / "weights" / "best.pt"
    if not best.is_file():
        return
    if loop.best_eval is not None:
        save_plots(loop.best_eval, setup.out, loop.report.plotter)
    else:
        model = model_from_checkpoint(load_checkpoint(best), nc=len(setup.names)).to(setup.device)
        model = model.half() if loop.amp else model.float()
        config = EvalConfig(imgsz=setup.cfg.imgsz, batch_size=max(setup.cfg.batch_size * 2, 1),
                            single_cls=setup.cfg.single_cls)
        evaluate_model(model, setup.val_index, config, setup.device, setup.names, out_dir=setup.out, plots=True,
                       progress=True, plotter=loop.report.plotter)


def close_sink(loop: Loop) -> None:
    sink = loop.checkpoints.sink
    if sink.enabled:
        LOG.info(redact(f"waiting for the checkpoint upload to {sink.uri} ..."))
        if not sink.close(timeout=float(os.environ.get("YOLO_FINAL_UPLOAD_TIMEOUT", "600"))):
            raise UserError(redact(f"final checkpoint upload to {sink.uri} did not complete (see warnings above)"))


def train_json(loop: Loop) -> dict[str, Any]:
    state, setup = loop.state, loop.setup
    device = setup.device
    return {
        "epochs_run": len(state.history),
        "best_epoch": state.best_epoch,
        "best": state.best_metrics,
        "final": state.final_metrics,
        "images_per_s": state.run_images / state.run_seconds if state.run_seconds else 0.0,
        "data_wait_share": state.run_wait / state.run_seconds if state.run_seconds else 0.0,
        "run_id": setup.run_id,
        "checkpoint_uri": strip_credentials(setup.cfg.checkpoint_uri) if setup.cfg.checkpoint_uri else None,
        "resumed_from": setup.resumed_from,
        "dataset_fingerprint": setup.dataset_fingerprint,
        "data_version": setup.cfg.data_version,
        "world_size": setup.ctx.world_size,
        "cpu_threads": torch.get_num_threads(),  # yolo.device.cpu_threads; decides float summation order
        "nonfinite_steps": state.nonfinite_total,
        "peak_gpu_memory_gb": torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None,
    }


def result(loop: Loop, code: int) -> TrainResult:
    state = loop.state
    return TrainResult(code, loop.setup.out, len(state.history), state.best_epoch, state.best_metrics,
                       state.final_metrics, loop.setup.run_id)
