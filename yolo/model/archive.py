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
import zipfile
from pathlib import Path

from yolo.errors import UserError, one_line
from yolo.limits import MAX_CHECKPOINT_BYTES, MAX_CHECKPOINT_ENTRIES, MAX_PICKLE_BYTES
from yolo.untrusted import TOO_LARGE, InputRefused, check_regular


def check_checkpoint_file(path: str | os.PathLike) -> bool:
    """Check a checkpoint file's budgets; True for a zip archive (checked), False for a bare pickle
    (checked against MAX_PICKLE_BYTES). InputRefused names the file and the budget it exceeds."""
    path = Path(path)
    st = os.stat(path)
    check_regular(st, path, MAX_CHECKPOINT_BYTES, "checkpoint")
    with open(path, "rb") as f:
        try:
            end = zipfile._EndRecData(f)  # the end-of-directory record: how many entries, before reading them
        except OSError:
            end = None
    if not end:
        if st.st_size > MAX_PICKLE_BYTES:
            raise InputRefused(TOO_LARGE, f"{path}: not a zip archive (truncated or corrupt?), and with "
                                          f"{st.st_size} bytes too large for a bare pickle ({MAX_PICKLE_BYTES})")
        return False
    entries = end[zipfile._ECD_ENTRIES_TOTAL]
    if entries > MAX_CHECKPOINT_ENTRIES:
        raise InputRefused(TOO_LARGE, f"{path}: the archive lists {entries} entries, more than the "
                                      f"{MAX_CHECKPOINT_ENTRIES} a checkpoint may have")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt?): {one_line(e)}") from None
    declared = sum(info.file_size for info in infos)
    if declared > st.st_size:
        raise InputRefused(TOO_LARGE, f"{path}: its entries declare {declared} bytes uncompressed, more than the "
                                      f"file's own {st.st_size} (compressed or overlapping entries): refused "
                                      "before inflating")
    for info in infos:
        if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise InputRefused(TOO_LARGE, f"{path}: {info.filename} has {info.file_size} bytes, more than the "
                                          f"{MAX_PICKLE_BYTES} a checkpoint's pickle may have")
    return True
