"""import_data into a real mount point (issue 15, fix 3): the PyTorchJob's init container imports into an
emptyDir, which is a mount point; removing and re-creating it fails (EBUSY as root, EACCES as uid 1000,
who cannot write the parent). The init container's own command (pipelines.pytorchjob.IMPORT_SNIPPET) runs
against a tmpfs mounted here, once as root and once as uid 1000 (the image's user).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import components.datasets  # noqa: F401 - imported before a fork that drops to uid 1000 (see below)
from pipelines.pytorchjob import IMPORT_SNIPPET

REPO = Path(__file__).resolve().parents[1]
USER = 1000  # the image's non-root user


def _mount_tmpfs(at: Path) -> None:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", str(at)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")


@pytest.fixture
def mount_point():
    """A tmpfs mounted at ROOT/data, ROOT owned by root and not writable by others (as a pod's /)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    root = Path(tempfile.mkdtemp(prefix="yolo-mount-"))
    root.chmod(0o755)
    data = root / "data"
    data.mkdir()
    _mount_tmpfs(data)
    try:
        yield data
    finally:
        subprocess.run(["umount", str(data)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _tiny_dataset(root: Path) -> None:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        (root / "images" / split / "a.png").write_bytes(b"png")
        (root / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [thing]\n")


def _run_init_container(source: str, version: str, target: Path, user: int | None) -> tuple[int, str]:
    """The init container's command in a forked child (as `user` when given): (exit code, error text).

    Forked rather than started anew: this interpreter may live where uid 1000 cannot read it (a pyenv under
    /root), and the import's own code is what is tested. The child sees argv as the container gives it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        code = 0
        try:
            if user is not None:
                os.setgid(user)
                os.setuid(user)
            sys.argv = ["-c", source, version, str(target)]  # as `python -c SNIPPET SOURCE VERSION DIR`
            exec(compile(IMPORT_SNIPPET, "<init container>", "exec"), {"__name__": "__main__"})
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(write_end, f"{type(e).__name__}: {e}".encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        error = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), error


@pytest.mark.parametrize("user", [None, USER], ids=["root", "uid1000"])
def test_import_into_a_mount_point(mount_point, user):
    src = Path(tempfile.mkdtemp(prefix="yolo-src-"))
    try:
        src.chmod(0o755)
        _tiny_dataset(src)
        for p in src.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        code, error = _run_init_container(str(src), "local-x", mount_point, user)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    assert code == 0, error
    assert os.path.ismount(mount_point)  # still the mount: imported into, not replaced
    assert (mount_point / "labels" / "val" / "a.txt").read_text() == "0 0.5 0.5 0.2 0.2\n"
    assert yaml.safe_load((mount_point / "data.yaml").read_text())["train"] == "images/train"
    if user is not None:
        assert (mount_point / "data.yaml").stat().st_uid == user


def test_sample_import_into_a_mount_point(mount_point):
    """sample: runs `python -m yolo sample-data` into the mount point (as root: see _run_init_container)."""
    code, error = _run_init_container("sample:train=4,val=2,imgsz=64", "sample-x", mount_point, None)
    assert code == 0, error
    assert len(list((mount_point / "images" / "train").iterdir())) == 4
    assert len(list((mount_point / "labels" / "val").iterdir())) == 2


def test_import_refuses_a_mount_point_that_is_not_empty(mount_point):
    (mount_point / "left-over").write_text("x")
    code, error = _run_init_container("sample:train=2,val=1,imgsz=64", "sample-x", mount_point, None)
    assert code == 1 and "not empty" in error
    assert (mount_point / "left-over").read_text() == "x"
