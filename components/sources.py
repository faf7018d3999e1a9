"""Dataset source strings: parsing, the checks that keep them from reaching git or dvc as options, and
resolving a git rev to a commit SHA.

Sources: `sample:[train=N,val=N,imgsz=N,seed=N]` (the embedded sample data), a local/PVC path (a folder
holding data.yaml, or a data.yaml file), `dvc://REPO#PATH` (a DVC repository, git URL or local path, and
the path inside it; the rev comes separately), `s3://bucket/prefix`.

Submit-time code (submit, retrain, run-local, pytorchjob) and the pipeline's first step both use this
module, so it imports nothing heavy and nothing that only makes sense inside a step's container.

Why the checks: a source or rev is a parameter anyone who can edit a params file controls, and it
reaches `git ls-remote` on the machine that holds the KFP token and `dvc get` inside the cluster. A
string beginning with `-` would be an option there (`--upload-pack=CMD` runs CMD), and git's transport
helpers (`ext::CMD`) run commands by design. So a repository must be an https/ssh URL, a `user@host:path`
scp form, a file:// URL or a plain path; nothing starts with `-`; no control characters; and every call
also passes the strings after `--` (or `--end-of-options`) and allows git only the file, https and ssh
protocols.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from yolo.errors import UserError

SOURCE_SCHEMES = ("sample:", "dvc://", "s3://", "file://")
# Where `--dataset-pvc` mounts its volume in every task that reads data: a local source under it is used in
# place (import_data writes only a data.yaml pointing at it), never copied through the pipeline root.
DATASET_MOUNT = "/mnt/dataset"
SAMPLE_OPTIONS = ("train", "val", "imgsz", "seed")
SHA_PATTERN = re.compile(r"^[0-9a-f]{40}$")
GIT_URL_SCHEMES = ("https", "ssh", "file")
GIT_ALLOWED_PROTOCOLS = "file:https:ssh"  # GIT_ALLOW_PROTOCOL: what git itself may use, whatever we parse
SCP_FORM = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?[A-Za-z0-9][A-Za-z0-9.-]*:(?!//)")
REV_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./@{}~^+-]{0,254}$")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
SOURCE_HELP = "use sample:, a path, dvc://REPO#PATH or s3://bucket/prefix"

# userinfo of a URL (scheme://USER:PASSWORD@host): greedy up to the last '@' before the first '/'
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-credential|x-amz-signature|x-amz-security-token|access_token|token|sig|signature)=)"
    r"[^&\s#]+"
)


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it (user:password@, signed-query values) replaced by ***."""
    return _SECRET_QUERY.sub(r"\1***", _URL_CREDENTIALS.sub(r"\1***@", str(text)))


def check_argument(what: str, value: str) -> str:
    """A string that will be one argument of a command: no leading '-', no control characters."""
    if value.startswith("-"):
        raise UserError(f"{what} {redact(value)!r}: must not begin with '-' (it would be read as an option)")
    if CONTROL_CHARS.search(value):
        raise UserError(f"{what} {redact(value)!r}: control characters (newline, tab, ...) are not allowed")
    return value


def check_git_repository(location: str) -> str:
    """A repository git or dvc may be pointed at: https/ssh/file URL, user@host:path, or a local path."""
    shown = f"dataset source dvc://{redact(location)}"
    check_argument("dataset source repository", location)
    if "::" in location:  # <transport>::<address> runs a remote helper (ext:: runs any command)
        raise UserError(f"{shown}: git transport helpers (TRANSPORT::ADDRESS) are not allowed")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", location)
    if scheme:
        name = scheme.group(1).lower()
        if name not in GIT_URL_SCHEMES:
            raise UserError(
                f"{shown}: repository scheme {name!r} is not allowed (use https://, ssh://, "
                "user@host:path, file:// or a local path)"
            )
        parts = urlsplit(location)
        if name != "file" and (not parts.hostname or parts.hostname.startswith("-") or " " in location):
            raise UserError(f"{shown}: not a valid {name} URL")
        return location
    if SCP_FORM.match(location) and location.split(":", 1)[1].startswith("-"):
        raise UserError(f"{shown}: the path after ':' must not begin with '-'")
    return location


def check_rev(rev: str) -> str:
    """A git rev (branch, tag, SHA, HEAD~1): ref characters only, never an option."""
    if rev and not REV_PATTERN.match(rev):
        raise UserError(
            f"dataset rev {redact(rev)!r}: not a git rev (letters, digits and ._/@{{}}~^+-, "
            "not beginning with '-')"
        )
    return rev


