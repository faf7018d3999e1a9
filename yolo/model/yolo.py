"""DetectionModel: a YOLOv5 cfg dict turned into modules by one builder, plus the Detect head."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from yolo.errors import UserError, did_you_mean, one_line
from yolo.limits import (
    MAX_ANCHORS_PER_LEVEL,
    MAX_CFG_LAYERS,
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_FEATURE_ELEMENTS,
    MAX_LAYER_REPEATS,
    MAX_PARAMETERS,
)
from yolo.model.layers import C3, SPP, SPPF, Bottleneck, Concat, Conv, Focus
from yolo.untrusted import check_data_tree, short_repr

STRIDE_PROBE_SIZE = 256  # upstream's dummy input size for measuring the strides


class Detect(nn.Module):
    """One 1x1 conv per level; eval mode decodes the maps to (cx, cy, w, h) pixels, objectness, classes."""

    def __init__(self, nc: int = 80, anchors: Sequence[Sequence[float]] = (), ch: Sequence[int] = ()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5  # outputs per anchor
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self._grids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stride = torch.ones(self.nl, device="cpu")  # set by DetectionModel from a dummy forward

    @property
    def stride(self) -> torch.Tensor:
        return self._stride

    @stride.setter
    def stride(self, value: torch.Tensor) -> None:
        # a plain attribute as upstream (not in the state dict); python floats avoid a device sync per batch
        self._stride = value
        self._stride_floats = [float(s) for s in value.detach().cpu()]
        self._grids = {}

    def forward(self, xs: list[torch.Tensor]):
        maps, decoded = [], []
        for i in range(self.nl):
            x = self.m[i](xs[i])
            bs, _, ny, nx = x.shape
            # (bs, na*no, ny, nx) -> (bs, na, ny, nx, no), the layout the loss and decode index
            x = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            maps.append(x)
            if not self.training:
                decoded.append(self._decode(i, x).view(bs, -1, self.no))
        return maps if self.training else (torch.cat(decoded, 1), maps)

    def _decode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        # Upstream: xy = (2*sig - 0.5 + cell) * stride, wh = (2*sig)^2 * anchor_px. Strides are powers of
        # two, so folding them into the grid and anchor tensors gives bit-identical results.
        tracing = _is_tracing()
        ny, nx = x.shape[2], x.shape[3]
        if tracing:  # exporters must record the grid ops, not a cached constant of one input size
            grid_px, anchor4_px = self._make_grid(i, ny, nx, x.dtype, x.device)
        else:
            grid_px, anchor4_px = self._grid(i, ny, nx, x.dtype, x.device)
        y = x.sigmoid()
        stride2 = self._stride_floats[i] * 2.0
        if tracing or torch.is_grad_enabled():
            xy = y[..., :2] * stride2 + grid_px
            wh = y[..., 2:4].square() * anchor4_px
            return torch.cat((xy, wh, y[..., 4:]), -1)
        y[..., :2].mul_(stride2).add_(grid_px)  # in place: no copies of the whole map per batch
        y[..., 2:4].square_().mul_(anchor4_px)
        return y

    def _grid(self, i: int, ny: int, nx: int, dtype: torch.dtype, device: torch.device):
        """Cached _make_grid; the anchors' version counter changes on any in-place edit (load, autoanchor)."""
        key = (i, ny, nx, dtype, device, self.anchors.data_ptr(), _version(self.anchors))
        cached = self._grids.get(key)
        if cached is None:
            if len(self._grids) > 64:  # many image shapes (rect batches): keep the cache bounded
                self._grids.clear()
            cached = self._grids[key] = self._make_grid(i, ny, nx, dtype, device)
        return cached

    def _make_grid(self, i: int, ny: int, nx: int, dtype: torch.dtype, device: torch.device):
        """(cell - 0.5) * stride as (1, 1, ny, nx, 2) and 4 * anchor px as (1, na, 1, 1, 2)."""
        stride = self._stride_floats[i]
        ys = torch.arange(ny, device=device, dtype=torch.float32)
        xs = torch.arange(nx, device=device, dtype=torch.float32)
        yv, xv = torch.meshgrid(ys, xs, indexing="ij")
        grid_px = ((torch.stack((xv, yv), 2) - 0.5) * stride).view(1, 1, ny, nx, 2).to(dtype)
        anchor4_px = (self.anchors[i].float() * (stride * 4.0)).view(1, self.na, 1, 1, 2).to(device, dtype)
        return grid_px, anchor4_px

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half()/.cuda() must move `stride` (a plain attribute, as upstream) and drop stale grids
        super()._apply(fn, *args, **kwargs)
        self.stride = fn(self.stride)
        return self

    def anchors_px(self) -> list[list[float]]:
        """Anchors in pixels, one row [w, h, w, h, ...] per level (the cfg/anchors.json layout)."""
        px = self.anchors.detach().float().cpu() * self.stride.float().cpu().view(-1, 1, 1)
        return [[round(v, 4) for v in row] for row in px.view(self.nl, -1).tolist()]

    @torch.no_grad()
    def set_anchors_px(self, anchors: Sequence[Sequence[float]]) -> None:
        """Replace the anchors by pixel anchors (one row per level), in stride units, order-checked."""
        new = torch.tensor(anchors, dtype=torch.float32)
        if new.numel() != self.anchors.numel():
            raise UserError(f"anchors of shape {tuple(new.shape)} do not fit a Detect head of "
                            f"{self.nl} levels x {self.na} anchors")
        new = new.view(self.anchors.shape)
        self.anchors.copy_(new.to(self.anchors))
        check_anchor_order(self)  # in pixels, as upstream: in stride units the level order can look reversed
        self.anchors /= self.stride.to(self.anchors).view(-1, 1, 1)
        self._grids = {}


