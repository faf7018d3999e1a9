"""One way for predict and evaluate to run a detection model, whatever file it came in.

`load_backend(weights, device)` returns a `Backend`: call it on a (bs, 3, h, w) float batch in 0..1 and get
the decoded (bs, N, 5+nc) tensor that NMS takes, as DetectionModel's eval forward gives. The file decides
the runtime:

- a checkpoint (`.pt`, ours or upstream's, an official name or a URL): the safe loaders of
  yolo.model.checkpoint, BN-fused, fp32 (fp16 with half=True on CUDA);
- `.onnx`: onnxruntime (CUDA provider when the device is a GPU and the runtime has it);
- `.torchscript` (or any TorchScript archive): torch.jit.load.

Exported models keep the shape they were exported with unless exported with `--dynamic`. A batch for a
fixed-shape model is split into the exported batch size, and each image is padded at the bottom and right
(grey 114, the letterbox colour) up to the exported height and width: box coordinates keep their origin, so
callers scale boxes back with the unpadded shape as usual. Exported models are programs (graphs and
TorchScript code), not data: load only files you trust, as you would a Python script.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import math
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from yolo.errors import UserError

LOG = logging.getLogger(__name__)
ONNX_OPSET = 17  # `export --opset` default, and the opset evaluate's in-memory export uses
PAD_VALUE = 114 / 255  # what letterbox pads with, so padding a fixed-shape input adds more of the same


@dataclass(frozen=True)
class ModelMeta:
    """What callers need besides the forward pass."""

    kind: str  # "pytorch", "onnx", "torchscript", or "onnxruntime" (a .pt run by ONNX Runtime: on_onnxruntime)
    stride: int  # the largest stride (at least 32): input sides are multiples of it
    names: list[str]
    fixed_shape: tuple[int, int, int, int] | None  # (bs, 3, h, w) an exported model accepts; None: any
    dtype: torch.dtype  # what the model takes as input


class Backend:
    """A loaded detection model: `backend(x)` -> decoded predictions; `meta` says what it is."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], meta: ModelMeta, device: torch.device,
                 module: torch.nn.Module | None = None):
        self._forward = forward
        self.meta = meta
        self.device = device
        self.module = module  # the torch model for .pt files (TTA and evaluate may want it), else None
        self._told_padding = False

    @classmethod
    def from_module(cls, model: torch.nn.Module, names=None) -> Backend:
        """A live DetectionModel (a loaded .pt, or train's EMA model) as a Backend, so that evaluate takes one
        kind of model; its dtype is the model's (fp16 after model.half())."""
        param = next(model.parameters())
        dtype = param.dtype if param.dtype in (torch.float16, torch.bfloat16) else torch.float32
        nc = int(_detect_head(model).nc)
        names = _names_list(names if names is not None else getattr(model, "names", None), nc)
        meta = ModelMeta("pytorch", max(int(model.stride.max()), 32), names, None, dtype)
        return cls(lambda x: model(x)[0], meta, param.device, module=model)

    @property
    def nc(self) -> int:
        return len(self.meta.names)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.meta.dtype)
        fixed = self.meta.fixed_shape
        if fixed is None:
            return self._forward(x)
        bs, _, h, w = fixed
        if x.shape[2] > h or x.shape[3] > w:
            raise UserError(f"the {self.meta.kind} model takes {h}x{w} images at most, got {x.shape[2]}x"
                            f"{x.shape[3]}: export it at that size (--imgsz) or with --dynamic")
        if (x.shape[2], x.shape[3]) != (h, w):
            if not self._told_padding:
                LOG.info(f"{self.meta.kind} model has a fixed {h}x{w} input: padding {x.shape[2]}x{x.shape[3]} "
                         "images at the bottom and right (export with --dynamic to run each shape as is)")
                self._told_padding = True
            x = F.pad(x, (0, w - x.shape[3], 0, h - x.shape[2]), value=PAD_VALUE)
        outputs = []
        for i in range(0, len(x), bs):
            chunk = x[i:i + bs]
            n = len(chunk)
            if n < bs:  # the last, short chunk: fill the batch with copies, keep only the real rows
                chunk = torch.cat([chunk, chunk[-1:].expand(bs - n, -1, -1, -1)])
            outputs.append(self._forward(chunk)[:n])
        return torch.cat(outputs)

    @property
    def levels(self) -> int:
        """Detection levels: the model's own for a .pt; for an export, YOLOv5's layout of strides 8, 16, ...
        up to meta.stride (3 levels for P5 models, 4 for P6)."""
        if self.module is not None and hasattr(_detect_head(self.module), "nl"):
            return int(_detect_head(self.module).nl)
        return round(math.log2(self.meta.stride)) - 2