def check_path_in_repo(source: str, path: str) -> str:
    check_argument(f"dataset source {redact(source)}: path", path)
    if any(part == ".." for part in path.split("/")):
        raise UserError(f"dataset source {redact(source)}: path {path!r} must not contain '..'")
    return path


@dataclass(frozen=True)
class Source:
    kind: str  # "sample" | "local" | "dvc" | "s3"
    location: str  # sample options, a path, a repo, an s3 URI
    path_in_repo: str = ""  # dvc only


def parse_source(source: str) -> Source:
    """Parse (and check) a dataset source string; UserError naming the problem for anything unknown."""
    text = source.strip()
    shown = redact(text)
    if not text:
        raise UserError(f"dataset source is empty ({SOURCE_HELP})")
    if CONTROL_CHARS.search(text):
        raise UserError(f"dataset source {shown!r}: control characters (newline, tab, ...) are not allowed")
    if text.startswith("sample:"):
        options = text[len("sample:") :]
        sample_args(options)  # validates
        return Source("sample", options)
    if text.startswith("dvc://"):
        repo, _, path = text[len("dvc://") :].partition("#")
        if not repo or not path:
            raise UserError(
                f"dataset source {shown!r}: expected dvc://REPO#PATH (a git URL or folder, then a path)"
            )
        check_git_repository(repo)
        return Source("dvc", repo, check_path_in_repo(text, path.strip("/")))
    if text.startswith("s3://"):
        if not text[len("s3://") :].split("/", 1)[0]:
            raise UserError(f"dataset source {shown!r}: no bucket (expected s3://bucket/prefix)")
        return Source("s3", text.rstrip("/"))
    if text.startswith("file://"):
        return Source("local", text[len("file://") :])
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?", text)
    if scheme and not re.match(r"^[A-Za-z]:[\\/]", text):  # not a Windows drive letter
        raise UserError(f"dataset source {shown!r}: unknown scheme {scheme.group(1)!r} ({SOURCE_HELP})")
    return Source("local", text)


def sample_args(options: str) -> list[str]:
    """`train=8,val=4` → ['--train', '8', '--val', '4'] for `yolo sample-data`."""
    args: list[str] = []
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in SAMPLE_OPTIONS or not value.isdigit():
            raise UserError(
                f"sample source option {item!r}: expected NAME=INTEGER with NAME in {', '.join(SAMPLE_OPTIONS)}"
            )
        args += [f"--{key}", value]
    return args


def tool_environment() -> dict[str, str]:
    """Environment for git and dvc: only the file/https/ssh protocols, and never a password prompt."""
    return dict(os.environ, GIT_ALLOW_PROTOCOL=GIT_ALLOWED_PROTOCOLS, GIT_TERMINAL_PROMPT="0")


def _git(args: list[str], cwd: str | None = None) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=False, env=tool_environment()
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["git failed"])[-1]
        raise UserError(redact(f"git {' '.join(args)}: {last}"))
    return result.stdout.strip()


def resolve_git_rev(repo: str, rev: str) -> str:
    """The commit SHA a rev (branch, tag, SHA; '' = HEAD) names in a local or remote git repository."""
    check_git_repository(repo)
    rev = check_rev(rev.strip()) or "HEAD"
    if SHA_PATTERN.match(rev):
        return rev
    if Path(repo).is_dir():
        return _git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"], cwd=repo)
    lines = _git(["ls-remote", "--", repo, rev]).splitlines()
    if not lines:
        raise UserError(f"dvc repo {redact(repo)}: no ref named {rev!r}")
    return lines[0].split()[0]


def manifest_dataset_version(source_text: str, rev: str) -> str:
    """The data version a manifest (PyTorchJob, Katib trial) records for a dataset source given at write
    time: a dvc:// source's rev resolved to a commit SHA, else the source's kind ('' without a source).
    Only a dvc:// source may have a rev; other sources hold whatever they hold when a pod starts."""
    if not source_text:
        return ""
    source = parse_source(source_text)
    if source.kind == "dvc":
        return resolve_git_rev(source.location, rev)
    if rev:
        raise UserError(f"--dataset-rev {rev!r}: only a dvc:// dataset source has a rev")
    return source.kind