def _is_tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter
        return -1


def check_anchor_order(detect: Detect) -> None:
    """Flip the anchor levels if their size order disagrees with the stride order (as upstream)."""
    if detect.anchors.is_meta:  # shape-only model (parameter counting): nothing to order
        return
    area = detect.anchors.prod(-1).mean(-1).view(-1)
    stride = detect.stride.to(area.device)
    d_area, d_stride = area[-1] - area[0], stride[-1] - stride[0]
    if d_area and (d_area.sign() != d_stride.sign()):
        detect.anchors[:] = detect.anchors.flip(0)


def make_divisible(x: float, divisor: int) -> int:
    """The smallest multiple of divisor that is >= x."""
    return math.ceil(x / divisor) * divisor


LAYERS: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "SPPF": SPPF,
    "SPP": SPP,
    "Focus": Focus,
    "Concat": Concat,
    "nn.Upsample": nn.Upsample,
    "Detect": Detect,
}
CHANNEL_LAYERS = (Conv, Bottleneck, C3, SPPF, SPP, Focus)  # args[0] is the output width to scale
REPEAT_INSIDE = (C3,)  # the repeat count is an argument, not copies of the layer
WORDS = {"None": None, "True": True, "False": False}


def _resolve_arg(arg: Any, cfg: dict) -> Any:
    """Yaml strings that upstream would eval(): 'nc', 'anchors', 'None'; any other string stays a string."""
    if isinstance(arg, str):
        if arg in ("nc", "anchors"):
            return cfg[arg]
        return WORDS.get(arg, arg)
    return arg


def _placeholder_anchors(na: int, nl: int) -> list[list[int]]:
    return [list(range(na * 2))] * nl  # upstream's meaning of an integer `anchors` (autoanchor fills it)


