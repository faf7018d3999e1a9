"""`dvc repro` for real: the real dvc in a temporary git repo, S3 remote on a loopback moto server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.s3_server import make_bucket

pytestmark = pytest.mark.slow
pytest_plugins = ("tests.s3_server",)

if shutil.which("dvc", path=str(Path(sys.executable).parent)) is None:
    pytest.skip("dvc is not installed in this environment (the `dvc` extra)", allow_module_level=True)

TINY_PARAMS = {
    "sample": {"seed": 0, "train": 12, "val": 6, "imgsz": 64},
    "train": {"imgsz": 64, "epochs": 1, "batch-size": 4},
    "evaluate": {"batch-size": 8},
}
ALL_STAGES = {"sample_data", "validate", "stats", "train", "evaluate", "report"}
REPORT_METRICS = ["map50", "map50_95", "precision", "recall", "fitness", "bpr", "epochs", "best_epoch",
                  "train_images", "val_images", "val_instances"]
PLOT_TITLES = ["Training losses per epoch", "Validation mAP per epoch (EMA model)",
               "Precision-recall at IoU 0.5 (mean over classes)", "Confusion matrix (conf 0.25, IoU 0.45)"]


def _env(tmp: Path) -> dict[str, str]:
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_"))}
    env.update(
        HOME=str(home),
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
        DVC_GLOBAL_CONFIG_DIR=str(tmp / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(tmp / "dvc-system"),
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        MPLBACKEND="Agg",
    )
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _set_params(repo: Path, updates: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in updates.items():
        if isinstance(values, dict):
            params.setdefault(section, {}).update(values)
        else:
            params[section] = values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """A copy of this repository's files as a fresh git repo, with tiny params, after one `dvc repro`."""
    tmp = tmp_path_factory.mktemp("dvc")
    repo = tmp / "repo"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            dst = repo / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    env = _env(tmp)
    _set_params(repo, TINY_PARAMS)
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "copy"], repo, env)
    first = _run(["dvc", "repro"], repo, env)
    _run(["git", "add", "-A"], repo, env)  # as a user would: dvc.lock and the small reports/ files
    _run(["git", "commit", "-qm", "pipeline run"], repo, env)
    return repo, env, first


def test_repro_runs_every_stage_then_nothing(dvc_repo):
    repo, env, first = dvc_repo
    assert _stages_run(first) == ALL_STAGES
    metrics = json.loads((repo / "runs/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["map50"] <= 1.0
    assert metrics["data_version"] not in ("", None, "unknown")
    train = json.loads((repo / "runs/train/train.json").read_text())
    assert train["epochs_run"] == 1
    assert train["dataset_fingerprint"] == metrics["dataset_fingerprint"]
    threads = int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS") else len(os.sched_getaffinity(0))
    assert train["cpu_threads"] == metrics["cpu_threads"] == threads

    # reports/: the numbers people compare in file order, identifiers apart, no warnings on the way
    report = json.loads((repo / "reports/metrics.json").read_text())
    assert list(report) == REPORT_METRICS
    assert report["map50"] == metrics["map50"] and report["epochs"] == 1
    assert (report["train_images"], report["val_images"]) == (12, 6)
    lineage = json.loads((repo / "reports/lineage.json").read_text())
    assert lineage["run_id"] == train["run_id"] and lineage["cpu_threads"]["train"] == train["cpu_threads"]
    # the tiny model is below params.yaml's floor: a verdict, not a failed stage
    assert lineage["promote"] is False and "--min-map50 0.5" in lineage["gate_reasons"][0]
    assert "warning" not in first.lower()
    shown = _run(["dvc", "metrics", "show", "--json"], repo, env)
    assert set(json.loads(shown)[""]["data"]["reports/metrics.json"]["data"]) == set(REPORT_METRICS)
    second = _run(["dvc", "repro"], repo, env)
    assert _stages_run(second) == set()
    assert not _run(["git", "status", "--porcelain"], repo, env).strip()  # reports/ committed, runs/ ignored


def test_changing_train_param_reruns_only_train_and_evaluate(dvc_repo):
    repo, env, _ = dvc_repo
    _set_params(repo, {"train": {"seed": 1}})
    assert _stages_run(_run(["dvc", "repro"], repo, env)) == {"train", "evaluate", "report"}


def test_changing_train_imgsz_reruns_stats_too(dvc_repo):
    repo, env, _ = dvc_repo
    _set_params(repo, {"train": {"imgsz": 96}})
    assert _stages_run(_run(["dvc", "repro"], repo, env)) == {"stats", "train", "evaluate", "report"}
    assert json.loads((repo / "runs/stats/anchors.json").read_text())["imgsz"] == 96


def test_experiments_keep_metrics_and_plots(dvc_repo, tmp_path):
    """`dvc exp run` twice; exp show, metrics diff and plots diff between the two read every number."""
    repo, env, _ = dvc_repo
    _run(["git", "checkout", "--", "params.yaml"], repo, env)
    names = []
    for seed in (3, 4):
        out = _run(["dvc", "exp", "run", "-S", f"train.seed={seed}", "-n", f"seed{seed}"], repo, env)
        assert "No file hash info found" not in out and "warning" not in out.lower()
        names.append(f"seed{seed}")
    table = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env))
    experiments = {x["name"]: x for row in table for x in row.get("experiments") or []}
    for name in names:
        data = experiments[name]["revs"][0]["data"]
        assert set(data["metrics"]["reports/metrics.json"]["data"]) == set(REPORT_METRICS)
        assert data["params"]["params.yaml"]["data"]["train"]["seed"] == int(name[4:])
    diff = json.loads(_run(["dvc", "metrics", "diff", *names, "--all", "--json"], repo, env))
    assert set(diff["reports/metrics.json"]) == set(REPORT_METRICS)
    _run(["dvc", "plots", "diff", *names, "-o", str(tmp_path / "plots")], repo, env)
    page = (tmp_path / "plots" / "index.html").read_text()
    for title in PLOT_TITLES:
        assert title in page
    assert "skipped_steps" not in page and "lr0" not in page  # only the declared plots
    assert page.count(names[0]) >= 4 and page.count(names[1]) >= 4  # every plot has both experiments


