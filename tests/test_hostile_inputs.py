"""Hostile inputs: each a small file made here, each refused through the CLI in bounded memory and time.

Every case runs the real CLI in a child process and checks: exit 2 with ONE line on stderr (or, where
validate carries on, the coded problem in report.json), no traceback, the child's peak RSS (os.wait4)
under MAX_RSS_MB, a timeout instead of a hang, and nothing written outside --out (the dataset and the
rest of the sandbox are byte-for-byte unchanged, the working folder and TMPDIR stay empty).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import types
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from markdown_it import MarkdownIt
from torch import nn

from tests.conftest import REPO
from tests.data_faults import GOOD_LABEL, add_pair, image_array, png_bytes, write, write_yaml
from yolo.limits import MAX_CLASSES, MAX_IMAGE_BYTES, MAX_LABEL_BYTES, MAX_YAML_BYTES
from yolo.model.cfg import load_cfg
from yolo.model.checkpoint import FORMAT

MAX_RSS_MB = 1500  # each attack below would need GiBs (or hang) without its budget
TIMEOUT_S = 240  # a hang is killed and fails the test; never a timing assertion
PEAK_RSS_MB: dict[str, int] = {}  # test id -> measured peak, printed at the end of the module (-s)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: int


# A small launcher between the test and the CLI: a process's peak RSS starts from the memory of the
# process it was forked from, and pytest (with torch loaded) would dominate every measurement. The
# launcher is small when it spawns the CLI, waits for it and writes the CLI's own rusage.
LAUNCHER = """
import json, os, sys
result, argv = sys.argv[1], sys.argv[2:]
pid = os.posix_spawn(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
with open(result, "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}, f)
"""


def run_measured(*args, sandbox: Sandbox) -> Run:
    """`python -m yolo ARGS` in sandbox/cwd with TMPDIR sandbox/tmp, killed (with its process group) after
    TIMEOUT_S; returns its exit code, output and own peak RSS (wait4, Linux: KiB)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(sandbox / "tmp")}
    result = sandbox.root.parent / f"{sandbox.root.name}.rusage.json"  # outside the sandbox, not a CLI output
    command = [sys.executable, "-c", LAUNCHER, result, sys.executable, "-m", "yolo", *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(map(str, command)), cwd=sandbox / "cwd", env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{args[0]} did not finish within {TIMEOUT_S} s (a hang)")
        out.seek(0)
        err.seek(0)
        measured = json.loads(result.read_text())
        result.unlink()
        return Run(measured["returncode"], out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                   measured["maxrss_kib"] // 1024)


def state(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple]:
    """Every entry under root (symlinks not followed, FIFOs and devices never opened) with its kind, size,
    mtime and, for regular files under 1 MiB, content hash."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            digest = ""
            if stat.S_ISREG(st.st_mode) and st.st_size < (1 << 20):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            found[p.relative_to(root).as_posix()] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, digest, link)
    return found


class Sandbox:
    """A test's folder: the child runs in cwd/ with TMPDIR tmp/ and may write only under out/."""

    def __init__(self, root: Path):
        self.root = root
        self.before: dict | None = None
        for sub in ("cwd", "tmp"):
            (root / sub).mkdir()

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def snapshot(self) -> None:
        """Record the state to compare with after the test (call once the hostile input is in place)."""
        self.before = state(self.root, self._own())

    def _own(self) -> tuple[Path, ...]:
        """out/ (the CLI's to write), cwd/ and tmp/ (checked to stay empty instead)."""
        return self.root / "out", self.root / "cwd", self.root / "tmp"

    def check_untouched(self) -> None:
        assert self.before is not None, "the test must snapshot the sandbox before running the CLI"
        # torch's compiler creates its cache folder in TMPDIR when train starts: torch's, not an output
        for cache in (self.root / "tmp").glob("torchinductor_*"):
            shutil.rmtree(cache)
        assert state(self.root, self._own()) == self.before, "something outside --out was written or changed"
        assert not any((self.root / "cwd").iterdir()) and not any((self.root / "tmp").iterdir())


@pytest.fixture
def sandbox(tmp_path):
    box = Sandbox(tmp_path)
    yield box
    box.check_untouched()


def refused(run: Run, command: str, *expected: str, test_id: str) -> str:
    """Exit 2, exactly one line on stderr naming the command, no traceback, bounded RSS; returns the line."""
    PEAK_RSS_MB[test_id] = run.peak_rss_mb
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"yolo-pipeline {command}: error: "), run.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert run.peak_rss_mb < MAX_RSS_MB, run.peak_rss_mb
    return lines[0]


def dataset(root: Path, n: int = 4) -> Path:
    """A small valid dataset: n train and 2 val PNGs with labels; returns its data.yaml."""
    for i in range(n):
        add_pair(root, "train", f"good{i}", png_bytes(image_array(seed=i)), GOOD_LABEL)
    for i in range(2):
        add_pair(root, "val", f"val{i}", png_bytes(image_array(seed=10 + i)), GOOD_LABEL)
    return write_yaml(root)


def validate_report(sandbox: Sandbox, test_id: str, *extra: str) -> dict:
    """validate with a generous --max-bad-fraction: it must finish (exit 0) and report each hostile file."""
    sandbox.snapshot()
    run = run_measured("validate", "--data", sandbox / "ds" / "data.yaml", "--out", sandbox / "out",
                       "--max-bad-fraction", "0.9", *extra, sandbox=sandbox)
    PEAK_RSS_MB[test_id] = run.peak_rss_mb
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert run.peak_rss_mb < MAX_RSS_MB, run.peak_rss_mb
    return json.loads((sandbox / "out" / "report.json").read_text())


def problem_codes(report: dict) -> dict[str, str]:
    return {p["file"]: p["code"] for p in report["problems"]}


# ---------------------------------------------------------------------------------------------- data.yaml
def _billion_laughs() -> str:
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        levels.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    return "\n".join(levels) + "\ntrain: images/train\nval: images/val\nnames: *i\n"


DATA_YAML_ATTACKS = {
    "yaml_bomb": (_billion_laughs(), "expands to more than"),  # 9^9 = 387 M strings from 600 bytes
    "recursive_alias": ("names: &n [a, *n]\ntrain: images/train\nval: images/val\n", "refers to itself"),
    "deep_nesting": ("names: " + "[" * 50_000 + "\n", "nested more than"),
    "huge_nc": ("nc: 1000000000000\ntrain: images/train\nval: images/val\n", f"more than the {MAX_CLASSES}"),
    "huge_names": ("names: [" + "a, " * (MAX_CLASSES + 1) + "]\ntrain: images/train\nval: images/val\n",
                   f"more than the {MAX_CLASSES}"),
    "oversized_yaml": ("train: images/train\nval: images/val\nnames: [a]\n" + "#" * MAX_YAML_BYTES + "\n",
                       f"more than the {MAX_YAML_BYTES}"),
    "path_proc": ("path: /proc\ntrain: self\nval: self\nnames: [a]\n", "virtual filesystem"),
    "split_in_proc": ("train: /proc/self\nval: images/val\nnames: [a]\n", "outside the dataset root"),
}


@pytest.mark.parametrize("attack", sorted(DATA_YAML_ATTACKS))
def test_data_yaml_attacks_are_one_line(sandbox, attack):
    text, expected = DATA_YAML_ATTACKS[attack]
    yaml_path = dataset(sandbox / "ds")
    yaml_path.write_text(text)
    sandbox.snapshot()
    run = run_measured("validate", "--data", yaml_path, "--out", sandbox / "out", sandbox=sandbox)
    refused(run, "validate", expected, test_id=f"data.yaml {attack}")
    assert not (sandbox / "out").exists()


def test_data_yaml_fifo_does_not_hang(sandbox):
    dataset(sandbox / "ds")
    fifo = sandbox / "ds" / "fifo.yaml"
    os.mkfifo(fifo)
    sandbox.snapshot()
    run = run_measured("validate", "--data", fifo, "--out", sandbox / "out", sandbox=sandbox)
    refused(run, "validate", "is a FIFO, not a regular file", test_id="data.yaml FIFO")


# ---------------------------------------------------------------------------------------------- model cfg
def _cfg_text(change) -> str:
    import yaml

    cfg = load_cfg("yolov5n")
    change(cfg)
    return yaml.safe_dump(cfg)


CFG_ATTACKS = {
    "cyclic": ("nc: 3\ndepth_multiple: 0.33\nwidth_multiple: 0.25\nanchors: 3\n"
               "backbone: &b [[-1, 1, Conv, *b]]\nhead: *b\n", "refers to itself"),
    "wide": (_cfg_text(lambda c: c.update(width_multiple=5000.0)), "output channels"),
    "deep": (_cfg_text(lambda c: c.update(depth_multiple=1e300)), "more than 128 times"),
    "huge_nc": (_cfg_text(lambda c: c.update(nc=10**12)), f"more than the {MAX_CLASSES} classes"),
    "huge_anchor_count": (_cfg_text(lambda c: c.update(anchors=10**9)), "a count of at most"),
    "upsample_bomb": (_cfg_text(lambda c: c["head"][1].__setitem__(3, [None, 100000, "nearest"])),
                      "feature map"),
    "many_layers": (_cfg_text(lambda c: c["backbone"].extend([[-1, 1, "Conv", [16, 1, 1]]] * 600)),
                    "more than the 512"),
    "oversized_file": ("# padding\n" * (MAX_YAML_BYTES // 10 + 10), f"more than the {MAX_YAML_BYTES}"),
}


@pytest.mark.parametrize("attack", sorted(CFG_ATTACKS))
def test_model_cfg_attacks_are_one_line(sandbox, attack):
    text, expected = CFG_ATTACKS[attack]
    yaml_path = dataset(sandbox / "ds")
    cfg = write(sandbox / "bad_cfg.yaml", text)
    sandbox.snapshot()
    run = run_measured("stats", "--data", yaml_path, "--cfg", cfg, "--out", sandbox / "out", sandbox=sandbox)
    refused(run, "stats", expected, test_id=f"cfg {attack}")


# ---------------------------------------------------------------------------------------------- checkpoints
def _ours(cfg: dict, **extra) -> dict:
    return {"format": FORMAT, "cfg": cfg, "names": ["a"], "model": {}, **extra}


def _shared_bomb(levels: int = 25) -> list:
    bomb: list = [0]
    for _ in range(levels):
        bomb = [bomb, bomb]  # 2^25 leaves in ~100 bytes of pickle
    return bomb


def _inflating_archive(path: Path) -> None:
    """A torch archive whose tensor entry is deflated and declares 3.75 GiB uncompressed (a few KB on disk)."""
    plain = path.with_suffix(".plain")
    torch.save(_ours(load_cfg("yolov5n"), extra=torch.zeros(16)), plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                dst.writestr(info.filename, b"\0" * (1 << 20), compress_type=zipfile.ZIP_DEFLATED)
                target = info.filename
            else:
                dst.writestr(info, src.read(info))
    plain.unlink()
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        local = z.getinfo(target).header_offset
    huge = struct.pack("<I", 0xF000_0000)
    assert data[local:local + 4] == b"PK\x03\x04"
    data[local + 22:local + 26] = huge  # local header: uncompressed size
    central = data.find(b"PK\x01\x02")  # the central directory's entries
    while central != -1:
        name_len = struct.unpack("<H", data[central + 28:central + 30])[0]
        if data[central + 46:central + 46 + name_len].decode() == target:
            data[central + 24:central + 28] = huge
        central = data.find(b"PK\x01\x02", central + 46)
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        assert z.getinfo(target).file_size == 0xF000_0000


def _upstream_like(path: Path, monkeypatch, cfg, cyclic: bool = False) -> None:
    """A pickle that names upstream's class (models.yolo.Model), as torch.save writes official files."""
    for package in ("models", "models.yolo"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    model_class = type("Model", (nn.Module,), {"__module__": "models.yolo"})
    sys.modules["models.yolo"].Model = model_class
    model = model_class()
    model.yaml, model.names = cfg, ["a"]
    if cyclic:
        model.add_module("inner", model)  # a module that is its own child
    torch.save({"model": model, "epoch": 1}, path)
    monkeypatch.undo()


def _nc_cfg(nc: int) -> dict:
    cfg = load_cfg("yolov5n")
    cfg["nc"] = nc
    return cfg


CHECKPOINT_ATTACKS = {
    "huge_cfg_nc": (lambda p, mp: torch.save(_ours(_nc_cfg(10**9)), p), "nc is 1000000000, more than"),
    "shared_references": (lambda p, mp: torch.save(_ours({**load_cfg("yolov5n"), "x": _shared_bomb()}), p),
                          "expands to more than"),
    "inflating_storage": (lambda p, mp: _inflating_archive(p), "refused before inflating"),
    "upstream_shared_references": (lambda p, mp: _upstream_like(p, mp, {"nc": 1, "x": _shared_bomb()}),
                                   "expands to more than"),
    "upstream_huge_nc": (lambda p, mp: _upstream_like(p, mp, _nc_cfg(10**12)), "asks for nc=1000000000000"),
    "upstream_cyclic_module": (lambda p, mp: _upstream_like(p, mp, {"nc": 1}, cyclic=True), "contain themselves"),
    "pickle_fifo": (lambda p, mp: os.mkfifo(p), "is a FIFO, not a regular file"),
}


@pytest.mark.parametrize("attack", sorted(CHECKPOINT_ATTACKS))
def test_checkpoint_attacks_are_one_line(sandbox, monkeypatch, attack):
    make, expected = CHECKPOINT_ATTACKS[attack]
    weights = sandbox / "weights.pt"
    make(weights, monkeypatch)
    sandbox.snapshot()
    run = run_measured("convert", "--weights", weights, "--out", sandbox / "out" / "converted.pt", sandbox=sandbox)
    refused(run, "convert", expected, test_id=f"checkpoint {attack}")
    assert not (sandbox / "out" / "converted.pt").exists()


@pytest.mark.parametrize("attack", ["inflating_storage", "shared_references"])
def test_tampered_last_pt_is_refused_on_resume(sandbox, monkeypatch, attack):
    """--resume reads last.pt with weights_only through the same budgets (yolo.model.checkpoint.load_weights_only)."""
    make, expected = CHECKPOINT_ATTACKS[attack]
    run_dir = sandbox / "out"  # a resumed run writes into its own folder: that is its --out
    (run_dir / "weights").mkdir(parents=True)
    make(run_dir / "weights" / "last.pt", monkeypatch)
    sandbox.snapshot()
    run = run_measured("train", "--resume", run_dir, "--device", "cpu", sandbox=sandbox)
    refused(run, "train", expected, test_id=f"resume {attack}")
    assert sorted(p.name for p in run_dir.rglob("*")) == ["last.pt", "weights"]


# ---------------------------------------------------------------------------------------------- images, labels
def png_declaring(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header declares width x height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def test_png_declaring_huge_dimensions(sandbox):
    dataset(sandbox / "ds")
    add_pair(sandbox / "ds", "train", "huge", png_declaring(100_000, 100_000), GOOD_LABEL)
    report = validate_report(sandbox, "png 100000x100000 (validate)")
    assert problem_codes(report)["images/train/huge.png"] == "image_too_large"
    assert report["splits"]["train"]["images_ok"] == 4


def test_png_declaring_huge_dimensions_in_predict(sandbox):
    from yolo.model.checkpoint import checkpoint_dict, save_checkpoint
    from yolo.model.yolo import DetectionModel

    torch.manual_seed(0)
    save_checkpoint(sandbox / "w.pt", checkpoint_dict(DetectionModel(load_cfg("yolov5n"), nc=2)))
    image = write(sandbox / "huge.png", png_declaring(100_000, 100_000))
    sandbox.snapshot()
    run = run_measured("predict", "--weights", sandbox / "w.pt", "--source", image, "--out", sandbox / "out",
                       "--imgsz", "64", "--device", "cpu", sandbox=sandbox)
    refused(run, "predict", "declares 100000x100000 px", test_id="png 100000x100000 (predict)")


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)  # no blocks on disk: the size is what a reader would allocate


def test_enormous_image_and_label_files_are_not_read(sandbox):
    dataset(sandbox / "ds")
    _sparse(sandbox / "ds" / "images" / "train" / "enormous.png", MAX_IMAGE_BYTES + 1)
    _sparse(sandbox / "ds" / "labels" / "train" / "good0.txt", MAX_LABEL_BYTES + 1)
    codes = problem_codes(validate_report(sandbox, "enormous image + label files"))
    assert codes["images/train/enormous.png"] == "image_too_large"
    assert codes["labels/train/good0.txt"] == "label_too_large"


def test_fifos_in_the_dataset_do_not_hang(sandbox):
    dataset(sandbox / "ds")
    os.mkfifo(sandbox / "ds" / "images" / "train" / "fifo.png")
    (sandbox / "ds" / "labels" / "train" / "good1.txt").unlink()
    os.mkfifo(sandbox / "ds" / "labels" / "train" / "good1.txt")
    codes = problem_codes(validate_report(sandbox, "FIFOs in dataset"))
    assert codes["images/train/fifo.png"] == "not_a_regular_file"
    assert codes["labels/train/good1.txt"] == "not_a_regular_file"


def test_device_files_symlinked_in_are_not_read(sandbox):
    dataset(sandbox / "ds")
    os.symlink("/dev/zero", sandbox / "ds" / "images" / "train" / "zero.png")
    (sandbox / "ds" / "labels" / "train" / "good2.txt").unlink()
    os.symlink("/dev/urandom", sandbox / "ds" / "labels" / "train" / "good2.txt")
    codes = problem_codes(validate_report(sandbox, "/dev files symlinked in"))
    assert codes["images/train/zero.png"] == "outside_dataset"
    assert codes["labels/train/good2.txt"] == "outside_dataset"


def test_directory_symlink_loops_list_each_image_once(sandbox):
    dataset(sandbox / "ds")
    train = sandbox / "ds" / "images" / "train"
    os.symlink(".", train / "self")
    os.symlink("..", train / "parent")  # images/, which holds train/ (and val/) again
    os.symlink(train, sandbox / "ds" / "images" / "val" / "to_train")
    report = validate_report(sandbox, "directory symlink loops")
    assert report["splits"]["train"]["images"] == 4 + 2  # train's 4, and val's 2 through parent/ once
    assert report["splits"]["val"]["images"] == 2 + 4


def test_symlinks_out_of_the_dataset_are_not_followed_or_quoted(sandbox):
    dataset(sandbox / "ds")
    secret = write(sandbox / "secret.txt", "SECRET-TOKEN-4711 0.5 0.5 0.1 0.1\n")
    write(sandbox / "private" / "x.png", png_bytes(image_array()))
    (sandbox / "ds" / "labels" / "train" / "good3.txt").unlink()
    os.symlink(secret, sandbox / "ds" / "labels" / "train" / "good3.txt")
    os.symlink(sandbox / "private" / "x.png", sandbox / "ds" / "images" / "train" / "outside.png")
    os.symlink(sandbox / "private", sandbox / "ds" / "images" / "train" / "outside_dir")
    report = validate_report(sandbox, "symlinks out of dataset")
    codes = problem_codes(report)
    assert codes["labels/train/good3.txt"] == "outside_dataset"
    assert codes["images/train/outside.png"] == "outside_dataset"
    assert codes["images/train/outside_dir"] == "outside_dataset"
    for name in ("report.json", "report.md"):
        assert "SECRET" not in (sandbox / "out" / name).read_text()
    assert report["splits"]["train"]["images_ok"] == 3


def test_file_names_cannot_inject_markdown(sandbox):
    dataset(sandbox / "ds")
    name = "x`y|z\n# Injected heading\n[link](javascript:alert(1)) <b>bold</b>"
    add_pair(sandbox / "ds", "train", name, png_bytes(image_array()), "0 0.5 0.5 0.2\n")  # a bad row
    validate_report(sandbox, "markdown in file names")
    md = (sandbox / "out" / "report.md").read_text()
    html = MarkdownIt("commonmark").enable("table").render(md)
    assert "<h1>Injected" not in html and "<a href" not in html and "<b>" not in html
    rows = [row for row in md.splitlines() if "Injected" in row]
    assert len(rows) == 1 and rows[0].startswith("- train: ``labels/train/x`y|z\\n# Injected heading\\n")
    assert "<code>labels/train/x`y|z\\n# Injected heading\\n[link](javascript:alert(1)) &lt;b&gt;" in html


@pytest.fixture(scope="module", autouse=True)
def peak_rss_summary():
    """Prints what the cases measured once the module is done (visible with pytest -s)."""
    yield
    for name, mb in sorted(PEAK_RSS_MB.items()):
        print(f"peak RSS {mb:5d} MB  {name}")
