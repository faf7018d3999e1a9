"""The training Dataset and DataLoader: upstream YOLOv5's LoadImagesAndLabels, made reproducible.

Every random draw of sample `slot` in epoch `e` comes from a generator seeded by (seed, e, slot); an epoch's
order from (seed, e), sharded by rank. The sampler hands workers `(epoch, slot)` keys, so persistent workers
never need the epoch pushed into them and no worker owns random state: a batch is the same with 0, 1 or 8
workers. Images leave as uint8 RGB CHW tensors; scaling to float happens on the device.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing.context
import multiprocessing.popen_fork
import os
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from yolo.boxes import xywhn2xyxy, xyxy2xywhn
from yolo.data.augment import (
    apply_hsv,
    build_mosaic,
    hsv_gains,
    mixup,
    random_perspective,
    to_chw_rgb,
)
from yolo.data.image import letterbox, read_image, resize_long_side
from yolo.data.rect import rect_batches
from yolo.errors import UserError

LOG = logging.getLogger(__name__)

CACHE_MODES = ("ram", "disk", "auto")
AUTO_RAM_FRACTION = 0.25  # cache='auto' keeps images in RAM when they need at most this share of free memory
# Streams other than the per-sample one get their own spawn key, so (seed, epoch, slot) for samples can never
# collide with the order, image-weights or quad draws of the same epoch.
_ORDER_STREAM, _WEIGHTS_STREAM, _QUAD_STREAM = 1, 2, 3

Key = tuple[int, int]  # (epoch, slot)
Sample = tuple[torch.Tensor, torch.Tensor, str, Any]


class IndexLike(Protocol):
    root: Path
    files: list[str]
    shapes: np.ndarray
    labels: list[np.ndarray]
    names: list[str]
    fingerprint: str

    def image_path(self, i: int) -> Path: ...

    def __len__(self) -> int: ...


class AugmentHyp(Protocol):
    hsv_h: float
    hsv_s: float
    hsv_v: float
    degrees: float
    translate: float
    scale: float
    shear: float
    perspective: float
    flipud: float
    fliplr: float
    mosaic: float
    mixup: float


def sample_rng(seed: int, epoch: int, slot: int) -> np.random.Generator:
    """The generator every random draw of sample `slot` in `epoch` comes from."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, slot])))


def _stream_rng(stream: int, *entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy), spawn_key=(stream,))))