def test_typo_in_params_fails_naming_the_key(dvc_repo):
    repo, env, _ = dvc_repo
    params_before = (repo / "params.yaml").read_text()
    try:
        _set_params(repo, {"train": {"epoch": 2}})
        proc = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0
        assert "--epoch" in proc.stdout + proc.stderr
    finally:
        (repo / "params.yaml").write_text(params_before)


def test_remote_push_pull_get_and_import_round_trip(dvc_repo, s3_server, tmp_path):
    repo, env, _ = dvc_repo
    s3 = {**env, **s3_server.env()}
    bucket = make_bucket(s3)
    _run(["dvc", "remote", "add", "-d", "storage", f"s3://{bucket}/dvcstore"], repo, s3)
    _run(["dvc", "remote", "modify", "storage", "endpointurl", s3_server.endpoint_url], repo, s3)
    _run(["dvc", "repro"], repo, s3)
    before = _tree_digest(repo / "data/sample")
    best_before = hashlib.sha256((repo / "runs/train/weights/best.pt").read_bytes()).hexdigest()
    _run(["dvc", "push"], repo, s3)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data/sample")
    (repo / "runs/train/weights/best.pt").unlink()
    _run(["dvc", "pull"], repo, s3)
    assert _tree_digest(repo / "data/sample") == before
    assert hashlib.sha256((repo / "runs/train/weights/best.pt").read_bytes()).hexdigest() == best_before

    # Another project takes the dataset by `dvc get` from this repo's commit, through the S3 remote.
    _run(["git", "add", "-A"], repo, s3)
    _run(["git", "commit", "-qm", "pipeline run"], repo, s3)
    got = tmp_path / "got"
    _run(["dvc", "get", str(repo), "data/sample", "-o", str(got)], tmp_path, s3)
    assert _tree_digest(got) == before
    # ... or by `dvc import`, which records the source repo and the commit it came from.
    other = tmp_path / "other"
    other.mkdir()
    _run(["git", "init", "-q"], other, s3)
    _run(["dvc", "init", "-q"], other, s3)
    _run(["dvc", "import", str(repo), "data/sample", "-o", "sample"], other, s3)
    assert _tree_digest(other / "sample") == before
    imported = yaml.safe_load((other / "sample.dvc").read_text())
    assert imported["deps"][0]["repo"]["url"] == str(repo)
    assert len(imported["deps"][0]["repo"]["rev_lock"]) == 40
