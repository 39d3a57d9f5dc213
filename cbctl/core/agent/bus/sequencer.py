"""The bridge's per-workflow sequencer: de-duplication, ordering and gap filling.

Contract: :meth:`Sequencer._accept` takes decoded events of the pinned schema version (any
order, copies included) and :meth:`Sequencer._deliver` is called once per released event, per
workflow in strictly increasing seq order, never twice for one seq.  A missing seq is filled from
the record (the gap filler) or, when provably gone or unreadable for ``give_up_after``, skipped
and counted.  Steps 3-5 of docs/event-bus.md ("Per message, in order") are the design.  Not
thread-safe: one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from cbctl.core.agent.bus.dedup import Forgotten, IdWindow
from cbctl.core.agent.bus.gap_fill import GapFill, GapFiller
from cbctl.core.agent.bus.reorder import ReorderBuffer, SeqOrder
from cbctl.core.model.errors import CbctlError
from cbctl.core.model.events import Event
from cbctl.core.model.metrics import AgentMetrics

log = logging.getLogger("cbctl.core.agent.bus.bridge")  # one logger for the bridge's whole story

__all__ = ["BridgeStats", "Sequencer"]


@dataclass(slots=True)
class _Workflow(SeqOrder):
    """One workflow's state in the bridge: the shared reorder state (``last``: last seq released
    or skipped over; ``held``; ``skipped``: seqs given up on, their late copies are dropped) and
    the bridge's own."""

    # False until something is released: the bridge may have started in the middle of the
    # workflow, so where its sequence starts is not known yet (see _order).
    baseline_known: bool = True
    gap_since: float | None = None
    # Created only when needed (an empty deque costs ~750 bytes, a set ~200: times
    # max_workflows, that was most of the bridge's ordering state).
    history: deque[Event] | None = None  # only for the history_workflows most recently active
    filling: bool = False  # a gap fill is in flight
    first_seq: int | None = None  # lowest seq released (a copy at or above it is a duplicate)
    owed: int = 0  # highest seq seen only in a previous version's left-over message (see _owe)

    def idle(self) -> bool:
        """Nothing held and nothing owed: the state may be forgotten (the gap timer resolves
        the others soon)."""
        return not self.held and self.owed <= self.last


@dataclass(slots=True)
class BridgeStats:
    """Counters for tests and status pages (the Prometheus metrics are the contract)."""

    received: int = 0
    bad: int = 0
    duplicates: int = 0
    dedup_mismatches: int = 0
    ordering_violations: int = 0
    late_dropped: int = 0
    released: int = 0
    delivered: int = 0
    held: int = 0
    filled: int = 0  # events released from the gap filler (the authoritative record)
    fills: int = 0  # filler calls
    fill_errors: int = 0