def parse_model(cfg: dict, ch: int) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a cfg dict; returns (nn.Sequential, indices of outputs kept for later layers)."""
    for key in ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head"):
        if key not in cfg:
            raise UserError(f"model cfg has no `{key}`")
    nc, gd, gw = cfg["nc"], cfg["depth_multiple"], cfg["width_multiple"]
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise UserError(f"model cfg: nc must be a positive integer, got {short_repr(nc)}")
    if nc > MAX_CLASSES:
        raise UserError(f"model cfg: nc is {nc}, more than the {MAX_CLASSES} classes a model may have")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in (gd, gw)):
        raise UserError(f"model cfg: depth_multiple/width_multiple must be positive finite numbers, got "
                        f"{short_repr(gd)}, {short_repr(gw)}")
    act = cfg.get("activation")
    if act not in (None, "nn.SiLU()"):
        raise UserError(f"model cfg: activation {short_repr(act)} is not supported (only nn.SiLU())")
    anchors = cfg["anchors"]
    na = anchors if isinstance(anchors, int) else len(anchors[0]) // 2 if _is_anchor_rows(anchors) else None
    if not na or isinstance(na, bool) or not 0 < na <= MAX_ANCHORS_PER_LEVEL:
        raise UserError(f"model cfg: anchors must be rows of [w, h, ...] pixels per level or a count of at most "
                        f"{MAX_ANCHORS_PER_LEVEL}, got {short_repr(anchors)}")
    no = na * (nc + 5)
    layer_rows = cfg["backbone"] + cfg["head"] if isinstance(cfg["backbone"], list) and isinstance(
        cfg["head"], list) else None
    if not layer_rows:
        raise UserError("model cfg: backbone and head must be lists of [from, number, module, args]")
    if len(layer_rows) > MAX_CFG_LAYERS:
        raise UserError(f"model cfg: {len(layer_rows)} layers, more than the {MAX_CFG_LAYERS} a model may have")

    if not isinstance(ch, int) or isinstance(ch, bool) or not 0 < ch <= MAX_CHANNELS:
        raise UserError(f"model cfg: ch (input channels) must be an integer in 1..{MAX_CHANNELS}, got {short_repr(ch)}")
    layers, save, channels = [], [], [ch]
    budget = _ProbeBudget(sides=[STRIDE_PROBE_SIZE])
    for i, row in enumerate(layer_rows):
        where = _where(cfg, i)
        if not (isinstance(row, list) and len(row) == 4):
            raise UserError(f"model cfg {where}: expected [from, number, module, args], got {short_repr(row)}")
        frm, n, name, args = row
        if name not in LAYERS:
            raise UserError(f"model cfg {where}: unknown module {short_repr(name)}"
                            f"{did_you_mean(str(name)[:80], LAYERS)}; "
                            f"known: {', '.join(LAYERS)}")
        module_cls = LAYERS[name]
        froms = [frm] if isinstance(frm, int) else frm
        if not (isinstance(froms, list) and froms and all(isinstance(f, int) and -i <= f < i or f == -1
                                                          for f in froms)):
            raise UserError(f"model cfg {where}: `from` must name earlier layers, got {short_repr(frm)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UserError(f"model cfg {where}: `number` must be a positive integer, got {short_repr(n)}")
        if not isinstance(args, list):
            raise UserError(f"model cfg {where}: args must be a list, got {short_repr(args)}")
        args = [_resolve_arg(a, cfg) for a in args]
        n = max(round(min(n, MAX_LAYER_REPEATS + 1) * gd), 1) if n > 1 else n
        if n > MAX_LAYER_REPEATS:
            raise UserError(f"model cfg {where}: repeats {name} more than {MAX_LAYER_REPEATS} times "
                            "(after depth_multiple)")
        chans = [channels[f + 1] if f >= 0 else channels[f] for f in froms]  # channels[0] is the input
        try:
            if module_cls in CHANNEL_LAYERS:
                c1, c2 = chans[0], args[0]
                if c2 != no:
                    c2 = make_divisible(c2 * gw, 8)
                args = [c1, c2, *args[1:]]
                if module_cls in REPEAT_INSIDE:
                    args.insert(2, n)
                    n = 1
            elif module_cls is Concat:
                c2 = sum(chans)
            elif module_cls is Detect:
                if len(args) < 2:
                    raise UserError(f"model cfg {where}: Detect needs [nc, anchors]")
                if isinstance(args[1], int) and 0 < args[1] <= MAX_ANCHORS_PER_LEVEL:
                    args[1] = _placeholder_anchors(args[1], len(froms))
                if not _is_anchor_rows(args[1]) or len(args[1]) != len(froms):
                    raise UserError(f"model cfg {where}: Detect needs one anchor row per input level "
                                    f"({len(froms)}), got {short_repr(args[1])}")
                args = [args[0], args[1], chans]
                c2 = no
            else:
                c2 = chans[0]
            if module_cls is not Detect and not (isinstance(c2, int) and 0 < c2 <= MAX_CHANNELS):
                raise UserError(f"model cfg {where}: {name} would have {short_repr(c2)} output channels, "
                                f"expected 1..{MAX_CHANNELS}")
            def build(module_cls=module_cls, args=args, n=n) -> nn.Module:
                return nn.Sequential(*(module_cls(*args) for _ in range(n))) if n > 1 else module_cls(*args)

            with torch.device("meta"):  # shapes only, nothing allocated: the budget is checked first
                shape_only = build()
            budget.check(where, shape_only, froms, chans, c2)
            module = build()
        except UserError:
            raise
        except (TypeError, ValueError, IndexError, RuntimeError, OverflowError) as e:
            raise UserError(f"model cfg {where}: cannot build {name} with args {short_repr(args)}: "
                            f"{one_line(e)}") from None
        module.i, module.f, module.type = i, frm, name  # upstream's bookkeeping, used by forward
        save.extend(f % i for f in froms if f != -1)
        layers.append(module)
        channels.append(c2)
    if not isinstance(layers[-1], Detect):
        raise UserError("model cfg: the last head layer must be Detect")
    return nn.Sequential(*layers), sorted(set(save))


@dataclass
class _ProbeBudget:
    """What the model built so far costs: parameters, and the side of each output on the stride probe
    (a STRIDE_PROBE_SIZE square), so each layer is refused before it is allocated or run."""

    sides: list[int]
    params: int = 0

    def check(self, where: str, shape_only: nn.Module, froms: list[int], chans: list[int], c2: int) -> None:
        self.params += sum(p.numel() for p in shape_only.parameters())
        if self.params > MAX_PARAMETERS:
            raise UserError(f"model cfg {where}: the model would have more than {MAX_PARAMETERS} parameters")
        convs = [m for m in shape_only.modules() if isinstance(m, nn.Conv2d)]
        if not isinstance(shape_only, Detect) and any(
                max(c.in_channels, c.out_channels) > MAX_CHANNELS for c in convs):
            raise UserError(f"model cfg {where}: a convolution wider than {MAX_CHANNELS} channels")
        side_in = max(self.sides[f + 1] if f >= 0 else self.sides[f] for f in froms)
        side_out = _probe_side(shape_only, side_in)
        widest = max([c2, *chans, *(c.out_channels for c in convs)])
        if widest * max(side_in, side_out) ** 2 > MAX_FEATURE_ELEMENTS:
            raise UserError(f"model cfg {where}: would make a feature map of {widest} x {max(side_in, side_out)}^2 "
                            f"values on the {STRIDE_PROBE_SIZE} px stride probe, more than {MAX_FEATURE_ELEMENTS}")
        self.sides.append(side_out)


def _conv_side(conv: nn.Conv2d, side: int) -> int:
    if isinstance(conv.padding, str):  # 'same' keeps the size (stride 1 only); 'valid' pads nothing
        padding = (None, None) if conv.padding == "same" else (0, 0)
    else:
        padding = conv.padding
    return max(side if p is None else (side + 2 * p - d * (k - 1) - 1) // s + 1
               for k, s, p, d in zip(conv.kernel_size, conv.stride, padding, conv.dilation, strict=True))


def _probe_side(m: nn.Module, side: int) -> int:
    """The side of a layer's output for a square input of `side` px: only Conv/Focus (their conv's
    kernel, stride, padding) and Upsample change it; the other layers' insides all run at stride 1."""
    if isinstance(m, nn.Sequential):
        for child in m:
            side = _probe_side(child, side)
        return side
    if isinstance(m, Conv):
        return _conv_side(m.conv, side)
    if isinstance(m, Focus):  # space-to-depth halves the side, then a Conv
        return _conv_side(m.conv.conv, (side + 1) // 2)
    if isinstance(m, nn.Upsample):
        if m.size is not None:
            return max(m.size) if isinstance(m.size, (tuple, list)) else int(m.size)
        factor = max(m.scale_factor) if isinstance(m.scale_factor, (tuple, list)) else m.scale_factor
        return math.floor(side * float(factor))
    return side


def _is_anchor_rows(anchors: Any) -> bool:
    return (isinstance(anchors, (list, tuple)) and len(anchors) > 0
            and all(isinstance(r, (list, tuple)) and len(r) >= 2 and len(r) % 2 == 0
                    and len(r) == len(anchors[0]) and all(isinstance(v, (int, float)) for v in r)
                    for r in anchors))


def _where(cfg: dict, i: int) -> str:
    nb = len(cfg["backbone"])
    return f"backbone layer {i}" if i < nb else f"head layer {i - nb} (model.{i})"



class DetectionModel(nn.Module):
    """YOLOv5 detection model built from a cfg dict; `nc`/`anchors` override the cfg's."""

    def __init__(self, cfg: dict, ch: int = 3, nc: int | None = None, anchors: Any = None):
        super().__init__()
        if not isinstance(cfg, dict):
            raise UserError(f"model cfg must be a mapping, got {type(cfg).__name__}")
        check_data_tree(cfg, "model cfg")  # before copying or printing it: no cycles, no huge shared trees
        self.yaml = copy.deepcopy(cfg)
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml.get("nc"):
            self.yaml["nc"] = int(nc)
        if anchors:
            self.yaml["anchors"] = anchors if isinstance(anchors, int) else [
                [round(float(v), 4) for v in row] for row in anchors]
        self.model, self.save = parse_model(copy.deepcopy(self.yaml), ch)
        self.names = [str(i) for i in range(self.yaml["nc"])]

        detect = self.model[-1]
        probe = torch.zeros(1, ch, STRIDE_PROBE_SIZE, STRIDE_PROBE_SIZE)
        try:
            with torch.no_grad():
                maps = self.forward(probe)  # training mode: raw maps, one per level
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise UserError(f"model cfg does not build a runnable network: {one_line(e)}") from None
        detect.stride = torch.tensor([STRIDE_PROBE_SIZE / m.shape[-2] for m in maps], device="cpu")
        check_anchor_order(detect)
        detect.anchors /= detect.stride.to(detect.anchors.device).view(-1, 1, 1)
        self.stride = detect.stride
        self._initialize_biases()

    def forward(self, x: torch.Tensor):
        outputs: list[torch.Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    @torch.no_grad()
    def _initialize_biases(self) -> None:
        # priors: ~8 objects per 640x640 image at each level; class probability 0.6 spread over nc
        detect = self.detect
        for conv, s in zip(detect.m, detect.stride, strict=True):
            b = conv.bias.view(detect.na, -1)
            b[:, 4] += math.log(8 / (640 / float(s)) ** 2)
            b[:, 5:5 + detect.nc] += math.log(0.6 / (detect.nc - 0.99))

    def fuse(self) -> DetectionModel:
        """Fold every BatchNorm into its conv (inference only); returns self."""
        for m in self.model.modules():
            if isinstance(m, Conv):
                m.fuse_bn()
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.stride = self.detect.stride
        return self


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
