"""yolo.plots.processes: figures drawn in forked worker processes, and in the caller when they cannot be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from yolo.plots.processes import PlotProcesses


def write_pid(path: Path) -> None:
    path.write_text(str(os.getpid()))


def fail(_path: Path) -> None:
    raise ValueError("no such figure")


def die_in_a_worker(caller: int) -> None:
    if os.getpid() != caller:
        os._exit(3)  # the worker process itself goes away


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """In a fresh interpreter: pytest's own threads would (rightly) keep the plotter from forking."""
    code = textwrap.dedent(script).format(tmp=str(tmp_path))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])


def test_figures_are_drawn_in_worker_processes_and_waited_for(tmp_path):
    done = _run("""
        import os
        from pathlib import Path
        from yolo.plots.processes import PlotProcesses
        from tests.test_plot_processes import write_pid, fail
        with PlotProcesses() as plotter:
            for k in range(4):
                plotter.submit(f"figure {{k}}", write_pid, Path("{tmp}") / f"{{k}}.pid")
            plotter.submit("broken figure", fail, Path("{tmp}") / "x")
            plotter.wait()
            pids = {{int((Path("{tmp}") / f"{{k}}.pid").read_text()) for k in range(4)}}
            print("OK", os.getpid() not in pids, len(pids) <= 2)
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OK", "True", "True"]
    assert "broken figure not drawn: no such figure" in done.stderr  # a warning, never an error


def test_a_figure_whose_worker_died_is_drawn_by_the_caller(tmp_path):
    done = _run("""
        import os
        from pathlib import Path
        from yolo.plots.processes import PlotProcesses
        from tests.test_plot_processes import write_pid, die_in_a_worker
        with PlotProcesses() as plotter:
            plotter.submit("killer", die_in_a_worker, os.getpid())
            plotter.wait()  # the figure is drawn (here: a no-op) although its worker died
            plotter.submit("figure", write_pid, Path("{tmp}") / "f.pid")  # the pool is broken now
        print("OK", int((Path("{tmp}") / "f.pid").read_text()) == os.getpid())
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OK", "True"]
    assert "killer: the plotting process died; drawing it here" in done.stderr


def test_workers_die_with_their_parent(tmp_path):
    done = _run("""
        import os, signal
        from yolo.plots.processes import PlotProcesses
        plotter = PlotProcesses()
        plotter.submit("figure", len, [1])
        plotter.wait()
        print(*plotter._pool._processes, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # an OOM kill: no clean-up runs
    """, tmp_path)
    assert done.returncode == -signal.SIGKILL
    workers = [int(p) for p in done.stdout.split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if _running(p)]


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_caller_with_threads_of_its_own_draws_itself(tmp_path):
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        plotter = PlotProcesses()
        plotter.submit("figure", write_pid, tmp_path / "f.pid")
        assert not (tmp_path / "f.pid").exists()  # drawn at wait(), not before
        plotter.close()
    finally:
        stop.set()
        other.join()
    assert int((tmp_path / "f.pid").read_text()) == os.getpid()
