"""Reading input that a user, or an attacker with control of one input, hands a step: within budgets.

Each rule is checked before anything is allocated for the input (the numbers: yolo/limits.py):
- files: only regular files are opened (a FIFO, a device or a socket never is), and their size is
  checked before they are read; nothing under a virtual filesystem (/proc, /sys, /dev) is read;
- zip archives (checkpoints, .npz): entry count and declared sizes checked from the directory,
  before any entry is inflated;
- yaml: safe tags only, nesting and the node count after alias expansion bounded, recursive aliases
  refused, all before a single Python object is built ("billion laughs" fails in microseconds);
- JSON and plain data from a checkpoint (a cfg, names): no cycles, bounded nesting and expanded size.
A refusal is an `InputRefused` (a UserError: one line, exit 2) that carries a stable `code`, or a
plain UserError.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

import yaml

from yolo.errors import UserError, one_line
from yolo.limits import MAX_DATA_DEPTH, MAX_JSON_BYTES, MAX_YAML_BYTES, MAX_YAML_NODES, VIRTUAL_FILESYSTEMS

NOT_A_REGULAR_FILE = "not_a_regular_file"
TOO_LARGE = "too_large"
OUTSIDE_ROOT = "outside_root"
VIRTUAL_FILESYSTEM = "virtual_filesystem"
TOO_COMPLEX = "too_complex"
READ_CHUNK = 1 << 16  # read size once past what fstat announced (a file that grows)


class InputRefused(UserError):
    """An input over a budget or of a kind never read; `code` says which rule refused it, `detail` says
    why without naming the file (for reports that name it already)."""

    def __init__(self, code: str, message: str, detail: str | None = None):
        super().__init__(message)
        self.code, self.detail = code, detail or message


# ---------------------------------------------------------------------------------------------- files
def file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


def in_virtual_filesystem(real_path: str | os.PathLike) -> bool:
    p = os.fspath(real_path)
    return any(p == v or p.startswith(v + os.sep) for v in VIRTUAL_FILESYSTEMS)


def is_inside(real_path: str, real_root: str) -> bool:
    """Whether a resolved path lies in (or is) a resolved folder."""
    return real_path == real_root or real_path.startswith(real_root.rstrip(os.sep) + os.sep)


def check_regular(st: os.stat_result, path: str | os.PathLike, max_bytes: int, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        detail = f"is a {file_kind(st.st_mode)}, not a regular file: not read"
        raise InputRefused(NOT_A_REGULAR_FILE, f"{what} {path} {detail}", detail)
    if st.st_size > max_bytes:
        detail = f"has {st.st_size} bytes, more than the {max_bytes} a {what} may have: not read"
        raise InputRefused(TOO_LARGE, f"{what} {path} {detail}", detail)


def check_file(path: str | os.PathLike, max_bytes: int, what: str,
               real_path: str | None = None) -> os.stat_result:
    """The stat of a regular file of at most max_bytes outside the virtual filesystems (InputRefused
    otherwise; OSError as os raises it), found without opening it. real_path: the caller's resolved path."""
    if in_virtual_filesystem(real_path or os.path.realpath(path)):
        detail = f"lies in a virtual filesystem ({', '.join(VIRTUAL_FILESYSTEMS)}): not read"
        raise InputRefused(VIRTUAL_FILESYSTEM, f"{what} {path} {detail}", detail)
    st = os.stat(path)
    check_regular(st, path, max_bytes, what)
    return st


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str,
                      real_path: str | None = None) -> tuple[bytes, os.stat_result]:
    """(bytes, stat) of a regular file of at most max_bytes; InputRefused otherwise, OSError as os raises it.
    real_path: the caller's resolved path, when it has one (saves resolving it again).

    The kind is checked with stat before the file is opened (opening a tape device or a FIFO has
    effects of its own), and again on the open file with O_NONBLOCK, so a file swapped for a FIFO in
    between cannot make the read hang. The read asks for the size fstat gave (not max_bytes, which
    would allocate that much for every small file), then reads on to the end or past max_bytes."""
    check_file(path, max_bytes, what, real_path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        check_regular(st, path, max_bytes, what)
        chunks, size = [], 0
        want = st.st_size + 1
        while size <= max_bytes:
            chunk = os.read(fd, max(want - size, READ_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) > max_bytes:  # it grew while being read
        detail = f"has more than the {max_bytes} bytes a {what} may have: not read"
        raise InputRefused(TOO_LARGE, f"{what} {path} {detail}", detail)
    return data, st


def check_zip_archive(path: str | os.PathLike, what: str, max_bytes: int,
                      max_entries: int) -> list[zipfile.ZipInfo] | None:
    """The entries of a zip archive (torch checkpoints, numpy .npz) whose budgets hold, checked from its
    directory before any entry is inflated; None when the file is not a zip archive.

    A regular file of at most max_bytes; at most max_entries entries (counted from the end record,
    before the directory is parsed); all entries together declaring no more bytes than the file holds.
    torch.save and np.savez store entries uncompressed, so every archive they write passes, while
    deflated entries that would inflate to GiBs, or entries overlapping each other, do not."""
    st = check_file(path, max_bytes, what)
    with open(path, "rb") as f:
        try:
            end = zipfile._EndRecData(f)  # the end-of-directory record: entry count before reading entries
        except OSError:
            end = None
    if not end:
        return None
    entries = end[zipfile._ECD_ENTRIES_TOTAL]
    if entries > max_entries:
        raise InputRefused(TOO_LARGE, f"{what} {path}: the archive lists {entries} entries, more than the "
                                      f"{max_entries} a {what} may have")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UserError(f"{what} {path}: not a readable zip archive (truncated or corrupt?): {one_line(e)}") from None
    declared = sum(info.file_size for info in infos)
    if declared > st.st_size:
        raise InputRefused(TOO_LARGE, f"{what} {path}: its entries declare {declared} bytes uncompressed, more "
                                      f"than the file's own {st.st_size} (compressed or overlapping entries): "
                                      "refused before inflating")
    return infos


# ---------------------------------------------------------------------------------------------- data trees
def short_repr(obj: Any, limit: int = 80) -> str:
    """repr for a one-line message: user data can be long (run on checked trees only: no cycles)."""
    text = repr(obj)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _count_tree(root: Any, children: Callable[[Any], Iterable[Any] | None], what: str, max_nodes: int,
                max_depth: int) -> int:
    """Nodes of a graph counted as the tree it expands to (a node shared n times counts n times);
    a cycle, nesting deeper than max_depth or more than max_nodes nodes is refused. Linear in the
    number of distinct nodes: each shared node is counted once and its count reused."""
    counted: dict[int, int] = {}
    open_ids: set[int] = set()
    keep_alive: list[Any] = []  # ids stay unique only while the objects live

    def count(node: Any, depth: int) -> int:
        kids = children(node)
        if kids is None:
            return 1
        key = id(node)
        if key in counted:
            return counted[key]
        if key in open_ids:
            raise InputRefused(TOO_COMPLEX, f"{what} refers to itself (a cycle): refused")
        if depth > max_depth:
            raise InputRefused(TOO_COMPLEX, f"{what} is nested more than {max_depth} levels deep: refused")
        open_ids.add(key)
        total = 1
        for kid in kids:
            total += count(kid, depth + 1)
            if total > max_nodes:
                raise InputRefused(TOO_COMPLEX, f"{what} expands to more than {max_nodes} values (shared "
                                                "references or aliases repeated): refused")
        open_ids.discard(key)
        counted[key] = total
        keep_alive.append(node)
        return total

    return count(root, 0)


def _data_children(obj: Any) -> Iterable[Any] | None:
    if isinstance(obj, dict):
        return [v for kv in obj.items() for v in kv]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return obj
    return None


def check_data_tree(obj: Any, what: str, max_nodes: int = MAX_YAML_NODES, max_depth: int = MAX_DATA_DEPTH) -> int:
    """Refuse plain data (dicts, lists, ...) with cycles, deep nesting or a huge expanded size; returns
    its expanded size. Run on data from a checkpoint before it is copied, printed or serialised."""
    return _count_tree(obj, _data_children, what, max_nodes, max_depth)


# ---------------------------------------------------------------------------------------------- yaml
class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than MAX_DATA_DEPTH (its recursion is unbounded)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DATA_DEPTH + 1:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DATA_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _node_children(node: yaml.Node) -> Iterable[yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return None


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parsed JSON of a regular file of at most max_bytes, nested at most MAX_DATA_DEPTH deep; one-line
    UserError naming `what` and the file otherwise (json's parser recurses: deep nesting must not
    end in a RecursionError)."""
    try:
        data, _ = read_regular_file(path, max_bytes, what)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read: {e.strerror or e}") from None
    try:
        obj = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path}, line {e.lineno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise UserError(f"{what} {path}: nested more than {MAX_DATA_DEPTH} levels deep") from None
    check_data_tree(obj, f"{what} {path}")
    return obj


class InvalidYaml(UserError):
    """Not valid yaml (or over a yaml budget); `line` (1-based or None) and `problem` let callers word it."""

    def __init__(self, where: str, line: int | None, problem: str):
        super().__init__(f"{where}{f', line {line}' if line else ''}: not valid YAML: {problem}")
        self.line, self.problem = line, problem


def parse_yaml(text: bytes | str, where: str) -> tuple[Any, yaml.Node | None]:
    """(data, root node) of one yaml document, safe tags only and within the budgets; the nodes carry
    line numbers for messages. InvalidYaml (a UserError naming `where`) on any problem."""
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        try:
            _count_tree(root, _node_children, "the document", MAX_YAML_NODES, MAX_DATA_DEPTH)
        except InputRefused as e:
            raise InvalidYaml(where, None, str(e)) from None
        return loader.construct_document(root), root
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InvalidYaml(where, mark.line + 1 if mark is not None else None,
                          str(getattr(e, "problem", None) or e)) from None
    except (ValueError, OverflowError, TypeError) as e:  # e.g. an integer of 5000 digits
        raise InvalidYaml(where, None, f"a value cannot be read: {one_line(e)}") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a yaml file: a regular file of at most MAX_YAML_BYTES (UserError otherwise)."""
    try:
        return read_regular_file(path, MAX_YAML_BYTES, what)[0]
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read: {e.strerror or e}") from None
