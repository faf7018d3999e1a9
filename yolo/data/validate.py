"""The validate step: verify every image and label of a dataset, write report.json, report.md and DIR/index/.

Never writes into the dataset. A dataset-level failure (a split missing or empty, names/nc disagreeing,
too many unusable images) still writes both reports with `ok: false`, then raises UserError (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from yolo.argtypes import float_between, int_at_least
from yolo.data.dataset import (
    FATAL,
    NAMES_MISMATCH,
    SKIPPED,
    SPLIT_EMPTY,
    SPLIT_TOO_MANY_BAD,
    SplitSourceMissing,
    parse_data_config,
    scan_split,
)
from yolo.data.index import dataset_fingerprint, split_fingerprint, verify_split, write_index, yaml_hash
from yolo.errors import UserError, escape_control
from yolo.files import prepare_out_dir, write_json, write_text

LOG = logging.getLogger(__name__)
DEFAULT_MAX_BAD_FRACTION = 0.05  # a split with more than 5 % unusable images fails the step
REPORT_MD_FILES_PER_CODE = 10


@dataclass(frozen=True)
class ValidateConfig:
    data: Path
    out: Path
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    workers: int = 0  # 0: all cores






def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="data.yaml (upstream YOLOv5 format)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: report.json, report.md, index/")
    parser.add_argument("--max-bad-fraction", type=float_between(0, 1), default=DEFAULT_MAX_BAD_FRACTION,
                        help="fail when more than this fraction of a split's images is unusable "
                             "(missing label files do not count; default %(default)s)")
    parser.add_argument("--workers", type=int_at_least(0), default=0, help="parallel workers (0: all cores)")


def run(args: argparse.Namespace) -> None:
    validate(ValidateConfig(data=args.data, out=args.out, max_bad_fraction=args.max_bad_fraction,
                            workers=args.workers))


def _problem(split: str | None, file: str, code: str, message: str, action: str) -> dict:
    return {"split": split, "file": file, "code": code, "message": message, "action": action}


def validate(cfg: ValidateConfig) -> dict:
    """Verify the dataset; returns the report (raises UserError after writing it when `ok` is false)."""
    data, mismatches = parse_data_config(cfg.data)  # yaml-level errors raise before anything is written
    out = prepare_out_dir(cfg.out)
    for name in ("report.json", "report.md"):  # an earlier run's report must never pass for this one's
        (out / name).unlink(missing_ok=True)
    yaml_sha = yaml_hash(data)
    problems = [_problem(None, data.yaml_path.name, NAMES_MISMATCH, m, FATAL) for m in mismatches]
    splits: dict[str, dict] = {}
    split_records, split_fps = {}, {}
    for split in data.splits:
        try:
            listing = scan_split(data, split)
        except SplitSourceMissing as e:
            images, missing = [], str(e)
        else:
            images, missing = listing.images, None
            problems += [_problem(split, path, code, message, SKIPPED) for code, path, message in listing.refused]
        if not images:
            sources = ", ".join(str(s) for s in data.splits[split])
            problems.append(_problem(split, sources, SPLIT_EMPTY, missing or f"no images in {sources}", FATAL))
            splits[split] = {"images": 0, "images_ok": 0, "backgrounds": 0, "boxes": 0, "skipped": 0,
                             "problems": 1, "fingerprint": None}
            continue
        records = verify_split(data, split, images, workers=cfg.workers)
        usable = [r for r in records if r.usable]
        split_problems = [_problem(split, file, code, message, action)
                          for r in records for code, file, message, action in r.problems]
        skipped = len(records) - len(usable)
        if skipped > cfg.max_bad_fraction * len(records):
            split_problems.append(_problem(
                split, ", ".join(str(s) for s in data.splits[split]), SPLIT_TOO_MANY_BAD,
                f"{skipped} of {len(records)} images unusable ({skipped / len(records):.1%}), more than "
                f"--max-bad-fraction {cfg.max_bad_fraction:g}", FATAL))
        split_fps[split] = split_fingerprint(yaml_sha, split, records)
        split_records[split] = records
        splits[split] = {
            "images": len(records), "images_ok": len(usable),
            "backgrounds": sum(1 for r in usable if len(r.labels) == 0),
            "boxes": int(sum(len(r.labels) for r in usable)), "skipped": skipped,
            "problems": len(split_problems), "fingerprint": split_fps[split]}
        problems += split_problems
        LOG.info(f"{split}: {len(records)} images, {len(usable)} usable, {splits[split]['backgrounds']} "
                    f"backgrounds, {splits[split]['boxes']} boxes, {len(split_problems)} problems")

    fatal = [p for p in problems if p["action"] == FATAL]
    ok = not fatal
    fingerprint = dataset_fingerprint(yaml_sha, split_fps) if ok else None
    report = {"ok": ok, "data": str(data.yaml_path), "root": str(data.root), "names": data.names, "nc": data.nc,
              "max_bad_fraction": cfg.max_bad_fraction, "fingerprint": fingerprint,
              "index": "index" if ok else None, "splits": splits, "problems": problems}
    if ok:
        write_index(out, data, yaml_sha, split_records, split_fps, fingerprint,
                    settings={"max_bad_fraction": cfg.max_bad_fraction})
    elif (out / "index").exists():  # an index from an earlier run must not vouch for this dataset
        shutil.rmtree(out / "index")
    write_text(out / "report.md", report_markdown(report))
    write_json(out / "report.json", report)  # last: its presence means the step finished
    if not ok:
        more = f" (+{len(fatal) - 1} more)" if len(fatal) > 1 else ""
        raise UserError(f"{fatal[0]['code']}: {fatal[0]['message']}{more}; see {out / 'report.json'}")
    LOG.info(f"dataset fingerprint {fingerprint}; report {out / 'report.json'}")
    return report


_MARKDOWN_SPECIAL = {ord(c): f"\\{c}" for c in "\\`*_[]<>!|#~&"}


def md_code(text: str) -> str:
    """`text` as one inline code span: control characters shown as escapes (a newline cannot end the
    line), fenced with more backticks than any run inside it (CommonMark), so nothing in a file name
    becomes Markdown."""
    text = escape_control(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_text(text: str) -> str:
    """Plain text that stays plain in Markdown: control characters shown as escapes, markup characters
    backslash-escaped (messages quote bits of labels and file names)."""
    return escape_control(str(text).translate(_MARKDOWN_SPECIAL))


def report_markdown(report: dict) -> str:
    """A human summary: counts per split, problems grouped by code, the first files of each."""
    lines = [f"# Dataset validation: {'OK' if report['ok'] else 'FAILED'}", "",
             f"- data: {md_code(report['data'])}", f"- root: {md_code(report['root'])}",
             f"- classes: {report['nc']}", f"- max bad fraction: {report['max_bad_fraction']:g}",
             f"- fingerprint: `{report['fingerprint']}`", "",
             "| split | images | usable | skipped | backgrounds | boxes | problems |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in report["splits"].items():
        lines.append(f"| {name} | {s['images']} | {s['images_ok']} | {s['skipped']} | {s['backgrounds']} | "
                     f"{s['boxes']} | {s['problems']} |")
    problems = report["problems"]
    lines += ["", "## Problems", ""]
    if not problems:
        return "\n".join(lines + ["None.", ""])
    by_code: dict[str, list[dict]] = defaultdict(list)
    for p in problems:
        by_code[p["code"]].append(p)
    lines += ["| code | count | action |", "|---|---:|---|"]
    for code, items in sorted(by_code.items()):
        actions = ", ".join(f"{a} ({n})" if len(set(i['action'] for i in items)) > 1 else a
                            for a, n in Counter(i["action"] for i in items).items())
        lines.append(f"| {code} | {len(items)} | {actions} |")
    for code, items in sorted(by_code.items()):
        lines += ["", f"### {code} ({len(items)})", ""]
        for p in items[:REPORT_MD_FILES_PER_CODE]:
            where = f"{p['split']}: " if p["split"] else ""
            lines.append(f"- {where}{md_code(p['file'])}: {md_text(p['message'])} ({p['action']})")
        if len(items) > REPORT_MD_FILES_PER_CODE:
            lines.append(f"- ... and {len(items) - REPORT_MD_FILES_PER_CODE} more in report.json")
    return "\n".join(lines) + "\n"
