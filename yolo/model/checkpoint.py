"""Checkpoints: this project's weights_only-safe dict format, upstream .pt import, model rebuild."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from yolo.errors import UserError, one_line
from yolo.files import atomic_path
from yolo.limits import MAX_CHECKPOINT_VALUES, MAX_CLASSES
from yolo.model.archive import check_checkpoint_file
from yolo.model.download import resolve_weights
from yolo.model.transfer import transfer_state
from yolo.model.upstream import import_upstream, restricted_load
from yolo.model.yolo import DetectionModel
from yolo.untrusted import check_data_tree, short_repr

LOG = logging.getLogger(__name__)
FORMAT = "yolo-pipeline/1"
PLAIN_SCALARS = (str, int, float, bool, type(None))
FILE_MODE = 0o644


def checkpoint_dict(model, half: bool = True, **extra: Any) -> dict:
    """Our checkpoint dict for a DetectionModel: cfg, names, state_dict (fp16 when half), pixel anchors."""
    # anchors stay fp32 even in half checkpoints: evolved anchors would lose digits in fp16
    state = {k: (v.detach().half() if half and v.is_floating_point() and not k.endswith("anchors")
                 else v.detach()).cpu().clone()
             for k, v in model.state_dict().items()}
    model_cfg = getattr(model, "yaml", None)
    ckpt = {"format": FORMAT, "cfg": model_cfg, "names": list(model.names), "model": state,
            "anchors_px": model.model[-1].anchors_px()}
    ckpt.update(extra)
    return ckpt


def _check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Refuse anything torch.load(weights_only=True) could not read back (modules, classes, numpy)."""
    # exact types: numpy.float64 is a float subclass that weights_only cannot read back
    if isinstance(obj, torch.Tensor) or type(obj) in PLAIN_SCALARS:
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a string or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} holds a {type(obj).__module__}.{type(obj).__name__}; checkpoints hold only "
                    "tensors, numbers, strings, lists and dicts")


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> None:
    """Write a checkpoint atomically (temp file, fsync, rename): readers never see a partial file."""
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"checkpoint dict must carry format={FORMAT!r} (build it with checkpoint_dict)")
    _check_plain(ckpt)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # to a file object: torch.save(path) names the archive after the (random) temp file, so two runs
        # with identical weights would write different bytes
        torch.save(ckpt, f)
        os.chmod(tmp, FILE_MODE)  # the temp file is created 0600; a checkpoint is an ordinary artefact


def load_weights_only(path: Path) -> Any:
    """torch.load(weights_only=True) of a file whose budgets passed first (yolo/model/archive.py): no
    entry is inflated or allocated before its declared size is known to fit; what it holds is then
    checked for cycles, shared-reference bombs and tensors larger than their storage. The one way any
    step reads a .pt without the restricted unpickler (resume's last.pt included). UserError otherwise;
    pickle.UnpicklingError passes through (a pickle naming classes: try the restricted unpickler)."""
    if not check_checkpoint_file(path):
        raise UserError(f"{path}: not a readable checkpoint (not a zip archive, as torch writes them)")
    return _torch_load(path)


def _torch_load(path: Path) -> Any:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt?): {one_line(e)}") from None
    # before anything reads, copies or prints it: no cycles, no shared-reference bombs, no huge views
    check_data_tree(obj, str(path), max_nodes=MAX_CHECKPOINT_VALUES)
    check_tensor_views(obj, str(path))
    return obj


def load_checkpoint(path_or_name: str | os.PathLike) -> dict:
    """Our checkpoint dict from a file, an official name (`yolov5s.pt`) or a URL; upstream files imported."""
    path = resolve_weights(path_or_name)
    if path.is_dir():
        raise UserError(f"weights {path} is a folder, expected a .pt file")
    if not check_checkpoint_file(path):
        # torch>=1.6 always writes zip archives. Run the restricted unpickler anyway so a crafted pickle
        # is refused by the class it names; anything else is not a checkpoint.
        restricted_load(path)
        raise UserError(f"{path}: not a checkpoint (neither this project's format nor an upstream YOLOv5 .pt)")
    try:
        ckpt = _torch_load(path)
    except pickle.UnpicklingError:
        # weights_only refuses pickled classes: an upstream YOLOv5 file (or something hostile). The
        # restricted unpickler imports the former and refuses the latter by name.
        return {"format": FORMAT, **import_upstream(path)}
    return _validated(ckpt, path)


def check_tensor_views(obj: Any, where: str) -> None:
    """Refuse tensors that claim more elements than their storage holds (zero strides, overlapping
    views): copying one would allocate what its shape declares, not what the file holds."""
    if isinstance(obj, torch.Tensor):
        if obj.numel() * obj.element_size() > obj.untyped_storage().nbytes():
            raise UserError(f"{where}: a tensor of shape {tuple(obj.shape)[:8]} is larger than its storage: refused")
    elif isinstance(obj, dict):
        for v in obj.values():
            check_tensor_views(v, where)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            check_tensor_views(v, where)


def _validated(ckpt: Any, path: Path) -> dict:
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
    fmt = ckpt.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith("yolo-pipeline/"):
            raise UserError(f"{path}: checkpoint format {short_repr(fmt)} is newer than this version reads ({FORMAT})")
        raise UserError(f"{path}: not a yolo-pipeline checkpoint (no format field {FORMAT!r}; a bare "
                        "state_dict cannot be rebuilt without its cfg)")
    for key, kind in (("cfg", dict), ("model", dict), ("names", list)):
        if not isinstance(ckpt.get(key), kind):
            raise UserError(f"{path}: checkpoint field `{key}` missing or not a {kind.__name__}")
    if len(ckpt["names"]) > MAX_CLASSES:
        raise UserError(f"{path}: names lists {len(ckpt['names'])} classes, more than {MAX_CLASSES}")
    return ckpt


def model_from_checkpoint(ckpt: dict, nc: int | None = None, anchors: Any = None):
    """Rebuild the DetectionModel (fp32) from a checkpoint; nc/anchors overrides rebuild and transfer."""
    cfg, state = ckpt["cfg"], ckpt["model"]
    same_nc = nc is None or int(nc) == int(cfg.get("nc", -1))
    if same_nc and anchors is None:
        model = DetectionModel(cfg)
        missing, unexpected = _load_exact(model, state)
        if missing or unexpected:
            raise UserError(f"checkpoint weights do not match its cfg: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        model.names = list(ckpt.get("names") or model.names)
    else:
        model = DetectionModel(cfg, nc=nc, anchors=anchors)
        report = transfer_state(model, state, exclude=("anchors",) if anchors is not None else ())
        LOG.info("%s", report.summary())
        if same_nc:
            model.names = list(ckpt.get("names") or model.names)
    return model.float()


def _load_exact(model, state: dict) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise UserError(f"checkpoint weights do not match its cfg: shapes differ for {', '.join(bad[:3])}")
    if not missing and not unexpected:
        model.load_state_dict(state, strict=True)  # copies (and casts fp16 -> fp32) into the parameters
    return missing, unexpected


def load_model(weights: str | os.PathLike, device: str | torch.device = "cpu", fuse: bool = False):
    """(model in eval mode, float32, on device; optionally BN-fused, ckpt) for predict/evaluate/export."""
    ckpt = load_checkpoint(weights)
    model = model_from_checkpoint(ckpt)
    model = model.to(torch.device(device)).eval()
    if fuse:
        model.fuse()
    return model, ckpt
