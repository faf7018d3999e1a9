"""Upstream YOLOv5's optimiser set-up: three parameter groups, nominal batch 64, warmup and schedules.

Group order matters and follows upstream: 0 = biases (no decay; warmup starts them at warmup_bias_lr),
1 = conv/linear weights (decay), 2 = normalisation weights (no decay).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

NOMINAL_BATCH = 64  # upstream's nbs: gradients are accumulated up to this many images per step
OPTIMIZERS = ("SGD", "Adam", "AdamW")
BIAS, DECAY, NO_DECAY = 0, 1, 2  # parameter-group indices


def split_param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(biases, weights with decay, normalisation weights) exactly as upstream's smart_optimizer."""
    norm_types = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))
    biases, decayed, norm_weights = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(p)
            elif name == "weight" and isinstance(module, norm_types):
                norm_weights.append(p)
            else:
                decayed.append(p)
    return biases, decayed, norm_weights


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD (Nesterov) / Adam / AdamW (betas (momentum, 0.999)) over the three upstream groups."""
    biases, decayed, norm_weights = split_param_groups(model)
    if name == "SGD":
        opt = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    elif name == "Adam":
        opt = torch.optim.Adam(biases, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        opt = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    opt.add_param_group({"params": decayed, "weight_decay": weight_decay})
    opt.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    for group in opt.param_groups:
        group["initial_lr"] = lr  # what LambdaLR would record; the schedule multiplies it
    return opt


def nominal_accumulate(batch_size: int) -> int:
    """Batches per optimiser step so that one step sees about 64 images (upstream's nbs)."""
    return max(round(NOMINAL_BATCH / batch_size), 1)


def scaled_weight_decay(weight_decay: float, batch_size: int) -> float:
    """Weight decay scaled to the images really seen per step (batch_size * accumulate / 64)."""
    return weight_decay * batch_size * nominal_accumulate(batch_size) / NOMINAL_BATCH


def one_cycle(y1: float, y2: float, steps: int) -> Callable[[float], float]:
    """Half-cosine ramp from y1 to y2 over `steps` (upstream's one_cycle)."""
    return lambda x: ((1 - math.cos(x * math.pi / steps)) / 2) * (y2 - y1) + y1


def lr_factor(epochs: int, lrf: float, cos_lr: bool) -> Callable[[float], float]:
    """The per-epoch lr multiplier: cosine (`--cos-lr`) or linear from 1 to lrf."""
    if cos_lr:
        return one_cycle(1.0, lrf, epochs)
    return lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf


@dataclass(frozen=True)
class Schedule:
    """Learning rate, momentum and accumulation at every iteration, as upstream's loop sets them.

    `ni` counts batches since the start of training (epoch * batches_per_epoch + i). The warmup runs
    over max(round(warmup_epochs * batches_per_epoch), 100) iterations; after it, each group's lr is
    lr0 * lr_factor(epoch) (what LambdaLR gives) and the momentum is the hyp's.
    """

    lr0: float
    lrf: float
    momentum: float
    warmup_epochs: float
    warmup_momentum: float
    warmup_bias_lr: float
    epochs: int
    batches_per_epoch: int
    batch_size: int
    cos_lr: bool = False

    @property
    def warmup_iterations(self) -> int:
        return max(round(self.warmup_epochs * self.batches_per_epoch), 100)

    @property
    def factor(self) -> Callable[[float], float]:
        return lr_factor(self.epochs, self.lrf, self.cos_lr)

    def accumulate(self, ni: int) -> int:
        """Batches per optimiser step at iteration ni (ramps from 1 during warmup)."""
        nw = self.warmup_iterations
        full = NOMINAL_BATCH / self.batch_size
        if ni <= nw:
            return max(1, int(np.interp(ni, [0, nw], [1, full]).round()))
        # After warmup upstream keeps the last warmup value, which is round(full) at ni == nw.
        return max(1, int(np.interp(nw, [0, nw], [1, full]).round()))

    def lrs(self, ni: int, epoch: int) -> list[float]:
        """lr of groups (bias, decay, no-decay) at iteration ni of epoch `epoch`."""
        target = self.lr0 * self.factor(epoch)
        nw = self.warmup_iterations
        if ni > nw:
            return [target] * 3
        return [float(np.interp(ni, [0, nw], [self.warmup_bias_lr if j == BIAS else 0.0, target])) for j in range(3)]

    def momentum_at(self, ni: int) -> float:
        nw = self.warmup_iterations
        if ni > nw:
            return self.momentum
        return float(np.interp(ni, [0, nw], [self.warmup_momentum, self.momentum]))

    def apply(self, optimizer: torch.optim.Optimizer, ni: int, epoch: int, lr_scale: float = 1.0) -> None:
        """Set each group's lr (times `lr_scale`, lowered after non-finite recoveries) and momentum."""
        momentum = self.momentum_at(ni)
        for group, lr in zip(optimizer.param_groups, self.lrs(ni, epoch), strict=True):
            group["lr"] = lr * lr_scale
            if "momentum" in group:  # SGD only, as upstream: Adam's beta1 stays at the hyp momentum
                group["momentum"] = momentum
