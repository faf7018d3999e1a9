"""torch.distributed set-up for `torchrun ... -m yolo train`: rank helpers that are no-ops alone.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process and every helper
returns immediately. CPU uses gloo (tests, `--device cpu`), CUDA uses NCCL with one GPU per local rank.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from yolo.errors import UserError

# Rank 0 validates while the others wait at a collective; the default 30 min would kill long
# validations on big val sets (upstream's NCCL timeouts), so the wait is generous.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=3)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    """Rank layout from torchrun's environment (single process when it is absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistContext(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def init_distributed(ctx: DistContext, device: torch.device) -> None:
    """Join the process group (gloo on CPU, NCCL on CUDA) when launched by torchrun with N > 1."""
    if not ctx.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        if torch.cuda.device_count() <= ctx.local_rank:
            raise UserError(
                f"torchrun started {ctx.local_world_size} processes per node but this machine has "
                f"{torch.cuda.device_count()} GPU(s)"
            )
        torch.cuda.set_device(ctx.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)


def rank_device(ctx: DistContext, device: torch.device) -> torch.device:
    """Each local rank drives its own GPU; on CPU every rank shares the CPU."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (identity when not distributed)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a stop request)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
