"""Box formats, the IoU family and non-maximum suppression, with upstream YOLOv5 semantics.

Format converters and clipping accept a torch tensor or a numpy array (`...x4`) and return the same kind;
evaluation works in numpy, the model and loss in torch. Nothing here loops over boxes in Python.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

Boxes = torch.Tensor | np.ndarray


def _copy(x: Boxes) -> Boxes:
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xywh2xyxy(x: Boxes) -> Boxes:
    """[cx, cy, w, h] -> [x1, y1, x2, y2]."""
    y = _copy(x)
    half_w, half_h = x[..., 2] / 2, x[..., 3] / 2
    y[..., 0] = x[..., 0] - half_w
    y[..., 1] = x[..., 1] - half_h
    y[..., 2] = x[..., 0] + half_w
    y[..., 3] = x[..., 1] + half_h
    return y


def xyxy2xywh(x: Boxes) -> Boxes:
    """[x1, y1, x2, y2] -> [cx, cy, w, h]."""
    y = _copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywhn2xyxy(x: Boxes, w: float = 640, h: float = 640, padw: float = 0, padh: float = 0) -> Boxes:
    """Normalised [cx, cy, w, h] -> pixel [x1, y1, x2, y2] in a w x h image shifted by (padw, padh)."""
    y = _copy(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x: Boxes, w: float = 640, h: float = 640, clip: bool = False, eps: float = 0.0) -> Boxes:
    """Pixel [x1, y1, x2, y2] -> normalised [cx, cy, w, h]; clip=True clips `x` IN PLACE first (as upstream)."""
    if clip:
        clip_boxes(x, (h - eps, w - eps))
    y = _copy(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_boxes(boxes: Boxes, shape: Sequence[float]) -> Boxes:
    """Clip xyxy boxes in place to an image of shape (height, width); returns `boxes` too."""
    h, w = shape[0], shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes(
    img1_shape: Sequence[int],
    boxes: Boxes,
    img0_shape: Sequence[int],
    ratio_pad: tuple | None = None,
) -> Boxes:
    """Map xyxy boxes IN PLACE from a letterboxed img1 (h, w) back to the original img0 (h, w), clipped.

    ratio_pad = ((rw, rh), (padw, padh)) from the loader overrides the gain/pad computed from the shapes.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = (img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain, pad = ratio_pad[0][0], ratio_pad[1]
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., :4] /= gain
    return clip_boxes(boxes, img0_shape)


def box_iou(box1: Boxes, box2: Boxes, eps: float = 1e-7) -> Boxes:
    """Pairwise IoU (N, M) of xyxy boxes box1 (N, 4) and box2 (M, 4); numpy in, numpy out."""
    if isinstance(box1, np.ndarray):
        return box_iou(torch.from_numpy(box1), torch.from_numpy(np.asarray(box2)), eps).numpy()
    lt = torch.max(box1[:, None, :2], box2[None, :, :2])
    rb = torch.min(box1[:, None, 2:4], box2[None, :, 2:4])
    inter = (rb - lt).clamp(0).prod(2)
    area1 = (box1[:, 2:4] - box1[:, :2]).prod(1)
    area2 = (box2[:, 2:4] - box2[:, :2]).prod(1)
    return inter / (area1[:, None] + area2[None, :] - inter + eps)


