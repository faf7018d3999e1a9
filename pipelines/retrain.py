"""`python -m pipelines retrain`: submit the production pipeline only when the versioned data or the
production parameters changed since the last submission.

What counts as a change: the git diff between the last submitted commit and HEAD touches `data/**.dvc`
(a DVC-tracked dataset moved to a new version) or the production parameters file (pipelines/production.yaml).
Code, docs, params.yaml (the CPU sample defaults) and dvc.lock (churn from local `dvc repro` runs) do not
retrain: the image built for each commit already carries the code, and the next data or params change
trains with it.

Where the last submitted commit is recorded: the git tag `retrain/last` (annotated, its message names the
run). A tag rather than the registry's models/<name>/current.json because current.json records what was
*promoted*, not what was *submitted*: a run that fails the gate, or is still training, never writes it, so
deciding from it would resubmit the same data on every push and every scheduled run. The tag sits beside
the diff it is compared with, needs no S3 credentials to read, and moves only when a submission succeeded.
The CI workflow pushes it (`git push --force origin refs/tags/retrain/last`) after this command.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from components.sources import check_argument, redact
from pipelines import submit as submission
from yolo.errors import UserError

DEFAULT_TAG = "retrain/last"
PRODUCTION_PARAMS = "pipelines/production.yaml"
DATA_DIR = "data/"
DVC_SUFFIX = ".dvc"
SHOWN_PATHS = 8  # of a long list of changed files, name this many in the reason


@dataclass(frozen=True)
class Decision:
    submit: bool
    reason: str
    head: str
    base: str | None = None
    changed: tuple[str, ...] = ()  # the watched paths that changed


def git(repo: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise UserError(f"git {' '.join(args)} (in {repo}): {last}")
    return proc.stdout.strip() if proc.returncode == 0 else ""


def is_watched(path: str, params_file: str = PRODUCTION_PARAMS) -> bool:
    """A dataset version file (data/**.dvc) or the production parameters: what makes a retrain."""
    return path == params_file or (path.startswith(DATA_DIR) and path.endswith(DVC_SUFFIX))


def _commit(repo: Path, rev: str) -> str | None:
    check_argument("git rev", rev)
    return (
        git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", check=False)
        or None
    )


def _listing(paths: list[str]) -> str:
    shown = ", ".join(paths[:SHOWN_PATHS])
    return shown + (f" and {len(paths) - SHOWN_PATHS} more" if len(paths) > SHOWN_PATHS else "")


def decide(
    repo: Path,
    base: str | None = None,
    tag: str = DEFAULT_TAG,
    params_file: str = PRODUCTION_PARAMS,
    force: bool = False,
) -> Decision:
    """Whether HEAD needs a training run, and why (git only: nothing is submitted or written)."""
    head = _commit(repo, "HEAD")
    if head is None:
        raise UserError(f"{repo}: no commit at HEAD")
    if base is not None:
        base_sha = _commit(repo, base)
        if base_sha is None:
            raise UserError(f"--base {base!r}: no such commit in {repo}")
        since = f"--base {base} ({base_sha[:12]})"
    else:
        base_sha = _commit(repo, f"refs/tags/{tag}")
        since = f"the last submission (tag {tag} = {base_sha[:12]})" if base_sha else ""
    if force:
        return Decision(True, "forced (--force)", head, base_sha)
    if base_sha is None:
        return Decision(True, f"no earlier submission recorded (no tag {tag}): first submission", head)
    if base_sha == head:
        return Decision(False, f"HEAD {head[:12]} is {since}: nothing new", head, base_sha)
    # --no-renames: a renamed dataset file shows as its old (deleted) and its new path, both watched.
    changed = git(repo, "diff", "--name-only", "--no-renames", "-z", "--end-of-options", base_sha, head)
    changed = changed.split("\0")
    changed = [p for p in changed if p]
    watched = [p for p in changed if is_watched(p, params_file)]
    if watched:
        return Decision(True, f"changed since {since}: {_listing(watched)}", head, base_sha, tuple(watched))
    if not changed:
        return Decision(False, f"no file differs from {since}", head, base_sha)
    return Decision(
        False,
        f"no data/**{DVC_SUFFIX} or {params_file} change since {since} "
        f"({len(changed)} other file(s) changed: {_listing(changed)})",
        head,
        base_sha,
    )


def _normalise_repo_url(url: str) -> str:
    url = re.sub(r"^[a-z+]+://([^@/]+@)?", "", url.strip())  # scheme and credentials
    url = re.sub(r"^[^@/]+@([^:/]+):", r"\1/", url)  # git@host:org/repo → host/org/repo
    return url.rstrip("/").removesuffix(".git").lower()


def is_this_repository(repo: Path, location: str) -> bool:
    """Whether a dvc:// source's repository is the one retrain runs in (a path to it, or its origin)."""
    candidate = Path(location).expanduser()
    if candidate.is_dir():
        return candidate.resolve() == repo.resolve()
    origin = git(repo, "remote", "get-url", "origin", check=False)
    return bool(origin) and _normalise_repo_url(origin) == _normalise_repo_url(location)


def pin_dataset_to_head(repo: Path, params: dict, head: str) -> str | None:
    """A dvc:// source in this repository with no rev (or HEAD) trains on the data of the commit decided
    on — not on whatever the branch points at when the pod starts."""
    from components.sources import parse_source

    source = parse_source(str(params.get("dataset_source", "")))
    rev = str(params.get("dataset_rev") or "")
    if source.kind != "dvc" or rev not in ("", "HEAD") or not is_this_repository(repo, source.location):
        return None
    params["dataset_rev"] = head
    return f"dataset {redact(source.location)}#{source.path_in_repo} at the decided commit {head}"


def record_submission(repo: Path, tag: str, head: str, run_id: str, url: str) -> None:
    """Move the tag to HEAD (annotated: the message names the run)."""
    env = dict(os.environ)
    if not git(repo, "config", "user.email", check=False) and "GIT_COMMITTER_EMAIL" not in env:
        env.update(
            GIT_COMMITTER_NAME="yolo-pipeline retrain", GIT_COMMITTER_EMAIL="retrain@yolo-pipeline.invalid"
        )
    message = f"retrain: submitted run {run_id}\n\n{url}\n"
    proc = subprocess.run(
        ["git", "-C", str(repo), "tag", "--force", "--annotate", "--message", message, "--", tag, head],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise UserError(f"run {run_id} was submitted, but tagging {tag}: {redact(proc.stderr.strip())}")


# --------------------------------------------------------------------------------------------- CLI
def production_params_path(repo: Path, given: Path | None) -> str:
    """--params-file (default pipelines/production.yaml) as a path relative to the repo, as git names it."""
    if given is None:
        return PRODUCTION_PARAMS
    path = given if given.is_absolute() else repo / given  # relative: to the repository root
    try:
        return path.resolve().relative_to(repo.resolve()).as_posix()
    except ValueError:
        raise UserError(
            f"--params-file {given}: must be inside the repository {repo} (its changes are watched)"
        ) from None


def add_parser(sub) -> None:
    """Register `retrain` on the `python -m pipelines` subparsers."""
    p = sub.add_parser(
        "retrain", help="submit the production pipeline if data/**.dvc or production params changed"
    )
    submission.add_connection_arguments(p)
    submission.add_pipeline_arguments(p)
    p.add_argument("--repo", type=Path, default=Path("."), help="the git working tree (default: .)")
    p.add_argument("--base", help=f"compare HEAD with this commit instead of the tag {DEFAULT_TAG}")
    p.add_argument(
        "--tag", default=DEFAULT_TAG, help=f"the tag that records the last submission ({DEFAULT_TAG})"
    )
    p.add_argument("--force", action="store_true", help="submit even when nothing changed")
    p.add_argument("--dry-run", action="store_true", help="print the decision, submit nothing")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_argument("--tag", args.tag)
    repo = Path(git(args.repo, "rev-parse", "--show-toplevel"))
    params_path = production_params_path(repo, args.params_file)
    decision = decide(repo, args.base, args.tag, params_path, args.force)
    print(f"retrain: {'submit' if decision.submit else 'no submit'}: {decision.reason}")
    if not decision.submit:
        return 0
    if args.dry_run:
        print("retrain: dry run, nothing submitted")
        return 0
    params_file = submission.load_params_file(repo / params_path)
    request = submission.request_from_args(args, params_file)
    note = pin_dataset_to_head(repo, request.parameters, decision.head)
    if note:
        print(f"retrain: {note}", file=sys.stderr)
    if not request.run_name:
        request.run_name = f"retrain {decision.head[:12]}"
    result = submission.submit(request, log=lambda line: print(line, file=sys.stderr))
    record_submission(repo, args.tag, decision.head, result.run_id, result.url)
    print(f"retrain: recorded {decision.head[:12]} as tag {args.tag} (push it to share the decision)")
    return submission.report(result)
