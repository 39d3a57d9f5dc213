"""Progress on stderr while a command waits (``--wait``, runbook checks, preflight, ``wait
converged``): on a terminal one live line rewritten in place; elsewhere one line per change.

Contract: :meth:`ProgressLine.update` with the same ``key`` as before (default: the text) prints
nothing off a terminal, so a caller hands it every state it sees and a log gets exactly one line
per change; a live line shows every new text (a countdown may tick without being a change). Nothing goes to
stdout (JSON there stays alone). Standard library only: no rich import for a progress line.
"""

from __future__ import annotations

import shutil
import sys
from typing import IO, Any


class ProgressLine:
    """One progress display. ``live`` None: a live line when ``stream`` is a terminal.

    Use as a context manager (or call :meth:`close`): a live line is cleared at the end so
    the command's own messages start on a clean line.
    """

    def __init__(self, stream: IO[str] | None = None, *, live: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty()) if live is None else live
        self.last: object = None
        self._text: str | None = None
        self.lines = 0  # lines written off a terminal (one per change)
        self._shown = False

    def update(self, text: str, key: object = None) -> None:
        """Show ``text``. ``key`` (default ``text``) is what a change is: off a terminal nothing
        is written when it equals the last key; a live line skips only an unchanged text."""
        key = text if key is None else key
        if (self.live and text == self._text) or (not self.live and key == self.last):
            return
        self.last, self._text = key, text
        if "://" in text:  # a second line of defence, as cli.common.err
            from cbctl.core.model.redaction import redact_url

            text = redact_url(text)
        if self.live:
            width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
            shown = text if len(text) <= width else text[: width - 1] + "…"
            self.stream.write("\r\x1b[2K" + shown)
            self._shown = True
        else:
            self.stream.write(text + "\n")
            self.lines += 1
        self.stream.flush()

    def close(self) -> None:
        """Clear a live line (off a terminal the lines stay: they are the log)."""
        if self.live and self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._shown = False

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["ProgressLine"]
