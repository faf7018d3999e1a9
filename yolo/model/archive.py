"""Torch checkpoint archives: their budgets checked from the zip's directory before any entry is read.

torch.save writes a zip whose entries are stored uncompressed: data.pkl (the pickle) and one entry per
tensor storage. A crafted archive can declare deflated entries that inflate to GiBs, or entries that
overlap, and torch.load (or the restricted unpickler) would allocate what they declare. So before a
byte is inflated: the file is a regular file under MAX_CHECKPOINT_BYTES, its directory lists at most
MAX_CHECKPOINT_ENTRIES entries, all entries together declare no more bytes than the file holds (true of
every archive torch writes), and the pickle is under MAX_PICKLE_BYTES.
"""

from __future__ import annotations

import os
from pathlib import Path

from yolo.limits import MAX_CHECKPOINT_BYTES, MAX_CHECKPOINT_ENTRIES, MAX_PICKLE_BYTES
from yolo.untrusted import TOO_LARGE, InputRefused, check_zip_archive


def check_checkpoint_file(path: str | os.PathLike) -> bool:
    """Check a checkpoint file's budgets; True for a zip archive (checked), False for a bare pickle
    (checked against MAX_PICKLE_BYTES). InputRefused names the file and the budget it exceeds."""
    path = Path(path)
    infos = check_zip_archive(path, "checkpoint", MAX_CHECKPOINT_BYTES, MAX_CHECKPOINT_ENTRIES)
    if infos is None:
        size = os.stat(path).st_size
        if size > MAX_PICKLE_BYTES:
            raise InputRefused(TOO_LARGE, f"{path}: not a zip archive (truncated or corrupt?), and with "
                                          f"{size} bytes too large for a bare pickle ({MAX_PICKLE_BYTES})")
        return False
    for info in infos:
        if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise InputRefused(TOO_LARGE, f"{path}: {info.filename} has {info.file_size} bytes, more than the "
                                          f"{MAX_PICKLE_BYTES} a checkpoint's pickle may have")
    return True
