"""Upstream YOLOv5 habits of the train and evaluate steps: run folders that never overwrite a finished run,
the flags upstream users type (--multi-scale, --save-period, --noautoanchor, --batch-size -1, --task,
--verbose, --save-json, --half) and the run folder's files (issue 17). Tiny data, imgsz 64, 1 epoch."""

from __future__ import annotations

import csv
import random

import pytest
import torch
import yaml

from tests.conftest import run_cli
from yolo.cli import main
from yolo.engine.config import TrainConfig
from yolo.errors import UserError
from yolo.train import multi_scale, train

UPSTREAM_RUN_FILES = [
    "weights/best.pt", "weights/last.pt", "hyp.yaml", "args.yaml", "results.csv", "results.png",
    "confusion_matrix.png", "F1_curve.png", "P_curve.png", "R_curve.png", "PR_curve.png", "labels.jpg",
    "labels_correlogram.jpg", "train_batch0.jpg", "train_batch1.jpg", "val_batch0_labels.jpg", "val_batch0_pred.jpg",
]  # fmt: skip


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    root = tmp_path_factory.mktemp("habits")
    made = run_cli("sample-data", "--out", root / "data", "--train", 16, "--val", 8, "--imgsz", 64)
    assert made.returncode == 0, made.stderr
    return root / "data" / "data.yaml"


def cfg(data, **kw) -> TrainConfig:
    base = dict(data=data, imgsz=64, epochs=1, batch_size=8, workers=0, device="cpu", deterministic=True)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def two_runs(data16, tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    first = train(cfg(data16, project=project, name="exp"))
    best_bytes = (first.out / "weights/best.pt").read_bytes()
    second = train(cfg(data16, project=project, name="exp"))
    return project, first, second, best_bytes


def test_same_project_and_name_twice_gives_two_folders_and_keeps_the_first_best(two_runs):
    project, first, second, best_bytes = two_runs
    assert first.out == project / "exp" and second.out == project / "exp2"
    assert first.run_id == second.run_id  # the same training; a finished run is never continued implicitly
    assert (first.out / "weights/best.pt").read_bytes() == best_bytes
    assert (second.out / "weights/best.pt").is_file()


def test_an_explicit_folder_with_a_best_pt_is_refused_in_one_line(two_runs, data16):
    project, first, _, best_bytes = two_runs
    for kw in ({"out": first.out}, {"project": project, "name": "exp", "exist_ok": True}):
        with pytest.raises(UserError, match="would replace it"):
            train(cfg(data16, **kw))
    assert (first.out / "weights/best.pt").read_bytes() == best_bytes
    code = main(["train", "--data", str(data16), "--out", str(first.out), "--imgsz", "64", "--epochs", "1",
                 "--device", "cpu", "--workers", "0"])
    assert code == 2


def test_the_run_folder_holds_upstreams_files(two_runs):
    out = two_runs[1].out
    missing = [name for name in UPSTREAM_RUN_FILES if not (out / name).is_file()]
    assert not missing
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert isinstance(args["hyp"], dict) and args["hyp"]["lr0"] == pytest.approx(0.01)
    assert yaml.safe_load((out / "hyp.yaml").read_text()) == args["hyp"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    for column in ("val/box_loss", "val/obj_loss", "val/cls_loss"):
        assert float(rows[-1][column]) > 0


def test_a_finished_last_pt_drops_the_optimizer_and_can_still_be_extended(two_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_runs[1].out, run)
    last = torch.load(run / "weights/last.pt", weights_only=True)
    assert last["train"]["finished"] and last["train"]["optimizer"] is None
    extended = train(TrainConfig(resume=str(run), out=None, device=None, workers=None, epochs=2))
    assert extended.exit_code == 0 and extended.epochs_run == 2 and extended.out == run


def test_save_period_and_multi_scale(data16, tmp_path):
    result = train(cfg(data16, out=tmp_path / "ms", epochs=2, save_period=1, multi_scale=True))
    assert (result.out / "weights/epoch1.pt").is_file() and (result.out / "weights/epoch2.pt").is_file()
    plain = train(cfg(data16, out=tmp_path / "plain", epochs=2))
    assert result.run_id != plain.run_id  # --multi-scale changes the result, hence the identity
    assert not (plain.out / "weights/epoch1.pt").exists()


def test_multi_scale_sizes_are_stride_multiples_in_half_to_one_and_a_half_imgsz():
    random.seed(0)
    imgs = torch.zeros(2, 3, 64, 64)
    sides = {multi_scale(imgs, 64, 32).shape[-1] for _ in range(50)}
    assert sides <= {32, 64, 96} and len(sides) > 1


def test_train_flags_refused_or_explained_in_one_line(data16, tmp_path, capsys):
    base = ["train", "--data", str(data16), "--out", str(tmp_path / "x"), "--imgsz", "64", "--device", "cpu"]
    assert main([*base, "--batch-size", "-1"]) == 2
    assert "autobatch needs a GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*base, "--autoanchor", "--noautoanchor"])
    assert e.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_evaluate_task_verbose_save_json_and_half(two_runs, data16, tmp_path, capsys):
    weights = str(two_runs[1].out / "weights/best.pt")
    base = ["evaluate", "--data", str(data16), "--weights", weights, "--imgsz", "64", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "speed"), "--task", "speed"]) == 0
    assert "Speed:" in capsys.readouterr().out and not (tmp_path / "speed").exists()
    assert main([*base, "--out", str(tmp_path / "s"), "--task", "study"]) == 2
    assert "not supported" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "h"), "--half"]) == 2
    assert "--half needs a CUDA device" in capsys.readouterr().err
    code = main([*base, "--out", str(tmp_path / "v"), "--save-json", "--verbose", "--promote-without-gate"])
    assert code == 0 and (tmp_path / "v" / "predictions.json").is_file()
    assert (tmp_path / "v" / "val_batch0_labels.jpg").is_file() and (tmp_path / "v" / "val_batch0_pred.jpg").is_file()
