"""Non-finite numbers never pass for a model: weights are checked before a run or an evaluation uses them,
and the loop's guard skips non-finite steps and recovers from a run of them.

A NaN or inf weight makes every output NaN; NMS then finds nothing, mAP is 0.0, and without a gate floor
such a model would be promoted, while a training from it skips every step and logs losses of 0.0.

`NonFiniteGuard` (the loop's): on the CPU every loss is checked (free) and a non-finite step is skipped,
all DDP ranks agreeing; on CUDA the GradScaler skips such steps and the guard counts them on the device,
reading the count back every 10 batches (a read-back syncs the stream). After RECOVER_AFTER in a row the
last good state (start of run or last epoch end, kept on the CPU) is restored at half the learning rate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from yolo.engine import distributed as dist_utils
from yolo.engine.distributed import DistContext
from yolo.engine.ema import ModelEMA, unwrap
from yolo.engine.optim import Schedule
from yolo.engine.state import TrainState
from yolo.errors import UserError

LOG = logging.getLogger(__name__)
RECOVER_AFTER = 5  # consecutive non-finite steps before restoring the last good state

# The parts of a checkpoint that hold weights and optimiser state (last.pt's `train` holds both again).
WEIGHT_FIELDS = ("model", "train")


def nonfinite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors under `obj` (dicts, lists) holding a NaN or an infinity."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            return [prefix or "tensor"]
        return []
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    found: list[str] = []
    for key, value in items:
        found += nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def refuse_nonfinite(ckpt: Mapping[str, Any], what: str) -> None:
    """UserError naming the first tensors when the checkpoint's weights or optimiser state are not finite."""
    bad = nonfinite_entries({k: ckpt[k] for k in WEIGHT_FIELDS if k in ckpt})
    if bad:
        raise UserError(f"{what}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {', '.join(bad[:3])}); "
                        f"refusing to use these weights")


def refuse_nonfinite_model(model: torch.nn.Module, what: str) -> None:
    """The same check for a built model's parameters and buffers."""
    refuse_nonfinite({"model": model.state_dict()}, what)


def cpu_copy(obj: Any, clone: bool = False) -> Any:
    """Tensors moved to the CPU (cloned when asked), recursively through dicts and lists."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        t = t.cpu() if t.device.type != "cpu" else t
        return t.clone() if clone else t
    if isinstance(obj, dict):
        return {k: cpu_copy(v, clone) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v, clone) for v in obj)
    return obj


class NonFiniteGuard:
    """Skips and counts non-finite steps of one run; restores the last good state after RECOVER_AFTER."""

    def __init__(self, model: torch.nn.Module, ema: ModelEMA | None, optimizer: torch.optim.Optimizer,
                 schedule: Schedule, state: TrainState, ctx: DistContext, device: torch.device, nb: int) -> None:
        self.model, self.ema, self.optimizer, self.schedule = model, ema, optimizer, schedule
        self.state, self.ctx, self.device, self.nb = state, ctx, device, nb
        self.in_a_row = 0  # consecutive non-finite steps (not in last.pt: a resume starts a new count)
        self._bad_on_device = torch.zeros((), dtype=torch.int64, device=device)  # CUDA bookkeeping
        self._bad_seen = 0
        self._window_start = 0
        self.good = self.snapshot()

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        # On the CPU this check costs nothing; on CUDA it would sync every step, so there the GradScaler
        # (which skips steps with inf/nan gradients) does the work and `account` counts it.
        if self.device.type == "cuda":
            return True
        ok = bool(torch.isfinite(loss))
        if self.ctx.enabled:  # every rank must skip together or DDP's all-reduce would hang
            ok = not dist_utils.any_rank(not ok, self.ctx, self.device)
        return ok

    def account(self, loss: torch.Tensor, items: torch.Tensor, finite: bool, epoch: int, i: int) -> None:
        """After batch i: fold its loss items into the running mean, or count and maybe recover."""
        st = self.state
        if self.device.type == "cuda":
            self._track_on_device(loss, items, epoch, i)
        elif not finite:
            st.epoch_log.skipped_steps += 1
            self.in_a_row += 1
            st.nonfinite_total += 1
            if self.in_a_row == 1:
                LOG.warning(f"non-finite loss at epoch {epoch} batch {i}: step skipped")
            if self.in_a_row >= RECOVER_AFTER:
                self._recover(epoch, i)
        else:
            self.in_a_row = 0
            st.mloss.mul_(i).add_(items.float()).div_(i + 1)  # running mean, stays on the device

    def _track_on_device(self, loss: torch.Tensor, items: torch.Tensor, epoch: int, i: int) -> None:
        """CUDA: count non-finite losses without a sync; every 10 batches read the count back and, after
        RECOVER_AFTER in a row, recover as on the CPU."""
        st = self.state
        finite = torch.isfinite(loss.detach())
        self._bad_on_device += (~finite).int()
        new_mean = (st.mloss * i + items.float()) / (i + 1)
        st.mloss.copy_(torch.where(finite, new_mean, st.mloss))
        if (i + 1) % 10 and i + 1 != self.nb:
            return
        total = int(self._bad_on_device.item())
        new, self._bad_seen = total - self._bad_seen, total
        window, self._window_start = (i + 1) - self._window_start, (i + 1) % self.nb
        if new:
            LOG.warning(f"{new} non-finite loss(es) up to epoch {epoch} batch {i}: GradScaler skipped the steps")
            st.epoch_log.skipped_steps += new
            st.nonfinite_total += new
            self.in_a_row = self.in_a_row + new if new == window else new
        else:
            self.in_a_row = 0
        # every rank votes at the same batches, so all of them recover together or none does
        if dist_utils.any_rank(self.in_a_row >= RECOVER_AFTER, self.ctx, self.device):
            self._recover(epoch, i)

    def _recover(self, epoch: int, i: int) -> None:
        """Back to the last good state with half the learning rate (repeated non-finite steps)."""
        self.restore()
        self.state.lr_scale *= 0.5
        self.in_a_row = 0
        LOG.warning(f"{RECOVER_AFTER} non-finite steps in a row: restored the state of {self.good['label']} "
                    f"and lowered the learning rate to x{self.state.lr_scale:g}")
        self.schedule.apply(self.optimizer, i + self.nb * epoch, epoch, self.state.lr_scale)

    def snapshot(self) -> dict[str, Any]:
        """An in-memory copy of the current state (CPU): the next recovery's target."""
        epoch = self.state.epoch
        return {
            "label": f"the end of epoch {epoch - 1}" if epoch else "the start of training",
            "model": cpu_copy(unwrap(self.model).state_dict(), clone=True),
            "ema": cpu_copy(self.ema.ema.state_dict(), clone=True) if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": cpu_copy(self.optimizer.state_dict(), clone=True),
        }

    def mark_good(self) -> None:
        """The state after a completed epoch is the new recovery target."""
        self.good = self.snapshot()

    def restore(self) -> None:
        good = self.good
        unwrap(self.model).load_state_dict(good["model"])
        if self.ema is not None and good["ema"] is not None:
            self.ema.ema.load_state_dict(good["ema"])
            self.ema.updates = good["ema_updates"]
        self.optimizer.load_state_dict(good["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
