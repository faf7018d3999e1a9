"""The one exception type for user errors, and helpers to word them well."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input, a bad option or a failed gate: the CLI prints one line and exits 2."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the nearest option, or '' when none is close."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""
