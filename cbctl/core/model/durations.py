"""Durations: the one parser every option and config key uses (``2s``, ``500ms``, ``1m``, ``7d``).

Pure, no I/O and no heavy imports, so the config loader and the CLI can use it without pulling
httpx in.  Spellings match PromQL ranges.
"""

from __future__ import annotations

import math
import re

from cbctl.core.model.errors import BadInput


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str | float | int, *, what: str = "duration") -> float:
    """``"2s"``, ``"500ms"``, ``"1m"``, ``"24h"``, ``"1h30m"``, ``"7d"`` or a bare number of
    seconds -> seconds (float, > 0).

    Raises ``BadInput`` quoting the value and ``what`` (e.g. ``--interval``) when the text is
    not a positive duration.  The one parser every command uses, so every option accepts the
    same spellings as PromQL ranges.
    """
    if isinstance(text, bool):
        raise BadInput(f"{what}: expected a duration like 2s, 500ms, 1m or 24h, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        raw = text.strip().lower()
        try:
            value = float(raw)
        except ValueError:
            pos = 0
            value = 0.0
            for m in _PART.finditer(raw):
                if m.start() != pos:
                    break
                value += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos != len(raw) or not raw:
                raise BadInput(f"{what}: expected a duration like 2s, 500ms, 1m or 24h, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise BadInput(f"{what}: must be a positive duration, got {text!r}")
    return value


def format_duration(seconds: float) -> str:
    """Seconds -> a PromQL range (``"10s"``, ``"24h"``, ``"1500ms"``): the largest whole unit."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise BadInput(f"duration must be positive, got {seconds!r}")
    for unit, factor in (("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % factor == 0:
            return f"{ms // factor}{unit}"
    return f"{ms}ms"



__all__ = ["format_duration", "parse_duration"]
