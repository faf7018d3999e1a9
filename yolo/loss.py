"""The YOLOv5 training loss (upstream ComputeLoss semantics), vectorised over targets.

Targets are matched to anchors by width/height ratio (< hyp.anchor_t) on every level, and each match is
also assigned to the two neighbouring cells nearest the target centre (offset 0.5), which triples the
positives. Box: 1 - CIoU. Objectness: BCE towards the detached, clamped CIoU of each positive (gr = 1).
Classes: BCE with (optionally smoothed) one-hot targets. Level balance [4.0, 1.0, 0.4] for P3-P5.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from yolo.boxes import bbox_iou
from yolo.hyp import Hyp

# Objectness weight per output level, small strides first (upstream: P3-P5, or P3-P7 for 5 levels).
_BALANCE = {3: [4.0, 1.0, 0.4]}
_BALANCE_DEFAULT = [4.0, 1.0, 0.25, 0.06, 0.02]

# Cell offsets (in cells, times 0.5): the target's own cell, then left, up, right, down neighbours.
_NEIGHBOUR_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32) * 0.5


def smooth_bce_targets(eps: float = 0.0) -> tuple[float, float]:
    """Positive and negative BCE targets under label smoothing eps: (1 - eps/2, eps/2)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


def scale_loss_gains(hyp: Hyp, nl: int, nc: int, imgsz: int) -> Hyp:
    """Upstream train.py's scaling of box/cls/obj gains to the number of levels, classes and image size."""
    levels = 3 / nl
    return hyp.replace(
        box=hyp.box * levels,
        cls=hyp.cls * nc / 80 * levels,
        obj=hyp.obj * (imgsz / 640) ** 2 * levels,
    )


