"""Model cfg files: built-in ones by name (`yolov5s.yaml`, `yolov5s`) or a user's yaml, checked on load."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from yolo.errors import UserError, did_you_mean
from yolo.limits import MAX_CFG_LAYERS
from yolo.untrusted import InvalidYaml, parse_yaml, read_yaml_file, short_repr

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
    """Read and check a model cfg (safe yaml within budgets); UserError naming file and line on any problem."""
    from yolo.model.yolo import LAYERS  # the registry of layer names the builder knows

    path = find_cfg(name_or_path)
    try:
        cfg, root = parse_yaml(read_yaml_file(path, "model cfg"), f"model cfg {path}")
    except InvalidYaml as e:
        where = f"{path}, line {e.line}" if e.line else str(path)
        raise UserError(f"model cfg {where}: not valid yaml: {e.problem}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"model cfg {path}: expected a mapping with keys {', '.join(REQUIRED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise UserError(f"model cfg {path}: missing key(s) {', '.join(missing)}")
    nodes = {k.value: v for k, v in root.value if isinstance(k, yaml.ScalarNode)}
    for section in ("backbone", "head"):
        rows, row_nodes = cfg[section], nodes.get(section)
        if not isinstance(rows, list) or not rows or not isinstance(row_nodes, yaml.SequenceNode):
            line = f", line {row_nodes.start_mark.line + 1}" if row_nodes is not None else ""
            raise UserError(f"model cfg {path}{line}: `{section}` must be a list of [from, number, module, args]")
        if len(rows) > MAX_CFG_LAYERS:
            raise UserError(f"model cfg {path}, line {row_nodes.start_mark.line + 1}: `{section}` has {len(rows)} "
                            f"layers, more than the {MAX_CFG_LAYERS} a model may have")
        for j, (row, node) in enumerate(zip(rows, row_nodes.value, strict=True)):
            line = node.start_mark.line + 1
            if not (isinstance(row, list) and len(row) == 4):
                raise UserError(f"model cfg {path}, line {line}: {section} layer {j}: "
                                f"expected [from, number, module, args], got {short_repr(row)}")
            name = row[2]
            if name not in LAYERS:
                line = node.value[2].start_mark.line + 1
                raise UserError(f"model cfg {path}, line {line}: {section} layer {j}: unknown module "
                                f"{short_repr(name)}{did_you_mean(str(name)[:80], LAYERS)}; known: "
                                f"{', '.join(LAYERS)}")
    return cfg
