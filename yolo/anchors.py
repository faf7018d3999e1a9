"""Anchor fit: upstream YOLOv5's best possible recall (BPR), k-means and a seeded genetic evolution.

The metric is upstream's (utils/autoanchor.py): for a label of size wh and an anchor a, r = wh / a and
the fit is min(r, 1/r) over both sides; a label is recallable when its best anchor's fit exceeds 1/thr.
Differences from upstream, on purpose: every random draw comes from a seeded generator, k-means is a
vectorised numpy one (no scipy), and the genetic search runs several of upstream's searches side by side,
scoring all their children in one numpy pass per generation (log-space distance, same fitness), and
keeps the fittest.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yolo.errors import UserError
from yolo.untrusted import read_json_file

LOG = logging.getLogger(__name__)
PREFIX = "autoanchor: "
MIN_LABEL_PX = 2.0  # labels smaller than this on both sides are left out of the fit (upstream)
WARN_LABEL_PX = 3.0  # labels smaller than this on either side are worth a warning (upstream)
MIN_ANCHOR_PX = 2.0  # evolved anchors never shrink below this (upstream)
MUTATION_PROB, MUTATION_SIGMA = 0.9, 0.1  # upstream's genetic search constants
KMEANS_RESTARTS, KMEANS_THRESH, KMEANS_MAX_ITER = 30, 1e-5, 300  # scipy.cluster.vq.kmeans(iter=30) defaults
CHUNK_ELEMENTS = 1 << 22  # bound the (labels x anchors) temporaries on big datasets
KMEANS_CHUNK_ELEMENTS = 1 << 20  # (restarts x points x clusters) per k-means pass
EVOLUTION_BLOCK = 8192  # mutation factors drawn per block (children, not generations)
JSON_DECIMALS = 6
ANCHOR_DECIMALS = 4


@dataclass(frozen=True)
class AutoAnchorConfig:
    """Knobs of one anchor fit (CLI: --imgsz --anchor-thr --bpr-target --generations --seed --force)."""

    imgsz: int = 640
    thr: float = 4.0  # hyp anchor_t: a label fits an anchor when both side ratios are within thr
    bpr_target: float = 0.98  # evolve when the model's anchors recall less than this
    generations: int = 1000
    population: int = 8  # upstream searches run side by side, the fittest kept (1 = upstream)
    seed: int = 0
    force: bool = False  # evolve even when the BPR already meets the target


@dataclass
class AnchorFit:
    """The outcome of a fit: the anchors to use (pixels at imgsz, one row per level) and the figures."""

    imgsz: int
    strides: list[float]
    anchors: np.ndarray  # (nl, na * 2) pixels
    bpr_before: float
    bpr_after: float
    aat_before: float
    aat_after: float
    changed: bool
    evolved: bool  # evolution ran (whether or not its anchors were kept)
    labels: int
    config: AutoAnchorConfig

    def to_json(self) -> dict[str, Any]:
        """The anchors.json contract (plus the settings that produced it), floats rounded."""
        def r(v: float) -> float:
            return round(float(v), JSON_DECIMALS)

        strides = [int(s) if float(s).is_integer() else r(s) for s in self.strides]
        return {
            "imgsz": int(self.imgsz),
            "strides": strides,
            "anchors": [[round(float(v), ANCHOR_DECIMALS) for v in row] for row in self.anchors],
            "bpr_before": r(self.bpr_before),
            "bpr_after": r(self.bpr_after),
            "aat_before": r(self.aat_before),
            "aat_after": r(self.aat_after),
            "changed": bool(self.changed),
            "evolved": bool(self.evolved),
            "labels": int(self.labels),
            "anchor_thr": r(self.config.thr),
            "bpr_target": r(self.config.bpr_target),
            "generations": int(self.config.generations),
            "population": int(self.config.population),
            "seed": int(self.config.seed),
        }


# ------------------------------------------------------------------------------------------------ label sizes
def image_scales(shapes_hw: np.ndarray, imgsz: int) -> np.ndarray:
    """(n, 2) (width, height) of each image resized so its long side is imgsz (upstream's `shapes`)."""
    wh = np.asarray(shapes_hw, dtype=np.float64).reshape(-1, 2)[:, ::-1]
    return imgsz * wh / wh.max(1, keepdims=True)  # same operation order as upstream: bit-identical


def label_wh(shapes_hw: np.ndarray, labels: Sequence[np.ndarray], imgsz: int,
             scale: np.ndarray | None = None) -> np.ndarray:
    """(N, 2) float64 label widths/heights in pixels at imgsz, optionally times a per-image scale (n, 1)."""
    sizes = image_scales(shapes_hw, imgsz)
    if scale is not None:
        sizes = sizes * scale
    counts = np.fromiter((len(lb) for lb in labels), dtype=np.int64, count=len(labels))
    if len(counts) != len(sizes):
        raise ValueError(f"{len(sizes)} image shapes but {len(counts)} label arrays")
    if not counts.sum():
        return np.zeros((0, 2), dtype=np.float64)
    norm_wh = np.concatenate([np.asarray(lb, dtype=np.float32).reshape(-1, 5)[:, 3:5] for lb in labels])
    return norm_wh * np.repeat(sizes, counts, axis=0)


def jitter_scales(n_images: int, rng: np.random.Generator) -> np.ndarray:
    """Upstream's augmentation-like scale jitter: one uniform(0.9, 1.1) factor per image, (n, 1)."""
    return rng.uniform(0.9, 1.1, size=(n_images, 1))


# ------------------------------------------------------------------------------------------------ metric
def ratio_metric(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(N, k) float32 fit of every label to every anchor: min over w, h of min(r, 1/r), r = wh / anchor."""
    wh = np.asarray(wh, dtype=np.float32).reshape(-1, 2)
    k = np.asarray(anchors, dtype=np.float32).reshape(-1, 2)
    with np.errstate(divide="ignore", invalid="ignore"):  # zero (placeholder) anchors fit nothing
        r = wh[:, None] / k[None]
        return np.nan_to_num(np.minimum(r, np.float32(1.0) / r).min(2), nan=0.0)


def _chunks(n: int, k: int) -> range:
    return range(0, n, max(1, CHUNK_ELEMENTS // max(1, 2 * k)))


def fit_figures(wh: np.ndarray, anchors: np.ndarray, thr: float) -> tuple[float, float]:
    """(BPR, AAT) as upstream's check_anchors: share of labels whose best anchor fits; anchors fit per label."""
    wh = np.asarray(wh).reshape(-1, 2)
    if not len(wh):
        return 0.0, 0.0
    k = np.asarray(anchors).reshape(-1, 2)
    recalled, above = 0, 0
    step = _chunks(len(wh), len(k)).step
    for i in range(0, len(wh), step):
        x = ratio_metric(wh[i:i + step], k)
        fits = x > 1.0 / thr
        recalled += int(fits.any(1).sum())  # best > 1/thr  <=>  some anchor > 1/thr
        above += int(fits.sum())
    return recalled / len(wh), above / len(wh)


def best_possible_recall(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> float:
    """Share of labels with at least one anchor within the ratio threshold."""
    return fit_figures(wh, anchors, thr)[0]


class FitnessEvaluator:
    """Upstream's anchor fitness, mean(best * (best > 1/thr)), for a population (P, k, 2) at once.

    In log space the fit is exp(-max(|dlog w|, |dlog h|)), so a candidate costs one subtract/abs per side
    and a max over (k, N) with N contiguous, instead of two divisions per element.
    """

    def __init__(self, wh: np.ndarray, thr: float):
        log_wh = np.log(np.asarray(wh, dtype=np.float32).reshape(-1, 2))
        self.log_w = np.ascontiguousarray(log_wh[:, 0])
        self.log_h = np.ascontiguousarray(log_wh[:, 1])
        self.log_thr = np.float32(math.log(thr))
        self.n = len(log_wh)

    def __call__(self, anchors: np.ndarray) -> np.ndarray:
        log_k = np.log(np.asarray(anchors, dtype=np.float32))
        if log_k.ndim == 2:
            log_k = log_k[None]
        dist = np.abs(log_k[:, :, 0, None] - self.log_w)  # (P, k, N)
        dist_h = np.abs(log_k[:, :, 1, None] - self.log_h)
        np.maximum(dist, dist_h, out=dist)
        best = dist.min(1)  # (P, N): -log of the best fit
        return (np.exp(-best) * (best < self.log_thr)).sum(1, dtype=np.float64) / self.n


# ------------------------------------------------------------------------------------------------ k-means
def kmeans(points: np.ndarray, n: int, rng: np.random.Generator, restarts: int = KMEANS_RESTARTS,
           thresh: float = KMEANS_THRESH, max_iter: int = KMEANS_MAX_ITER) -> tuple[np.ndarray, float] | None:
    """scipy.cluster.vq.kmeans semantics, all restarts at once: (centroids (n, d), mean distance) or None.

    Each restart starts from n distinct random points and iterates until the mean distance changes by at
    most `thresh`; the restart with the lowest mean distance wins. A restart that ends with an empty
    cluster is discarded (scipy would drop that centroid and return fewer than n); None when all are.
    """
    points = np.asarray(points, dtype=np.float64)
    m, d = points.shape
    if n < 1 or m < n:
        return None
    columns = [np.ascontiguousarray(points[:, j], dtype=np.float32) for j in range(d)]
    best_code, best_dist = None, math.inf
    per_pass = max(1, KMEANS_CHUNK_ELEMENTS // max(1, m * n))
    for start in range(0, restarts, per_pass):
        runs = min(per_pass, restarts - start)
        code = np.stack([points[rng.choice(m, size=n, replace=False)] for _ in range(runs)])  # (R, n, d)
        prev = np.full(runs, np.inf)
        dist = np.full(runs, np.inf)
        empty = np.zeros(runs, dtype=bool)
        active = np.arange(runs)  # restarts still moving
        for _ in range(max_iter):
            c = code[active].astype(np.float32)
            # (n, R, m) squared distances in float32 (as upstream's float32 wh) with the points contiguous:
            # reducing over the leading axis is elementwise, unlike argmin over a short inner axis
            sq = np.square(np.ascontiguousarray(c[:, :, 0].T)[:, :, None] - columns[0])
            for j in range(1, d):
                sq += np.square(np.ascontiguousarray(c[:, :, j].T)[:, :, None] - columns[j])
            min_sq = sq.min(0)
            assign = (sq == min_sq).argmax(0)  # the first nearest cluster, as argmin
            mean_dist = np.sqrt(min_sq).mean(1, dtype=np.float64)
            flat = (assign + (np.arange(len(active)) * n)[:, None]).ravel()
            counts = np.bincount(flat, minlength=len(active) * n).reshape(-1, n)
            sums = np.stack([np.bincount(flat, weights=np.tile(points[:, j], len(active)), minlength=len(active) * n)
                             for j in range(d)], 1).reshape(-1, n, d)
            has = counts > 0
            code[active] = np.where(has[..., None], sums / np.maximum(counts, 1)[..., None], code[active])
            dist[active] = mean_dist
            empty[active] = ~has.all(1)
            moving = np.abs(prev[active] - mean_dist) > thresh
            prev[active] = mean_dist
            active = active[moving]
            if not len(active):
                break
        dist = np.where(empty, np.inf, dist)
        j = int(dist.argmin())
        if dist[j] < best_dist:
            best_code, best_dist = code[j], float(dist[j])
    return None if best_code is None else (best_code, best_dist)


# ------------------------------------------------------------------------------------------------ evolution
def mutations(rng: np.random.Generator, population: int, shape: tuple[int, int]) -> np.ndarray:
    """(P, *shape) multiplicative mutations as upstream: each gene changes with p=0.9 by N(0, (0.1 u)^2)."""
    size = (population, *shape)
    v = np.ones(size)
    redo = np.ones(population, dtype=bool)
    while redo.any():  # a candidate identical to its parent is wasted: redraw it (upstream's while loop)
        p = int(redo.sum())
        gene = rng.random((p, *shape)) < MUTATION_PROB
        amount = rng.random((p, 1, 1)) * rng.standard_normal((p, *shape)) * MUTATION_SIGMA
        v[redo] = (gene * amount + 1).clip(0.3, 3.0)
        redo = (v == 1).reshape(population, -1).all(1)
    return v


def evolve_anchors(anchors: np.ndarray, fitness: FitnessEvaluator, generations: int, population: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """`population` independent runs of upstream's genetic search from `anchors`, stepped together.

    Each run is upstream's loop (one mutation per generation, kept when fitter); all runs' children are
    scored in one vectorised pass per generation and the fittest run wins. The best of several runs is
    at least as fit as one, and much less often stuck in a poor local optimum.
    """
    k = np.repeat(np.asarray(anchors, dtype=np.float64)[None], max(1, population), axis=0)  # (P, n, 2)
    best = np.repeat(fitness(k[:1]), len(k))
    block = max(1, EVOLUTION_BLOCK // len(k))
    for start in range(0, generations, block):  # mutations drawn a block of generations at a time
        count = min(block, generations - start)
        factors = mutations(rng, count * len(k), k.shape[1:]).reshape(count, *k.shape)
        for v in factors:
            children = (k * v).clip(min=MIN_ANCHOR_PX)
            scores = fitness(children)
            fitter = scores > best
            k[fitter], best[fitter] = children[fitter], scores[fitter]
    j = int(best.argmax())
    return k[j], float(best[j])


def sort_by_area(anchors: np.ndarray) -> np.ndarray:
    k = np.asarray(anchors).reshape(-1, 2)
    return k[np.argsort(k.prod(1), kind="stable")]


def kmean_anchors(wh0: np.ndarray, n: int, imgsz: int, thr: float = 4.0, generations: int = 1000,
                  population: int = 8, rng: np.random.Generator | None = None) -> np.ndarray:
    """n anchors (n, 2) sorted by area, as upstream's kmean_anchors: k-means on whitened wh, then evolution.

    wh0: label sizes in pixels at imgsz without jitter. Labels under 2 px on both sides are left out.
    """
    rng = rng or np.random.default_rng(0)
    wh0 = np.asarray(wh0, dtype=np.float64).reshape(-1, 2)
    tiny = int((wh0 < WARN_LABEL_PX).any(1).sum())
    if tiny:
        LOG.warning(f"{PREFIX}WARNING: extremely small objects: {tiny} of {len(wh0)} labels are under "
                       f"{WARN_LABEL_PX:g} pixels in size")
    wh = wh0[(wh0 >= MIN_LABEL_PX).any(1)].astype(np.float32)
    LOG.info(f"{PREFIX}running k-means for {n} anchors on {len(wh)} points...")
    found = None
    if len(wh) >= n:
        sigma = wh.std(0).astype(np.float64)
        sigma[sigma == 0] = 1.0  # identical sizes on one side: nothing to whiten
        found = kmeans(wh / sigma, n, rng)
    if found is None:
        LOG.warning(f"{PREFIX}WARNING: too few distinct labels for k-means, starting from random anchors")
        k = np.sort(rng.random(n * 2)).reshape(n, 2) * imgsz
    else:
        k = found[0] * sigma
    k = sort_by_area(k)
    if not len(wh) or generations <= 0:
        return k
    k, fit = evolve_anchors(k, FitnessEvaluator(wh, thr), generations, population, rng)
    LOG.info(f"{PREFIX}evolved {population} x {generations} generations: fitness {fit:.4f}")
    return sort_by_area(k)


# ------------------------------------------------------------------------------------------------ levels
def order_levels(anchors_px: np.ndarray, strides: Sequence[float]) -> np.ndarray:
    """Flip the level order when anchor size runs against stride order (upstream's check_anchor_order)."""
    a = np.asarray(anchors_px, dtype=np.float64)
    area = a.reshape(len(a), -1, 2).prod(-1).mean(-1)
    d_area, d_stride = area[-1] - area[0], float(strides[-1]) - float(strides[0])
    if d_area and np.sign(d_area) != np.sign(d_stride):
        LOG.info(f"{PREFIX}reversing anchor order to follow the strides")
        return a[::-1].copy()
    return a


def to_levels(anchors: np.ndarray, nl: int, strides: Sequence[float]) -> np.ndarray:
    """(n, 2) anchors → (nl, na*2): sorted by area, na per level small → large, in stride order."""
    k = sort_by_area(anchors)
    return order_levels(k.reshape(nl, -1), strides)


# ------------------------------------------------------------------------------------------------ the fit
def fit_anchors(shapes_hw: np.ndarray, labels: Sequence[np.ndarray], anchors_px: np.ndarray,
                strides: Sequence[float], config: AutoAnchorConfig = AutoAnchorConfig()) -> AnchorFit:
    """Check the anchors against the labels (upstream's check_anchors) and evolve new ones when needed."""
    anchors_px = np.asarray(anchors_px, dtype=np.float64)
    if anchors_px.ndim != 2 or anchors_px.shape[1] % 2 or len(anchors_px) != len(strides):
        raise ValueError(f"anchors of shape {anchors_px.shape} do not match {len(strides)} strides")
    nl, n = len(anchors_px), anchors_px.size // 2
    jitter_seq, kmeans_seq = np.random.SeedSequence(config.seed).spawn(2)
    scale = jitter_scales(len(labels), np.random.default_rng(jitter_seq))
    wh = label_wh(shapes_hw, labels, config.imgsz, scale)
    if not len(wh):
        raise UserError("no labels to fit anchors to (every image is a background)")
    bpr, aat = fit_figures(wh, anchors_px, config.thr)
    LOG.info(f"{PREFIX}{aat:.2f} anchors/target, {bpr:.4f} best possible recall (BPR) at {config.imgsz} "
                f"on {len(wh)} labels")
    fit = AnchorFit(config.imgsz, [float(s) for s in strides], anchors_px, bpr, bpr, aat, aat,
                    changed=False, evolved=False, labels=len(wh), config=config)
    if bpr >= config.bpr_target and not config.force:
        LOG.info(f"{PREFIX}current anchors fit the dataset (BPR >= {config.bpr_target})")
        return fit
    LOG.info(f"{PREFIX}{'--force: ' if bpr >= config.bpr_target else 'anchors fit poorly; '}evolving new ones")
    wh0 = label_wh(shapes_hw, labels, config.imgsz)
    new = kmean_anchors(wh0, n, config.imgsz, config.thr, config.generations, config.population,
                        np.random.default_rng(kmeans_seq))
    new = np.round(to_levels(new, nl, strides), ANCHOR_DECIMALS)  # what the file says is what is measured
    new_bpr, new_aat = fit_figures(wh, new, config.thr)
    fit.evolved = True
    if new_bpr > bpr:
        fit.anchors, fit.bpr_after, fit.aat_after, fit.changed = new, new_bpr, new_aat, True
        LOG.info(f"{PREFIX}new anchors: {new_aat:.2f} anchors/target, {new_bpr:.4f} BPR")
    else:
        LOG.info(f"{PREFIX}new anchors recall no more ({new_bpr:.4f} BPR): keeping the original anchors")
    return fit


# ------------------------------------------------------------------------------------------------ train helpers
def load_anchors_json(path: str | os.PathLike) -> tuple[int, np.ndarray]:
    """(imgsz, anchors px (nl, na*2)) from an anchors.json; UserError naming the file on any problem."""
    return parse_anchors_json(read_anchors_json(path), f"anchors file {path}")


def read_anchors_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of an anchors.json (not yet checked); UserError naming the file."""
    path = Path(path)
    return read_json_file(path, "anchors file")


def parse_anchors_json(obj: Any, where: str = "anchors.json") -> tuple[int, np.ndarray]:
    """(imgsz, anchors px (nl, na*2)) from an anchors.json document; UserError starting with `where`."""
    if not isinstance(obj, dict) or "anchors" not in obj or "imgsz" not in obj:
        raise UserError(f"{where}: expected an object with `imgsz` and `anchors` (from the stats step)")
    imgsz, rows = obj["imgsz"], obj["anchors"]
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0:
        raise UserError(f"{where}: `imgsz` must be a positive integer, got {imgsz!r}")
    ok = (isinstance(rows, list) and rows and all(isinstance(r, list) and r and len(r) % 2 == 0
                                                  and len(r) == len(rows[0]) for r in rows)
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in rows for v in r))
    if not ok:
        raise UserError(f"{where}: `anchors` must be rows of equal, even length "
                        f"[w, h, w, h, ...], one per level")
    anchors = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(anchors).all() or (anchors <= 0).any():
        raise UserError(f"{where}: anchors must be positive finite pixel sizes")
    strides = obj.get("strides")
    if strides is not None and (not isinstance(strides, list) or len(strides) != len(anchors)):
        raise UserError(f"{where}: {len(anchors)} anchor rows but strides {strides!r}")
    return imgsz, anchors


def anchors_for_imgsz(anchors_px: np.ndarray, from_imgsz: int, to_imgsz: int) -> np.ndarray:
    """Anchors fitted at from_imgsz, rescaled by the size ratio for a run at to_imgsz (logged)."""
    anchors_px = np.asarray(anchors_px, dtype=np.float64)
    if from_imgsz == to_imgsz:
        return anchors_px
    ratio = to_imgsz / from_imgsz
    LOG.info(f"{PREFIX}anchors fitted at imgsz {from_imgsz} rescaled x{ratio:g} for imgsz {to_imgsz}")
    return anchors_px * ratio


def model_anchors_px(model) -> tuple[np.ndarray, list[float]]:
    """(anchors px (nl, na*2), strides) of a DetectionModel's Detect head."""
    detect = model.model[-1]
    stride = detect.stride.detach().float().cpu()
    px = (detect.anchors.detach().float().cpu() * stride.view(-1, 1, 1)).reshape(detect.nl, -1)
    return px.double().numpy(), [float(s) for s in stride]


def set_model_anchors(model, anchors_px: np.ndarray) -> None:
    """Put pixel anchors (nl, na*2) into the model's Detect head (stride units, level order checked)."""
    anchors_px = np.asarray(anchors_px, dtype=np.float64)
    detect = model.model[-1]
    if anchors_px.shape != (detect.nl, detect.na * 2):
        raise UserError(f"anchors of shape {anchors_px.shape} do not fit the model's Detect head "
                        f"({detect.nl} levels x {detect.na} anchors)")
    detect.set_anchors_px(anchors_px.tolist())  # the one writer: level order checked in pixels, in place


def check_anchors_inline(model, index, imgsz: int, thr: float = 4.0, bpr_target: float = 0.98,
                         generations: int = 1000, seed: int = 0) -> AnchorFit:
    """train --autoanchor: fit the model's anchors to a SplitIndex and write them into the model if better."""
    anchors_px, strides = model_anchors_px(model)
    config = AutoAnchorConfig(imgsz=imgsz, thr=thr, bpr_target=bpr_target, generations=generations, seed=seed)
    fit = fit_anchors(index.shapes, index.labels, anchors_px, strides, config)
    if fit.changed:
        set_model_anchors(model, fit.anchors)
    return fit
