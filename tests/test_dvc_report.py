"""pipelines.dvc_report on hand-written step outputs: what lands in reports/ and in which shape."""

from __future__ import annotations

import csv
import io
import json

import pytest

from pipelines import dvc_report


def _write_runs(runs, *, matrix=None):
    (runs / "validate").mkdir(parents=True)
    (runs / "stats").mkdir()
    (runs / "train").mkdir()
    (runs / "evaluate").mkdir()
    (runs / "validate/report.json").write_text(json.dumps(
        {"ok": True, "splits": {"train": {"images": 10, "images_ok": 9}, "val": {"images": 4, "images_ok": 4}}}))
    (runs / "stats/anchors.json").write_text(json.dumps({"bpr_after": 0.9975, "bpr_before": 0.99}))
    (runs / "train/train.json").write_text(json.dumps(
        {"epochs_run": 3, "best_epoch": 2, "run_id": "abc", "resumed_from": None, "cpu_threads": 2,
         "images_per_s": 12.5}))
    (runs / "train/results.csv").write_text(
        "epoch,train/box_loss,train/obj_loss,train/cls_loss,metrics/precision,metrics/recall,metrics/mAP_0.5,"
        "metrics/mAP_0.5:0.95,fitness,x/lr0,seconds,skipped_steps\n"
        "0,0.1,0.2,0.3,0.5,0.4,0.25,0.1,0.115,0.01,3.2,0\n"
        "1,0.09,0.19,0.29,,,,,,0.009,3.1,0\n")
    (runs / "evaluate/metrics.json").write_text(json.dumps(
        {"precision": 0.5, "recall": 0.4, "map50": 0.25, "map50_95": 0.1, "fitness": 0.115, "images": 4,
         "instances": 7, "dataset_fingerprint": "fp", "data_version": "v1", "cpu_threads": 2,
         "weights": "/abs/best.pt", "per_class": []}))
    (runs / "evaluate/gate.json").write_text(json.dumps(
        {"promote": False, "reasons": ["mAP50 0.2500 < --min-map50 0.5"]}))
    (runs / "evaluate/pr_curve.csv").write_text("recall,all,a,b\n0.000000,1.000000,1,1\n1.000000,0.000000,0,0\n")
    (runs / "evaluate/confusion_matrix.json").write_text(json.dumps(
        {"labels": ["a", "b", "background"], "rows": "true", "columns": "predicted",
         "matrix": matrix or [[2, 1, 0], [0, 3, 1], [1, 0, 0]]}))


def test_reports_hold_numbers_lineage_and_plot_data(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "reports"
    _write_runs(runs)
    assert dvc_report.main(["--runs", str(runs), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["map50", "map50_95", "precision", "recall", "fitness", "bpr", "epochs",
                             "best_epoch", "train_images", "val_images", "val_instances"]
    assert metrics == {"map50": 0.25, "map50_95": 0.1, "precision": 0.5, "recall": 0.4, "fitness": 0.115,
                       "bpr": 0.9975, "epochs": 3, "best_epoch": 2, "train_images": 9, "val_images": 4,
                       "val_instances": 7}
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage == {"run_id": "abc", "resumed_from": None, "dataset_fingerprint": "fp", "data_version": "v1",
                       "cpu_threads": {"train": 2, "evaluate": 2}, "promote": False,
                       "gate_reasons": ["mAP50 0.2500 < --min-map50 0.5"]}
    epochs = list(csv.reader(io.StringIO((out / "plots/epochs.csv").read_text())))
    assert epochs == [["epoch", "box_loss", "obj_loss", "cls_loss", "map50", "map50_95", "precision", "recall"],
                      ["0", "0.1", "0.2", "0.3", "0.25", "0.1", "0.5", "0.4"],
                      ["1", "0.09", "0.19", "0.29", "", "", "", ""]]
    assert (out / "plots/pr_curve.csv").read_text() == "recall,precision\n0.000000,1.000000\n1.000000,0.000000\n"
    pairs = list(csv.reader(io.StringIO((out / "plots/confusion.csv").read_text())))
    assert pairs[0] == ["actual", "predicted"]
    assert sorted(map(tuple, pairs[1:])) == sorted(
        [("a", "a")] * 2 + [("a", "b")] + [("b", "b")] * 3 + [("b", "background")] + [("background", "a")])


def test_same_outputs_same_bytes(tmp_path):
    _write_runs(tmp_path / "runs")
    dvc_report.write_reports(tmp_path / "runs", tmp_path / "r1")
    dvc_report.write_reports(tmp_path / "runs", tmp_path / "r2")
    for name in ("metrics.json", "lineage.json", "plots/epochs.csv", "plots/pr_curve.csv", "plots/confusion.csv"):
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes()


def test_huge_confusion_matrix_is_left_out_of_the_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dvc_report, "MAX_CONFUSION_ROWS", 5)
    _write_runs(tmp_path / "runs")
    dvc_report.write_reports(tmp_path / "runs", tmp_path / "reports")
    assert (tmp_path / "reports/plots/confusion.csv").read_text() == "actual,predicted\n"
    assert "not written as a plot" in capsys.readouterr().err


@pytest.mark.parametrize("broken", ["missing", "not_json", "wrong_shape"])
def test_bad_step_output_is_one_line_and_exit_2(tmp_path, capsys, broken):
    runs = tmp_path / "runs"
    _write_runs(runs)
    target = runs / "evaluate/metrics.json"
    if broken == "missing":
        target.unlink()
    elif broken == "not_json":
        target.write_text("{")
    else:
        target.write_text("[]")
    assert dvc_report.main(["--runs", str(runs), "--out", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("metrics.json" in err[0] or f"{runs}: a step output is not" in err[0])
    assert not (tmp_path / "reports").exists()  # nothing half-written
