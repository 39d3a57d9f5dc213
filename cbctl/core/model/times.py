"""The one spelling of a point in time in cbctl's output: RFC 3339 in UTC with milliseconds.

``rfc3339(1.25) == "1970-01-01T00:00:01.250Z"``.  Fixed width, so the strings sort as the times
do.  Used by every JSON result of the CLI, the gate verdicts and the agent's JSON log lines.
(The canonical event's ``occurred_at`` has its own, microsecond, wire format:
cbctl/core/model/events.py.)
"""

from __future__ import annotations

import time
from typing import overload

__all__ = ["rfc3339"]


@overload
def rfc3339(ts: float) -> str: ...
@overload
def rfc3339(ts: None) -> None: ...


def rfc3339(ts: float | None) -> str | None:
    """Unix seconds -> ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC); None (or a bool, not a time) -> None."""
    if ts is None or isinstance(ts, bool):
        return None
    whole = int(ts // 1)
    millis = int(round((ts - whole) * 1000))
    if millis == 1000:  # 0.9996 rounds up into the next second
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"
