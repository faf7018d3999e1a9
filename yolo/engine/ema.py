"""Model exponential moving average (upstream's ModelEMA: decay 0.9999 ramped with tau 2000)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel, else the model itself."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


class ModelEMA:
    """Keeps `ema` = decay-weighted average of the training model's float parameters and buffers.

    decay(updates) = decay * (1 - exp(-updates / tau)), so early updates follow the model closely.
    The update is one fused in-place lerp over all tensors: no allocation per step.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = copy.deepcopy(unwrap(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay_max = decay
        self.tau = tau
        self.updates = updates
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._bound_to: int | None = None

    def decay(self, updates: int) -> float:
        return self.decay_max * (1 - math.exp(-updates / self.tau))

    def _bind(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Pair tensors by name once; the model's tensors keep their storage for the whole run
        # (load_state_dict copies in place), so the pairs stay valid.
        if self._pairs is None or self._bound_to != id(model):
            source = unwrap(model).state_dict(keep_vars=True)
            ema_t, model_t = [], []
            for name, v in self.ema.state_dict(keep_vars=True).items():
                if name.endswith("anchors"):
                    # constant during training; lerping them would only bump Detect's grid-cache key
                    v.data.copy_(source[name].data)
                elif v.dtype.is_floating_point:
                    ema_t.append(v.data)
                    model_t.append(source[name].data)
            self._pairs = (ema_t, model_t)
            self._bound_to = id(model)
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the model's current weights and buffers."""
        self.updates += 1
        d = self.decay(self.updates)
        ema_t, model_t = self._bind(model)
        torch._foreach_lerp_(ema_t, model_t, 1.0 - d)

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        self.updates = int(state["updates"])
