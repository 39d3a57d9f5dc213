"""A minimal Server-Sent Events parser (the subset the agent's event streams use).

Stdlib only, so `cbctl events tail` stays light.  Fields: ``id``, ``event``, ``data`` (several
``data`` lines join with newlines); comment lines (``:``) are reported as comments so a reader
can tell a live-but-idle stream from a dead one.  Contract: feed lines without their line
ending, in order; a blank line dispatches the message collected so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SseMessage", "SseParser"]


@dataclass(slots=True)
class SseMessage:
    """One dispatched message; ``comment`` is set (and the rest empty) for a comment line."""

    id: str | None = None
    event: str = "message"
    data: str = ""
    comment: str | None = None


@dataclass(slots=True)
class SseParser:
    """Incremental parser: :meth:`feed` one line, get a message when one is complete."""

    _id: str | None = None
    _event: str | None = None
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> SseMessage | None:
        if line == "":
            if self._event is None and not self._data and self._id is None:
                return None
            msg = SseMessage(id=self._id, event=self._event or "message", data="\n".join(self._data))
            self._id, self._event, self._data = None, None, []
            return msg
        if line.startswith(":"):
            return SseMessage(comment=line[1:].strip())
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None