# ------------------------------------------------------------------------------------------- image weights
def labels_to_class_weights(labels: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """Inverse class frequency over all boxes, normalised to sum 1 (upstream; absent classes count 1)."""
    classes = np.concatenate([lb[:, 0] for lb in labels]).astype(int) if labels else np.zeros(0, int)
    counts = np.bincount(classes, minlength=nc).astype(np.float64)
    counts[counts == 0] = 1
    weights = 1 / counts
    return weights / weights.sum()


def labels_to_image_weights(labels: Sequence[np.ndarray], nc: int, class_weights: np.ndarray) -> np.ndarray:
    """Per-image weight: sum over its boxes of their class weight (upstream)."""
    counts = np.stack([np.bincount(lb[:, 0].astype(int), minlength=nc)[:nc] for lb in labels])
    return (counts * class_weights.reshape(1, nc)).sum(1)


def image_weights_from_maps(
    labels: Sequence[np.ndarray], nc: int, maps: np.ndarray | None = None
) -> np.ndarray:
    """Upstream train.py's --image-weights: class weights * (1 - per-class mAP)^2, summed per image."""
    maps = np.zeros(nc) if maps is None else np.asarray(maps, np.float64)
    class_weights = labels_to_class_weights(labels, nc) * nc * (1 - maps) ** 2 / nc
    return labels_to_image_weights(labels, nc, class_weights)


# ------------------------------------------------------------------------------------------------- images
def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ImageStore:
    """Images decoded and resized to long side imgsz (upstream load_image), from RAM, a disk cache or files.

    cache='ram' decodes everything up front in this process; DataLoader workers fork after that and share
    the pages copy-on-write. cache='disk' keeps the resized images as .npy under `cache_dir`, in a folder
    keyed by the dataset fingerprint, imgsz and resize mode: never under the dataset. cache='auto' is 'ram'
    when the resized images fit in AUTO_RAM_FRACTION of the available memory, else no cache. Decoding is
    most of a sample's cost (4 JPEGs per mosaic), so a cache is what makes the loader cheap.
    """

    def __init__(
        self,
        index: IndexLike,
        imgsz: int,
        augment: bool,
        cache: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        threads: int | None = None,
    ) -> None:
        if cache not in (None, *CACHE_MODES):
            raise UserError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
        self.index, self.imgsz, self.augment = index, imgsz, augment
        self.hw0 = np.asarray(index.shapes, dtype=int).reshape(-1, 2)
        if cache == "auto":
            need, free = self.ram_bytes(), available_memory()
            cache = "ram" if free is not None and need <= AUTO_RAM_FRACTION * free else None
            LOG.info("cache auto: images need %.2f GB in RAM -> %s", need / 1e9, cache or "no cache")
        self.cache = cache
        self.ram: list[np.ndarray | None] = []
        self.disk_dir: Path | None = None
        threads = threads or min(8, os.cpu_count() or 1)
        if cache == "disk":
            self.disk_dir = self._disk_folder(cache_dir)
            todo = [i for i in range(len(index)) if not self._npy(i).exists()]
            if todo:
                try:
                    self.disk_dir.mkdir(parents=True, exist_ok=True)
                    with ThreadPoolExecutor(threads) as pool:
                        list(pool.map(self._write_npy, todo))
                except OSError as e:
                    raise UserError(f"cannot write the disk cache in {self.disk_dir}: {e.strerror or e}") from None
            LOG.info("disk cache %s: %d images (%d new)", self.disk_dir, len(index), len(todo))
        elif cache == "ram":
            with ThreadPoolExecutor(threads) as pool:
                self.ram = list(pool.map(self._decode, range(len(index))))
            LOG.info("ram cache: %.2f GB", sum(im.nbytes for im in self.ram) / 1e9)

    def ram_bytes(self) -> int:
        """Bytes the resized images take (from the index shapes, nothing decoded)."""
        r = self.imgsz / self.hw0.max(1)
        return int((np.ceil(self.hw0[:, 0] * r) * np.ceil(self.hw0[:, 1] * r) * 3).sum())

    def _disk_folder(self, cache_dir: str | os.PathLike | None) -> Path:
        if cache_dir is None:
            raise UserError(
                "--cache disk needs a cache folder (the train step passes one under its run folder)"
            )
        folder = Path(cache_dir).resolve()
        root = Path(self.index.root).resolve()
        if folder == root or root in folder.parents:
            raise UserError(
                f"disk cache folder {folder} is inside the dataset {root}; the dataset is never written"
            )
        mode = "linear" if self.augment else "eval"
        return folder / f"images-{self.index.fingerprint[:16]}-{self.imgsz}-{mode}"

    def _npy(self, i: int) -> Path:
        assert self.disk_dir is not None
        name = hashlib.sha256(self.index.files[i].encode("utf-8")).hexdigest()[:24]
        return self.disk_dir / f"{name}.npy"

    def _write_npy(self, i: int) -> None:
        im = self._decode(i)
        final = self._npy(i)
        tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, im)
        os.replace(tmp, final)  # atomic: a concurrent reader sees the old file or the whole new one

    def _decode(self, i: int) -> np.ndarray:
        path = self.index.image_path(i)
        im = read_image(path)
        if im is None:
            raise UserError(f"cannot decode image {path} (it changed since the index was built?)")
        return resize_long_side(im, self.imgsz, self.augment)

    def load(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """(resized BGR image, original (h0, w0), resized (h, w)); the image must not be written to."""
        if self.ram:
            im = self.ram[i]
        elif self.disk_dir is not None:
            im = np.load(self._npy(i))
        else:
            im = self._decode(i)
        h0, w0 = self.hw0[i]
        return im, (int(h0), int(w0)), im.shape[:2]


# ------------------------------------------------------------------------------------------------ dataset
class TrainDataset(Dataset):
    """Upstream LoadImagesAndLabels for training: mosaic, random perspective, mixup, HSV, flips.

    Items are addressed by slot (an int, using the epoch from set_epoch) or by an (epoch, slot) key from
    EpochSampler. Slot -> image goes through `indices` (sorted by aspect ratio for rect, drawn by weight for
    image weights, else the identity). Returns (uint8 RGB CHW tensor, labels (n, 6) [0, cls, cx, cy, w, h]
    normalised, image path, shapes) with shapes = ((h0, w0), ((h / h0, w / w0), pad)), or None for a mosaic.
    """

    def __init__(
        self,
        index: IndexLike,
        imgsz: int,
        hyp: AugmentHyp,
        augment: bool = True,
        rect: bool = False,
        batch_size: int = 16,
        stride: int = 32,
        pad: float = 0.0,
        cache: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        quad: bool = False,
    ) -> None:
        self.index, self.imgsz, self.hyp, self.augment, self.rect = index, imgsz, hyp, augment, rect
        self.seed, self.quad, self.epoch = int(seed), quad, 0
        self.n = len(index)
        if self.n == 0:
            raise UserError("the training split has no usable images")
        self.mosaic = augment and not rect
        self.mosaic_border = (-imgsz // 2, -imgsz // 2)
        self.labels = [np.asarray(lb, dtype=np.float32).reshape(-1, 5) for lb in index.labels]
        self.paths = [str(index.image_path(i)) for i in range(self.n)]
        self.indices = np.arange(self.n)
        self.slot_shapes: np.ndarray | None = None  # rect: letterbox (h, w) of each slot's batch
        if rect:
            batches = rect_batches(np.asarray(index.shapes), batch_size, imgsz, stride, pad)
            self.indices = batches.order
            self.slot_shapes = batches.shapes[batches.batch_of]
        self.image_weights: np.ndarray | None = None
        self.images = ImageStore(index, imgsz, augment, cache, cache_dir)

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for int slots; redraws the image-weighted slot -> image map when weights are set."""
        self.epoch = int(epoch)
        if self.image_weights is not None:
            self._draw_weighted_indices()

    def update_image_weights(self, maps: np.ndarray | None = None) -> None:
        """Turn on --image-weights for this and later epochs from per-class mAP `maps` (None: all zero)."""
        if self.rect:
            raise UserError("--image-weights cannot be combined with --rect")
        self.image_weights = image_weights_from_maps(self.labels, len(self.index.names), maps)
        self._draw_weighted_indices()

    def _draw_weighted_indices(self) -> None:
        w = self.image_weights
        assert w is not None
        p = w / w.sum() if w.sum() > 0 else None
        rng = _stream_rng(_WEIGHTS_STREAM, self.seed, self.epoch)
        self.indices = rng.choice(self.n, size=self.n, replace=True, p=p)

    # ----------------------------------------------------------------------------------- one sample
    def __getitem__(self, key: int | Key) -> Sample:
        epoch, slot = (self.epoch, key) if isinstance(key, (int, np.integer)) else key
        rng = sample_rng(self.seed, int(epoch), int(slot))
        i = int(self.indices[slot])
        hyp = self.hyp
        shapes = None
        if self.mosaic and rng.random() < hyp.mosaic:
            im, labels = self.load_mosaic(i, rng)
            if rng.random() < hyp.mixup:
                # upstream draws the partner from all images, not from the weighted indices
                im, labels = mixup(im, labels, *self.load_mosaic(int(rng.integers(self.n)), rng), rng)
        else:
            im, (h0, w0), (h, w) = self.images.load(i)
            shape = tuple(self.slot_shapes[slot]) if self.slot_shapes is not None else self.imgsz
            im, ratio, pad = letterbox(im, shape, auto=False, scaleup=self.augment)
            shapes = (h0, w0), ((h / h0, w / w0), pad)
            labels = self.labels[i].copy()
            if len(labels):
                labels[:, 1:] = xywhn2xyxy(
                    labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1]
                )
            if self.augment:
                im, labels = random_perspective(im, labels, rng, hyp)

        if len(labels):
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=im.shape[1], h=im.shape[0], clip=True, eps=1e-3)
        flip_ud = flip_lr = False
        if self.augment:
            gains = hsv_gains(rng, hyp.hsv_h, hyp.hsv_s, hyp.hsv_v)
            if gains is not None:
                apply_hsv(im, gains)
            flip_ud = rng.random() < hyp.flipud
            flip_lr = rng.random() < hyp.fliplr
            if flip_ud and len(labels):
                labels[:, 2] = 1 - labels[:, 2]
            if flip_lr and len(labels):
                labels[:, 1] = 1 - labels[:, 1]

        out = torch.zeros((len(labels), 6))
        if len(labels):
            out[:, 1:] = torch.from_numpy(labels)
        return torch.from_numpy(to_chw_rgb(im, flip_ud, flip_lr)), out, self.paths[i], shapes

    def load_mosaic(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Image i plus 3 partners from `indices`, shuffled into a 2s mosaic, then warped down to s x s."""
        s = self.imgsz
        yc, xc = (int(rng.uniform(-b, 2 * s + b)) for b in self.mosaic_border)
        picks = np.concatenate(([i], self.indices[rng.integers(0, self.n, 3)]))[rng.permutation(4)]
        images = [self.images.load(int(j))[0] for j in picks]
        im, labels = build_mosaic(images, [self.labels[j] for j in picks], s, xc, yc)
        # copy_paste needs segments; box-only labels make it a no-op upstream, so it is not applied here
        return random_perspective(im, labels, rng, self.hyp, border=self.mosaic_border)

    # ------------------------------------------------------------------------------- one batch of keys
    def __getitems__(self, keys: list[int | Key]) -> list[Sample]:
        samples = [self[k] for k in keys]
        if not self.quad:
            return samples
        first = [(self.epoch, k) if isinstance(k, (int, np.integer)) else k for k in keys[::4]]
        return quad_combine(samples, [_stream_rng(_QUAD_STREAM, self.seed, int(e), int(s)) for e, s in first])


def quad_combine(samples: list[Sample], rngs: list[np.random.Generator]) -> list[Sample]:
    """Upstream collate_fn4: each group of 4 becomes one image at double size, either the first image
    upsampled x2 (draw < 0.5) or the 4 tiled 2x2, labels moved into their quadrant. A trailing group of
    fewer than 4 is dropped, as upstream, unless it is the whole batch (then its first image is upsampled).
    """
    out = []
    groups = max(len(samples) // 4, 1)
    for g in range(groups):
        part = samples[4 * g : 4 * g + 4]
        first = part[0]
        if len(part) < 4 or rngs[g].random() < 0.5:
            up = F.interpolate(first[0][None].float(), scale_factor=2.0, mode="bilinear", align_corners=False)
            im, labels = up[0].to(torch.uint8), first[1]
        else:
            ims = [p[0] for p in part]
            im = torch.cat((torch.cat((ims[0], ims[1]), 1), torch.cat((ims[2], ims[3]), 1)), 2)
            moved = [p[1].clone() for p in part]
            moved[1][:, 3] += 1  # second image sits below the first
            moved[2][:, 2] += 1  # third to the right
            moved[3][:, 2:4] += 1  # fourth below right
            labels = torch.cat(moved, 0)
            labels[:, 2:] *= 0.5
        out.append((im, labels, first[2], first[3]))
    return out


def collate(batch: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple[Any, ...]]:
    """Stack images (into shared memory inside a worker) and set each label row's image-index column."""
    ims, labels, paths, shapes = zip(*batch, strict=True)
    for i, lb in enumerate(labels):
        lb[:, 0] = i
    return default_collate(list(ims)), torch.cat(labels, 0), paths, shapes


# ------------------------------------------------------------------------------------------------ sampler
class EpochSampler(Sampler[Key]):
    """This rank's (epoch, slot) keys for the epoch: a permutation from (seed, epoch), or 0..n-1 unshuffled.

    DDP: the permutation is cut into blocks of `block` slots (1, or the batch size for rect so a rank never
    mixes rect shapes), padded by repeating from the start to a multiple of world_size, and rank r takes
    blocks r, r + world_size, ... as torch's DistributedSampler does for block 1.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        block: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.n, self.seed, self.shuffle = n, int(seed), shuffle
        self.rank, self.world_size, self.block = rank, world_size, max(int(block), 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def slots(self) -> np.ndarray:
        """This rank's slots for the current epoch, in order."""
        if self.shuffle:
            order = _stream_rng(_ORDER_STREAM, self.seed, self.epoch).permutation(self.n)
        else:
            order = np.arange(self.n)
        blocks = self._blocks_of_rank()
        starts = blocks * self.block
        return np.concatenate([order[s : s + self.block] for s in starts]) if len(starts) else order[:0]

    def _blocks_of_rank(self) -> np.ndarray:
        nb = math.ceil(self.n / self.block)
        total = math.ceil(nb / self.world_size) * self.world_size
        return np.arange(self.rank, total, self.world_size) % nb

    def __iter__(self) -> Iterator[Key]:
        epoch = self.epoch
        return iter([(epoch, int(s)) for s in self.slots()])

    def __len__(self) -> int:
        sizes = np.full(math.ceil(self.n / self.block), self.block)
        sizes[-1] = self.n - (len(sizes) - 1) * self.block
        return int(sizes[self._blocks_of_rank()].sum())


# ------------------------------------------------------------------------------------------------- loader
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _KilledOnTerminate(multiprocessing.popen_fork.Popen):
    """A loader worker's process handle. The worker ignores SIGTERM (see worker_init), so terminate() sends
    SIGKILL: torch's shutdown and multiprocessing's exit handler terminate workers that outlive their queue
    (the exit handler through this handle, not Process.terminate)."""

    def terminate(self) -> None:
        self.kill()


class _WorkerProcess(multiprocessing.context.ForkProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> _KilledOnTerminate:
        return _KilledOnTerminate(process_obj)


class _WorkerContext(multiprocessing.context.ForkContext):
    Process = _WorkerProcess


class TrainLoader(DataLoader):
    """A DataLoader whose set_epoch(e) moves both the sampler and the dataset to epoch e.

    Stop signals are the main process's business: a SIGTERM/SIGINT sent to the whole process group or
    container (Ctrl-C, the image's init under `docker stop`, a pod's PID 1) must not kill a worker the
    trainer still reads from while it finishes its step and writes last.pt. So workers ignore both, and
    are forked with both blocked until they do: there is no moment in which a stop signal kills a worker.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("num_workers"):
            kwargs.setdefault("multiprocessing_context", _WorkerContext())
            kwargs.setdefault("worker_init_fn", worker_init)
        super().__init__(*args, **kwargs)

    def __iter__(self):
        # workers inherit the forking thread's mask; a signal sent to this process meanwhile stays pending
        # (or goes to another of its threads) and is handled once the mask is restored
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)


def worker_init(_worker_id: int) -> None:
    """In a loader worker: ignore stop signals (see TrainLoader), then unblock them, and keep to one thread
    (the cores are shared with the training step)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # the disposition is the whole process's, every thread included
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def create_train_loader(
    index: IndexLike,
    imgsz: int,
    batch_size: int,
    hyp: AugmentHyp,
    *,
    augment: bool = True,
    rect: bool = False,
    workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    cache: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    image_weights: bool = False,
    quad: bool = False,
    shuffle: bool = True,
    stride: int = 32,
    pad: float = 0.0,
) -> tuple[TrainLoader, TrainDataset]:
    """The training loader and its dataset; call loader.set_epoch(e) before iterating each epoch.

    Batches: (uint8 (bs, 3, H, W), targets (n, 6) [image, cls, cx, cy, w, h], paths, shapes); with quad,
    bs / 4 images of twice the size. Results do not depend on `workers`.
    """
    if rect and image_weights:
        LOG.warning("--image-weights is incompatible with --rect; training without --rect (as upstream)")
        rect = False
    if rect and shuffle:
        shuffle = False  # rect batches are fixed groups of similar aspect ratio
    if quad and batch_size % 4:
        raise UserError(f"--quad needs a batch size that is a multiple of 4, got {batch_size}")
    dataset = TrainDataset(
        index, imgsz, hyp, augment=augment, rect=rect, batch_size=batch_size, stride=stride, pad=pad,
        cache=cache, cache_dir=cache_dir, seed=seed, quad=quad,
    )  # fmt: skip
    if image_weights:
        dataset.update_image_weights(None)
    batch_size = min(batch_size, len(dataset))
    workers = min(workers, os.cpu_count() or 1) if batch_size > 1 else 0
    sampler = EpochSampler(
        len(dataset),
        seed=seed,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
        block=batch_size if rect else 1,
    )
    loader = TrainLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        # image weights change `indices` between epochs; fresh workers pick them up (upstream does the same)
        persistent_workers=workers > 0 and not image_weights,
        # a private generator: creating worker seeds must not consume the global torch RNG of training
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, dataset
