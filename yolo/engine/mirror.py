"""Time-based mid-epoch checkpoints: what a node lost without warning costs.

SIGTERM gives the trainer a chance to write last.pt at the batch it reached (yolo.engine.preemption).
A node that dies, or a pod deleted with its node, sends nothing: without more, the run would fall back
to the last epoch end, which on a large dataset is hours old. So every `minutes` of training the loop
also writes last.pt mid-epoch (the same exact-resume state a SIGTERM writes) and the checkpoint sink
mirrors it in the background: such a loss costs at most `minutes` of training plus one upload.

Default: DEFAULT_MINUTES when checkpoints go to a remote store (an s3:// URI, any `scheme://`), where
the mirror is what survives the node; off otherwise (a local folder dies with the node, and epoch-end
checkpoints are enough on a workstation). Writing a checkpoint reads the training state and changes
nothing in it, so the interval never changes results (it is not part of the run identity).
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_MINUTES = 10.0


def interval_minutes(checkpoint_uri: str | None, minutes: float | None) -> float:
    """The interval to use: `minutes` when given (0 = off), else DEFAULT_MINUTES for a remote URI, else 0."""
    if minutes is not None:
        return minutes
    return DEFAULT_MINUTES if checkpoint_uri and "://" in checkpoint_uri else 0.0


class MidEpochMirror:
    """Says when the loop should write last.pt mid-epoch: `minutes` after the last checkpoint written."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = minutes * 60.0
        self._clock = clock
        self._last = clock()

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def due(self) -> bool:
        """True when the interval has passed since the last checkpoint (never when disabled)."""
        return self.enabled and self._clock() - self._last >= self.seconds

    def reset(self) -> None:
        """A checkpoint was just written (epoch end, stop, or mid-epoch): the interval starts again."""
        self._last = self._clock()
