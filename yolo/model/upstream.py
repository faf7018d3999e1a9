"""Read upstream YOLOv5 `.pt` files without executing anything.

An upstream checkpoint is a torch zip archive whose `data.pkl` pickles a `models.yolo.Model`. Plain
`torch.load` would import upstream's source tree and run whatever the pickle names. Here a restricted
unpickler resolves only a whitelist of names: upstream and torch module classes become inert records
(they keep their pickled state and run no code), tensors are rebuilt from the archive's raw storages,
and every other global (`os.system`, `builtins.eval`, unknown modules) is refused by name.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from yolo.errors import UserError, one_line
from yolo.limits import MAX_CHECKPOINT_ENTRIES, MAX_CLASSES, MAX_DATA_DEPTH
from yolo.model.archive import check_checkpoint_file
from yolo.untrusted import check_data_tree, short_repr

UPSTREAM_MODEL_CLASSES = {"Model", "DetectionModel"}
UPSTREAM_MODULES = {
    "models.yolo": {"Model", "DetectionModel", "Detect"},
    "models.common": {"Conv", "DWConv", "Bottleneck", "BottleneckCSP", "C3", "SPP", "SPPF", "Focus",
                      "Concat", "GhostConv", "GhostBottleneck", "C3Ghost", "C3TR", "C3SPP", "C3x",
                      "CrossConv", "Contract", "Expand", "TransformerBlock", "TransformerLayer"},
    "models.experimental": {"CrossConv", "MixConv2d", "Sum", "Ensemble"},
}
TORCH_NN_CLASSES = {
    "torch.nn.modules.conv": {"Conv2d"},
    "torch.nn.modules.batchnorm": {"BatchNorm2d"},
    "torch.nn.modules.activation": {"SiLU", "LeakyReLU", "Hardswish", "ReLU", "Sigmoid", "MultiheadAttention"},
    "torch.nn.modules.linear": {"Identity", "Linear"},
    "torch.nn.modules.container": {"Sequential", "ModuleList"},
    "torch.nn.modules.pooling": {"MaxPool2d", "AdaptiveAvgPool2d"},
    "torch.nn.modules.upsampling": {"Upsample"},
    "torch.nn.modules.dropout": {"Dropout"},
    "torch.nn.modules.flatten": {"Flatten"},
}
# Plain data that training scripts leave in checkpoints (paths in `opt`, numpy fitness values):
# kept as inert records too, never constructed.
DATA_CLASSES = {
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "argparse": {"Namespace"},
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.dtypes": {"Float64DType", "Float32DType", "Int64DType"},
}
STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


class Record:
    """An inert stand-in for an instance of a whitelisted class: it stores what the pickle gives it."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls cls(*args): store only, run nothing
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<record of {self.qualname}>"

    @property
    def attrs(self) -> dict:
        """The instance __dict__ an nn.Module pickles (state may also be (dict, slots))."""
        state = self.state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]
        return state if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


class _TypeMarker:
    """A whitelisted type used only as an argument (e.g. torch.Tensor in _rebuild_from_type_v2)."""

    def __init__(self, qualname: str):
        self.qualname = qualname


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise UserError("malformed tensor record in checkpoint")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or int(storage_offset) < 0:
        raise UserError("malformed tensor shape in checkpoint")
    if math.prod(size) > storage.numel():  # zero strides or overlapping views: copies would allocate the shape
        raise UserError(f"a tensor of shape {size[:8]} is larger than its storage: refused")
    last = int(storage_offset) + sum((n - 1) * s for n, s in zip(size, stride, strict=True) if n > 0)
    if all(n > 0 for n in size) and last >= storage.numel():
        raise UserError("tensor reaches past its storage (truncated or corrupt checkpoint)")
    return storage.as_strided(size, stride, int(storage_offset))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise UserError("checkpoint rebuilds a tensor with a function that is not whitelisted")
    return func(*args)


def _reconstructor(cls, base, state):  # copyreg._reconstructor of protocol 0/1 pickles
    if not (isinstance(cls, type) and issubclass(cls, Record)) or base is not object:
        raise UserError("checkpoint uses copyreg._reconstructor on a class that is not whitelisted")
    return cls.__new__(cls)


def _latin1_bytes(text, encoding="latin1"):
    # protocol-2 pickles spell bytes (numpy array data) as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UserError("checkpoint calls _codecs.encode with arguments a pickle of bytes never uses")
    return text.encode("latin1")


SAFE_CALLABLES: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1_bytes,
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.parameter.Parameter"),
}
_RECORD_CLASSES: dict[str, type[Record]] = {}


