"""Unit tests of the training engine pieces: groups, schedules, EMA, identity, sink, signals, RNG."""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from yolo.engine.checkpointing import CheckpointSink
from yolo.engine.ema import ModelEMA
from yolo.engine.optim import (
    Schedule,
    build_optimizer,
    lr_factor,
    nominal_accumulate,
    scaled_weight_decay,
    split_param_groups,
)
from yolo.engine.preemption import EXIT_SIGINT, EXIT_SIGTERM, StopRequested
from yolo.engine.run_identity import run_identity
from yolo.engine.state import capture_rng, restore_rng


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads stall each other at every barrier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)  # weight + bias
        self.ln = nn.LayerNorm(2)


# --------------------------------------------------------------------------- param groups


def test_param_groups_follow_upstream_split():
    net = TinyNet()
    biases, decayed, norm = split_param_groups(net)
    assert {id(p) for p in biases} == {id(net.bn.bias), id(net.head.bias), id(net.ln.bias)}
    assert {id(p) for p in decayed} == {id(net.conv.weight), id(net.head.weight)}
    assert {id(p) for p in norm} == {id(net.bn.weight), id(net.ln.weight)}


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_optimizer_groups_and_hyper(name):
    net = TinyNet()
    opt = build_optimizer(net, name, lr=0.01, momentum=0.937, weight_decay=5e-4)
    groups = opt.param_groups
    assert [len(g["params"]) for g in groups] == [3, 2, 2]  # bias, decay, no-decay
    assert [g["weight_decay"] for g in groups] == [0.0, 5e-4, 0.0]
    assert all(g["initial_lr"] == 0.01 for g in groups)
    if name == "SGD":
        assert all(g["nesterov"] and g["momentum"] == 0.937 for g in groups)
    else:
        assert all(g["betas"] == (0.937, 0.999) for g in groups)
        assert isinstance(opt, torch.optim.AdamW if name == "AdamW" else torch.optim.Adam)


def test_detection_model_groups_cover_every_parameter():
    from yolo.model.cfg import load_cfg
    from yolo.model.yolo import DetectionModel

    model = DetectionModel(load_cfg("yolov5n.yaml"), nc=3)
    groups = split_param_groups(model)
    assert sum(len(g) for g in groups) == len(list(model.parameters()))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(groups[2]) == n_bn
    assert len(groups[0]) == n_bn + 3  # every BN bias + the three Detect conv biases


# ----------------------------------------------------------------------- nominal batch


@pytest.mark.parametrize(("bs", "acc", "wd_factor"), [(16, 4, 1.0), (24, 3, 72 / 64), (64, 1, 1.0), (128, 1, 2.0)])
def test_accumulation_and_weight_decay(bs, acc, wd_factor):
    assert nominal_accumulate(bs) == acc
    assert scaled_weight_decay(5e-4, bs) == pytest.approx(5e-4 * wd_factor)


# ----------------------------------------------------------------------------- schedules


def upstream_lr(ni, epoch, j, nb, epochs, lr0=0.01, lrf=0.01, warmup_epochs=3.0, bias_lr=0.1, cos=False):
    """Upstream train.py's arithmetic, written out independently."""
    if cos:
        lf = lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1  # noqa: E731
    else:
        lf = lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf  # noqa: E731
    nw = max(round(warmup_epochs * nb), 100)
    if ni <= nw:
        return np.interp(ni, [0, nw], [bias_lr if j == 0 else 0.0, lr0 * lf(epoch)])
    return lr0 * lf(epoch)


@pytest.mark.parametrize("cos", [False, True])
@pytest.mark.parametrize("nb", [10, 50])
def test_schedule_matches_upstream_formulas(cos, nb):
    epochs = 7
    s = Schedule(lr0=0.01, lrf=0.01, momentum=0.937, warmup_epochs=3.0, warmup_momentum=0.8,
                 warmup_bias_lr=0.1, epochs=epochs, batches_per_epoch=nb, batch_size=16, cos_lr=cos)
    assert s.warmup_iterations == max(round(3.0 * nb), 100)
    for ni in [0, 1, 37, 99, 100, 101, 149, 150, 151, 275, nb * epochs - 1]:
        epoch = ni // nb
        got = s.lrs(ni, epoch)
        for j in range(3):
            assert got[j] == pytest.approx(upstream_lr(ni, epoch, j, nb, epochs, cos=cos), rel=1e-12, abs=1e-15)
        nw = s.warmup_iterations
        want_m = np.interp(ni, [0, nw], [0.8, 0.937]) if ni <= nw else 0.937
        assert s.momentum_at(ni) == pytest.approx(want_m)
        want_acc = max(1, np.interp(min(ni, nw), [0, nw], [1, 64 / 16]).round())
        assert s.accumulate(ni) == want_acc


def test_schedule_end_values_and_apply():
    assert lr_factor(10, 0.01, cos_lr=False)(10) == pytest.approx(0.01)
    assert lr_factor(10, 0.01, cos_lr=True)(10) == pytest.approx(0.01)
    assert lr_factor(10, 0.01, cos_lr=True)(5) == pytest.approx((1 + 0.01) / 2)
    net = TinyNet()
    opt = build_optimizer(net, "SGD", 0.01, 0.937, 5e-4)
    s = Schedule(0.01, 0.01, 0.937, 3.0, 0.8, 0.1, epochs=3, batches_per_epoch=4, batch_size=16)
    s.apply(opt, ni=50, epoch=12, lr_scale=0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([x * 0.5 for x in s.lrs(50, 12)])
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.8 + 0.5 * (0.937 - 0.8))


# ----------------------------------------------------------------------------------- EMA