def bbox_iou(
    box1: torch.Tensor,
    box2: torch.Tensor,
    xywh: bool = True,
    GIoU: bool = False,  # noqa: N803 - upstream's flag names, which users of the loss know
    DIoU: bool = False,  # noqa: N803
    CIoU: bool = False,  # noqa: N803
    eps: float = 1e-7,
) -> torch.Tensor:
    """Elementwise (broadcast) IoU / GIoU / DIoU / CIoU of box1 (..., 4) and box2 (..., 4) -> (..., 1)."""
    if xywh:
        (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.chunk(4, -1), box2.chunk(4, -1)
        b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
        b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    else:
        b1_x1, b1_y1, b1_x2, b1_y2 = box1.chunk(4, -1)
        b2_x1, b2_y1, b2_x2, b2_y2 = box2.chunk(4, -1)
        w1, h1 = b1_x2 - b1_x1, (b1_y2 - b1_y1).clamp(eps)
        w2, h2 = b2_x2 - b2_x1, (b2_y2 - b2_y1).clamp(eps)

    inter = (b1_x2.minimum(b2_x2) - b1_x1.maximum(b2_x1)).clamp(0) * (
        b1_y2.minimum(b2_y2) - b1_y1.maximum(b2_y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou
    enclose_w = b1_x2.maximum(b2_x2) - b1_x1.minimum(b2_x1)
    enclose_h = b1_y2.maximum(b2_y2) - b1_y1.minimum(b2_y1)
    if GIoU and not (DIoU or CIoU):
        enclose_area = enclose_w * enclose_h + eps
        return iou - (enclose_area - union) / enclose_area
    diagonal2 = enclose_w**2 + enclose_h**2 + eps
    center_dist2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    if not CIoU:
        return iou - center_dist2 / diagonal2
    aspect = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():  # alpha is a weight, not a path for gradients (as in the CIoU paper's code)
        alpha = aspect / (aspect - iou + (1 + eps))
    return iou - (center_dist2 / diagonal2 + aspect * alpha)


@functools.cache
def nms_kernel() -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """torchvision's NMS operator (boxes xyxy, scores, IoU threshold -> kept indices, by score), loaded
    from torchvision's compiled library alone. Importing the torchvision package would load the same
    library but also pull in torch._dynamo through torchvision.ops: about 2 s on a 2-core CPU, a seventh
    of a whole coco128 evaluation. Falls back to the package where the library is not a plain `_C*.so`."""
    spec = importlib.util.find_spec("torchvision")
    folders = list(spec.submodule_search_locations or []) if spec else []
    libraries = sorted(p for folder in folders for p in Path(folder).glob("_C*.so"))
    if libraries:
        torch.ops.load_library(str(libraries[0]))
        return torch.ops.torchvision.nms
    import torchvision

    return torchvision.ops.nms


PER_CLASS_NMS_MIN = 1000  # candidates from which one kernel call per class beats a single call


def _class_offset_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_thres: float,
                      max_wh: float) -> torch.Tensor:
    """Upstream's NMS of boxes shifted by class * max_wh (no box suppresses another class's), for boxes
    sorted by descending score: kept indices in ascending order (= by score, ties by position: the kernel
    sorts stably).

    The kernel compares each kept box with every later candidate, so a single call on N candidates of
    80 classes spends most of its time on pairs that cannot overlap: early in fine-tuning, coco128 at
    conf 0.001 gives tens of thousands of candidates and NMS cost more than the forward pass. Run per
    class instead, the answer is the same whenever the shifted boxes of different classes cannot overlap,
    that is when all coordinates span less than max_wh (checked; otherwise the single call)."""
    kernel = nms_kernel()
    shifted = boxes + classes[:, None] * max_wh  # per class too: the shift rounds coordinates, as upstream's
    if max_wh == 0 or len(boxes) < PER_CLASS_NMS_MIN or not float(boxes.max() - boxes.min()) < max_wh - 1:
        return kernel(shifted, scores, iou_thres)
    order = torch.argsort(classes, stable=True)  # grouped by class, ascending position within each
    counts = torch.unique_consecutive(classes[order], return_counts=True)[1].tolist()
    kept = [group[kernel(shifted[group], scores[group], iou_thres)] for group in order.split(counts)]
    return torch.cat(kept).sort().values


def non_max_suppression(
    prediction: torch.Tensor | Sequence[torch.Tensor],
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
    max_nms: int = 30000,
    max_wh: int = 7680,
) -> list[torch.Tensor]:
    """Per-image NMS of decoded predictions (bs, N, 5+nc) [cx, cy, w, h, obj, cls...] -> (n, 6) xyxy/conf/cls.

    Upstream's order of operations: keep obj > conf_thres; class scores *= obj; with multi_label every
    (box, class) pair scoring > conf_thres (only when nc > 1), else the best class; class filter; sort by
    score, keep max_nms; NMS per class via a class * max_wh offset; keep max_det. Upstream's wall-clock
    time limit is deliberately left out: results must not depend on how busy the machine is.
    """
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres {conf_thres} and iou_thres {iou_thres} must lie in [0, 1]")
    if isinstance(prediction, (list, tuple)):  # eval forward returns (decoded, raw maps)
        prediction = prediction[0]
    device = prediction.device
    if device.type == "mps":  # torchvision nms is incomplete on MPS
        prediction = prediction.cpu()
    nc = prediction.shape[2] - 5
    multi_label = multi_label and nc > 1
    candidates = prediction[..., 4] > conf_thres
    class_filter = None if classes is None else torch.tensor(classes, device=prediction.device)

    output = []
    for image_pred, keep in zip(prediction, candidates, strict=True):
        x = image_pred[keep]  # a copy: the in-place score product below leaves `prediction` alone
        if not x.shape[0]:
            output.append(torch.zeros((0, 6), device=device))
            continue
        x[:, 5:] *= x[:, 4:5]
        box = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (x[:, 5:] > conf_thres).nonzero(as_tuple=False).T
            x = torch.cat((box[i], x[i, 5 + j, None], j[:, None].float()), 1)
        else:
            conf, j = x[:, 5:].max(1, keepdim=True)
            x = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
        if class_filter is not None:
            x = x[(x[:, 5:6] == class_filter).any(1)]
        if not x.shape[0]:
            output.append(torch.zeros((0, 6), device=device))
            continue
        x = x[x[:, 4].argsort(descending=True)[:max_nms]]
        kept = _class_offset_nms(x[:, :4], x[:, 4], x[:, 5], iou_thres, 0 if agnostic else max_wh)[:max_det]
        output.append(x[kept].to(device))
    return output