def _record_class(module: str, name: str) -> type[Record]:
    qualname = f"{module}.{name}"
    if qualname not in _RECORD_CLASSES:
        _RECORD_CLASSES[qualname] = type(f"Record[{qualname}]", (Record,), {"qualname": qualname})
    return _RECORD_CLASSES[qualname]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only whitelisted names and reads storages from a torch zip archive."""

    def __init__(self, file, archive: zipfile.ZipFile | None = None, prefix: str = ""):
        super().__init__(file)  # the archive's entry sizes were checked by check_checkpoint_file
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_CALLABLES:
            return SAFE_CALLABLES[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        for table in (UPSTREAM_MODULES, TORCH_NN_CLASSES, DATA_CLASSES):
            if name in table.get(module, ()):
                return _record_class(module, name)
        raise UserError(f"refusing to load `{module}.{name}`: it is not on the whitelist of classes a "
                        "YOLOv5 checkpoint may contain (loading it could execute code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UserError(f"unexpected persistent reference in checkpoint: {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if key in self.storages:
            return self.storages[key]
        if self.archive is None:
            raise UserError("checkpoint refers to tensor storages but is not a torch zip archive "
                            "(legacy torch<1.6 format is not supported)")
        try:
            raw = self.archive.read(f"{self.prefix}data/{key}")
        except KeyError:
            raise UserError(f"storage {key} is missing from the archive (truncated or corrupt)") from None
        dtype = storage_type.dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != int(numel) * itemsize:
            raise UserError(f"storage {key} has {len(raw)} bytes, expected {int(numel) * itemsize}")
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        self.storages[key] = flat
        return flat


def restricted_load(path: Path) -> Any:
    """Unpickle a torch zip archive (or a bare pickle) through the whitelist; UserError names the file."""
    is_archive = check_checkpoint_file(path)  # its messages name the file
    try:
        if is_archive:
            with zipfile.ZipFile(path) as archive:
                pkl = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
                if not pkl:
                    raise UserError("zip file without a torch data.pkl")
                prefix = pkl[0][: -len("data.pkl")]
                data = archive.read(pkl[0])
                return RestrictedUnpickler(io.BytesIO(data), archive, prefix).load()
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RuntimeError, OSError, MemoryError, OverflowError, UnicodeDecodeError,
            RecursionError) as e:
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                        f"{type(e).__name__}: {one_line(e, 120)}") from None


def state_dict_of(record: Record, prefix: str = "", _path: tuple[int, ...] = (),
                  _out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a pickled nn.Module record, named as module.state_dict().

    A pickle can make a module its own child (a cycle) or share one child many times over (names
    multiply): both are refused, by nesting depth and by the number of tensors named."""
    out: dict[str, torch.Tensor] = {} if _out is None else _out
    if id(record) in _path or len(_path) > MAX_DATA_DEPTH:
        raise UserError("the model's modules contain themselves or nest too deep: refused")
    _path = (*_path, id(record))
    attrs = record.attrs
    non_persistent = attrs.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (attrs.get(kind) or {}).items():
            if tensor is not None and not (kind == "_buffers" and name in non_persistent):
                if not isinstance(tensor, torch.Tensor):
                    raise UserError(f"{prefix}{name} is not a tensor")
                out[prefix + str(name)] = tensor
                if len(out) > MAX_CHECKPOINT_ENTRIES:
                    raise UserError(f"the model names more than {MAX_CHECKPOINT_ENTRIES} tensors: refused")
    for name, child in (attrs.get("_modules") or {}).items():
        if isinstance(child, Record):
            state_dict_of(child, f"{prefix}{name}.", _path, out)
    return out


def names_list(names: Any, nc: int) -> list[str]:
    """Class names as a list of strings, from upstream's list or {index: name} dict."""
    if isinstance(names, dict):
        return [str(names.get(i, names.get(str(i), i))) for i in range(nc)]
    if isinstance(names, (list, tuple)) and len(names) == nc:
        return [str(n) for n in names]
    return [str(i) for i in range(nc)]


def _plain(obj: Any) -> Any:
    """Copy of yaml-like data; anything else (records, tensors) is refused."""
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (str, int)) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise UserError(f"model cfg holds a {type(obj).__name__}, expected yaml data")


LEGACY_KEYS = ("anchor_grid",)  # buffers of YOLOv5 <= v5.0 that the current Detect recomputes


def import_upstream(path: Path) -> dict:
    """An upstream YOLOv5 checkpoint as this project's checkpoint fields (cfg, names, model, source;
    tensors as stored, e.g. fp16). The caller adds the format."""
    ckpt = restricted_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), Record):
        raise UserError(f"{path}: not a YOLOv5 checkpoint (no pickled model under 'model')")
    model = ckpt.get("ema") if isinstance(ckpt.get("ema"), Record) else ckpt["model"]  # as attempt_load
    kind = model.qualname.rsplit(".", 1)[-1]
    if not model.qualname.startswith("models.yolo.") or kind not in UPSTREAM_MODEL_CLASSES:
        raise UserError(f"{path}: holds a {model.qualname}, not a YOLOv5 detection model")
    attrs = model.attrs
    cfg = attrs.get("yaml")
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: the model carries no cfg (`yaml` attribute); cannot rebuild it")
    try:
        check_data_tree(cfg, "the model's cfg")  # before copying it: no cycles, no shared-reference bombs
        check_data_tree(attrs.get("names"), "the model's names")
        cfg = _plain(cfg)
        nc = cfg.get("nc", 0) or 0
        if not isinstance(nc, int) or isinstance(nc, bool) or not 0 <= nc <= MAX_CLASSES:
            raise UserError(f"the model's cfg asks for nc={short_repr(nc)}, expected an integer in 0..{MAX_CLASSES}")
        state = {k: v for k, v in state_dict_of(model).items() if k.rsplit(".", 1)[-1] not in LEGACY_KEYS}
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    out = {
        "cfg": cfg,
        "names": names_list(attrs.get("names"), nc),
        "model": state,
        "source": {"kind": "upstream-yolov5", "file": str(path), "class": model.qualname},
    }
    epoch = ckpt.get("epoch")
    if isinstance(epoch, int):
        out["source"]["epoch"] = epoch
    if isinstance(ckpt.get("date"), str):
        out["source"]["date"] = ckpt["date"]
    return out
