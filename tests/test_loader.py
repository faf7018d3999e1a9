"""The training Dataset/DataLoader: determinism across workers, caches, sampling, quad, batch plots."""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from yolo.data.loader import (
    EpochSampler,
    TrainDataset,
    collate,
    create_train_loader,
    labels_to_class_weights,
    labels_to_image_weights,
    sample_rng,
)
from yolo.data.rect import rect_batches
from yolo.errors import UserError
from yolo.hyp import Hyp
from yolo.plots.batches import class_color, plot_batch

# pure colours (BGR) of each image's rectangle; class k is drawn in COLORS[k]
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 255)]
SIZES = [(64, 96), (96, 64), (80, 80), (64, 80), (96, 96), (72, 96), (96, 72)]  # (h, w)


@dataclass
class FakeIndex:
    """What the loader needs of yolo.data.dataset.SplitIndex."""

    root: Path
    files: list[str]
    shapes: np.ndarray
    labels: list[np.ndarray]
    names: list[str]
    fingerprint: str = "f00dfeed" * 8
    skipped: list[str] = field(default_factory=list)

    def image_path(self, i: int) -> Path:
        return self.root / self.files[i]

    def __len__(self) -> int:
        return len(self.files)


def make_dataset(root: Path, background: bool = True) -> FakeIndex:
    """One filled rectangle per image (class k in COLORS[k]) on grey; the last image is a background."""
    (root / "images").mkdir(parents=True)
    files, labels = [], []
    for k, (h, w) in enumerate(SIZES):
        im = np.full((h, w, 3), 60, np.uint8)
        x1, y1, x2, y2 = w // 4, h // 5, w // 4 + w // 2, h // 5 + h // 2
        lb = np.zeros((0, 5), np.float32)
        if not (background and k == len(SIZES) - 1):
            im[y1:y2, x1:x2] = COLORS[k]
            lb = np.array(
                [[k, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]], np.float32
            )
        name = f"images/{k:03d}.png"
        cv2.imwrite(str(root / name), im)
        files.append(name)
        labels.append(lb)
    return FakeIndex(root, files, np.array(SIZES), labels, [f"c{k}" for k in range(len(COLORS))])


@pytest.fixture
def index(tmp_path) -> FakeIndex:
    return make_dataset(tmp_path / "data")


HYP = Hyp(degrees=5, shear=2, mixup=0.3)


def _epochs(index, workers, epochs=(0, 1), **kw):
    loader, _ = create_train_loader(index, 64, 4, kw.pop("hyp", HYP), workers=workers, seed=7, **kw)
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.append([(b[0].clone(), b[1].clone(), b[2]) for b in loader])
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b, strict=True):
        assert len(ea) == len(eb)
        for (ia, la, pa), (ib, lb, pb) in zip(ea, eb, strict=True):
            assert torch.equal(ia, ib) and torch.equal(la, lb) and pa == pb


def test_epochs_identical_with_0_and_2_workers(index):
    plain = _epochs(index, 0)
    _assert_same(plain, _epochs(index, 2))
    assert not torch.equal(plain[0][0][0], plain[1][0][0])  # epochs differ
    assert sorted(p for b in plain[0] for p in b[2]) == sorted(
        str(index.image_path(i)) for i in range(len(index))
    )


def test_same_key_same_sample_with_0_1_2_workers(index):
    ds = TrainDataset(index, 64, HYP, seed=3)
    keys = [(2, 4), (0, 1), (5, 0), (2, 4)]
    direct = [ds[k] for k in keys]
    assert torch.equal(direct[0][0], direct[3][0])
    for workers in (1, 2):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=1, sampler=keys, num_workers=workers, collate_fn=collate
        )
        for (im, lb, paths, _), ref in zip(loader, direct, strict=True):
            assert torch.equal(im[0], ref[0]) and torch.equal(lb[:, 1:], ref[1][:, 1:]) and paths[0] == ref[2]
    ds.set_epoch(2)
    assert torch.equal(ds[4][0], direct[0][0])  # an int slot uses the epoch from set_epoch