class FocalLoss(nn.Module):
    """Focal loss around a BCEWithLogitsLoss (TF addons formulation, alpha 0.25), as upstream."""

    def __init__(self, bce: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.bce, self.gamma, self.alpha = bce, gamma, alpha
        self.reduction = bce.reduction
        self.bce.reduction = "none"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.bce(logits, target)
        prob = logits.sigmoid()
        p_t = target * prob + (1 - target) * (1 - prob)
        loss = loss * (target * self.alpha + (1 - target) * (1 - self.alpha)) * (1.0 - p_t) ** self.gamma
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss


def detect_head(model: nn.Module) -> nn.Module:
    """The Detect module of a DetectionModel, unwrapping DDP/DataParallel (`.module`)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
        hasattr(model, "module") and not hasattr(model, "model")
    ):
        model = model.module
    return model.model[-1]


@dataclasses.dataclass
class _LevelTargets:
    image: torch.Tensor  # (n,) long
    anchor: torch.Tensor  # (n,) long
    gj: torch.Tensor  # (n,) long, cell row
    gi: torch.Tensor  # (n,) long, cell column
    box: torch.Tensor  # (n, 4) xy offset within the cell, wh in cells
    anchor_wh: torch.Tensor  # (n, 2) in cells
    cls: torch.Tensor  # (n,) long


class YoloLoss:
    """loss(preds, targets) -> (total * batch_size, detached [box, obj, cls]).

    `hyp` gains are used as given: apply `scale_loss_gains` first, as training does. The Detect anchors
    are referenced, not copied, so later in-place anchor updates (autoanchor) are seen.
    """

    def __init__(self, model: nn.Module, hyp: Hyp, label_smoothing: float = 0.0):
        head = detect_head(model)
        self.na, self.nl, self.nc = int(head.na), int(head.nl), int(head.nc)
        self.anchors = head.anchors  # (nl, na, 2) in stride units
        self.hyp = hyp
        self.balance = _BALANCE.get(self.nl, _BALANCE_DEFAULT)
        self.cls_pos, self.cls_neg = smooth_bce_targets(label_smoothing)
        device = self.anchors.device
        bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp.cls_pw], device=device))
        bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp.obj_pw], device=device))
        if hyp.fl_gamma > 0:
            bce_cls, bce_obj = FocalLoss(bce_cls, hyp.fl_gamma), FocalLoss(bce_obj, hyp.fl_gamma)
        self.bce_cls, self.bce_obj = bce_cls, bce_obj

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = preds[0].device
        lbox = torch.zeros((), device=device)
        lobj = torch.zeros((), device=device)
        lcls = torch.zeros((), device=device)
        for level, (pi, t) in enumerate(zip(preds, self.build_targets(preds, targets.to(device)), strict=True)):
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=device)
            n = t.image.shape[0]
            if n:
                ps = pi[t.image, t.anchor, t.gj, t.gi]  # (n, 5 + nc): the predictions at the positives
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * t.anchor_wh
                iou = bbox_iou(torch.cat((pxy, pwh), 1), t.box, CIoU=True).squeeze(-1)
                lbox = lbox + (1.0 - iou).mean()
                # several positives may share one cell and anchor: like upstream, the last write wins
                tobj[t.image, t.anchor, t.gj, t.gi] = iou.detach().clamp(0).to(tobj.dtype)
                if self.nc > 1:  # a single class needs no class loss
                    cls_target = torch.full_like(ps[:, 5:], self.cls_neg)
                    cls_target[torch.arange(n, device=device), t.cls] = self.cls_pos
                    lcls = lcls + self.bce_cls(ps[:, 5:], cls_target)
            lobj = lobj + self.bce_obj(pi[..., 4], tobj) * self.balance[level]
        lbox = lbox * self.hyp.box
        lobj = lobj * self.hyp.obj
        lcls = lcls * self.hyp.cls
        batch_size = preds[0].shape[0]
        return (lbox + lobj + lcls) * batch_size, torch.stack((lbox, lobj, lcls)).detach()

    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor) -> list[_LevelTargets]:
        """Positives per level: targets (n, 6) [image, class, cx, cy, w, h] matched to anchors and cells."""
        device = targets.device
        na, nt = self.na, targets.shape[0]
        anchor_index = torch.arange(na, device=device, dtype=targets.dtype).view(na, 1).expand(na, nt)
        # (na, nt, 7): every target once per anchor, with the anchor index as the last column
        per_anchor = torch.cat((targets.expand(na, nt, 6), anchor_index[..., None]), 2)
        offsets_all = _NEIGHBOUR_OFFSETS.to(device=device, dtype=targets.dtype)
        out = []
        for level in range(self.nl):
            anchors = self.anchors[level].to(targets.dtype)
            ny, nx = preds[level].shape[2:4]
            to_grid = torch.tensor([1, 1, nx, ny, nx, ny, 1], device=device, dtype=targets.dtype)
            t = per_anchor * to_grid
            # keep (anchor, target) pairs whose w and h are both within anchor_t times the anchor's
            ratio = t[..., 4:6] / anchors[:, None]
            t = t[torch.max(ratio, 1 / ratio).max(2).values < self.hyp.anchor_t]
            xy = t[:, 2:4]
            xy_from_far_side = to_grid[[2, 3]] - xy
            near_low = ((xy % 1 < 0.5) & (xy > 1)).T  # (2, m): left / upper neighbour cell also gets it
            near_high = ((xy_from_far_side % 1 < 0.5) & (xy_from_far_side > 1)).T
            use = torch.cat((torch.ones_like(near_low[:1]), near_low, near_high))  # (5, m)
            t = t.repeat(5, 1, 1)[use]
            offsets = (torch.zeros_like(xy)[None] + offsets_all[:, None])[use]

            xy, wh = t[:, 2:4], t[:, 4:6]
            cell = (xy - offsets).long()
            # clamp the cell into the grid; the box offset is taken from the clamped cell, as upstream
            cell[:, 0].clamp_(0, nx - 1)
            cell[:, 1].clamp_(0, ny - 1)
            a = t[:, 6].long()
            out.append(
                _LevelTargets(
                    image=t[:, 0].long(),
                    anchor=a,
                    gj=cell[:, 1],
                    gi=cell[:, 0],
                    box=torch.cat((xy - cell, wh), 1),
                    anchor_wh=anchors[a],
                    cls=t[:, 1].long(),
                )
            )
        return out
