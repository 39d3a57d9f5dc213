"""The local stream: in-process fan-out of the updates this node applied (``stream.source = local``).

Contract: per workflow, subscribers get strictly increasing seqs, each once, in seq order even
though several writers (the lane worker, the signal router) publish one workflow concurrently:
a writer reserves its seq before any await and publishes or abandons it in a ``finally``.  A
slow subscriber is dropped (``SubscriberLagged``), never waited for.  docs/event-bus.md ("Local
stream") has the design.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from cbctl.core.agent.bus.reorder import ReorderBuffer, SeqOrder
from cbctl.core.agent.bus.subscription import SubscriberLagged
from cbctl.core.model.events import Event

log = logging.getLogger(__name__)

__all__ = ["LocalStream", "LocalStreamStats", "LocalSubscription"]


class LocalSubscription:
    """A subscriber of :class:`LocalStream`: async ``next(timeout)``, ``close()``."""

    def __init__(self, stream: LocalStream, workflow_id: str | None, max_queue: int) -> None:
        self.workflow_id = workflow_id
        self._stream = stream
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._max_queue = max_queue
        self.lagged = False
        self.closed = False

    def _offer(self, ev: Event) -> None:
        if self.closed or self.lagged:
            return
        if self._queue.qsize() >= self._max_queue:
            self.lagged = True  # never block the lane worker for a slow reader
            self._queue.put_nowait(None)
            self._stream._remove(self)
            return
        self._queue.put_nowait(ev)

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; ``TimeoutError`` after ``timeout``; ``SubscriberLagged`` if dropped;
        ``StopAsyncIteration`` once closed."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is None:
            self._queue.put_nowait(None)
            if self.lagged:
                raise SubscriberLagged("local", self.workflow_id, None)
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stream._remove(self)
            self._queue.put_nowait(None)


@dataclass(slots=True)
class _LocalWorkflow(SeqOrder):
    """Ordering state of one workflow in :class:`LocalStream`: the shared reorder state (held:
    published, waiting for a lower in-flight seq; skipped: in-flight seqs given up on) plus the
    reservations and the gap timer."""

    inflight: dict[int, int] = field(default_factory=dict)  # seq -> hooks still publishing it
    timer: asyncio.TimerHandle | None = None

    def idle(self) -> bool:
        """Nothing held and nothing in flight: the state may be forgotten."""
        return not self.inflight and not self.held


@dataclass(slots=True)
class LocalStreamStats:
    """Counters for tests and ``GET /v1/bus``."""

    released: int = 0
    duplicates: int = 0
    held: int = 0
    ordering_violations: int = 0


class LocalStream:
    """In-process fan-out of the updates this node applied (module doc; docs/event-bus.md).

    Writers call :meth:`reserve` with a seq as soon as the guard assigned it (before any await),
    then :meth:`publish` or :meth:`abandon` it.  A published event is held while a lower seq of
    its workflow is still reserved; seqs never reserved here are legitimate gaps.  A wait ends
    early only when more than ``max_held`` events are held behind it or after ``gap_timeout``
    seconds (``None``: no time limit); then the held events go out, ``ordering_violations`` is
    counted, and the late seq is dropped should it still come.  At most ``max_workflows`` idle
    workflows' ordering state is kept.
    """

    def __init__(self, max_queue: int = 10_000, max_workflows: int = 10_000, *, gap_timeout: float | None = None,
                 max_held: int = 10_000) -> None:
        self.max_queue = max_queue
        self.max_workflows = max_workflows
        self.gap_timeout = gap_timeout
        self.max_held = max_held
        self.stats = LocalStreamStats()
        self._wf: ReorderBuffer[_LocalWorkflow] = ReorderBuffer(max_workflows, _LocalWorkflow.idle)
        self._by_workflow: dict[str, set[LocalSubscription]] = {}
        self._all: set[LocalSubscription] = set()

    def subscribe(self, workflow_id: str | None) -> LocalSubscription:
        sub = LocalSubscription(self, workflow_id, self.max_queue)
        if workflow_id is None:
            self._all.add(sub)
        else:
            self._by_workflow.setdefault(workflow_id, set()).add(sub)
        return sub

    def _state(self, workflow_id: str) -> _LocalWorkflow:
        # Forgets the least recently active workflows beyond max_workflows, never a busy one.
        return self._wf.state(workflow_id, _LocalWorkflow)

    def reserve(self, workflow_id: str, seq: int) -> None:
        """Announce that ``seq`` (just assigned by the guard) is being published; higher seqs of
        the workflow wait for it.  Pair with :meth:`publish` or :meth:`abandon`."""
        wf = self._state(workflow_id)
        if wf.released(seq):
            return  # a re-apply of something already released: nothing will wait for it
        wf.inflight[seq] = wf.inflight.get(seq, 0) + 1

    def abandon(self, workflow_id: str, seq: int) -> None:
        """A reserved seq will not be published now (its hook failed; a re-delivery may bring
        it later, out of order by then).  Events held behind it go out."""
        wf = self._wf.get(workflow_id)
        if wf is None or not self._unreserve(wf, seq):
            return
        self._release_ready(workflow_id, wf)

    def publish(self, ev: Event) -> None:
        """Offer ``ev`` to subscribers, in seq order per workflow (class doc)."""
        wf = self._state(ev.workflow_id)
        self._unreserve(wf, ev.seq)
        if wf.released(ev.seq) or not wf.hold(ev):
            if wf.late_skipped(ev.seq):
                log.warning("local stream: workflow %s seq %d published after seq %d was released; dropped",
                            ev.workflow_id, ev.seq, wf.last)
            else:
                self.stats.duplicates += 1
            return
        self._release_ready(ev.workflow_id, wf)
        if ev.seq in wf.held:
            self.stats.held += 1

    @staticmethod
    def _unreserve(wf: _LocalWorkflow, seq: int) -> bool:
        n = wf.inflight.get(seq)
        if n is None:
            return False
        if n > 1:
            wf.inflight[seq] = n - 1
        else:
            del wf.inflight[seq]
        return True

    def _release_ready(self, workflow_id: str, wf: _LocalWorkflow) -> None:
        """Release held events, lowest first, while no lower seq is still in flight."""
        for ev in wf.pop_before(min(wf.inflight, default=None)):
            self._release(ev)
        if not wf.held:
            if wf.timer is not None:
                wf.timer.cancel()
                wf.timer = None
            return
        if len(wf.held) > self.max_held:
            self._give_up(workflow_id, wf)
        elif wf.timer is None and self.gap_timeout is not None:
            wf.timer = asyncio.get_running_loop().call_later(self.gap_timeout, self._expire, workflow_id)

    def _expire(self, workflow_id: str) -> None:
        wf = self._wf.get(workflow_id)
        if wf is None:
            return
        wf.timer = None
        if wf.held:
            self._give_up(workflow_id, wf)

    def _give_up(self, workflow_id: str, wf: _LocalWorkflow) -> None:
        """Stop waiting for the in-flight seqs below the lowest held one; release what is held."""
        if wf.timer is not None:
            wf.timer.cancel()
            wf.timer = None
        upto = max(wf.held)
        stuck = sorted(r for r in wf.inflight if r < upto)
        for r in stuck:
            del wf.inflight[r]
        wf.skip(stuck)  # bounded: only recent give-ups can still turn up
        self._violation()
        log.warning("local stream: workflow %s: seq(s) %s still not published; releasing %d held",
                    workflow_id, ", ".join(map(str, stuck[:10])), len(wf.held))
        self._release_ready(workflow_id, wf)

    def _violation(self) -> None:
        # Not the bridge's Prometheus counter (a different stream); logged and in GET /v1/bus.
        self.stats.ordering_violations += 1

    def _release(self, ev: Event) -> None:
        self.stats.released += 1
        for sub in (*self._by_workflow.get(ev.workflow_id, ()), *self._all):
            sub._offer(ev)

    def _remove(self, sub: LocalSubscription) -> None:
        if sub.workflow_id is None:
            self._all.discard(sub)
        else:
            subs = self._by_workflow.get(sub.workflow_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_workflow[sub.workflow_id]

    def close_all(self) -> None:
        """End every subscription and stop the gap timers."""
        for wf in self._wf.values():
            if wf.timer is not None:
                wf.timer.cancel()
                wf.timer = None
        for sub in [*self._all, *(s for subs in self._by_workflow.values() for s in subs)]:
            sub.close()
