"""The per-workflow reorder buffer the bridge's sequencer and the local stream share.

Contract: per workflow, events leave (:meth:`SeqOrder.pop_contiguous` /
:meth:`SeqOrder.pop_before`) in strictly increasing seq order and each seq at most once; ``last``
is the highest seq released or skipped over, and never decreases.  What is at or below ``last``
is never released again: a copy of a seq that was given up on (:meth:`SeqOrder.skip`) is reported
once by :meth:`SeqOrder.late_skipped`, so the caller drops it without counting its loss twice.
:class:`ReorderBuffer` keeps at most ``max_workflows`` workflows' state beyond those still busy
(least recently active idle one forgotten first).  Synchronous; one event loop.  Why two release
rules and where each is used: docs/event-bus.md ("The shared reorder buffer").
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cbctl.core.model.events import Event

__all__ = ["MAX_SKIPPED", "ReorderBuffer", "SeqOrder"]

#: Seqs given up on that are remembered per workflow (the most recent ones: only those can still
#: turn up late in practice).
MAX_SKIPPED = 1000


@dataclass(slots=True)
class SeqOrder:
    """The ordering state of one workflow: the last seq released, the events held back, and the
    recent seqs given up on.  Callers subclass it to add their own per-workflow state."""

    last: int = 0  # highest seq released (or skipped over)
    held: dict[int, Event] = field(default_factory=dict)  # seq -> event waiting for a lower seq
    skipped: set[int] | None = None  # seqs given up on; created when needed (a set is ~200 bytes)

    def released(self, seq: int) -> bool:
        """``seq`` is at or below the last one released: it must not go out again."""
        return seq <= self.last

    def hold(self, ev: Event) -> bool:
        """Hold ``ev`` back until it may be released; False if its seq is held already."""
        if ev.seq in self.held:
            return False
        self.held[ev.seq] = ev
        return True

    def pop_contiguous(self) -> Iterator[Event]:
        """Release held events while the next one is exactly ``last + 1`` (the bridge's rule)."""
        while (self.last + 1) in self.held:
            ev = self.held.pop(self.last + 1)
            self.last = ev.seq
            yield ev

    def pop_before(self, floor: int | None) -> Iterator[Event]:
        """Release held events lowest first, skipping over gaps, while none is above ``floor``
        (the lowest seq still in flight; ``None``: nothing is; the local stream's rule)."""
        while self.held:
            nxt = min(self.held)
            if floor is not None and floor < nxt:
                break
            ev = self.held.pop(nxt)
            self.last = ev.seq
            yield ev

    def skip(self, seqs: Iterable[int]) -> None:
        """Remember ``seqs`` as given up on (at most :data:`MAX_SKIPPED`, the highest kept)."""
        if self.skipped is None:
            self.skipped = set()
        self.skipped.update(seqs)
        while len(self.skipped) > MAX_SKIPPED:
            self.skipped.discard(min(self.skipped))

    def late_skipped(self, seq: int) -> bool:
        """True, once, if ``seq`` was given up on: this is its late copy (drop it, uncounted)."""
        if self.skipped is not None and seq in self.skipped:
            self.skipped.discard(seq)
            return True
        return False

    def start_at(self, seq: int) -> None:
        """Go on from ``seq``: everything below it counts as released."""
        self.last = seq - 1

    def drop_held_released(self) -> int:
        """Drop held events at or below ``last`` (they can never be released); how many."""
        stale = [s for s in self.held if s <= self.last]
        for s in stale:
            del self.held[s]
        return len(stale)


S = TypeVar("S", bound=SeqOrder)


class ReorderBuffer(Generic[S]):
    """The :class:`SeqOrder` of each recently active workflow, bounded by ``max_workflows``.

    ``idle(state)`` says whether a workflow may be forgotten (nothing held or in progress);
    ``on_evict(workflow_id, state)`` is told of each one forgotten.  Eviction runs when a new
    workflow is added and forgets the least recently active idle ones first, never a busy one,
    looking at no more than twice the excess (O(excess), not O(workflows)).
    """

    __slots__ = ("max_workflows", "_idle", "_on_evict", "_states")

    def __init__(self, max_workflows: int, idle: Callable[[S], bool],
                 on_evict: Callable[[str, S], None] | None = None) -> None:
        self.max_workflows = max_workflows
        self._idle = idle
        self._on_evict = on_evict
        self._states: OrderedDict[str, S] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, workflow_id: object) -> bool:
        return workflow_id in self._states

    def __getitem__(self, workflow_id: str) -> S:
        return self._states[workflow_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def get(self, workflow_id: str) -> S | None:
        """The workflow's state, if kept (does not count as activity)."""
        return self._states.get(workflow_id)

    def values(self) -> Iterable[S]:
        return self._states.values()

    def state(self, workflow_id: str, create: Callable[[], S]) -> S:
        """The workflow's state, marked most recently active; made by ``create()`` (and idle
        workflows beyond ``max_workflows`` forgotten) if it is not kept."""
        st = self._states.get(workflow_id)
        if st is not None:
            self._states.move_to_end(workflow_id)
            return st
        st = self._states[workflow_id] = create()
        self._evict()
        return st

    def _evict(self) -> None:
        excess = len(self._states) - self.max_workflows
        if excess <= 0:
            return
        for workflow_id in list(itertools.islice(self._states, excess * 2)):  # oldest first
            if excess <= 0:
                break
            st = self._states[workflow_id]
            if self._idle(st):
                del self._states[workflow_id]
                if self._on_evict is not None:
                    self._on_evict(workflow_id, st)
                excess -= 1
