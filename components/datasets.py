"""Dataset sources inside the pipeline's containers: the version of a source now (`resolve_version`, the
key import_data is cached by) and the source materialised as a Dataset artifact (`import_data`).

Parsing and checking a source string, and resolving a git rev, are in components/sources.py (submit-time
code uses them too); this module copies, downloads and runs `dvc get`, so only the steps import it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from components.runtime import DATA_YAML, data_yaml_of, run_yolo
from components.sources import (
    DATASET_MOUNT,
    SHA_PATTERN,
    check_argument,
    parse_source,
    redact,
    resolve_git_rev,
    sample_args,
    tool_environment,
)
from yolo import __version__
from yolo.errors import UserError
from yolo.storage import open_storage

LOGGER = logging.getLogger(__name__)
COPY_IGNORED = (".git", ".dvc", "__pycache__")
STAGING = ".import-staging"  # dvc get's download folder inside the target, emptied into it
SHOWN_SKIPPED = 5  # of a long list of skipped paths, name this many in the warning


def _tree_fingerprint(root: Path) -> str:
    return open_storage(root).fingerprint()


def _local_root(location: str) -> tuple[Path, Path]:
    """(dataset root to copy, data.yaml) of a local source: a folder with data.yaml, or a yaml file."""
    path = Path(location).expanduser().resolve()
    if path.is_dir():
        yaml_path = path / DATA_YAML
        if not yaml_path.is_file():
            raise UserError(f"dataset source {location}: no {DATA_YAML} in this folder")
        return path, yaml_path
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {e}") from None
        root = (path.parent / str(raw.get("path") or ".")).resolve()
        return root, path
    raise UserError(f"dataset source {location}: no such folder or data.yaml")


def resolve_version(source: str, rev: str = "") -> str:
    """A version string that changes exactly when the data does: the key import_data is cached by."""
    parsed = parse_source(source)
    if parsed.kind == "sample":
        options = ",".join(sorted(filter(None, (o.strip() for o in parsed.location.split(",")))))
        return "sample-" + hashlib.sha256(f"{__version__}|{options}".encode()).hexdigest()[:16]
    if parsed.kind == "dvc":
        return resolve_git_rev(parsed.location, rev)
    if parsed.kind == "s3":
        storage = open_storage(parsed.location)
        storage.check_access()
        keys = storage.list()
        if not keys:
            raise UserError(f"dataset source {parsed.location}: no objects under this prefix")
        return "s3-" + storage.fingerprint()[:16]
    root, yaml_path = _local_root(parsed.location)
    digest = hashlib.sha256(_tree_fingerprint(root).encode() + b"|" + yaml_path.read_bytes())
    return "local-" + digest.hexdigest()[:16]


def _empty_target(path: Path) -> None:
    """Make sure the import target is an empty folder. An existing empty folder is used as it is, never
    removed and re-created: it may be a mount point (the PyTorchJob's init container imports into an
    emptyDir), which rmdir cannot remove (EBUSY as root, EACCES as a user who cannot write its parent)."""
    if path.is_dir():
        if any(path.iterdir()):
            raise RuntimeError(f"{path}: output artifact location is not empty")
        return
    if path.exists():
        raise RuntimeError(f"{path}: output artifact location is not a folder")
    path.mkdir(parents=True)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def copy_dataset_tree(root: Path, target: Path) -> list[str]:
    """Copy the regular files under `root` to `target`; returns what was skipped (relative paths).

    Symlinks are followed only where they resolve inside `root` (a link to a file is copied as that file,
    a link to a folder as that folder); one that points outside — or dangles — is skipped, so a dataset
    cannot pull `~/.ssh/id_rsa` or anything else the importer can read into the artifact. A folder is
    entered at most once per path from the root (links back to an ancestor are skipped: no loop), and
    FIFOs, sockets and devices are skipped (reading one can hang or never end).
    """
    skipped: list[str] = []

    def visit(folder: Path, copy: Path, relative: Path, ancestors: frozenset[Path]) -> None:
        copy.mkdir(parents=True, exist_ok=True)
        for entry in sorted(folder.iterdir()):
            if entry.name in COPY_IGNORED:
                continue
            rel = relative / entry.name
            real = entry.resolve()
            if entry.is_symlink() and not (real.exists() and _inside(real, root)):
                skipped.append(f"{rel.as_posix()} (a link to outside the dataset)")
            elif real.is_dir():
                if real in ancestors:
                    skipped.append(f"{rel.as_posix()} (a link back to a folder above it)")
                else:
                    visit(entry, copy / entry.name, rel, ancestors | {real})
            elif real.is_file():
                shutil.copyfile(real, copy / entry.name)
            else:
                skipped.append(f"{rel.as_posix()} (not a regular file)")

    visit(root, target, Path(), frozenset({root}))
    return skipped


def _copy_local(location: str, target: Path) -> list[str]:
    root, yaml_path = _local_root(location)
    skipped = copy_dataset_tree(root, target)
    if skipped:
        shown = ", ".join(skipped[:SHOWN_SKIPPED]) + (" ..." if len(skipped) > SHOWN_SKIPPED else "")
        LOGGER.warning("dataset source %s: skipped %d path(s): %s", location, len(skipped), shown)
    _write_rebased_yaml(root, yaml_path, target, ".")  # the copy's data.yaml points at the copy
    return skipped


def is_mounted(location: str) -> bool:
    """A local source on the `--dataset-pvc` volume (mounted at DATASET_MOUNT in every data step)."""
    root, _ = _local_root(location)
    return _inside(root, Path(DATASET_MOUNT))


def _reference_mounted(location: str, target: Path) -> None:
    """A dataset on the mounted volume: the artifact is its data.yaml, pointing at the mount, no copy."""
    root, yaml_path = _local_root(location)
    _write_rebased_yaml(root, yaml_path, target, str(root))


def _write_rebased_yaml(root: Path, yaml_path: Path, target: Path, new_path: str) -> None:
    """target/data.yaml: the source's, with `path: new_path`; split entries relative to (or inside) root."""
    raw = yaml.safe_load(yaml_path.read_text()) or {}
    for split in ("train", "val", "test"):
        entries = raw.get(split)
        if entries is None:
            continue
        as_list = entries if isinstance(entries, list) else [entries]
        fixed = []
        for entry in as_list:
            p = Path(str(entry))
            if p.is_absolute():
                try:
                    p = p.resolve().relative_to(root)
                except ValueError:
                    raise UserError(
                        f"{yaml_path}: {split} entry {entry} is outside the dataset root {root}"
                    ) from None
            fixed.append(p.as_posix())
        raw[split] = fixed if isinstance(entries, list) else fixed[0]
    raw["path"] = new_path
    (target / DATA_YAML).write_text(yaml.safe_dump(raw, sort_keys=False))


