"""Model cfg files: built-in ones by name (`yolov5s.yaml`, `yolov5s`) or a user's yaml, checked on load."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from yolo.errors import UserError, did_you_mean

CFG_DIR = Path(__file__).resolve().parent / "cfg"
REQUIRED_KEYS = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")


def builtin_cfgs() -> list[str]:
    return sorted(p.name for p in CFG_DIR.glob("*.yaml"))


def find_cfg(name_or_path: str | os.PathLike) -> Path:
    """The cfg file for a path or a built-in name (with or without `.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    if path.parent == Path(".") and (CFG_DIR / name).is_file():
        return CFG_DIR / name
    known = builtin_cfgs()
    raise UserError(f"model cfg not found: {name_or_path}{did_you_mean(name, known)} "
                    f"(built in: {', '.join(known)}; or give a path to a yaml file)")


def load_cfg(name_or_path: str | os.PathLike) -> dict:
    """Read and check a model cfg (yaml.safe_load); UserError naming file and line on any problem."""
    from yolo.model.yolo import LAYERS  # the registry of layer names the builder knows

    path = find_cfg(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read model cfg {path}: {e}") from None
    try:
        cfg = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes carry line numbers for messages
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise UserError(f"model cfg {where}: not valid yaml: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"model cfg {path}: expected a mapping with keys {', '.join(REQUIRED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise UserError(f"model cfg {path}: missing key(s) {', '.join(missing)}")
    nodes = {k.value: v for k, v in root.value}
    for section in ("backbone", "head"):
        rows, row_nodes = cfg[section], nodes[section]
        if not isinstance(rows, list) or not rows:
            raise UserError(f"model cfg {path}, line {row_nodes.start_mark.line + 1}: "
                            f"`{section}` must be a list of [from, number, module, args]")
        for j, (row, node) in enumerate(zip(rows, row_nodes.value, strict=True)):
            line = node.start_mark.line + 1
            if not (isinstance(row, list) and len(row) == 4):
                raise UserError(f"model cfg {path}, line {line}: {section} layer {j}: "
                                f"expected [from, number, module, args], got {row!r}")
            name = row[2]
            if name not in LAYERS:
                line = node.value[2].start_mark.line + 1
                raise UserError(f"model cfg {path}, line {line}: {section} layer {j}: unknown module "
                                f"{name!r}{did_you_mean(str(name), LAYERS)}; known: {', '.join(LAYERS)}")
    return cfg