def test_quad_batches_identical_across_workers_and_well_formed(index):
    plain = _epochs(index, 0, epochs=(0,), quad=True)
    _assert_same(plain, _epochs(index, 2, epochs=(0,), quad=True))
    im, labels, _ = plain[0][0]
    assert im.shape == (1, 3, 128, 128) and im.dtype == torch.uint8
    assert (labels[:, 0] == 0).all() and (labels[:, 2:] >= 0).all() and (labels[:, 2:] <= 1).all()
    with pytest.raises(UserError, match="multiple of 4"):
        create_train_loader(index, 64, 6, HYP, workers=0, quad=True)


def test_loader_leaves_global_torch_rng_alone(index):
    loader, _ = create_train_loader(index, 64, 4, HYP, workers=0)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    for _ in loader:
        pass
    assert torch.equal(torch.random.get_rng_state(), state)


def test_samples_boxes_inside_and_on_their_pixels(index):
    hyp = Hyp(hsv_h=0, hsv_s=0, hsv_v=0, translate=0.2, scale=0.5, flipud=0.5, fliplr=0.5)
    ds = TrainDataset(index, 64, hyp, seed=1)
    boxes = 0
    for slot in range(len(ds)):
        for epoch in range(4):
            im, labels, _, shapes = ds[(epoch, slot)]
            assert im.shape == (3, 64, 64) and im.dtype == torch.uint8 and im.is_contiguous()
            assert shapes is None  # mosaic
            cx, cy, w, h = labels[:, 2:].T
            assert (
                (cx - w / 2 >= -1e-6)
                & (cx + w / 2 <= 1 + 1e-6)
                & (cy - h / 2 >= -1e-6)
                & (cy + h / 2 <= 1 + 1e-6)
            ).all()
            rgb = im.permute(1, 2, 0).numpy().astype(int)
            for c, x, y in zip(
                labels[:, 1].int().tolist(), (cx * 64).int().tolist(), (cy * 64).int().tolist(), strict=True
            ):
                expect = COLORS[c][::-1]  # BGR -> RGB
                assert np.abs(rgb[y, x] - expect).max() < 40, (slot, epoch, c)
                boxes += 1
    assert boxes > 20


def test_background_only_gives_empty_labels(tmp_path):
    full = make_dataset(tmp_path / "d")
    bg = FakeIndex(full.root, full.files[-1:], full.shapes[-1:], full.labels[-1:], full.names)
    for augment in (True, False):
        im, labels, _, _ = TrainDataset(bg, 64, HYP, augment=augment)[0]
        assert labels.shape == (0, 6) and labels.dtype == torch.float32 and im.shape == (3, 64, 64)
    _, targets, _, _ = next(iter(create_train_loader(bg, 64, 1, HYP, workers=0)[0]))
    assert targets.shape == (0, 6)


def test_letterbox_path_shapes_and_labels(index):
    ds = TrainDataset(index, 64, HYP, augment=False)
    im, labels, _, shapes = ds[0]  # 64x96 -> resized 43x64 (ceil), padded to 64x64
    (h0, w0), ((rh, rw), (padw, padh)) = shapes
    assert (h0, w0) == (64, 96) and rh == pytest.approx(43 / 64) and rw == pytest.approx(64 / 96)
    assert padw == 0 and padh == pytest.approx(10.5)
    np.testing.assert_allclose(
        labels[0, 2:].numpy(),
        index.labels[0][0, 1:] * [1, 43 / 64, 1, 43 / 64] + [0, 10.5 / 64, 0, 0],
        atol=2e-3,
    )


def test_rect_batches_have_one_shape_and_follow_rect_order(index):
    loader, ds = create_train_loader(index, 64, 2, HYP, workers=0, rect=True, augment=False)
    rb = rect_batches(index.shapes, 2, 64, pad=0.0)  # training pads 0, evaluation 0.5
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(rb)
    for b, (ims, _, paths, _) in enumerate(batches):
        assert tuple(ims.shape[2:]) == tuple(rb.shapes[b])
        assert list(paths) == [str(index.image_path(i)) for i in rb.batch_indices(b)]