def _download_s3(uri: str, target: Path) -> int:
    storage = open_storage(uri)
    keys = storage.list()
    for key in keys:  # each becomes a path under target: nothing may climb out of it
        parts = key.split("/")
        if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise UserError(
                f"dataset source {redact(uri)}: object key {key!r} is not a plain relative path "
                "(empty, '.' or '..' segments); refusing to import it"
            )
        check_argument(f"dataset source {redact(uri)}: object key", key)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: storage.get(key, target / key), keys))
    return len(keys)


def _dvc_executable() -> str:
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else "dvc"


def import_data(source: str, version: str, dataset) -> dict[str, Any]:
    """Materialise the source into the Dataset artifact folder; returns (and records) its metadata."""
    parsed = parse_source(source)
    target = Path(dataset.path)
    _empty_target(target)
    metadata: dict[str, Any] = {"source": redact(source), "version": version, "data_yaml": DATA_YAML}
    if parsed.kind == "sample":
        run_yolo("sample-data", ["--out", target, *sample_args(parsed.location)])
    elif parsed.kind == "local" and is_mounted(parsed.location):
        _reference_mounted(parsed.location, target)
        metadata["mounted"] = DATASET_MOUNT
    elif parsed.kind == "local":
        skipped = _copy_local(parsed.location, target)
        if skipped:
            metadata["skipped"] = len(skipped)
    elif parsed.kind == "s3":
        metadata["objects"] = _download_s3(parsed.location, target)
    elif parsed.kind == "dvc":
        if not SHA_PATTERN.match(version):
            raise UserError(
                f"dataset source {redact(source)}: version {version!r} is not a commit SHA (resolve it first)"
            )
        commit = version
        metadata.update(commit=commit, path=parsed.path_in_repo)
        # The repository and path come after `--`: never options, whatever they hold (parse_source checked).
        # `dvc get -o` wants a path that does not exist yet, and the target may be a mount point: fetch
        # into a folder inside it, then move the dataset's entries up (a rename on the same filesystem).
        staging = target / STAGING
        argv = [_dvc_executable(), "get", "--rev", commit, "-o", str(staging / "dataset"), "--"]
        argv += [parsed.location, parsed.path_in_repo]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, env=tool_environment())
        if result.returncode != 0:
            detail = redact(result.stderr.strip()[-2000:])
            raise RuntimeError(f"dvc get failed ({result.returncode}): {detail}")
        fetched = staging / "dataset"
        if not fetched.is_dir():
            raise UserError(f"dataset source {redact(source)}: {parsed.path_in_repo} is not a folder")
        for entry in fetched.iterdir():
            entry.rename(target / entry.name)
        shutil.rmtree(staging)
    yaml_path = data_yaml_of(target)
    if not yaml_path.is_file():
        candidates = sorted(target.glob("*.yaml"))
        if len(candidates) != 1:
            raise UserError(f"dataset source {redact(source)}: expected {DATA_YAML} at the top of the dataset")
        metadata["data_yaml"] = candidates[0].name
    if "mounted" not in metadata:  # a mounted dataset's files stay on its volume
        metadata["files"] = sum(1 for p in target.rglob("*") if p.is_file())
    dataset.metadata.update(metadata)
    return metadata
