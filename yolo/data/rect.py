"""Rectangular batches (upstream's `rect=True`): images sorted by aspect ratio, one padded shape per batch.

Evaluation and `--rect` training share this, so the grouping that decides the shapes (and therefore
mAP) is computed in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RectBatches:
    order: np.ndarray  # (n,) dataset indices sorted by aspect ratio (h / w)
    batch_of: np.ndarray  # (n,) batch number of the i-th image in `order`
    shapes: np.ndarray  # (nb, 2) int (height, width) of each batch, multiples of stride

    def __len__(self) -> int:
        return len(self.shapes)

    def batch_indices(self, b: int) -> np.ndarray:
        """Dataset indices of batch b, in order."""
        return self.order[self.batch_of == b]


def rect_batches(hw: np.ndarray, batch_size: int, imgsz: int, stride: int = 32, pad: float = 0.5) -> RectBatches:
    """Group images (heights/widths `hw`, shape (n, 2)) as upstream's LoadImagesAndLabels(rect=True)."""
    hw = np.asarray(hw, dtype=np.float64)
    n = len(hw)
    batch_of = np.floor(np.arange(n) / batch_size).astype(int)
    nb = int(batch_of[-1]) + 1 if n else 0
    aspect = hw[:, 0] / hw[:, 1]
    order = aspect.argsort()  # same (non-stable) sort as upstream, so ties group identically
    aspect = aspect[order]
    ratios = np.ones((nb, 2))
    for b in range(nb):  # one iteration per batch, not per box
        ab = aspect[batch_of == b]
        lo, hi = ab.min(), ab.max()
        if hi < 1:
            ratios[b] = [hi, 1]
        elif lo > 1:
            ratios[b] = [1, 1 / lo]
    shapes = (np.ceil(ratios * imgsz / stride + pad).astype(int) * stride).astype(int)
    return RectBatches(order=order, batch_of=batch_of, shapes=shapes)
