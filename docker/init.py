#!/usr/bin/env python3
"""PID 1 of the image under `docker run` (the ENTRYPOINT): run the command, pass stop signals to every
process in the container, and exit only when the last one has exited.

Why not `sh` or tini: a Kubeflow lightweight component runs as `sh -ec '... python3 -m kfp.dsl.executor_main'`,
whose Python starts `python -m yolo train`. As PID 1, `sh` has no handler for SIGTERM, so the kernel drops
`docker stop`'s signal and the trainer is killed at the end of the grace period without writing last.pt.
tini (also with -g) exits as soon as its child exits: SIGTERM kills `sh` at once, tini leaves, and the
container's PID namespace goes down with the trainer still writing its checkpoint. This init signals
every process (kill(-1) from PID 1 reaches the whole container but not itself) and then waits for all of
them, so the trainer finishes its step, writes and uploads last.pt, and exits 143 inside the grace period.

Not PID 1 (a Kubernetes pod's `command:` replaces the ENTRYPOINT; or run by hand): it just execs the
command. Stdlib only: the same file runs on the CUDA and the Debian base.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal that killed the process."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    if not argv:
        print("container-init: no command given", file=sys.stderr)
        return 2
    if os.getpid() != 1:
        os.execvp(argv[0], argv)
    signalled = False

    def forward(signum: int, _frame) -> None:
        nonlocal signalled
        signalled = True
        os.kill(-1, signum)  # from PID 1: every other process of this container

    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen(argv)
    except OSError as e:
        print(f"container-init: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        return 127
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, 0)  # reaps orphans too: PID 1 adopts them
        except ChildProcessError:
            break
        if pid == child.pid:
            code = exit_code(status)
            if not signalled:
                break  # a normal end: leave like any init once the command is done
    return 1 if code is None else code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
