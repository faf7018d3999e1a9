"""The validate step through the CLI: coco128, a read-only faults dataset, dataset-level failures, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.data_faults import (
    FAULTS,
    GOOD_LABEL,
    ODDITIES,
    add_pair,
    image_array,
    make_faults_dataset,
    make_read_only,
    make_writable,
    png_bytes,
    snapshot,
    write,
    write_yaml,
)
from yolo.data.dataset import load_data_config
from yolo.data.index import load_split


def one_line_error(result, only_line: bool = True) -> str:
    """The error line; with only_line, nothing else on stderr (no progress logs came before it)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("yolo-pipeline validate: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert len(lines) == 1 or not only_line, result.stderr
    return errors[0]


def test_coco128(coco128_yaml, tmp_path):
    out = tmp_path / "v"
    result = run_cli("validate", "--data", coco128_yaml, "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and len(report["fingerprint"]) == 64
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert (train["images"], train["images_ok"], train["skipped"], train["boxes"]) == (128, 128, 0, 929)
    assert (val["images"], val["images_ok"], val["skipped"], val["boxes"]) == (128, 128, 0, 898)
    assert train["backgrounds"] == 2  # two train images have no label file
    assert [p["code"] for p in report["problems"]] == ["label_missing", "label_missing"]
    assert {p["action"] for p in report["problems"]} == {"kept_as_background"}
    assert "| train | 128 | 128 | 0 | 2 | 929 | 2 |" in (out / "report.md").read_text()
    index = load_split(load_data_config(coco128_yaml), "val", index_dir=out / "index")
    assert len(index) == 128 and sum(len(lb) for lb in index.labels) == 898
    assert index.fingerprint == val["fingerprint"]


@pytest.fixture
def read_only_faults(tmp_path):
    root = tmp_path / "faults"
    yaml_path = make_faults_dataset(root)
    make_read_only(root)
    yield yaml_path
    make_writable(root)  # so pytest can clean up


def test_faults_dataset_read_only(read_only_faults, tmp_path):
    root = read_only_faults.parent
    before = snapshot(root)
    out = tmp_path / "out"
    result = run_cli("validate", "--data", read_only_faults, "--out", out, "--max-bad-fraction", "1")
    assert result.returncode == 0, result.stderr
    assert snapshot(root) == before  # nothing in the dataset written, created or touched

    report = json.loads((out / "report.json").read_text())
    found = {(p["file"], p["code"], p["action"]) for p in report["problems"]}
    assert found == set(FAULTS.values())  # every fault under its code, nothing else reported
    assert all(p["split"] == "train" and p["message"] for p in report["problems"])
    train = report["splits"]["train"]
    n_train = 3 + len(ODDITIES) + len(FAULTS)
    skipped = sum(1 for _, _, action in FAULTS.values() if action == "skipped")
    assert (train["images"], train["skipped"], train["images_ok"]) == (n_train, skipped, n_train - skipped)
    assert train["problems"] == len(FAULTS)
    assert train["backgrounds"] == 2  # empty_label.png and no_label.png
    # boxes: 2 per good/oddity/no_end_marker file, 2 in duplicate (one dropped), 1 in zero_size, 1 polygon
    assert train["boxes"] == 2 * (3 + 5 + 1) + 2 + 1 + 1
    assert report["splits"]["val"] == {**report["splits"]["val"], "images": 3, "images_ok": 3, "boxes": 6,
                                       "problems": 0}

    index = load_split(load_data_config(read_only_faults), "train", index_dir=out / "index")
    shapes = dict(zip(index.files, map(tuple, index.shapes.tolist()), strict=True))
    for rel, shape in ODDITIES.items():
        assert shapes[rel] == shape, rel
    assert not any("notes" in f or "README" in f for f in index.files + index.skipped)
    assert sorted(index.skipped) == sorted(f.replace("labels/", "images/").replace(".txt", ".png")
                                           if f.startswith("labels/") else f
                                           for f, _, action in FAULTS.values() if action == "skipped")
    polygon = index.labels[index.files.index("images/train/polygon.png")]
    np.testing.assert_allclose(polygon, [[2, 0.3, 0.4, 0.4, 0.4]], atol=1e-6)

    md = (out / "report.md").read_text()
    assert "# Dataset validation: OK" in md and "| label_duplicate | 1 | row_dropped |" in md
    assert "| image_corrupt | 2 | kept (1), skipped (1) |" in md or "| image_corrupt | 2 | skipped (1), kept (1) |" in md


def test_too_many_bad_images_fails_after_writing_the_report(read_only_faults, tmp_path):
    out = tmp_path / "out"
    (out / "index").mkdir(parents=True)  # a stale index from an earlier run must not survive a failure
    line = one_line_error(run_cli("validate", "--data", read_only_faults, "--out", out), only_line=False)
    assert "split_too_many_bad" in line and "more than --max-bad-fraction 0.05" in line
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is False and report["fingerprint"] is None and report["index"] is None
    fatal = [p for p in report["problems"] if p["action"] == "fatal"]
    assert [(p["split"], p["code"]) for p in fatal] == [("train", "split_too_many_bad")]
    assert "# Dataset validation: FAILED" in (out / "report.md").read_text()
    assert not (out / "index").exists()


def _good_dataset(root: Path, yaml_text: str | None = None) -> Path:
    for i in range(2):
        add_pair(root, "train", f"t{i}", png_bytes(image_array(seed=i)), GOOD_LABEL)
        add_pair(root, "val", f"v{i}", png_bytes(image_array(seed=i)), GOOD_LABEL)
    return write_yaml(root, yaml_text)


@pytest.mark.parametrize(("yaml_text", "code", "split"), [
    ("train: images/train\nval: images/val\nnc: 4\nnames: [a, b, c]\n", "names_mismatch", None),
    ("train: images/train\nval: images/nowhere\nnames: [a, b, c]\n", "split_empty", "val"),
    ("train: images/train\nval: images/empty\nnames: [a, b, c]\n", "split_empty", "val"),
])
def test_dataset_level_failures_write_the_report_then_exit_2(tmp_path, yaml_text, code, split):
    yaml_path = _good_dataset(tmp_path / "ds", yaml_text)
    (tmp_path / "ds/images/empty").mkdir()
    out = tmp_path / "out"
    line = one_line_error(run_cli("validate", "--data", yaml_path, "--out", out), only_line=False)
    assert code in line
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is False
    assert [(p["code"], p["split"], p["action"]) for p in report["problems"]] == [(code, split, "fatal")]
    assert report["splits"]["train"]["images_ok"] == 2  # the rest is still verified and counted
    assert not (out / "index").exists()


@pytest.mark.parametrize(("make", "expected"), [
    (lambda ds: ds / "missing.yaml", "data.yaml not found"),
    (lambda ds: write_yaml(ds, "just a string\n"), "must be a mapping"),
    (lambda ds: write_yaml(ds, "trian: images/train\nval: images/val\nnames: [a]\n"),
     "missing required key `train`; found `trian` (did you mean `train`?)"),
    (lambda ds: write_yaml(ds, "path: ../elsewhere\ntrain: images/train\nval: images/val\nnames: [a]\n"),
     "is resolved relative to the data.yaml's folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, make, expected):
    ds = tmp_path / "ds"
    _good_dataset(ds)
    yaml_path = make(ds)
    out = tmp_path / "out"
    line = one_line_error(run_cli("validate", "--data", yaml_path, "--out", out))
    assert expected in line and str(yaml_path) in line
    assert not out.exists()


def test_unwritable_output_folder(tmp_path):
    yaml_path = _good_dataset(tmp_path / "ds")
    blocker = write(tmp_path / "file", "a file where a folder should be")
    line = one_line_error(run_cli("validate", "--data", yaml_path, "--out", blocker / "out"))
    assert f"cannot create output folder {blocker / 'out'}" in line


def test_bad_option_values(tmp_path):
    yaml_path = _good_dataset(tmp_path / "ds")
    result = run_cli("validate", "--data", yaml_path, "--out", tmp_path / "o", "--max-bad-fraction", "1.5")
    assert result.returncode == 2 and "must be in [0, 1]" in result.stderr and not (tmp_path / "o").exists()


def test_validate_in_process_matches_threads_and_processes(tmp_path):
    """Pools (threads or processes) give the same records as a plain loop, in the same order."""
    from yolo.data.index import PARALLEL_MIN_FILES, verify_split

    root = tmp_path / "ds"
    for i in range(PARALLEL_MIN_FILES + 8):
        label = GOOD_LABEL if i % 5 else f"{i % 7} 0.5 0.5 0.1 0.1\n"
        add_pair(root, "train", f"im{i:03d}", png_bytes(image_array(16 + i % 9, 20, seed=i)), label)
    cfg = load_data_config(write_yaml(root))
    runs = [verify_split(cfg, "train", workers=w, executor=ex, progress=False)
            for w, ex in [(1, "thread"), (2, "thread"), (2, "process")]]
    for records in runs[1:]:
        assert [r.image for r in records] == [r.image for r in runs[0]]
        assert [r.usable for r in records] == [r.usable for r in runs[0]]
        assert [r.problems for r in records] == [r.problems for r in runs[0]]
        assert all(np.array_equal(a.labels, b.labels) for a, b in zip(records, runs[0], strict=True))
    assert sum(not r.usable for r in runs[0]) == 4  # i = 5, 10, 20, 25 give classes 5, 3, 6, 4 >= nc


def test_rerun_replaces_the_index(tmp_path):
    yaml_path = _good_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    assert run_cli("validate", "--data", yaml_path, "--out", out).returncode == 0
    first = json.loads((out / "report.json").read_text())["fingerprint"]
    shutil.copy(tmp_path / "ds/images/train/t0.png", tmp_path / "ds/images/train/t9.png")
    assert run_cli("validate", "--data", yaml_path, "--out", out).returncode == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fingerprint"] != first and report["splits"]["train"]["images"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["index", "report.json", "report.md"]  # no temp leftovers
    meta = json.loads((out / "index/index.json").read_text())
    assert meta["fingerprint"] == report["fingerprint"] and meta["splits"]["train"]["images"] == 3
