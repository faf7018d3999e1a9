"""The whole pipeline for real with kfp.local (SubprocessRunner, no containers) on tiny sample data:
first run promotes v1 (no baseline), the second run's evaluate compares against current.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("kfp")
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--dataset-source",
    "sample:train=8,val=4,imgsz=64",
    "--imgsz",
    "64",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--model-name",
    "tiny",
    "--min-map50",  # a floor of 0 promotes any finite model: one epoch on 8 images scores near 0
    "0",
]


def _run_local(root: Path, *extra: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "run-local", "--pipeline-root", str(root), *TINY, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    report = json.loads((root / "last-run.json").read_text())
    verdict = f"promoted as {report['current_version']}" if report["promote"] else "not promoted"
    assert f"run-local: {verdict} (" in result.stderr  # the pipeline says what the gate decided
    return report


def _executor_output(root: Path, task: str) -> list[dict]:
    """executor_output.json of one task in every run under root, oldest first."""
    runs = sorted((root / "artifacts").glob("yolo-training-*"))
    return [json.loads((run / task / "executor_output.json").read_text()) for run in runs]


@pytest.mark.slow
def test_run_local_promotes_then_compares_against_current(tmp_path):
    root = tmp_path / "kfp"
    first = _run_local(root)

    assert 0.0 <= first["metrics"]["map50"] <= 1.0 and set(first["metrics"]) >= {
        "precision",
        "recall",
        "map50_95",
    }
    assert first["promote"] is True and first["baseline"] is None
    assert first["current_version"] == "v1"
    model = Path(first["model"])
    assert (model / "best.pt").stat().st_size > 100_000 and (model / "train.json").is_file()
    evaluation = Path(first["evaluation"])
    for name in ("metrics.json", "gate.json", "confusion_matrix.json", "predictions.json"):
        assert (evaluation / name).is_file(), name
    registry = root / "registry" / "models" / "tiny"
    card = json.loads((registry / "v1" / "model_card.json").read_text())
    assert card["metrics"]["map50"] == pytest.approx(first["metrics"]["map50"])
    assert card["data_version"].startswith("sample-")
    assert (registry / "v1" / "best.pt").read_bytes() == (model / "best.pt").read_bytes()

    # Metrics were logged on the artifacts (what the KFP UI shows), not just written to files.
    (evaluate_out,) = _executor_output(root, "evaluate")
    logged = evaluate_out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["map50"] == pytest.approx(first["metrics"]["map50"])
    (stats_out,) = _executor_output(root, "stats")
    assert 0.0 <= stats_out["artifacts"]["anchor_fit"]["artifacts"][0]["metadata"]["bpr_after"] <= 1.0
    (validate_out,) = _executor_output(root, "validate")
    assert validate_out["artifacts"]["summary"]["artifacts"][0]["metadata"]["train_images_ok"] == 8
    # Checkpoints went to the checkpoint root, under this pipeline run's id.
    assert any((root / "checkpoints").rglob("last.pt"))

    second = _run_local(root, "--min-map50", "0.99")  # the later flag wins: a floor no tiny model reaches
    # Same data version: import, validate and stats are cache hits (they did not run again); resolve,
    # train and evaluate are never cached.
    runs = sorted((root / "artifacts").glob("yolo-training-*"))
    assert len(runs) == 2
    ran_again = {p.parent.name for p in runs[1].glob("*/executor_output.json")}
    assert {"resolve-dataset-version", "train", "evaluate"} <= ran_again
    assert not ran_again & {"import-data", "validate", "stats"}
    assert second["baseline"] is not None  # compared against v1's metrics via current.json
    assert any("baseline" in reason for reason in second["gate_reasons"])
    assert second["promote"] is False and any("< --min-map50 0.99" in r for r in second["gate_reasons"])
    assert second["current_version"] == "v1"
    evaluations = _executor_output(root, "evaluate")
    assert evaluations[1]["artifacts"]["evaluation"]["artifacts"][0]["metadata"]["baseline_version"] == "v1"
