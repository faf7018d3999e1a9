"""The verified index: per-file checks run in parallel, content hashes, fingerprints, and DIR/index/ on disk.

On disk (no pickle anywhere): `index.json` (format, data.yaml hash, names, fingerprints, problems) and
one `SPLIT.npz` per split (read with allow_pickle=False): relative paths, size, mtime_ns and sha256 of
every image and label file, shapes, a usable flag, and all boxes as one (N, 5) array with per-image
counts. Paths are relative to the dataset root, so a copied or re-mounted dataset reuses the index:
files whose size and mtime still match are trusted, the others are re-hashed, and only a file whose
bytes changed is verified again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from yolo.data.dataset import (
    IMAGE_TOO_LARGE,
    IMAGE_UNREADABLE,
    KEPT,
    KEPT_AS_BACKGROUND,
    LABEL_BAD_ROW,
    LABEL_MISSING,
    LABEL_TOO_LARGE,
    NOT_A_REGULAR_FILE,
    OUTSIDE_DATASET,
    SKIPPED,
    DataConfig,
    SplitIndex,
    UserError,
    check_image_bytes,
    content_hash,
    label_path_for,
    list_split_images,
    parse_label_bytes,
    relative_to_root,
)
from yolo.errors import one_line
from yolo.limits import MAX_IMAGE_BYTES, MAX_INDEX_BYTES, MAX_LABEL_BYTES
from yolo.untrusted import NOT_A_REGULAR_FILE as REFUSED_NOT_REGULAR
from yolo.untrusted import (
    OUTSIDE_ROOT,
    TOO_LARGE,
    VIRTUAL_FILESYSTEM,
    InputRefused,
    check_zip_archive,
    is_inside,
    read_regular_file,
)

LOG = logging.getLogger(__name__)
INDEX_FORMAT = "yolo-pipeline-index"
INDEX_VERSION = 1
INDEX_MAX_ARRAYS = 64  # entries of a SPLIT.npz (it holds 12)
PARALLEL_MIN_FILES = 32  # below this a pool costs more than it saves


@dataclass
class FileRecord:
    """Everything validate learns about one image and its label file."""

    image: str  # relative to the dataset root, posix
    label: str
    image_size: int
    image_mtime_ns: int
    image_hash: str
    label_size: int  # -1: no label file
    label_mtime_ns: int
    label_hash: str  # "" when there is no label file
    shape: tuple[int, int]  # (height, width), (0, 0) when undecodable
    usable: bool
    labels: np.ndarray  # (k, 5) float32
    problems: list[tuple[str, str, str, str]] = field(default_factory=list)  # (code, file, message, action)


# ---------------------------------------------------------------------------------------------- one file
_REFUSED_CODES = {  # InputRefused code -> (problem code for an image, for a label)
    REFUSED_NOT_REGULAR: (NOT_A_REGULAR_FILE, NOT_A_REGULAR_FILE),
    TOO_LARGE: (IMAGE_TOO_LARGE, LABEL_TOO_LARGE),
    OUTSIDE_ROOT: (OUTSIDE_DATASET, OUTSIDE_DATASET),
    VIRTUAL_FILESYSTEM: (OUTSIDE_DATASET, OUTSIDE_DATASET),
}


def _read(path: str, real_root: str, max_bytes: int, what: str,
          real_dirs: dict[str, str]) -> tuple[bytes, os.stat_result]:
    """A dataset file's bytes: only a regular file, inside the dataset root after resolving symlinks, of at
    most max_bytes (InputRefused otherwise; the file's content is never quoted)."""
    real = _real_path(path, real_dirs)
    if not is_inside(real, real_root):
        raise InputRefused(OUTSIDE_ROOT, "resolves (through a symlink) to outside the dataset root: not read")
    return read_regular_file(path, max_bytes, what, real_path=real)


def _real_path(path: str, real_dirs: dict[str, str]) -> str:
    """os.path.realpath(path), resolving each folder once per verification (`real_dirs`, shared by its
    threads): realpath walks every component in Python, the GIL-bound third of verifying a file."""
    folder, name = os.path.split(path)
    if not name or name in (".", "..") or os.path.islink(path):
        return os.path.realpath(path)
    real = real_dirs.get(folder)
    if real is None:
        real = real_dirs.setdefault(folder, os.path.realpath(folder))
    return os.path.join(real, name)


def _refusal(e: InputRefused, kind: int) -> tuple[str, str]:
    """(problem code, message without the path: the report names the file) of a refused image or label."""
    return _REFUSED_CODES.get(e.code, (IMAGE_UNREADABLE, LABEL_BAD_ROW))[kind], e.detail


def verify_file(task: tuple[str, str, str, str, int, tuple[str, str] | None, str, dict]) -> FileRecord | tuple:
    """Read, hash and check one image/label pair (bytes read once).

    task = (image_abs, label_abs, image_rel, label_rel, nc, expected_hashes, real_root, real_dirs). With
    expected hashes that match the bytes on disk, returns only ('same', sizes, mtimes) so the caller reuses
    its record. real_dirs: the resolved folders of this verification (see _real_path).
    """
    image_abs, label_abs, image_rel, label_rel, nc, expected, real_root, real_dirs = task
    problems: list[tuple[str, str, str, str]] = []
    try:
        image_bytes, st = _read(image_abs, real_root, MAX_IMAGE_BYTES, "image", real_dirs)
        image_stat, image_error = (st.st_size, st.st_mtime_ns), None
    except OSError as e:
        image_bytes, image_stat, image_error = b"", (-1, -1), e.strerror or str(e)
    except InputRefused as e:
        image_bytes, image_stat, image_error = b"", (-1, -1), ""
        code, message = _refusal(e, 0)
        problems.append((code, image_rel, message, SKIPPED))
    try:
        label_bytes, lst = _read(label_abs, real_root, MAX_LABEL_BYTES, "label file", real_dirs)
        label_stat, label_error, label_exists = (lst.st_size, lst.st_mtime_ns), None, True
    except FileNotFoundError:
        label_bytes, label_stat, label_error, label_exists = b"", (-1, -1), None, False
    except OSError as e:  # no permission, ...
        label_bytes, label_stat, label_error, label_exists = b"", (-1, -1), e.strerror or str(e), True
    except InputRefused as e:
        label_bytes, label_stat, label_error, label_exists = b"", (-1, -1), _refusal(e, 1), True
    image_hash = content_hash(image_bytes) if image_error is None else ""
    label_hash = content_hash(label_bytes) if label_exists and label_error is None else ""
    if expected is not None and image_error is None and expected == (image_hash, label_hash):
        return ("same", image_stat, label_stat)

    labels = np.zeros((0, 5), np.float32)
    if image_error is not None:
        shape, usable = None, False
        if image_error:  # "" when refused: the problem is already recorded
            problems.append((IMAGE_UNREADABLE, image_rel, f"cannot read: {image_error}", SKIPPED))
    else:
        shape, image_problems, usable = check_image_bytes(image_bytes)
        problems += [(code, image_rel, msg, KEPT if usable else SKIPPED) for code, msg in image_problems]
    if usable:
        if isinstance(label_error, tuple):  # refused (not regular, too large, outside the root)
            usable = False
            problems.append((label_error[0], label_rel, label_error[1], SKIPPED))
        elif label_error is not None:
            usable = False
            problems.append((LABEL_BAD_ROW, label_rel, f"cannot read: {label_error}", SKIPPED))
        elif not label_exists:
            problems.append((LABEL_MISSING, label_rel, "no label file: image used as background",
                             KEPT_AS_BACKGROUND))
        else:
            labels, label_problems, usable = parse_label_bytes(label_bytes, nc)
            problems += [(code, label_rel, msg, action) for code, msg, action in label_problems]
    return FileRecord(
        image=image_rel, label=label_rel, image_size=image_stat[0], image_mtime_ns=image_stat[1],
        image_hash=image_hash, label_size=label_stat[0], label_mtime_ns=label_stat[1], label_hash=label_hash,
        shape=tuple(shape) if shape else (0, 0), usable=usable, labels=labels, problems=problems)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one decode per worker; the pool provides the parallelism


def parallel_map(fn: Callable, tasks: list, workers: int = 0, executor: str = "thread",
                 progress: str | None = None) -> Iterator:
    """fn over tasks in order, on all cores; a tqdm bar on stderr when `progress` names it.

    Threads are the default: decoding, hashing and file reads release the GIL, results need no
    pickling, and nothing is forked from a process that may already run torch threads.
    """
    workers = max(1, min(workers or available_cpus(), len(tasks)))
    if progress is not None:
        bar = tqdm(total=len(tasks), desc=progress, unit="img", leave=False, disable=None, dynamic_ncols=True)
    else:
        bar = None
    pool = None
    try:
        if workers == 1 or len(tasks) < PARALLEL_MIN_FILES:
            results: Iterable = map(fn, tasks)
        else:
            if executor == "process":  # forkserver: forking a process whose OpenCV/torch threads run can hang
                pool = multiprocessing.get_context("forkserver").Pool(workers, initializer=_init_worker)
            else:
                pool = ThreadPool(workers)
            results = pool.imap(fn, tasks, chunksize=max(1, min(64, len(tasks) // (workers * 8))))
        for r in results:
            if bar is not None:
                bar.update(1)
            yield r
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()


# ---------------------------------------------------------------------------------------------- a split
def yaml_hash(data: DataConfig) -> str:
    return data.yaml_sha256


def split_fingerprint(yaml_sha: str, split: str, records: list[FileRecord]) -> str:
    """Hash of the data.yaml and every (path, image hash, label hash) of the split, in sorted order."""
    h = hashlib.sha256(f"{INDEX_FORMAT} {INDEX_VERSION}\n{yaml_sha}\n{split}\n".encode())
    for r in sorted(records, key=lambda r: r.image):
        h.update(f"{r.image}\t{r.image_hash}\t{r.label_hash}\n".encode())
    return h.hexdigest()


def dataset_fingerprint(yaml_sha: str, split_fingerprints: dict[str, str]) -> str:
    """Hash of the data.yaml and all split fingerprints (what report.json and index.json record)."""
    h = hashlib.sha256(f"{yaml_sha}\n".encode())
    for split in sorted(split_fingerprints):
        h.update(f"{split}\t{split_fingerprints[split]}\n".encode())
    return h.hexdigest()


def dataset_fingerprint_of(data: DataConfig, index_dir: str | os.PathLike | None = None,
                           known: dict[str, str] | None = None) -> str:
    """The whole dataset's fingerprint, as validate's report.json records it: every step that consumes the
    dataset records this one value (lineage). `known` holds split fingerprints a step already computed;
    the other splits come from the index (cheap) or are verified in-process."""
    fps = dict(known or {})
    for split in data.splits:
        if split not in fps:
            fps[split] = load_split(data, split, index_dir).fingerprint
    return dataset_fingerprint(yaml_hash(data), {s: fps[s] for s in data.splits})


def verify_split(data: DataConfig, split: str, images: list[Path] | None = None,
                 previous: dict[str, FileRecord] | None = None, workers: int = 0, executor: str = "thread",
                 progress: bool = True) -> list[FileRecord]:
    """Verify every image of `split` (reusing `previous` records whose files are unchanged), in order."""
    images = list_split_images(data, split) if images is None else images
    previous = previous or {}
    real_dirs: dict[str, str] = {}  # folder -> its resolved path, for this verification only
    records: list[FileRecord | None] = [None] * len(images)
    tasks, slots = [], []
    for i, image in enumerate(images):
        rel = relative_to_root(image, data.root)
        label = label_path_for(image)
        old = previous.get(rel)
        if old is not None and _unchanged(old, image, label):
            records[i] = old
            continue
        expected = (old.image_hash, old.label_hash) if old is not None else None
        tasks.append((str(image), str(label), rel, relative_to_root(label, data.root), data.nc, expected,
                      data.real_root, real_dirs))
        slots.append(i)
    if previous and tasks:
        LOG.info(f"{split}: {len(images) - len(tasks)} files unchanged since verified, checking {len(tasks)}")
    desc = f"{split}: verifying {len(tasks)} images" if progress else None
    for slot, task, result in zip(slots, tasks, parallel_map(verify_file, tasks, workers, executor, desc),
                                  strict=True):
        if isinstance(result, tuple):  # same bytes, new size/mtime (a copy, a checkout): reuse the record
            old = previous[task[2]]
            old.image_size, old.image_mtime_ns = result[1]
            old.label_size, old.label_mtime_ns = result[2]
            records[slot] = old
        else:
            records[slot] = result
    return records  # type: ignore[return-value]


def _unchanged(record: FileRecord, image: Path, label: Path) -> bool:
    try:
        st = image.stat()
    except OSError:
        return False
    if (st.st_size, st.st_mtime_ns) != (record.image_size, record.image_mtime_ns):
        return False
    try:
        lst = label.stat()
    except FileNotFoundError:
        return record.label_size == -1 and record.label_hash == ""
    except OSError:
        return False
    return (lst.st_size, lst.st_mtime_ns) == (record.label_size, record.label_mtime_ns)


def split_index_from_records(data: DataConfig, split: str, records: list[FileRecord], fingerprint: str,
                             single_cls: bool = False) -> SplitIndex:
    usable = [r for r in records if r.usable]
    labels = [r.labels.copy() for r in usable]
    names = list(data.names)
    if single_cls:  # upstream folds every class into 0 and names the one class 'item'
        for lb in labels:
            lb[:, 0] = 0
        names = names if len(names) == 1 else ["item"]
    return SplitIndex(
        root=data.root, files=[r.image for r in usable],
        shapes=np.array([r.shape for r in usable], dtype=np.int64).reshape(-1, 2), labels=labels, names=names,
        fingerprint=fingerprint, skipped=[r.image for r in records if not r.usable], split=split)


def load_split(data: DataConfig, split: str, index_dir: str | os.PathLike | None = None,
               single_cls: bool = False) -> SplitIndex:
    """The verified usable images of `split`: from validate's index when it still matches the files on
    disk (changed files are re-verified), else verified in-process (nothing written)."""
    return load_splits(data, [split], index_dir, single_cls)[split]


def load_splits(data: DataConfig, splits: Sequence[str], index_dir: str | os.PathLike | None = None,
                single_cls: bool = False) -> dict[str, SplitIndex]:
    """load_split for several splits, each file read once: a file that two splits list (coco128's train
    and val are one folder) reuses the first split's record while its size and mtime are unchanged."""
    yaml_sha = yaml_hash(data)
    verified: dict[str, FileRecord] = {}  # by path relative to the root, across the splits
    indexes = {}
    for split in splits:
        previous = dict(verified)
        if index_dir is not None:
            previous.update(read_split_records(Path(index_dir), split, yaml_sha) or {})
        images = list_split_images(data, split)
        if not images:
            raise UserError(f"{data.yaml_path}: split `{split}` has no images "
                            f"(looked in {', '.join(map(str, data.splits[split]))})")
        records = verify_split(data, split, images, previous=previous)
        verified.update((r.image, r) for r in records)
        index = split_index_from_records(data, split, records, split_fingerprint(yaml_sha, split, records),
                                         single_cls)
        if not index.files:
            raise UserError(f"{data.yaml_path}: split `{split}` has no usable images ({len(index.skipped)} "
                            f"skipped; run `yolo-pipeline validate` for the reasons)")
        if index.skipped:
            LOG.info(f"{split}: {len(index.files)} usable images, {len(index.skipped)} skipped "
                     f"(see validate's report.json)")
        indexes[split] = index
    return indexes


# ---------------------------------------------------------------------------------------------- on disk
def write_index(out_dir: Path, data: DataConfig, yaml_sha: str, split_records: dict[str, list[FileRecord]],
                split_fps: dict[str, str], fingerprint: str, settings: dict | None = None) -> Path:
    """Write DIR/index/ atomically: built in a temp folder beside it, then renamed into place.

    `settings` records the validation rules the index passed (e.g. max_bad_fraction): provenance, and it
    makes a changed rule change the index, so content-addressed consumers (DVC) rerun what follows."""
    final = out_dir / "index"
    tmp = out_dir / f".index.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: the index folder gets the usual umask permissions, not 0700
    try:
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "data_yaml": str(data.yaml_path),
                "data_yaml_sha256": yaml_sha, "root": str(data.root), "names": data.names, "nc": data.nc,
                "fingerprint": fingerprint, "settings": settings or {}, "splits": {}}
        for split, records in split_records.items():
            counts = np.array([len(r.labels) for r in records], np.int64)
            boxes = (np.concatenate([r.labels for r in records]) if records else np.zeros((0, 5))).astype(np.float32)
            with open(tmp / f"{split}.npz", "wb") as f:
                np.savez(
                    f,
                    image=np.array([r.image for r in records], dtype=str),
                    label=np.array([r.label for r in records], dtype=str),
                    image_size=np.array([r.image_size for r in records], np.int64),
                    image_mtime_ns=np.array([r.image_mtime_ns for r in records], np.int64),
                    image_hash=np.array([r.image_hash for r in records], dtype=str),
                    label_size=np.array([r.label_size for r in records], np.int64),
                    label_mtime_ns=np.array([r.label_mtime_ns for r in records], np.int64),
                    label_hash=np.array([r.label_hash for r in records], dtype=str),
                    shape=np.array([r.shape for r in records], np.int64).reshape(-1, 2),
                    usable=np.array([r.usable for r in records], bool),
                    box_count=counts,
                    boxes=boxes.reshape(-1, 5),
                )
                os.fsync(f.fileno())
            problems = [[i, *p] for i, r in enumerate(records) for p in r.problems]
            meta["splits"][split] = {"fingerprint": split_fps[split], "images": len(records),
                                     "arrays": f"{split}.npz", "problems": problems}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        old = None
        if final.exists():
            old = out_dir / f".index.old.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_split_records(index_dir: Path, split: str, yaml_sha: str) -> dict[str, FileRecord] | None:
    """The stored records of `split` by relative path, or None (logged) when the index cannot be used."""
    meta_path = index_dir / "index.json"
    try:
        meta = json.loads(read_regular_file(meta_path, MAX_INDEX_BYTES, "index")[0].decode("utf-8"))
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise ValueError(f"format {meta.get('format')} v{meta.get('version')}, need {INDEX_FORMAT} "
                             f"v{INDEX_VERSION}")
        if meta.get("data_yaml_sha256") != yaml_sha:
            LOG.warning(f"index {index_dir} was built for a different data.yaml; verifying in-process")
            return None
        if split not in meta["splits"]:
            LOG.warning(f"index {index_dir} has no `{split}` split; verifying in-process")
            return None
        arrays_path = index_dir / str(meta["splits"][split]["arrays"])
        if check_zip_archive(arrays_path, "index", MAX_INDEX_BYTES, INDEX_MAX_ARRAYS) is None:
            raise ValueError(f"{arrays_path} is not an .npz archive")
        with np.load(arrays_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise UserError(f"index not found: {e.filename} (run `yolo-pipeline validate --out DIR` and pass "
                        f"DIR/index)") from None
    except (OSError, ValueError, KeyError, TypeError, UserError) as e:
        LOG.warning(f"index {index_dir} is unreadable ({one_line(e)}); verifying in-process")
        return None
    offsets = np.concatenate([[0], np.cumsum(arrays["box_count"])])
    problems: dict[int, list] = {}
    for i, *p in meta["splits"][split]["problems"]:
        problems.setdefault(i, []).append(tuple(p))
    records = {}
    for i, rel in enumerate(arrays["image"].tolist()):
        records[rel] = FileRecord(
            image=rel, label=str(arrays["label"][i]), image_size=int(arrays["image_size"][i]),
            image_mtime_ns=int(arrays["image_mtime_ns"][i]), image_hash=str(arrays["image_hash"][i]),
            label_size=int(arrays["label_size"][i]), label_mtime_ns=int(arrays["label_mtime_ns"][i]),
            label_hash=str(arrays["label_hash"][i]), shape=tuple(int(v) for v in arrays["shape"][i]),
            usable=bool(arrays["usable"][i]), labels=arrays["boxes"][offsets[i]:offsets[i + 1]],
            problems=problems.get(i, []))
    return records
