"""`yolo-pipeline STEP ...`: parse argv, run one step, map errors to exit codes.

Each step module defines `add_arguments(parser)` (its flags, beside its typed config) and
`run(args) -> int | None`. Only the chosen step's module is imported, so `--help` and light
steps stay fast and a GPU machine without boto3/kfp/dvc can still run every step.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from yolo import __version__
from yolo.errors import UserError, escape_control

EXIT_USER_ERROR = 2

COMMANDS: dict[str, tuple[str, str]] = {
    "sample-data": ("yolo.data.sample", "write the embedded synthetic sample dataset"),
    "validate": ("yolo.data.validate", "verify a YOLO dataset and write its report and index"),
    "stats": ("yolo.stats", "label statistics, plots and a seeded autoanchor"),
    "train": ("yolo.train", "train a YOLOv5 model"),
    "evaluate": ("yolo.evaluate", "mAP, P, R per class, plots, COCO export and a promotion gate"),
    "predict": ("yolo.predict", "detect objects in images and write annotated copies and labels"),
    "convert": ("yolo.model.convert", "convert an upstream YOLOv5 .pt to this project's safe format"),
    "export": ("yolo.export", "export a model to ONNX or TorchScript"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line on stderr and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a typo like `--epoch` is an error, not `--epochs`
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def _top_parser() -> OneLineParser:
    parser = OneLineParser(prog="yolo-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"yolo-pipeline {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), help="the step to run")
    return parser


def build_parser(command: str) -> OneLineParser:
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = OneLineParser(prog=f"yolo-pipeline {command}", description=help_text)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") or argv[0] not in COMMANDS:
        top = _top_parser()
        if not argv:
            top.print_help(sys.stderr)
            return EXIT_USER_ERROR
        top.parse_args(argv[:1])  # prints help/version or a one-line error, then exits
        return EXIT_USER_ERROR
    # Our progress at INFO; third-party libraries (botocore, ...) only at WARNING, so a user error is
    # not preceded by their chatter.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("yolo").setLevel(logging.INFO)
    command = argv[0]
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv[1:])
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"yolo-pipeline {command}: error: {escape_control(str(e))}", file=sys.stderr)  # one line
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"yolo-pipeline {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
