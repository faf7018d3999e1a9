"""SIGTERM / SIGINT as a request to stop at the next step boundary, not an immediate death.

Kubernetes sends SIGTERM and waits ~30 s before SIGKILL; a training step is well under that, so the
loop finishes the step it is in, writes last.pt (epoch and iteration reached), waits for the upload and
exits with a code that says "preempted, resume me":

    EXIT_SIGTERM = 143   (128 + SIGTERM, what a shell reports for a TERM-killed process)
    EXIT_SIGINT  = 130   (128 + SIGINT, Ctrl-C)

A second signal of the same kind while stopping restores the default action, so a user can still kill
a stuck run with a second Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

LOG = logging.getLogger(__name__)

EXIT_SIGTERM = 128 + signal.SIGTERM
EXIT_SIGINT = 128 + signal.SIGINT
_EXIT_CODES = {signal.SIGTERM: EXIT_SIGTERM, signal.SIGINT: EXIT_SIGINT}


class StopRequested:
    """Context manager that turns SIGTERM/SIGINT into a flag the loop polls between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES.get(self.signal, 1) if self.signal is not None else 0

    def poll(self, epoch: int, iteration: int) -> bool:
        """Asked by the loop at each step boundary (`iteration` batches of `epoch` done); True: stop now."""
        return self.requested

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to stop as if `signum` had arrived (also how tests and other ranks trigger it)."""
        if self.signal is None:
            self.signal = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == self.signal:
            # second identical signal: give the default behaviour back (next one kills immediately)
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        name = signal.Signals(signum).name
        LOG.warning(f"{name} received: stopping after the current step and writing weights/last.pt")
        self.request(signum)

    def __enter__(self) -> StopRequested:
        if threading.current_thread() is threading.main_thread():
            for sig in _EXIT_CODES:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