class DecodedOutput(nn.Module):
    """Wraps a DetectionModel so that forward returns only the decoded tensor (what serving consumes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()  # the exporters restore the wrapper's mode afterwards, and train() would recurse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


ONNX_DYNAMIC_AXES = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}


def export_onnx(wrapper: nn.Module, sample: torch.Tensor, f: str | io.BytesIO, opset: int, dynamic: bool) -> None:
    """`wrapper` (a DecodedOutput) to ONNX at `f` (a path or a buffer): input `images`, output `output0`.
    The TorchScript-based exporter: torch.export's needs onnxscript and re-traces Detect's cached grids;
    the legacy one is exact here and carries dynamic axes (its deprecation notes are silenced)."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper, (sample,), f, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=["images"], output_names=["output0"], dynamic_axes=ONNX_DYNAMIC_AXES if dynamic else None,
        )  # fmt: skip


def on_onnxruntime(backend: Backend, threads: int) -> Backend:
    """A CPU PyTorch backend's model run by ONNX Runtime with `threads` intra-op threads, exported in
    memory with dynamic batch and sides (about half a second for yolov5n). On this 2-core CPU its
    kernels run yolov5n on coco128 at 640 ~1.2-1.35x faster than eager PyTorch (docs/benchmarks.md), and
    coco128's mAP moves by ~1e-7. Anything else (a GPU, an export, a model ONNX cannot take, no
    onnxruntime installed) comes back unchanged, with the reason logged."""
    if backend.meta.kind != "pytorch" or backend.device.type != "cpu" or backend.module is None:
        return backend
    try:
        import onnxruntime as ort
    except ImportError:
        LOG.info("onnxruntime is not installed: evaluating with PyTorch (pip install onnxruntime: faster on CPUs)")
        return backend
    side = 2 * backend.meta.stride
    buffer = io.BytesIO()
    try:
        export_onnx(DecodedOutput(backend.module), torch.zeros(1, 3, side, side), buffer, ONNX_OPSET, dynamic=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - a custom layer the exporter cannot take: PyTorch still can
        LOG.info(f"evaluating with PyTorch: the model does not run on onnxruntime ({str(e).splitlines()[0][:120]})")
        return backend

    def forward(x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to(torch.float32).contiguous().numpy()  # ORT reads NCHW, whatever x's layout
        return torch.from_numpy(session.run(["output0"], {"images": array})[0])

    meta = ModelMeta("onnxruntime", backend.meta.stride, backend.meta.names, None, torch.float32)
    return Backend(forward, meta, backend.device, module=backend.module)


def _detect_head(model: torch.nn.Module):
    """A DetectionModel's Detect layer (nc, nl); a stand-in model without one answers for itself."""
    layers = getattr(model, "model", None)
    return layers[-1] if isinstance(layers, torch.nn.Sequential) else model


def load_backend(weights: str | os.PathLike, device: torch.device, half: bool = False) -> Backend:
    """The backend for `weights` on `device`. half: fp16 for a .pt on CUDA (an exported model's precision
    was fixed when it was exported; half is ignored for it, with a note)."""
    path = Path(os.fspath(weights))
    if path.is_file() and path.suffix.lower() == ".onnx":
        backend = _onnx(path, device)
    elif path.is_file() and _is_torchscript(path):
        backend = _torchscript(path, device)
    else:
        return _pytorch(weights, device, half)
    if half and backend.meta.dtype != torch.float16:
        LOG.info(f"--half: {path} was exported in float32; running it in float32 (export with --half for fp16)")
    return backend


def _pytorch(weights, device: torch.device, half: bool) -> Backend:
    from yolo.model.checkpoint import load_model  # torch model code, only when a .pt is asked for

    model, ckpt = load_model(weights, device, fuse=True)
    model = model.float().eval()
    if half:
        model.half()
    return Backend.from_module(model, ckpt.get("names") if isinstance(ckpt, dict) else None)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold `<root>/code/` and `<root>/constants.pkl`; checkpoints do not."""
    if path.suffix.lower() == ".torchscript":
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


def _onnx(path: Path, device: torch.device) -> Backend:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"{path}: running ONNX models needs onnxruntime (a dependency): pip install onnxruntime") from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types, all for a bad file
        raise UserError(f"{path}: not a readable ONNX model: {str(e).splitlines()[0][:160]}") from None
    if device.type == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        LOG.warning(f"onnxruntime has no CUDA provider here: running {path.name} on the CPU")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise UserError(f"{path}: expected one image input (bs, 3, h, w), found {[i.shape for i in inputs]}")
    meta_props = session.get_modelmeta().custom_metadata_map
    stride, names = _stride_names(meta_props, path)
    dims = inputs[0].shape
    fixed = tuple(dims) if all(isinstance(d, int) for d in dims) else None
    if fixed is None and any(isinstance(d, int) for d in dims[2:]):
        raise UserError(f"{path}: input shape {dims} fixes only some sides; export with all of h, w dynamic or none")
    dtype = torch.float16 if "float16" in inputs[0].type else torch.float32
    input_name, output_name = inputs[0].name, outputs[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = session.run([output_name], {input_name: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(y).to(x.device)

    return Backend(forward, ModelMeta("onnx", stride, names, fixed, dtype), device)


def _torchscript(path: Path, device: torch.device) -> Backend:
    extra = {"config.txt": ""}
    try:
        with warnings.catch_warnings():  # torch.jit.load is deprecated for torch.export; traced files remain
            warnings.simplefilter("ignore", category=FutureWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable TorchScript model: {str(e).splitlines()[0][:160]}") from None
    try:
        config = json.loads(extra["config.txt"] or "{}")
    except json.JSONDecodeError:
        config = {}
    stride, names = _stride_names(config, path)
    # ours records imgsz [h, w]; upstream's records shape [bs, 3, h, w]
    shape = config.get("shape") or ([1, 3, *config["imgsz"]] if "imgsz" in config else None)
    if shape is None or len(shape) != 4:
        raise UserError(f"{path}: TorchScript model without its input shape (config.txt imgsz or shape)")
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    module.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = module(x)
        return y[0] if isinstance(y, (tuple, list)) else y

    meta = ModelMeta("torchscript", stride, names, tuple(int(s) for s in shape), dtype)
    return Backend(forward, meta, device)


def _stride_names(props: dict, path: Path) -> tuple[int, list[str]]:
    """stride and names from export metadata: ours as JSON, upstream's ONNX names as a Python dict literal."""

    def parse(value):
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            try:
                return ast.literal_eval(value)  # literals only: never evaluates code
            except (ValueError, SyntaxError):
                return None

    stride, names = parse(props.get("stride")), parse(props.get("names"))
    if not isinstance(stride, (int, float)) or names is None:
        raise UserError(f"{path}: no stride/names metadata (export it with `yolo-pipeline export` or upstream's "
                        "export.py)")
    if isinstance(names, dict):
        names = [names.get(i, names.get(str(i), str(i))) for i in range(len(names))]
    return max(int(stride), 32), [str(n) for n in names]


def _names_list(names, nc: int) -> list[str]:
    if isinstance(names, dict):
        names = [names.get(i, names.get(str(i), i)) for i in range(nc)]
    names = [str(n) for n in (names or [])]
    return names if len(names) == nc else [str(i) for i in range(nc)]