def test_epoch_sampler_permutation_and_ddp_shards():
    s = EpochSampler(10, seed=1)
    s.set_epoch(3)
    keys = list(s)
    assert {k[0] for k in keys} == {3} and sorted(k[1] for k in keys) == list(range(10)) and len(s) == 10
    s.set_epoch(4)
    assert [k[1] for k in s] != [k[1] for k in keys]
    shards = [EpochSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    for sh in shards:
        sh.set_epoch(3)
    slots = [sh.slots() for sh in shards]
    assert [len(x) for x in slots] == [4, 4, 4] == [len(sh) for sh in shards]
    assert set(np.concatenate(slots)) == set(range(10))
    np.testing.assert_array_equal(np.concatenate(slots)[[0, 4, 8, 1, 5, 9]][:6], [k[1] for k in keys][:6])
    rect = [EpochSampler(7, shuffle=False, rank=r, world_size=2, block=2) for r in range(2)]
    assert rect[0].slots().tolist() == [0, 1, 4, 5] and rect[1].slots().tolist() == [2, 3, 6]
    assert [len(x) for x in rect] == [4, 3]  # same number of batches (blocks) on every rank
    padded = [EpochSampler(5, shuffle=False, rank=r, world_size=2, block=2) for r in range(2)]
    assert padded[0].slots().tolist() == [0, 1, 4] and padded[1].slots().tolist() == [2, 3, 0, 1]


def test_disk_cache_never_writes_under_a_read_only_dataset(tmp_path):
    index = make_dataset(tmp_path / "ro")
    before = sorted(p.relative_to(index.root) for p in index.root.rglob("*"))
    modes = {p: p.stat().st_mode for p in [index.root, *index.root.rglob("*")]}
    for p in modes:
        p.chmod(stat.S_IMODE(modes[p]) & ~0o222)
    try:
        cache_dir = tmp_path / "run" / "cache"
        ds = TrainDataset(index, 64, HYP, cache="disk", cache_dir=cache_dir)
        npys = sorted(cache_dir.rglob("*.npy"))
        assert len(npys) == len(index)
        mtimes = [p.stat().st_mtime_ns for p in npys]
        again = TrainDataset(index, 64, HYP, cache="disk", cache_dir=cache_dir)  # reuses, writes nothing
        assert [p.stat().st_mtime_ns for p in sorted(cache_dir.rglob("*.npy"))] == mtimes
        plain = TrainDataset(index, 64, HYP)
        for k in [(0, 0), (1, 5)]:
            assert torch.equal(ds[k][0], plain[k][0]) and torch.equal(again[k][0], plain[k][0])
        assert sorted(p.relative_to(index.root) for p in index.root.rglob("*")) == before
        with pytest.raises(UserError, match="inside the dataset"):
            TrainDataset(index, 64, HYP, cache="disk", cache_dir=index.root / "cache")
        with pytest.raises(UserError, match="needs a cache folder"):
            TrainDataset(index, 64, HYP, cache="disk")
        with pytest.raises(UserError, match="--cache"):
            TrainDataset(index, 64, HYP, cache="gpu")
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
        shutil.rmtree(tmp_path / "ro", ignore_errors=True)


def test_ram_cache_gives_the_same_samples(index):
    cached, plain = TrainDataset(index, 64, HYP, cache="ram"), TrainDataset(index, 64, HYP)
    assert len(cached.images.ram) == len(index)
    for k in [(0, 1), (3, 6)]:
        a, b = cached[k], plain[k]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_class_and_image_weights_follow_upstream_formula():
    labels = [np.array([[0, 0.5, 0.5, 0.1, 0.1]] * 3 + [[1, 0.5, 0.5, 0.1, 0.1]], np.float32),
              np.array([[0, 0.5, 0.5, 0.1, 0.1]], np.float32), np.zeros((0, 5), np.float32)]  # fmt: skip
    cw = labels_to_class_weights(labels, nc=3)  # counts 4, 1, 0 -> 1/4, 1, 1 (absent counts 1)
    np.testing.assert_allclose(cw, np.array([0.25, 1, 1]) / 2.25)
    np.testing.assert_allclose(
        labels_to_image_weights(labels, 3, cw), [(3 * 0.25 + 1) / 2.25, 0.25 / 2.25, 0]
    )


def test_image_weights_draw_rare_class_images_more(index):
    loader, ds = create_train_loader(index, 64, 2, HYP, workers=0, image_weights=True)
    assert not loader.persistent_workers
    loader.set_epoch(0)
    first = ds.indices.copy()
    assert len(index) - 1 not in set(first)  # the background has weight 0
    ds.update_image_weights(np.array([0.9, 0, 0, 0, 0, 0, 0]))  # class 0 is learned: drawn far less
    counts = np.zeros(len(index))
    for e in range(30):
        loader.set_epoch(e)
        np.add.at(counts, ds.indices, 1)
    assert counts[0] < counts[1:6].min()
    loader.set_epoch(0)
    again = ds.indices.copy()
    ds.set_epoch(0)
    np.testing.assert_array_equal(ds.indices, again)  # a pure function of (seed, epoch, weights)


def test_sample_rng_is_keyed_by_seed_epoch_slot():
    draws = {(s, e, i): sample_rng(s, e, i).random() for s in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len(set(draws.values())) == 8
    assert sample_rng(1, 0, 1).random() == draws[(1, 0, 1)]


def test_plot_batch_draws_boxes_in_class_colours(tmp_path):
    ims = torch.full((3, 3, 64, 80), 60, dtype=torch.uint8)
    targets = torch.tensor([[0, 2, 0.5, 0.5, 0.5, 0.5], [2, 1, 0.25, 0.25, 0.25, 0.25]])
    out = tmp_path / "train_batch0.jpg"
    grid = plot_batch(ims, targets, ["a", "b", "c"], out, paths=["x.jpg"] * 3)
    assert out.exists() and cv2.imread(str(out)).shape == grid.shape == (128, 160, 3)
    # left edge of the class-2 box in image 0 (x = 20, mid-height) carries class 2's colour
    assert np.abs(grid[40, 20].astype(int) - class_color(2)).max() < 30  # anti-aliased; grey is >100 away
    # image 2 sits in the second row, first column: its class-1 box left edge at x = 10, y = 64 + 16
    assert np.abs(grid[64 + 18, 10].astype(int) - class_color(1)).max() < 30


def test_cache_auto_uses_ram_only_when_images_fit(index, monkeypatch):
    import yolo.data.loader as loader_module

    store = loader_module.ImageStore(index, 64, True, cache="auto")
    assert store.cache == "ram" and store.ram_bytes() == sum(im.nbytes for im in store.ram)
    monkeypatch.setattr(loader_module, "available_memory", lambda: store.ram_bytes() * 2)  # needs 50% > 25%
    assert loader_module.ImageStore(index, 64, True, cache="auto").cache is None


def test_flips_mirror_image_and_boxes(index):
    base = dict(hsv_h=0, hsv_s=0, hsv_v=0, degrees=5)
    plain = TrainDataset(index, 64, Hyp(**base, fliplr=0, flipud=0))
    lr = TrainDataset(index, 64, Hyp(**base, fliplr=1, flipud=0))
    ud = TrainDataset(index, 64, Hyp(**base, fliplr=0, flipud=1))
    for key in [(0, 0), (1, 3), (2, 5)]:
        (im, lb, _, _), (im_lr, lb_lr, _, _), (im_ud, lb_ud, _, _) = plain[key], lr[key], ud[key]
        assert len(lb) > 0
        assert torch.equal(im_lr, im.flip(-1)) and torch.equal(im_ud, im.flip(-2))
        torch.testing.assert_close(lb_lr[:, 2], 1 - lb[:, 2])
        torch.testing.assert_close(lb_ud[:, 3], 1 - lb[:, 3])
        torch.testing.assert_close(lb_lr[:, [1, 3, 4, 5]], lb[:, [1, 3, 4, 5]])


def test_hsv_changes_pixels_not_boxes(index):
    grey = TrainDataset(index, 64, Hyp(hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0))
    colour = TrainDataset(index, 64, Hyp(hsv_h=0.1, hsv_s=0.7, hsv_v=0.4, fliplr=0))
    for key in [(0, 1), (3, 4)]:
        (im, lb, _, _), (im2, lb2, _, _) = grey[key], colour[key]
        assert torch.equal(lb, lb2) and not torch.equal(im, im2)


def test_real_split_index_from_coco128(coco128_yaml):
    from yolo.data.dataset import load_data_config
    from yolo.data.index import load_split

    index = load_split(load_data_config(coco128_yaml), "train")
    ds = TrainDataset(index, 128, Hyp(), seed=0)
    for key in [(0, 0), (0, 1)]:
        im, labels, path, _ = ds[key]
        assert im.shape == (3, 128, 128) and Path(path).exists()
        assert labels.shape[1] == 6 and ((labels[:, 2:] >= 0) & (labels[:, 2:] <= 1)).all()
    im, labels, _, shapes = TrainDataset(index, 128, Hyp(), augment=False)[0]
    assert shapes[0] == tuple(index.shapes[0]) and im.shape == (3, 128, 128)
