"""Secrets never reach a message: credentials inside URIs and AWS keys are masked before anything prints.

`redact(text)` is applied where storage and train build their messages, and `RedactFilter` sits on the
CLI's log handler as the last line of defence, so a URI echoed by a library is masked too.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
# scheme://user:password@host -> scheme://***@host (any scheme: s3, http(s), git+https ...)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
# AWS access key ids have a fixed shape; secret keys and tokens do not, so those are masked by value
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """`text` with URI credentials, AWS key ids and the values of the AWS secret variables masked."""
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _ACCESS_KEY_ID.sub(MASK, text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:  # a one-letter test value would mask half the message
            text = text.replace(value, MASK)
    return text


def has_credentials(uri: str) -> bool:
    """True when a URI carries `user[:password]@` in its authority."""
    return bool(_USERINFO.match(uri))


class RedactFilter(logging.Filter):
    """Masks secrets in every record a handler emits (message and arguments, formatted once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True
