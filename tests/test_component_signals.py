"""The train component passes a stop signal it gets on to the trainer and waits for it (in a pod the
trainer is a grandchild of PID 1; see docs/kubeflow.md "Preemption in the container")."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from components.runtime import _run_passing_on_stop_signals

# A stand-in trainer: on SIGTERM it takes a moment (its "last step and last.pt"), then exits 143.
CHILD = """
import pathlib, signal, sys, time
def stop(signum, frame):
    time.sleep(0.5)
    print("stopped cleanly", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[1]).touch()
time.sleep(60)
sys.exit(0)
"""


def test_sigterm_reaches_the_child_and_the_component_waits_for_it(tmp_path, capfd):
    ready = tmp_path / "ready"

    def send_sigterm_to_this_process():
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:  # the child's handler is installed
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=send_sigterm_to_this_process)
    sender.start()
    code = _run_passing_on_stop_signals([sys.executable, "-c", CHILD, str(ready)])
    sender.join()
    assert code == 143  # the child's own exit after its clean stop, not a kill of this process
    assert capfd.readouterr().out.splitlines() == ["stopped cleanly"]
    assert signal.getsignal(signal.SIGTERM) is previous  # this process's handler is back as it was