def test_ema_matches_upstream_update_and_skips_int_buffers():
    torch.manual_seed(0)
    net = TinyNet()
    ema = ModelEMA(net, decay=0.9999, tau=3.0)
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    for step in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.bn.running_mean.add_(1.0)
            net.bn.num_batches_tracked += 1
        ema.update(net)
        d = 0.9999 * (1 - math.exp(-step / 3.0))
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                reference[k] = reference[k] * d + (1 - d) * v
    got = ema.ema.state_dict()
    for k, v in reference.items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)
    assert got["bn.num_batches_tracked"].item() == 0  # integer buffers are not averaged
    assert ema.updates == 5
    assert not any(p.requires_grad for p in ema.ema.parameters())


def test_ema_state_round_trip():
    net = TinyNet()
    ema = ModelEMA(net)
    ema.update(net)
    other = ModelEMA(TinyNet())
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    torch.testing.assert_close(other.ema.state_dict()["conv.weight"], ema.ema.state_dict()["conv.weight"])


# --------------------------------------------------------------------------- run identity


def test_run_identity_stable_and_sensitive():
    args = {"epochs": 3, "imgsz": 64, "batch_size": 4, "weights": None}
    a = run_identity("fp1", {"nc": 2, "anchors": [[1, 2]]}, {"lr0": 0.01}, args)
    assert a == run_identity("fp1", {"anchors": [(1, 2)], "nc": 2}, {"lr0": 0.01}, dict(reversed(args.items())))
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != run_identity("fp2", {"nc": 2, "anchors": [[1, 2]]}, {"lr0": 0.01}, args)
    assert a != run_identity("fp1", {"nc": 2, "anchors": [[1, 2]]}, {"lr0": 0.02}, args)
    assert a != run_identity("fp1", {"nc": 2, "anchors": [[1, 2]]}, {"lr0": 0.01}, {**args, "epochs": 4})


# ---------------------------------------------------------------------------------- sink


class FlakyStore:
    """In-memory store that fails the first `failures` puts, records what it finally holds."""

    def __init__(self, failures=0, delay=0.0):
        self.failures = failures
        self.delay = delay
        self.objects: dict[str, bytes] = {}
        self.puts = 0
        self.gate = threading.Event()
        self.gate.set()

    def put(self, path, key):
        self.gate.wait()
        time.sleep(self.delay)
        self.puts += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("store down")
        self.objects[key] = Path(path).read_bytes()
        return key

    def exists(self, key):
        return key in self.objects

    def get(self, key, local_path):
        Path(local_path).write_bytes(self.objects[key])
        return Path(local_path)

    def check_access(self, write=False):
        pass


def test_sink_newest_wins_and_close_awaits(tmp_path):
    store = FlakyStore()
    store.gate.clear()  # hold the first upload in flight
    sink = CheckpointSink("mem://x", storage=store, retry_initial_s=0.01)
    f = tmp_path / "last.pt"
    f.write_bytes(b"v1")
    sink.publish(f, "weights/last.pt")
    time.sleep(0.05)
    for version in (b"v2", b"v3", b"v4"):  # replaced atomically, as the trainer does
        tmp = tmp_path / "tmp"
        tmp.write_bytes(version)
        os.replace(tmp, f)
        sink.publish(f, "weights/last.pt")
    store.gate.set()
    assert sink.close(timeout=10)
    assert store.objects["weights/last.pt"] == b"v4"
    assert store.puts == 2  # v1 (already in flight) and v4; v2, v3 were superseded
    assert not list(tmp_path.glob(".upload-*"))


def test_sink_retries_through_outage(tmp_path):
    store = FlakyStore(failures=3)
    sink = CheckpointSink("mem://x", storage=store, retry_initial_s=0.01, retry_max_s=0.02)
    f = tmp_path / "best.pt"
    f.write_bytes(b"best")
    sink.publish(f, "weights/best.pt")
    assert sink.close(timeout=10)
    assert store.objects == {"weights/best.pt": b"best"} and sink.failures == 3


def test_sink_without_uri_is_a_no_op(tmp_path):
    sink = CheckpointSink(None)
    sink.publish(tmp_path / "missing.pt", "weights/last.pt")
    assert not sink.enabled and sink.storage is None  # nothing to fetch from, nothing uploaded
    assert sink.close()


def test_sink_with_local_storage(tmp_path):
    from yolo.storage import open_storage

    remote = tmp_path / "remote"
    sink = CheckpointSink(str(remote), storage=open_storage(remote))
    sink.storage.check_access(write=True)
    f = tmp_path / "run" / "weights" / "last.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"abc")
    sink.publish(f, "weights/last.pt")
    assert sink.flush(timeout=10)
    assert (remote / "weights" / "last.pt").read_bytes() == b"abc"
    assert sink.storage.get("weights/last.pt", tmp_path / "back.pt").read_bytes() == b"abc"
    sink.close()


# --------------------------------------------------------------------------- preemption


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, EXIT_SIGTERM), (signal.SIGINT, EXIT_SIGINT)])
def test_signal_becomes_stop_request(sig, code):
    before = signal.getsignal(sig)
    with StopRequested() as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        time.sleep(0.01)
        assert stop.requested and stop.exit_code == code
    assert signal.getsignal(sig) is before
    assert (EXIT_SIGTERM, EXIT_SIGINT) == (143, 130)


# ---------------------------------------------------------------------------------- RNG


def test_rng_round_trip_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    torch.save(capture_rng(), path)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


# -------------------------------------------------------------------------------- plots


def test_results_png_written(tmp_path):
    from yolo.plots.results import plot_results

    rows = [{"epoch": e, "train/box_loss": 0.1 / (e + 1), "metrics/mAP_0.5": 0.1 * e, "x/lr0": 0.01,
             "metrics/recall": ""} for e in range(3)]
    out = plot_results(rows, tmp_path / "results.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_results([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
