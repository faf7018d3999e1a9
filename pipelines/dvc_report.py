"""The DVC view of a pipeline run: small git-kept files that `dvc exp show`, `dvc metrics diff` and `dvc plots`
read, condensed from the step outputs under runs/ (git-ignored, DVC-cached).

    reports/metrics.json       the numbers people compare (a DVC metric)
    reports/lineage.json       identifiers, thread counts, the gate's verdict (kept, not a metric)
    reports/plots/epochs.csv   losses and validation mAP per epoch
    reports/plots/pr_curve.csv the precision-recall curve (mean over classes, IoU 0.5)
    reports/plots/confusion.csv  one row per counted (actual, predicted) pair: DVC's confusion template

It is the DVC counterpart of what components/runtime.py logs for the Kubeflow UI: it only reads what the steps
wrote, so `yolo` stays free of DVC and the steps write the same files under every orchestrator.
Usage (the `report` stage of dvc.yaml): python -m pipelines.dvc_report --runs runs --out reports
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from yolo.errors import UserError
from yolo.files import write_text

# results.csv column -> epochs.csv column: only what dvc.yaml plots (timings and learning rates stay in runs/)
EPOCH_COLUMNS = {
    "epoch": "epoch",
    "train/box_loss": "box_loss",
    "train/obj_loss": "obj_loss",
    "train/cls_loss": "cls_loss",
    "metrics/mAP_0.5": "map50",
    "metrics/mAP_0.5:0.95": "map50_95",
    "metrics/precision": "precision",
    "metrics/recall": "recall",
}
# the confusion matrix is counted at a fixed confidence; more rows than this means a dataset far larger than
# a DVC plot can draw, and the plot is left out (the matrix stays in runs/evaluate/confusion_matrix.json)
MAX_CONFUSION_ROWS = 200_000


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the step that writes it first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None


def _json(obj: Any) -> str:
    """In the order written: `dvc exp show` shows the columns in file order, map50 first."""
    return json.dumps(obj, indent=2) + "\n"


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def metrics_summary(report: dict, anchors: dict, train: dict, metrics: dict) -> dict[str, Any]:
    """reports/metrics.json: the evaluate step's totals, the anchors' best possible recall, the counts."""
    val = report["splits"].get("val", {})
    return {
        "map50": metrics["map50"],
        "map50_95": metrics["map50_95"],
        "precision": metrics["precision"],
        "recall": metrics["recall"],
        "fitness": metrics["fitness"],
        "bpr": anchors["bpr_after"],
        "epochs": train["epochs_run"],
        "best_epoch": train["best_epoch"],
        "train_images": report["splits"].get("train", {}).get("images_ok", 0),
        "val_images": val.get("images_ok", metrics["images"]),
        "val_instances": metrics["instances"],
    }


def lineage(train: dict, metrics: dict, gate: dict) -> dict[str, Any]:
    """reports/lineage.json: what the numbers came from; identifiers are no metric to plot or diff."""
    return {
        "run_id": train["run_id"],
        "resumed_from": train.get("resumed_from"),
        "dataset_fingerprint": metrics["dataset_fingerprint"],
        "data_version": metrics["data_version"],
        "cpu_threads": {"train": train.get("cpu_threads"), "evaluate": metrics.get("cpu_threads")},
        "promote": gate["promote"],
        "gate_reasons": gate["reasons"],
    }


def epochs_csv(results_csv: str) -> str:
    rows = list(csv.DictReader(io.StringIO(results_csv)))
    return _csv(list(EPOCH_COLUMNS.values()), [[row.get(k, "") for k in EPOCH_COLUMNS] for row in rows])


def pr_curve_csv(evaluate_pr_csv: str) -> str:
    """recall, precision: the evaluate step's mean curve ('all'); per-class columns stay in runs/."""
    rows = list(csv.DictReader(io.StringIO(evaluate_pr_csv)))
    return _csv(["recall", "precision"], [[row["recall"], row["all"]] for row in rows])


def confusion_csv(confusion: dict) -> str | None:
    """actual, predicted: each cell of the count matrix repeated as many times as it counts."""
    labels, matrix = confusion["labels"], confusion["matrix"]  # rows = true class, columns = predicted
    if sum(map(sum, matrix)) > MAX_CONFUSION_ROWS:
        return None
    rows = [[labels[t], labels[p]] for t, counts in enumerate(matrix) for p, n in enumerate(counts)
            for _ in range(int(n))]
    return _csv(["actual", "predicted"], rows)


def write_reports(runs: Path, out: Path) -> dict[str, Any]:
    """Read the steps' outputs under `runs`, write the report files under `out`; returns metrics.json's content."""
    report = _read_json(runs / "validate" / "report.json")
    anchors = _read_json(runs / "stats" / "anchors.json")
    train = _read_json(runs / "train" / "train.json")
    metrics = _read_json(runs / "evaluate" / "metrics.json")
    gate = _read_json(runs / "evaluate" / "gate.json")
    confusion = _read_json(runs / "evaluate" / "confusion_matrix.json")
    try:
        results = (runs / "train" / "results.csv").read_text(encoding="utf-8")
        pr = (runs / "evaluate" / "pr_curve.csv").read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{e.filename}: cannot read: {e.strerror}") from None
    try:
        summary = metrics_summary(report, anchors, train, metrics)
        files = {
            "metrics.json": _json(summary),
            "lineage.json": _json(lineage(train, metrics, gate)),
            "plots/epochs.csv": epochs_csv(results),
            "plots/pr_curve.csv": pr_curve_csv(pr),
            "plots/confusion.csv": confusion_csv(confusion),
        }
    except (KeyError, TypeError, IndexError) as e:
        raise UserError(f"{runs}: a step output is not in the expected form ({type(e).__name__}: {e}); "
                        "rerun the steps") from None
    if files["plots/confusion.csv"] is None:
        print(f"confusion matrix over {MAX_CONFUSION_ROWS} counts: not written as a plot", file=sys.stderr)
        files["plots/confusion.csv"] = _csv(["actual", "predicted"], [])
    for name, text in files.items():
        write_text(out / name, text)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.dvc_report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="the steps' output folders")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where the report files go")
    args = parser.parse_args(argv)
    try:
        summary = write_reports(args.runs, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}/metrics.json: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
