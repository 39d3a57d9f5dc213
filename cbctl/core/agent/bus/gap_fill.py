"""Events read back from a workflow's Redis history (the authoritative record of every applied
event): the bridge's gap fills and the local SSE stream's replays, and the canonical event of an
applied update.

Contract: an event rebuilt from the history is the one that was published (same deterministic
``event_id``, payload and seq); a history entry that does not make a valid event is logged and
skipped.  Reading raises ``BackendUnavailable`` when Redis cannot be read (:func:`fill_from_record`)
or stops quietly (:func:`history_events`, a replay).  docs/event-bus.md has the design.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cbctl.core.model.errors import BackendUnavailable
from cbctl.core.model.events import BadEvent, Event, deterministic_event_id, make_event

if TYPE_CHECKING:
    from cbctl.core.agent.hooks import AppliedUpdate
    from cbctl.core.backends.redis.guard import LaneGuard

log = logging.getLogger(__name__)

__all__ = ["GapFill", "GapFiller", "event_of_entry", "event_of_update", "fill_from_record", "history_events"]



@dataclass(frozen=True, slots=True)
class GapFill:
    """What a :data:`GapFiller` found for one workflow in the authoritative record.

    ``begin``: the seq at which the workflow's publishing began in the asked schema version
    (``None``: not begun in it, or not known, e.g. its keys expired).  ``begins``: the same for
    every schema version whose publishing began (empty: taken as ``{asked version: begin}``).
    ``events``: the record's events with a seq in the asked range that were published in some
    version (seq >= the lowest of ``begins``).  ``applied_at``: wall-clock time (epoch seconds)
    each of those was applied.  ``oldest``: the lowest seq the record still holds (older ones
    were trimmed), ``None`` if it holds none.
    """

    begin: int | None
    events: Mapping[int, Event]
    applied_at: Mapping[int, float]
    oldest: int | None
    begins: Mapping[int, int] = field(default_factory=dict)


GapFiller = Callable[[str, int, int, int], Awaitable[GapFill]]
"""``await filler(workflow_id, schema_version, lo, hi)``: the workflow's events with
``lo <= seq <= hi`` from the authoritative record.  Raises ``BackendUnavailable`` when the
record cannot be read right now (the bridge retries)."""


async def fill_from_record(guard: LaneGuard, workflow_id: str, version: int, lo: int, hi: int) -> GapFill:
    """``workflow_id``'s events ``lo..hi`` from its Redis history (the authoritative record), with
    the seq its publishing began at in each schema version (``GapFill.begins``).

    Every recorded event at or after the EARLIEST marker is returned, not only those published in
    ``version``: after ``consumers.schema_version`` moves (say 1 -> 2 right after a v1+v2 window
    opened) a bridge that was delivering a workflow in v1 goes on delivering it, and the seqs
    between where it had got to and where v2 publishing began for that workflow exist only in
    v1.  The bridge decides which of them are its to deliver (``Sequencer._apply_fill`` in
    cbctl/core/agent/bus/sequencer.py).  ``BackendUnavailable`` when Redis cannot be read."""
    rec = await guard.record(workflow_id, lo, hi)
    begins = dict(rec.publish_from)
    events: dict[int, Event] = {}
    applied_at: dict[int, float] = {}
    if begins:
        floor = min(begins.values())
        for e in rec.entries:
            if e["seq"] < floor:
                continue  # never published in any version
            ev = event_of_entry(workflow_id, e)
            if ev is not None:
                events[ev.seq] = ev
                applied_at[ev.seq] = e["at"] / 1000
    return GapFill(begin=begins.get(version), events=events, applied_at=applied_at, oldest=rec.oldest, begins=begins)


async def history_events(guard: LaneGuard, workflow_id: str, after: int, page: int) -> AsyncIterator[Event | bytes]:
    """The workflow's updates with seq > ``after`` from its Redis history (every node's), one
    page (``page`` entries) per request; a gap left by ``history-max`` trimming is announced with
    an SSE comment (bytes).  Stops quietly if Redis fails mid-way."""
    cursor = "-"
    first = True
    while True:
        try:
            entries = await guard.history(workflow_id, after=cursor, count=page)
        except (BackendUnavailable, ValueError) as exc:
            log.warning("history of %s unavailable for a replay: %s", workflow_id, exc)
            return
        if not entries:
            return
        if first and entries[0]["seq"] > after + 1:
            yield (f": history before seq {entries[0]['seq']} was trimmed (redis history-max); "
                   f"seqs {after + 1}..{entries[0]['seq'] - 1} are not available\n\n").encode()
        first = False
        for e in entries:
            if e["seq"] <= after:
                continue
            ev = event_of_entry(workflow_id, e)
            if ev is not None:
                yield ev
        if len(entries) < page:
            return
        cursor = entries[-1]["id"]


def event_of_entry(workflow_id: str, e: Mapping[str, Any]) -> Event | None:
    """The canonical event of a Redis history entry (same ``event_id`` as the published one)."""
    data = e["data"] if isinstance(e["data"], dict) else {}
    try:
        return make_event(
            workflow_id=workflow_id, seq=e["seq"], type=e["type"] or "task", lane=e["lane"] or "-",
            node_id=e["node"] or "-", task_id=e["task_id"] or None, payload=data,
            occurred_at=datetime.fromtimestamp(e["at"] / 1000, UTC), attempt=_attempt(data),
            event_id=deterministic_event_id(workflow_id, e["seq"]),
        )
    except BadEvent as exc:
        log.warning("workflow %s history seq %s: %s; skipped", workflow_id, e["seq"], exc)
        return None


def _attempt(update: Mapping[str, Any]) -> int:
    a = update.get("attempt")
    if isinstance(a, str) and a.isdigit():
        a = int(a)
    return a if isinstance(a, int) and not isinstance(a, bool) and a >= 1 else 1


def event_of_update(u: AppliedUpdate) -> Event:
    """The canonical event of an applied update; deterministic in everything but
    ``occurred_at``/``node_id`` (a re-apply after a crash yields the same ``event_id``)."""
    return make_event(
        workflow_id=u.workflow_id, seq=u.seq, type=u.type or "task", lane=u.lane, node_id=u.node_id,
        task_id=u.task_id or None, payload=dict(u.update),
        occurred_at=datetime.fromtimestamp(u.occurred_at, UTC) if math.isfinite(u.occurred_at) else None,
        attempt=_attempt(u.update), event_id=deterministic_event_id(u.workflow_id, u.seq),
    )
