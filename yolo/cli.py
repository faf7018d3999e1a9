"""`yolo-pipeline STEP ...`: parse argv, run one step, map errors to exit codes.

Each step module defines `add_arguments(parser)` (its flags, beside its typed config) and
`run(args) -> int | None`. Only the chosen step's module is imported, so `--help` and light
steps stay fast and a GPU machine without boto3/kfp/dvc can still run every step.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import signal
import sys
import threading

from yolo import __version__
from yolo.errors import UserError, escape_control
from yolo.files import environment_error
from yolo.redact import RedactFilter, redact

EXIT_USER_ERROR = 2
EXIT_SIGTERM = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM outside the train loop: unwinds the step, so its `finally` blocks remove temp files."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()

COMMANDS: dict[str, tuple[str, str]] = {
    "sample-data": ("yolo.data.sample", "write the embedded synthetic sample dataset"),
    "validate": ("yolo.data.validate", "verify a YOLO dataset and write its report and index"),
    "stats": ("yolo.stats", "label statistics, plots and a seeded autoanchor"),
    "train": ("yolo.train", "train a YOLOv5 model"),
    "evaluate": ("yolo.evaluate", "mAP, P, R per class, plots, COCO export and a promotion gate"),
    "predict": ("yolo.predict", "detect objects in images, videos and streams: annotated copies, labels, crops"),
    "convert": ("yolo.model.convert", "convert an upstream YOLOv5 .pt to this project's safe format"),
    "export": ("yolo.export", "export a model to ONNX or TorchScript"),
    "tune": ("yolo.tune.study", "hyperparameter search: Optuna trials of the train step, resumable"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line on stderr and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a typo like `--epoch` is an error, not `--epochs`
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def has_no_default(value) -> bool:
    """None, False (an off switch), "" or SUPPRESS: nothing to show. By identity: 0 and 0.0 are defaults."""
    return value is None or value is False or value is argparse.SUPPRESS or (isinstance(value, str) and not value)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to an option's help when it has a default to show (see has_no_default) and
    the text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not action.required and not has_no_default(action.default)
        if shown and action.option_strings and "%(default)" not in text and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


def _top_parser() -> OneLineParser:
    steps = "\n".join(f"  {name:<12} {help_text}" for name, (_, help_text) in COMMANDS.items())
    parser = OneLineParser(
        prog="yolo-pipeline", usage="yolo-pipeline STEP [options]  (yolo-pipeline STEP --help for its options)",
        description="YOLOv5 training as a reproducible workflow: run one step.",
        epilog=f"steps:\n{steps}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"yolo-pipeline {__version__}")
    parser.add_argument("command", metavar="STEP", choices=list(COMMANDS), help="the step to run (listed below)")
    return parser


def build_parser(command: str) -> OneLineParser:
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = OneLineParser(prog=f"yolo-pipeline {command}", description=help_text,
                           formatter_class=DefaultsHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None, *, executable: bool = False) -> int:
    """Run one step from the command line; returns the exit code. executable=True (program()): the
    process ends with the step, see program()."""
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
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactFilter())  # no secret reaches the log, whoever wrote the message
    logging.getLogger("yolo").setLevel(logging.INFO)
    command = argv[0]
    if command == "train" and any(a == "--evolve" or a.startswith("--evolve=") for a in argv[1:]):
        # upstream's spelling of a hyperparameter search: say where it lives rather than half-doing it
        print("yolo-pipeline train: error: --evolve is `yolo-pipeline tune --sampler evolve --trials N` here "
              "(same data/model flags as train)", file=sys.stderr)
        return EXIT_USER_ERROR
    # The train loop installs its own handler (stop at a step boundary, write last.pt); everywhere else
    # SIGTERM unwinds the step, so atomic writes in progress remove their temp files.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        parser = build_parser(command)
        if executable:
            gc.freeze()  # torch and the step's modules are imported now: see program()
        args = parser.parse_args(argv[1:])
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"yolo-pipeline {command}: error: {redact(escape_control(str(e)))}", file=sys.stderr)  # one line
        return EXIT_USER_ERROR
    except (OSError, RuntimeError) as error:
        e = environment_error(error)
        if e is None:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(redact(f"yolo-pipeline {command}: error: {e.strerror}{where}"), file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated:
        print(f"yolo-pipeline {command}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print(f"yolo-pipeline {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def program() -> int:
    """The `yolo-pipeline` executable (pyproject's entry point, `python -m yolo`): main() with the heap
    frozen out of the garbage collector twice. Once the step's modules are imported: the full collections
    a run triggers then skip torch's hundreds of thousands of module objects (GC time per evaluate 0.4 s,
    per 2-epoch fine-tune 0.8 s on this 2-core machine, before). Again at the end: the interpreter's
    shutdown does not traverse them either (0.6 -> 0.2 s per command). Nothing else changes: objects made
    during the step are collected as always, shutdown joins threads and runs atexit handlers and
    finalizers. Library callers use main(): a frozen object is never collected, so freezing is right only
    in a process that ends with the step."""
    code = main(executable=True)
    gc.freeze()
    return code


if __name__ == "__main__":
    raise SystemExit(program())
