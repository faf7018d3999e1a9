"""`python -m yolo.tune.trial_hyp OUT KEY=VALUE ...`: write a trial's hyp.yaml from KEY=VALUE pairs.

The init container of a Katib trial runs this with the values Katib suggested (and the base values the
Experiment fixed), so the train step itself gets them the one way it takes hyperparameters: --hyp FILE.
Every value passes `Hyp`'s own checks; a bad one is one line on stderr and exit 2.
"""

from __future__ import annotations

import sys

import yaml

from yolo.errors import UserError
from yolo.files import write_text
from yolo.hyp import Hyp

EXIT_USER_ERROR = 2


def hyp_from_pairs(pairs: list[str]) -> Hyp:
    values: dict[str, float] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UserError(f"expected KEY=VALUE, got {pair!r}")
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"hyp `{key}`: not a number: {text!r}") from None
        values[key] = round(value) if key == "anchors" else value
    return Hyp().replace(**values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m yolo.tune.trial_hyp OUT KEY=VALUE ...", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        hyp = hyp_from_pairs(argv[1:])
    except UserError as e:
        print(f"trial_hyp: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    write_text(argv[0], yaml.safe_dump({k: v for k, v in hyp.to_dict().items() if v is not None}, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
