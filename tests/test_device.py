"""The CPU thread rule (yolo.device.cpu_threads) on faked affinity and cgroup files."""

from __future__ import annotations

import os

import pytest

from yolo import device
from yolo.errors import UserError


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """An 8-CPU affinity, no OMP_NUM_THREADS, and cgroup files under tmp_path (none written yet)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    proc = tmp_path / "proc_self_cgroup"
    root = tmp_path / "sys_fs_cgroup"
    root.mkdir()
    monkeypatch.setattr(device, "PROC_CGROUP", proc)
    monkeypatch.setattr(device, "CGROUP_ROOT", root)
    return proc, root


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_affinity_without_cgroup_files(machine):
    assert device.cpu_threads() == 8
    assert device.cpu_threads(processes=2) == 4
    assert device.cpu_threads(processes=16) == 1


def test_cgroup_v2_quota_caps_the_affinity(machine):
    proc, root = machine
    _write(proc, "0::/kubepods/pod1/container\n")
    _write(root / "kubepods/pod1/container/cpu.max", "max 100000\n")
    _write(root / "kubepods/pod1/cpu.max", "250000 100000\n")  # the pod's limit: 2.5 CPUs
    assert device.cgroup_cpu_quota() == 2.5
    assert device.cpu_threads() == 2
    assert device.available_cpus() == (2, "cgroup CPU quota 2.5")


def test_cgroup_v2_unlimited_and_namespaced_root(machine):
    proc, root = machine
    _write(proc, "0::/host/path/not/mounted/here\n")
    _write(root / "cpu.max", "max 100000\n")
    assert device.cgroup_cpu_quota() is None and device.cpu_threads() == 8
    _write(root / "cpu.max", "300000 100000\n")  # a container sees its own cgroup at the mount's root
    assert device.cpu_threads() == 3


def test_cgroup_v1_cfs_quota(machine):
    proc, root = machine
    _write(proc, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    _write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")  # unlimited here ...
    _write(root / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct/docker/cpu.cfs_quota_us", "150000\n")  # ... 1.5 CPUs one level up
    _write(root / "cpu,cpuacct/docker/cpu.cfs_period_us", "100000\n")
    assert device.cgroup_cpu_quota() == 1.5
    assert device.cpu_threads() == 1


def test_quota_above_affinity_leaves_affinity(machine):
    proc, root = machine
    _write(proc, "0::/\n")
    _write(root / "cpu.max", "1600000 100000\n")  # 16 CPUs allowed, 8 given
    assert device.cpu_threads() == 8


def test_omp_num_threads_wins(machine, monkeypatch):
    proc, root = machine
    _write(proc, "0::/\n")
    _write(root / "cpu.max", "100000 100000\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert device.cpu_threads() == 3 and device.cpu_threads(processes=2) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's per-nesting-level list: the outer level
    assert device.cpu_threads() == 4


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_omp_num_threads_is_one_clear_error(machine, monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(UserError, match="OMP_NUM_THREADS"):
        device.cpu_threads()


def test_load_average_is_not_consulted(machine, monkeypatch):
    def no_load(*_):
        raise AssertionError("cpu_threads read the load average")

    monkeypatch.setattr(os, "getloadavg", no_load)
    monkeypatch.setattr(device.os, "getloadavg", no_load)
    assert device.cpu_threads() == 8


def test_unreadable_cgroup_files_are_ignored(machine):
    proc, root = machine
    _write(proc, "0::/a\n")
    _write(root / "a/cpu.max", "garbage\n")
    assert device.cgroup_cpu_quota() is None and device.cpu_threads() == 8
