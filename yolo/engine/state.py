"""The train state: counters, best/early-stop, history and RNG, as one dataclass that last.pt carries.

`TrainState.to_dict()` is the counters part of last.pt's `train` entry (the tensors of the model,
optimiser and EMA are added by `yolo.engine.checkpointing`); `from_dict` undoes it. Everything a resumed
run needs to continue exactly is here or there; what is not (the non-finite guard's window, the progress
bar) restarts from zero on resume without changing a number.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


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


@dataclass
class TrainState:
    """Where the run is and what it has seen; saved in last.pt, restored on resume."""

    epoch: int = 0  # epoch in progress (or next to start)
    iteration: int = 0  # batches of `epoch` already done
    last_opt_step: int = -1  # global batch index of the last optimiser step
    mloss: torch.Tensor = field(default_factory=lambda: torch.zeros(3))  # running mean box/obj/cls loss
    epoch_log: EpochLog = field(default_factory=EpochLog)
    best_fitness: float = 0.0
    best_epoch: int | None = None
    best_metrics: dict[str, float] | None = None
    final_metrics: dict[str, float] | None = None
    stopper_best: tuple[float, int] = (0.0, 0)  # (fitness, epoch) of upstream's EarlyStopping
    lr_scale: float = 1.0  # halved by each non-finite recovery
    nonfinite_total: int = 0
    batches_run: int = 0  # batches trained over the whole run (the all-skipped check)
    history: list[dict[str, Any]] = field(default_factory=list)  # results.csv rows
    run_images: int = 0
    run_seconds: float = 0.0
    run_wait: float = 0.0
    finished: bool = False
    last_maps: np.ndarray | None = None  # per-class mAP50-95 of the last validation (--image-weights)

    # ------------------------------------------------------------------------------ end of an epoch
    def end_epoch(self, epoch: int, metrics: dict[str, float] | None, patience: int) -> tuple[bool, bool]:
        """Count the epoch and update best/early-stop; (improved, stop early)."""
        self.run_images += self.epoch_log.images
        self.run_seconds += self.epoch_log.seconds
        self.run_wait += self.epoch_log.data_wait
        self.epoch += 1
        self.iteration = 0
        if metrics is None:
            return False, False
        fi = metrics["fitness"]
        improved = fi > self.best_fitness or self.best_epoch is None
        if improved:
            self.best_fitness, self.best_epoch, self.best_metrics = fi, epoch, metrics
        self.final_metrics = metrics
        # upstream EarlyStopping: >= so that zero fitness early on still moves the best epoch
        if fi >= self.stopper_best[0]:
            self.stopper_best = (fi, epoch)
        return improved, patience > 0 and epoch - self.stopper_best[1] >= patience

    def may_stop_after(self, epoch: int, patience: int) -> bool:
        """True when `epoch` could be the last (early stopping): it is then validated even under --noval."""
        return patience > 0 and epoch - self.stopper_best[1] >= patience - 1

    # ------------------------------------------------------------------------------ last.pt
    def to_dict(self) -> dict[str, Any]:
        """The counters and RNG states, in the form torch.load(weights_only=True) reads back."""
        return {
            "epoch": self.epoch,
            "iteration": self.iteration,
            "last_opt_step": self.last_opt_step,
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
            "rng": capture_rng(),
            "last_maps": None if self.last_maps is None else torch.as_tensor(self.last_maps),
        }

    @classmethod
    def from_dict(cls, st: dict[str, Any], device: torch.device) -> TrainState:
        """Undo to_dict (the RNG states are restored separately, at the last moment: `restore_rng`)."""
        run_images, run_seconds, run_wait = st["run_totals"]
        return cls(
            epoch=int(st["epoch"]), iteration=int(st["iteration"]), last_opt_step=int(st["last_opt_step"]),
            mloss=st["mloss"].to(device), epoch_log=EpochLog(**st["epoch_log"]),
            best_fitness=float(st["best_fitness"]), best_epoch=st["best_epoch"],
            best_metrics=st.get("best_metrics"), final_metrics=st.get("final_metrics"),
            stopper_best=(float(st["stopper_best"][0]), int(st["stopper_best"][1])),
            lr_scale=float(st["lr_scale"]), nonfinite_total=int(st["nonfinite_total"]),
            batches_run=int(st.get("batches_run", 0)), history=list(st["history"]),
            run_images=run_images, run_seconds=run_seconds, run_wait=run_wait,
            finished=bool(st.get("finished", False)),
            last_maps=st["last_maps"].numpy() if st.get("last_maps") is not None else None,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tensors, lists and ints."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def restore_rng(state: dict[str, Any]) -> None:
    """Undo capture_rng (CUDA states only when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
