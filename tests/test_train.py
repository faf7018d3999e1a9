"""The train step: outputs of a real (tiny) run, the loop's behaviour, freezing, non-finite losses, bad input."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import run_cli
from yolo.train import TrainConfig, train

TRAIN_JSON_KEYS = {"epochs_run", "best_epoch", "best", "final", "images_per_s", "data_wait_share", "run_id",
                   "resumed_from", "dataset_fingerprint", "data_version"}
METRIC_KEYS = {"precision", "recall", "map50", "map50_95", "fitness"}


def tiny_config(data_yaml: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=data_yaml, out=out, imgsz=64, epochs=1, batch_size=4, workers=0, device="cpu",
                  deterministic=True, noval=True)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread (the trainer honours OMP_NUM_THREADS): far steadier on a shared machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_data")
    made = run_cli("sample-data", "--out", root, "--train", 8, "--val", 4, "--imgsz", 64)
    assert made.returncode == 0, made.stderr
    return root / "data.yaml"


# ------------------------------------------------------------------------------------ outputs


def test_run_writes_every_output(tiny_run):
    for name in ("weights/best.pt", "weights/last.pt", "results.csv", "results.png", "train.json", "args.yaml",
                 "train_batch0.jpg"):
        assert (tiny_run / name).is_file(), name
    doc = json.loads((tiny_run / "train.json").read_text())
    assert TRAIN_JSON_KEYS <= set(doc)
    assert doc["epochs_run"] == 1 and doc["best_epoch"] == 0 and doc["resumed_from"] is None
    assert METRIC_KEYS <= set(doc["best"]) and METRIC_KEYS <= set(doc["final"])
    assert all(0.0 <= doc["final"][k] <= 1.0 for k in METRIC_KEYS)
    assert doc["images_per_s"] > 0 and 0.0 <= doc["data_wait_share"] < 1.0
    assert len(doc["run_id"]) == 16 and len(doc["dataset_fingerprint"]) == 64

    rows = list(csv.DictReader((tiny_run / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["epoch"] == "0"
    for column in ("train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
                   "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "x/lr0", "x/lr1", "x/lr2", "seconds",
                   "data_wait_share"):
        assert math.isfinite(float(rows[0][column])), column
    args = yaml.safe_load((tiny_run / "args.yaml").read_text())
    assert args["epochs"] == 1 and args["imgsz"] == 64 and args["batch_size"] == 8


def test_checkpoints_are_safe_and_complete(tiny_run):
    best = torch.load(tiny_run / "weights/best.pt", weights_only=True)
    for key in ("cfg", "names", "model", "anchors_px", "hyp", "args", "dataset_fingerprint", "data_version",
                "run_id", "epoch", "metrics"):
        assert key in best, key
    assert best["names"] == ["circle", "square", "triangle", "cross"] and best["cfg"]["nc"] == 4
    floats = [v for k, v in best["model"].items() if v.is_floating_point() and not k.endswith("anchors")]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert best["hyp"]["lr0"] == 0.01 and "train" not in best

    last = torch.load(tiny_run / "weights/last.pt", weights_only=True)
    state = last["train"]
    assert state["finished"] and state["epoch"] == 1 and state["iteration"] == 0
    for key in ("model", "optimizer", "scaler", "ema_updates", "last_opt_step", "best_fitness", "stopper_best",
                "rng", "history", "lr_scale"):
        assert key in state, key
    assert state["ema_updates"] > 0 and last["run_id"] == best["run_id"]
    assert all(v.dtype == torch.float32 for v in last["model"].values() if v.is_floating_point())


def test_best_weights_evaluate(tiny_run):
    from yolo.data.dataset import load_data_config
    from yolo.data.index import load_split
    from yolo.evaluate import EvalConfig, evaluate_model
    from yolo.model.yolo import DetectionModel

    best = torch.load(tiny_run / "weights/best.pt", weights_only=True)
    model = DetectionModel(best["cfg"])
    model.load_state_dict({k: v.float() for k, v in best["model"].items()})
    data = load_data_config(tiny_run.parent / "data" / "data.yaml")
    result = evaluate_model(model.eval(), load_split(data, "val"), EvalConfig(imgsz=64, batch_size=16), "cpu",
                            best["names"])
    doc = json.loads((tiny_run / "train.json").read_text())
    # the same EMA weights, the same settings: the trainer's validation numbers are reproduced
    assert result.map50_95 == pytest.approx(doc["final"]["map50_95"], abs=1e-6)
    assert result.images == 8


# ------------------------------------------------------------------------------------ the loop


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch():
    from yolo.engine.optim import build_optimizer
    from yolo.hyp import Hyp
    from yolo.loss import YoloLoss, scale_loss_gains
    from yolo.model.cfg import load_cfg
    from yolo.model.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(load_cfg("yolov5n.yaml"), nc=2).to(memory_format=torch.channels_last).train()
    loss_fn = YoloLoss(model, scale_loss_gains(Hyp(), 3, 2, 64))
    opt = build_optimizer(model, "SGD", lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.4], [1, 1, 0.3, 0.6, 0.2, 0.3], [1, 0, 0.7, 0.3, 0.3, 0.2]])
    losses = []
    for _ in range(24):
        loss, _ = loss_fn(model(images), targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_freeze_first_layers_keeps_them_fixed():
    from yolo.engine.optim import build_optimizer
    from yolo.engine.setup import _freeze
    from yolo.hyp import Hyp
    from yolo.loss import YoloLoss, scale_loss_gains
    from yolo.model.cfg import load_cfg
    from yolo.model.yolo import DetectionModel

    model = _freeze(DetectionModel(load_cfg("yolov5n.yaml"), nc=2).train(), [3])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.split(".")[1] in ("0", "1", "2") for n in frozen)
    assert {n for n, _ in model.named_parameters() if n.startswith(("model.0.", "model.1.", "model.2."))} == frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, "SGD", 0.1, 0.9, 5e-4)
    loss, _ = YoloLoss(model, scale_loss_gains(Hyp(), 3, 2, 64))(model(torch.rand(2, 3, 64, 64)),
                                                                 torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]]))
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n
    assert _freeze(model, [0]) is model and all(p.requires_grad for p in model.parameters())


class NaNLoss:
    """Wraps the loss; calls listed in `bad` return NaN (what an fp overflow or a bad label does)."""

    def __init__(self, loss, bad):
        self.loss, self.bad, self.calls = loss, set(bad), 0

    def __call__(self, preds, targets):
        self.calls += 1
        loss, items = self.loss(preds, targets)
        if self.calls in self.bad:
            return loss * float("nan"), items * float("nan")
        return loss, items


@pytest.mark.slow
def test_non_finite_losses_are_skipped_then_recovered_and_tensorboard_logs(tiny_data, tmp_path, monkeypatch, caplog):
    import yolo.engine.setup as setup_module

    real_prepare = setup_module.prepare_run

    def prepare_with_nan(cfg, ctx):
        run = real_prepare(cfg, ctx)
        run.compute_loss = NaNLoss(run.compute_loss, bad={1, 3, 4, 5, 6, 7})  # 1 lone, then 5 in a row
        return run

    monkeypatch.setattr(setup_module, "prepare_run", prepare_with_nan)
    caplog.set_level(logging.WARNING)
    pytest.importorskip("tensorboard")
    result = train(tiny_config(tiny_data, tmp_path / "run", epochs=4, tensorboard=True))
    assert result.exit_code == 0
    last = torch.load(tmp_path / "run/weights/last.pt", weights_only=True)
    assert last["train"]["nonfinite_total"] == 6
    assert last["train"]["lr_scale"] == 0.5  # one recovery
    assert all(torch.isfinite(v.float()).all() for v in last["train"]["model"].values())
    assert "non-finite loss" in caplog.text and "restored the state of" in caplog.text
    rows = list(csv.DictReader((tmp_path / "run/results.csv").open()))
    assert sum(int(r["skipped_steps"]) for r in rows) == 6
    assert all(math.isfinite(float(r["train/box_loss"])) for r in rows)
    assert list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))  # --tensorboard wrote scalars


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rect-adamw-single-cls", "quad-image-weights-cache-freeze", "cfg-weights-anchors"])
def test_option_combinations_train(case, tiny_data, tiny_run, tmp_path):
    best = str(tiny_run / "weights/best.pt")
    anchors = tmp_path / "anchors.json"
    rows = [[4, 6, 8, 12, 16, 10], [12, 24, 24, 18, 24, 48], [46, 36, 62, 80, 150, 130]]
    anchors.write_text(json.dumps({"imgsz": 128, "strides": [8, 16, 32], "anchors": rows}))
    options = {
        "rect-adamw-single-cls": dict(rect=True, cos_lr=True, optimizer="AdamW", label_smoothing=0.1,
                                      single_cls=True, weights=best, epochs=2, noval=False),
        "quad-image-weights-cache-freeze": dict(quad=True, image_weights=True, cache="ram", freeze=[3], workers=2,
                                                epochs=2, noval=False),
        "cfg-weights-anchors": dict(cfg="yolov5n.yaml", weights=best, anchors=anchors, autoanchor=True),
    }[case]
    result = train(tiny_config(tiny_data, tmp_path / "run", **options))
    assert result.exit_code == 0 and (tmp_path / "run/weights/best.pt").is_file()
    ckpt = torch.load(tmp_path / "run/weights/best.pt", weights_only=True)
    if case == "rect-adamw-single-cls":
        assert ckpt["names"] == ["item"] and ckpt["cfg"]["nc"] == 1
        assert ckpt["args"]["optimizer"] == "AdamW" and ckpt["args"]["rect"]
    elif case == "cfg-weights-anchors":
        # anchors.json fitted at 128 px, rescaled x0.5 for imgsz 64; kept by the autoanchor check here
        assert ckpt["anchors_px"] == [[v / 2 for v in row] for row in rows]
    else:
        from yolo.model.cfg import load_cfg
        from yolo.model.yolo import DetectionModel

        torch.manual_seed(0)  # the run seeds with --seed 0 before building its model
        initial = DetectionModel(load_cfg("yolov5n.yaml"), nc=4).state_dict()
        trained = torch.load(tmp_path / "run/weights/last.pt", weights_only=True)["train"]["model"]
        assert torch.equal(trained["model.2.cv1.conv.weight"], initial["model.2.cv1.conv.weight"])  # frozen
        assert not torch.equal(trained["model.3.conv.weight"], initial["model.3.conv.weight"])  # trained


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_exit_2(tmp_path, tiny_data, capsys, restore_logging):
    from yolo.cli import main

    cases = [
        (["train", "--out", tmp_path / "a"], "--data is required"),
        (["train", "--data", tmp_path / "nope.yaml", "--out", tmp_path / "b"], "nope.yaml"),
        (["train", "--resume", tmp_path / "nothing", "--out", tmp_path / "c"], "no last.pt found"),
        (["train", "--data", tiny_data, "--out", tmp_path / "d", "--imgsz", "70", "--device", "cpu"], "multiple of"),
        (["train", "--data", tiny_data, "--out", tmp_path / "e", "--batch-size", "3", "--quad", "--device", "cpu"],
         "multiple of 4"),
        (["train", "--data", tiny_data, "--out", tmp_path / "f", "--device", "7"], "does not exist"),
    ]
    for argv, message in cases:
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) >= 1 and message in err[-1], (argv, err)
    for argv, message in ([["train", "--data", tiny_data, "--epochs", "0"], "must be >= 1"],
                          [["train", "--data", tiny_data, "--optimizer", "Lion"], "invalid choice"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