class Sequencer:
    """De-duplicates and orders one bridge's events per workflow (module doc); the bridge
    (:class:`~cbctl.core.agent.bus.bridge.Bridge`) subclasses it and fans out in :meth:`_deliver`."""

    def __init__(
        self,
        metrics: AgentMetrics,
        *,
        gap_timeout: float,
        give_up_after: float,
        filler: GapFiller | None,
        dedup_max_ids: int,
        dedup_max_age: float,
        max_workflows: int,
        forget_max: int,
        forget_max_age: float,
        max_held: int,
        history: int,
        history_workflows: int,
        deliver_new: bool,
    ) -> None:
        self.metrics = metrics
        self.gap_timeout = gap_timeout
        self.give_up_after = give_up_after
        self.filler = filler
        self.dedup_max_ids = dedup_max_ids
        self.dedup_max_age = dedup_max_age
        self.max_workflows = max_workflows
        self.max_held = max_held
        self.history = history
        self.history_workflows = history_workflows
        self.deliver_new = deliver_new
        self.stats = BridgeStats()
        # Wall-clock time this bridge's stream begins (its start; events applied before it are
        # not ours to fill for a workflow first seen mid-life); a margin covers clock skew.
        self._consumer_since: float | None = None
        self.skew_margin = 5.0
        self._with_history: OrderedDict[str, None] = OrderedDict()
        self._fill_tasks: set[asyncio.Task[None]] = set()
        self.max_concurrent_fills = 16
        self._version = 1  # the pinned schema version
        # Every version this bridge has delivered from (been pinned to while consuming): their
        # seqs are its to deliver (_begin).
        self._consumed_versions: set[int] = set()
        self._seen_ids = IdWindow(dedup_max_ids, dedup_max_age)  # event ids seen (monotonic time)
        self._forgotten = Forgotten(forget_max, forget_max_age)  # evicted workflow -> its last seq
        # Ordering state of the max_workflows most recently active workflows; an evicted one's
        # last seq goes to _forgotten.
        self._workflows: ReorderBuffer[_Workflow] = ReorderBuffer(max_workflows, _Workflow.idle, self._evicted)
        self._gapped: set[str] = set()
        self._stopped = False

    def _deliver(self, ev: Event) -> None:
        """Fan ``ev`` out to subscribers (the bridge's part); called once per released event."""
        raise NotImplementedError

    def _accept(self, ev: Event, now: float) -> None:
        """A decoded event of the pinned version: de-duplicate by ``event_id``, then order it."""
        if ev.event_id in self._seen_ids:
            self.stats.duplicates += 1
            self.metrics.bridge_duplicates.inc()
            return
        self._seen_ids.add(ev.event_id, now)
        self._order(ev, now)

    def _owe(self, ev: Event, now: float) -> None:
        """``ev`` is known to exist but is not delivered from this message (see :meth:`_handle`)."""
        wf = self._state_of(ev)
        if ev.seq <= wf.last or ev.seq in wf.held or ev.seq <= wf.owed:
            return
        wf.owed = ev.seq
        if wf.gap_since is None:
            wf.gap_since = now
            self._gapped.add(ev.workflow_id)

    def _state_of(self, ev: Event) -> _Workflow:
        """The ordering state of ``ev``'s workflow, created (or restored) on first sight."""

        def create() -> _Workflow:
            last = self._forgotten.pop(ev.workflow_id)
            if last is not None:
                # Evicted earlier: it goes on from where it had got to (a copy of an old event is
                # a duplicate however late it comes; docs/event-bus.md, step 3).
                return _Workflow(last=last, first_seq=1)
            # A workflow first seen at seq 1 starts here.  One first seen later is held back
            # like any gap until the filler (or, without one, the gap timeout) says where its
            # stream starts for this bridge (docs/event-bus.md, step 4).
            return _Workflow(last=0, baseline_known=ev.seq == 1)

        return self._workflows.state(ev.workflow_id, create)

    def _order(self, ev: Event, now: float) -> None:
        wf = self._state_of(ev)
        if ev.seq <= wf.last:
            # A copy of a seq released already or given up on: never delivered out of order.
            # Its loss was counted when the gap was skipped (if it was one), not again here.
            if wf.late_skipped(ev.seq):
                self.stats.late_dropped += 1
                log.warning("bridge: workflow %s seq %d arrived after it was given up on; dropped",
                            ev.workflow_id, ev.seq)
            elif wf.first_seq is not None and ev.seq >= wf.first_seq:
                # Released before and no longer in the event-id window (e.g. an outbox drained
                # long after): the per-workflow order recognises it.
                self.stats.duplicates += 1
                self.metrics.bridge_duplicates.inc()
            else:
                self.stats.late_dropped += 1  # below where this workflow's stream began for us
            return
        if ev.seq in wf.held:
            self.stats.duplicates += 1
            self.metrics.bridge_duplicates.inc()
            return
        if ev.seq == wf.last + 1 and wf.baseline_known:
            self._release(wf, ev)
            self._release_run(ev.workflow_id, wf, now)
            return
        wf.hold(ev)
        self.stats.held += 1
        if wf.gap_since is None:
            wf.gap_since = now
            self._gapped.add(ev.workflow_id)
        if len(wf.held) > self.max_held:
            # Memory bound: stop waiting for what is missing below the held events.
            self._skip_gap(ev.workflow_id, wf, now, why=f"more than {self.max_held} events held")

    def _release_run(self, workflow_id: str, wf: _Workflow, now: float) -> None:
        """Release held events that are now contiguous; restart the gap clock if some remain."""
        for ev in wf.pop_contiguous():
            self._release(wf, ev)
        if wf.held or wf.owed > wf.last:
            wf.gap_since = now  # a new gap starts now
            self._gapped.add(workflow_id)
        else:
            wf.gap_since = None
            self._gapped.discard(workflow_id)

    def _skip_gap(self, workflow_id: str, wf: _Workflow, now: float, *, why: str) -> None:
        """Give up on the seqs missing below the lowest held one (they are really missing for
        subscribers: counted once) and go on from there."""
        nxt = min(wf.held) if wf.held else wf.owed + 1
        if wf.baseline_known:
            self.stats.ordering_violations += 1
            self.metrics.bridge_ordering_violations.inc()
            log.warning("bridge: workflow %s: seq %d..%d missing after %.1fs (%s); skipping ahead",
                        workflow_id, wf.last + 1, nxt - 1, now - (wf.gap_since or now), why)
            wf.skip(range(max(wf.last + 1, nxt - 100), nxt))  # bounded: recent ones only
        else:
            log.debug("bridge: workflow %s first seen at seq %d; starting there", workflow_id, nxt)
        self._start_at(wf, nxt)
        self._release_run(workflow_id, wf, now)

    @staticmethod
    def _start_at(wf: _Workflow, seq: int) -> None:
        wf.start_at(seq)
        wf.baseline_known = True

    def _drop_held_below(self, wf: _Workflow) -> None:
        """Held events at or below the new start can never be released: drop them (left in
        ``held`` they would keep the workflow gapped and unevictable forever)."""
        self.stats.late_dropped += wf.drop_held_released()

    def tick(self, now: float | None = None) -> None:
        """Deal with gaps older than ``gap_timeout``: ask the filler, or (without one) skip
        (runs periodically by itself after start)."""
        now = time.monotonic() if now is None else now
        for workflow_id in list(self._gapped):
            wf = self._workflows.get(workflow_id)
            if wf is None or not (wf.held or wf.owed > wf.last):
                self._gapped.discard(workflow_id)
                continue
            if wf.gap_since is None or now - wf.gap_since < self.gap_timeout or wf.filling:
                continue
            if self.filler is None:
                if not wf.baseline_known:
                    self._skip_gap(workflow_id, wf, now, why="first seen mid-workflow")
                elif now - wf.gap_since >= self.give_up_after:
                    self._skip_gap(workflow_id, wf, now, why="no gap filler")
                continue
            if len(self._fill_tasks) >= self.max_concurrent_fills:
                continue  # the next tick gets it
            wf.filling = True
            task = asyncio.ensure_future(self._fill(workflow_id, wf))
            self._fill_tasks.add(task)
            task.add_done_callback(self._fill_tasks.discard)

    async def _fill(self, workflow_id: str, wf: _Workflow) -> None:
        """Fill the gap below the lowest held seq of ``workflow_id`` from the filler."""
        assert self.filler is not None
        version = self._version
        try:
            lo = wf.last + 1 if wf.baseline_known else 1
            hi = min(wf.held) - 1 if wf.held else wf.owed
            if hi < lo:
                return
            self.stats.fills += 1
            try:
                got = await self.filler(workflow_id, version, lo, hi)
            except (CbctlError, OSError, asyncio.TimeoutError) as exc:
                self.stats.fill_errors += 1
                log.warning("bridge: cannot read workflow %s's record to fill seq %d..%d: %s", workflow_id, lo,
                            hi, exc)
                now = time.monotonic()
                if (wf.gap_since is not None and now - wf.gap_since >= self.give_up_after
                        and (wf.held or wf.owed > wf.last)):
                    self._skip_gap(workflow_id, wf, now, why=f"record unreadable for {self.give_up_after:g}s")
                return
            if self._workflows.get(workflow_id) is not wf or version != self._version:
                return  # forgotten or re-pinned meanwhile: the next gap starts afresh
            self._apply_fill(workflow_id, wf, got, lo, hi, version)
        finally:
            wf.filling = False

    def _begin(self, got: GapFill, version: int) -> int | None:
        """Where the workflow's stream began for this bridge: the earliest publish marker among
        the schema versions this bridge has consumed (``None``: in none of them).

        Not only the pinned version's: when ``consumers.schema_version`` moved (1 -> 2 right
        after a v1+v2 window opened), a workflow this bridge delivered in v1 began in v2 at a
        later seq (its first apply after the window opened), or not yet at all; its events
        before that exist only in v1, and they are this bridge's to deliver (it was reading
        v1 then).  Asking only about v2 made them look missing (counted as ordering
        violations) or "never published" (skipped silently)."""
        begins = dict(got.begins) if got.begins else ({version: got.begin} if got.begin is not None else {})
        mine = [b for v, b in begins.items() if v in self._consumed_versions or v == version]
        return min(mine) if mine else None

    def _apply_fill(self, workflow_id: str, wf: _Workflow, got: GapFill, lo: int, hi: int,
                    version: int | None = None) -> None:
        now = time.monotonic()
        if not wf.held and wf.owed <= wf.last:
            return
        begin = self._begin(got, self._version if version is None else version)
        if not wf.baseline_known:
            # Where does this workflow's stream start for this bridge?  At the seq its publishing
            # began, or later: events applied before our consumer existed are not ours to fill.
            start = min(wf.held) if wf.held else wf.owed + 1
            since = (self._consumer_since or 0.0) - self.skew_margin
            floor = begin if begin is not None else start
            seq = start - 1
            while seq >= max(floor, lo) and seq in got.events and got.applied_at.get(seq, 0.0) >= since:
                seq -= 1
            self._start_at(wf, seq + 1)
        for seq in range(wf.last + 1, hi + 1):
            if seq in wf.held:
                continue
            ev = got.events.get(seq)
            if ev is None:
                continue
            if ev.event_id in self._seen_ids:
                continue  # the stream copy got here first (and was released or is held)
            self._seen_ids.add(ev.event_id, now)
            wf.held[seq] = ev
            self.stats.filled += 1
        self._release_run(workflow_id, wf, now)
        if not wf.held and wf.owed <= wf.last:
            return
        # Still a gap: is what is missing provably gone (before the publishing began, trimmed
        # from the history, or the workflow's keys expired)?  Then skip; else keep waiting.
        missing = wf.last + 1
        if begin is not None and missing < begin:
            self._start_at(wf, begin)  # never published in a version we read: not a gap
            self._drop_held_below(wf)
            self._release_run(workflow_id, wf, now)
        elif begin is None or (got.oldest is not None and missing < got.oldest) or got.oldest is None:
            self._skip_gap(workflow_id, wf, now, why="not in the workflow's record (trimmed or expired)")
        elif wf.gap_since is not None and now - wf.gap_since >= self.give_up_after:
            self._skip_gap(workflow_id, wf, now, why=f"still missing after {self.give_up_after:g}s")
        else:
            wf.gap_since = now  # applied but its event not in the record yet: ask again later

    async def _tick_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(max(0.02, self.gap_timeout / 4))
            self.tick()

    def _evicted(self, workflow_id: str, old: _Workflow) -> None:
        """``workflow_id``'s ordering state was forgotten (it was idle): remember where it had got to."""
        self._with_history.pop(workflow_id, None)
        if old.baseline_known:
            self._forgotten.put(workflow_id, old.last, time.monotonic())

    def _release(self, wf: _Workflow, ev: Event) -> None:
        wf.baseline_known = True
        wf.last = ev.seq
        if wf.first_seq is None:
            wf.first_seq = ev.seq
        self.stats.released += 1
        if wf.history is None:
            wf.history = deque(maxlen=self.history)
        wf.history.append(ev)
        # Only the most recently active workflows keep a replay history (memory bound).
        self._with_history[ev.workflow_id] = None
        self._with_history.move_to_end(ev.workflow_id)
        if len(self._with_history) > self.history_workflows:
            old_id, _ = self._with_history.popitem(last=False)
            old = self._workflows.get(old_id)
            if old is not None:
                old.history = None
        self._deliver(ev)
