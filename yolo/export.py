"""The export step: a fused model whose one output is the decoded (bs, N, 5+nc) tensor, as ONNX or TorchScript.

The exported file is checked before it is published: ONNX by onnx.checker and onnxruntime, TorchScript by
reloading it, each against the torch model's outputs on the same random image (fp32: within 1e-3 absolute
plus 1e-5 relative, see TOLERANCE_FP32).
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from yolo.backend import ONNX_OPSET, DecodedOutput, export_onnx
from yolo.device import select_device
from yolo.errors import UserError
from yolo.files import atomic_path, prepare_out_dir
from yolo.model.checkpoint import load_model
from yolo.predict import check_img_size

LOG = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")
# |exported - torch| <= atol + rtol * |torch| (numpy's allclose). Box sizes are pixels amplified from the logits
# through (2 sigmoid)^2 * anchor: at 640 px, float32 summation-order noise alone (oneDNN vs MLAS) reaches
# ~1e-3 px on 300 px boxes, and torch fp32 itself is that far from float64; rtol 1e-5 (~150 ulp) absorbs it.
TOLERANCE_FP32 = (1e-3, 1e-5)  # (atol, rtol)
TOLERANCE_FP16 = (1e-2, 1e-2)  # fp16 boxes near 640 px have a 0.5 px step


@dataclass
class ExportConfig:
    weights: str
    format: str
    out: Path
    imgsz: list[int] = field(default_factory=lambda: [640])
    batch_size: int = 1
    dynamic: bool = False
    half: bool = False
    device: str = ""
    opset: int = ONNX_OPSET


@dataclass
class ExportResult:
    path: Path
    input_shape: list[int]
    output_shape: list[int]
    max_abs_diff: float  # exported vs torch on the check image(s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="checkpoint: ours or an upstream YOLOv5 .pt")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or torchscript")
    parser.add_argument("--out", required=True, type=Path, help="the file to write (e.g. model.onnx)")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640],
                        help="input size: one number, or h w")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the exported input")
    parser.add_argument("--dynamic", action="store_true", help="ONNX: dynamic batch, height and width")
    parser.add_argument("--half", action="store_true", help="fp16 (CUDA only)")
    parser.add_argument("--device", default="", help="cuda device (0) or cpu (default: a GPU when there is one, else the CPU)")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset (12 or newer)")


def run(args: argparse.Namespace) -> int:
    cfg = ExportConfig(
        weights=args.weights,
        format=args.format,
        out=args.out,
        imgsz=list(args.imgsz),
        batch_size=args.batch_size,
        dynamic=args.dynamic,
        half=args.half,
        device=args.device,
        opset=args.opset,
    )
    result = export(cfg)
    LOG.info(
        f"exported {cfg.format} to {result.path}: input {result.input_shape} -> output {result.output_shape}, "
        f"max |exported - torch| = {result.max_abs_diff:.2e}"
    )
    return 0


def _check_config(cfg: ExportConfig, device: torch.device) -> None:
    if cfg.format not in FORMATS:
        raise UserError(f"--format {cfg.format!r} is not one of {', '.join(FORMATS)}")
    if cfg.half and device.type != "cuda":
        raise UserError("--half needs a CUDA device (fp16 export is not supported on the CPU)")
    if cfg.half and cfg.dynamic:
        raise UserError("--half and --dynamic cannot be combined (as upstream): choose one")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.format == "onnx" and cfg.opset < 12:
        raise UserError(f"--opset must be 12 or newer, got {cfg.opset}")
    if cfg.out.exists() and cfg.out.is_dir():
        raise UserError(f"--out {cfg.out} is a folder; give the file to write (e.g. {cfg.out / 'model.onnx'})")
    prepare_out_dir(cfg.out.parent)  # missing, read-only or not a folder: one line now, not after the export


def _check_images(shape: list[int], half: bool, device: torch.device, dynamic: bool, stride: int):
    """The check inputs: a seeded random image at the export shape, plus another shape when dynamic."""
    g = torch.Generator().manual_seed(0)
    shapes = [shape]
    if dynamic:
        shapes.append([shape[0] + 1, 3, shape[2] + stride, max(shape[3] - stride, stride)])
    dtype = torch.float16 if half else torch.float32
    return [torch.rand(s, generator=g).to(device, dtype) for s in shapes]


def _compare(exported: list[np.ndarray], reference: list[torch.Tensor], half: bool, what: str) -> float:
    worst = 0.0
    for out, ref in zip(exported, reference, strict=True):
        ref_np = ref.float().cpu().numpy()
        out = np.asarray(out, dtype=np.float32)
        if out.shape != ref_np.shape:
            raise RuntimeError(f"{what} output shape {out.shape} differs from torch's {ref_np.shape}")
        diff = np.abs(out - ref_np)
        worst = max(worst, float(diff.max()))
        atol, rtol = TOLERANCE_FP16 if half else TOLERANCE_FP32
        if not (diff <= atol + rtol * np.abs(ref_np)).all():
            raise RuntimeError(
                f"{what} disagrees with torch: max abs diff {diff.max():.3g} (tolerance atol {atol}, rtol {rtol})"
            )
    return worst


def _export_onnx(wrapper, im, path: Path, cfg: ExportConfig, meta: dict, checks) -> float:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise UserError(f"ONNX export needs onnx and onnxruntime ({e.name} missing): "
                        "pip install 'yolo-pipeline[export]'") from None  # fmt: skip
    export_onnx(wrapper, im, str(path), cfg.opset, cfg.dynamic)
    model_onnx = onnx.load(str(path))
    onnx.checker.check_model(model_onnx)
    for key, value in meta.items():  # what upstream's loaders read back (stride, names)
        prop = model_onnx.metadata_props.add()
        prop.key, prop.value = key, json.dumps(value) if not isinstance(value, str) else value
    onnx.save(model_onnx, str(path))

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        reference = [wrapper(x) for x in checks]
    outputs = [session.run(None, {"images": x.cpu().numpy()})[0] for x in checks]
    return _compare(outputs, reference, cfg.half, "onnxruntime")


def _export_torchscript(wrapper, im, path: Path, cfg: ExportConfig, meta: dict, checks) -> float:
    if cfg.dynamic:
        LOG.info("--dynamic applies to ONNX only; TorchScript is traced at the given shape")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, im, strict=False, check_trace=False)  # checked below, once
        traced.save(str(path), _extra_files={"config.txt": json.dumps(meta)})
        loaded = torch.jit.load(str(path), map_location=im.device)
    with torch.inference_mode():
        reference = [wrapper(x) for x in checks[:1]]
        outputs = [loaded(x).float().cpu().numpy() for x in checks[:1]]
    return _compare(outputs, reference, cfg.half, "the reloaded TorchScript module")


def export(cfg: ExportConfig) -> ExportResult:
    """Export cfg.weights to cfg.format at cfg.out, verified against torch; returns what was written."""
    cfg.out = Path(cfg.out)
    device = select_device(cfg.device)
    _check_config(cfg, device)
    model, ckpt = load_model(cfg.weights, device, fuse=True)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.half:
        model.half()
    stride = max(int(model.stride.max()), 32)
    imgsz = check_img_size(cfg.imgsz, stride)
    names = ckpt.get("names") if isinstance(ckpt, dict) else None
    names = list(names.values()) if isinstance(names, dict) else list(names or getattr(model, "names", []))
    meta = {"stride": stride, "names": [str(n) for n in names], "imgsz": imgsz, "format": "yolo-pipeline"}

    wrapper = DecodedOutput(model)
    im = torch.zeros(cfg.batch_size, 3, *imgsz, device=device, dtype=torch.float16 if cfg.half else torch.float32)
    with torch.no_grad():  # not inference_mode: its tensors (cached grids) must not reach the tracer
        for _ in range(2):  # dry runs, as upstream: builds grids and catches shape errors early
            y = wrapper(im)
    checks = _check_images(list(im.shape), cfg.half, device, cfg.dynamic and cfg.format == "onnx", stride)
    exporter = _export_onnx if cfg.format == "onnx" else _export_torchscript
    with atomic_path(cfg.out) as tmp:
        diff = exporter(wrapper, im, tmp, cfg, meta, checks)
    return ExportResult(path=cfg.out, input_shape=list(im.shape), output_shape=list(y.shape), max_abs_diff=diff)
