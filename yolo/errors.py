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


def one_line(error: BaseException | str, limit: int = 160) -> str:
    """The first line of an exception's message (or its type when it has none), at most `limit` chars:
    third-party messages can span lines or quote whole inputs, and a UserError is one line."""
    lines = str(error).splitlines()
    text = lines[0] if lines and lines[0].strip() else (type(error).__name__ if isinstance(error, BaseException)
                                                        else "")
    return text if len(text) <= limit else f"{text[:limit]}..."
