"""Detection metrics with upstream YOLOv5 semantics: matching, AP per class, P/R/F1, confusion matrix.

Everything here is pure numpy on already-computed IoU matrices, so it knows nothing about models,
images or box formats; `yolo.evaluate` feeds it. Upstream quirks that change numbers are kept on
purpose (users compare our mAP with val.py's) and each one is named where it happens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# torch.linspace(0.5, 0.95, 10) in float32, as upstream compares float32 IoUs with float32 thresholds
# (a float64 threshold would flip the rare IoU that equals float32(t) < t).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).astype(np.float32)
CURVE_POINTS = 1000  # confidence grid of the P/R/F1 curves (upstream px)


def match_predictions(
    iou: np.ndarray, label_cls: np.ndarray, pred_cls: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS
) -> np.ndarray:
    """(D, T) bool: which of D predictions are true positives at each IoU threshold (upstream process_batch).

    `iou` is (L, D) labels x predictions. Per threshold: candidate pairs with IoU >= t and equal class,
    sorted by IoU descending; keep the first pair per prediction, then — in prediction-index order, as
    upstream's np.unique leaves them — the first pair per label. With predictions sorted by confidence
    (NMS output) a label therefore goes to its most confident candidate, not its best-IoU one.
    """
    iou = np.asarray(iou, dtype=np.float32)
    n_pred = iou.shape[1] if iou.ndim == 2 else 0
    correct = np.zeros((n_pred, len(thresholds)), dtype=bool)
    if iou.size == 0:
        return correct
    same_class = np.asarray(label_cls)[:, None] == np.asarray(pred_cls)[None, :]
    for ti, t in enumerate(np.asarray(thresholds, dtype=np.float32)):
        li, di = np.nonzero((iou >= t) & same_class)  # row-major, the order torch.where gives
        if not len(li):
            continue
        # float32 rows like upstream's torch.cat of (index, index, iou): the sort sees the same values
        matches = np.stack([li, di, iou[li, di]], axis=1).astype(np.float32)
        if len(li) > 1:
            matches = matches[matches[:, 2].argsort()[::-1]]
            matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
            matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
        correct[matches[:, 1].astype(int), ti] = True
    return correct


def smooth(y: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Box-filter `y` over about `fraction` of its length, padding with the end values (upstream smooth)."""
    nf = round(len(y) * fraction * 2) // 2 + 1  # odd filter length
    pad = np.ones(nf // 2)
    padded = np.concatenate((pad * y[0], y, pad * y[-1]))
    return np.convolve(padded, np.ones(nf) / nf, mode="valid")


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AP of one PR curve: sentinels, monotone precision envelope, 101-point COCO interpolation, trapezoid."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    return float(np.trapezoid(np.interp(x, mrec, mpre), x)), mpre, mrec


@dataclass
class ClassAP:
    """ap_per_class output; row k of every array is class `classes[k]` (only classes that have labels)."""

    classes: np.ndarray  # (k,) int class ids present among the labels, ascending
    instances: np.ndarray  # (k,) labels per class
    ap: np.ndarray  # (k, T) AP at each IoU threshold
    precision: np.ndarray  # (k,) at the confidence that maximises the smoothed mean F1
    recall: np.ndarray  # (k,)
    f1: np.ndarray  # (k,)
    tp: np.ndarray  # (k,) true positives implied by recall at that confidence (upstream)
    fp: np.ndarray  # (k,)
    conf_grid: np.ndarray  # (1000,) confidence thresholds of the curves below
    p_curve: np.ndarray  # (k, 1000) precision vs confidence at IoU 0.5
    r_curve: np.ndarray  # (k, 1000) recall vs confidence
    f1_curve: np.ndarray  # (k, 1000)
    pr_curve: np.ndarray  # (k, 1000) precision envelope vs recall (grid = conf_grid values) at IoU 0.5
    best_conf: float  # the confidence at which precision/recall/f1 are reported

    @property
    def ap50(self) -> np.ndarray:
        return self.ap[:, 0]

    @property
    def ap50_95(self) -> np.ndarray:
        return self.ap.mean(1)


def ap_per_class(
    tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray, eps: float = 1e-16
) -> ClassAP:
    """AP per class and P/R/F1 at the best smoothed mean F1, exactly as upstream utils/metrics.ap_per_class.

    tp (N, T) bool, conf (N,), pred_cls (N,) for all predictions of the dataset (in dataset order: the
    confidence sort is not stable, so order decides ties); target_cls (M,) for all labels.
    """
    tp = np.asarray(tp, dtype=bool).reshape(len(conf), -1) if len(conf) else np.zeros((0, len(IOU_THRESHOLDS)), bool)
    order = np.argsort(-np.asarray(conf))
    tp, conf, pred_cls = tp[order], np.asarray(conf)[order], np.asarray(pred_cls)[order]
    classes, counts = np.unique(np.asarray(target_cls), return_counts=True)
    k, n_thr = len(classes), tp.shape[1]

    px = np.linspace(0, 1, CURVE_POINTS)
    ap = np.zeros((k, n_thr))
    p_curve, r_curve, pr_curve = np.zeros((k, CURVE_POINTS)), np.zeros((k, CURVE_POINTS)), np.zeros((k, CURVE_POINTS))
    for ci, c in enumerate(classes):  # one pass per class; the work inside is vectorised
        sel = pred_cls == c
        n_labels, n_preds = counts[ci], sel.sum()
        if n_preds == 0 or n_labels == 0:
            continue
        tpc = tp[sel].cumsum(0)
        fpc = (1 - tp[sel]).cumsum(0)
        recall = tpc / (n_labels + eps)
        precision = tpc / (tpc + fpc)
        # confidences fall along the curve, so interpolate on the negated axis
        r_curve[ci] = np.interp(-px, -conf[sel], recall[:, 0], left=0)
        p_curve[ci] = np.interp(-px, -conf[sel], precision[:, 0], left=1)
        for j in range(n_thr):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if j == 0:
                pr_curve[ci] = np.interp(px, mrec, mpre)

    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = int(smooth(f1_curve.mean(0), 0.1).argmax()) if k else 0
    p, r, f1 = p_curve[:, best], r_curve[:, best], f1_curve[:, best]
    tp_count = (r * counts).round()
    fp_count = (tp_count / (p + eps) - tp_count).round()
    return ClassAP(
        classes=classes.astype(int),
        instances=counts.astype(int),
        ap=ap,
        precision=p,
        recall=r,
        f1=f1,
        tp=tp_count,
        fp=fp_count,
        conf_grid=px,
        p_curve=p_curve,
        r_curve=r_curve,
        f1_curve=f1_curve,
        pr_curve=pr_curve,
        best_conf=float(px[best]),
    )


def fitness(map50: float, map50_95: float) -> float:
    """Upstream's model-selection score: 0.1 * mAP50 + 0.9 * mAP50-95."""
    return 0.1 * float(map50) + 0.9 * float(map50_95)


class ConfusionMatrix:
    """(nc+1, nc+1) counts, rows = predicted class, columns = true class; index nc is background.

    Upstream semantics: detections above `conf`, pairs with IoU > `iou_thres` (any class), best IoU per
    detection then per label. Unmatched labels count as missed (background row); unmatched detections
    count as background false positives only when the image had at least one match (upstream quirk),
    and images without labels are not counted at all (val.py only updates it where there are labels).
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.nc, self.conf, self.iou_thres = nc, conf, iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def update(self, iou: np.ndarray, label_cls: np.ndarray, pred_cls: np.ndarray, pred_conf: np.ndarray) -> None:
        """Add one image: `iou` (L, D) labels x detections, classes and detection confidences."""
        label_cls = np.asarray(label_cls).astype(int)
        keep = np.asarray(pred_conf) > self.conf
        iou = np.asarray(iou, dtype=np.float32).reshape(len(label_cls), -1)[:, keep]
        det_cls = np.asarray(pred_cls).astype(int)[keep]
        li, di = np.nonzero(iou > self.iou_thres)
        matches = np.stack([li, di, iou[li, di]], axis=1).astype(np.float32)
        if len(li) > 1:
            matches = matches[matches[:, 2].argsort()[::-1]]
            matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
            matches = matches[matches[:, 2].argsort()[::-1]]
            matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
        m_label, m_det = matches[:, 0].astype(int), matches[:, 1].astype(int)
        np.add.at(self.matrix, (det_cls[m_det], label_cls[m_label]), 1)
        missed = np.ones(len(label_cls), dtype=bool)
        missed[m_label] = False
        np.add.at(self.matrix, (self.nc, label_cls[missed]), 1)
        if len(m_label):
            unmatched = np.ones(len(det_cls), dtype=bool)
            unmatched[m_det] = False
            np.add.at(self.matrix, (det_cls[unmatched], self.nc), 1)

    def update_missed(self, label_cls: np.ndarray) -> None:
        """An image with labels and no detections at all: every label is a miss."""
        np.add.at(self.matrix, (self.nc, np.asarray(label_cls).astype(int)), 1)

    def normalized(self) -> np.ndarray:
        """Column-normalised matrix (each true class sums to 1), as upstream plots it."""
        return self.matrix / (self.matrix.sum(0, keepdims=True) + 1e-9)
