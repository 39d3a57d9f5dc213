"""The agent's ``--log-format json``: one JSON object per log line.

Contract: every record becomes exactly one line (no embedded newlines: a traceback is inside the
``exception`` string) holding ``time`` (RFC 3339 UTC, milliseconds), ``level``, ``logger``,
``message`` and, when the record carries one, ``exception`` (the formatted traceback). URL
userinfo in the message and the exception is blanked (cbctl/core/model/redaction.py), a second
line of defence: nothing logs a secret in the first place.
"""

from __future__ import annotations

import json
import logging
from typing import Final

from cbctl.core.model.redaction import redact_url
from cbctl.core.model.times import rfc3339

LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME: Final = "cbctl-agent-log"


def _clean(text: str) -> str:
    return redact_url(text) if "://" in text else text


class JsonLogFormatter(logging.Formatter):
    """Formats a record as one compact JSON object (see the module contract)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _clean(record.getMessage()),
        }
        if record.exc_info:
            data["exception"] = _clean(self.formatException(record.exc_info))
        elif record.exc_text:
            data["exception"] = _clean(record.exc_text)
        if record.stack_info:
            data["stack"] = _clean(self.formatStack(record.stack_info))
        # ensure_ascii keeps the line plain ASCII; json.dumps escapes newlines inside strings.
        return json.dumps(data, ensure_ascii=True, separators=(",", ":"))


def configure_logging(stream: object, level: int, log_format: str) -> None:
    """Install a handler on the root logger writing ``log_format`` (``text`` or ``json``).

    Replaces a handler an earlier call installed (calling twice does not log twice) and leaves
    any other handler alone (a test's log capture, an embedding service's own handler).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]  # a text stream
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


__all__ = ["LOG_FORMATS", "TEXT_FORMAT", "JsonLogFormatter", "configure_logging"]
