"""Compact, bounded memories of the bridge's de-duplication (docs/event-bus.md, step 3).

Contract: each structure is bounded by age and by count, never by uptime, and answers
membership only (what it has forgotten reads as unseen).  :class:`IdWindow`: event ids seen
recently; :class:`MsgWindow`: ``Nats-Msg-Id`` -> (stream seq, stored at) for the broker de-dup
check; :class:`Forgotten`: where evicted workflows had got to.  Synchronous, not thread-safe.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections import deque

__all__ = ["Forgotten", "IdWindow", "MsgWindow", "id_digest"]


def id_digest(event_id: str) -> int:
    """A 128-bit integer standing for ``event_id``: the id itself when it is 32 hex digits (what
    :func:`cbctl.core.model.events.deterministic_event_id` makes: lossless), else a BLAKE2b digest.
    About 44 bytes as a Python int, against about 300 for the string and its dict entry."""
    if len(event_id) == 32:
        try:
            return int(event_id, 16)
        except ValueError:
            pass
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=16).digest(), "big")


class IdWindow:
    """Event ids seen recently (membership only), bounded by age and by count.

    Digests (:func:`id_digest`) in ``generations`` sets, each covering about ``max_age /
    generations`` seconds (or ``max_ids / generations`` ids, whichever fills first); a whole set
    is dropped once its newest id is older than ``max_age`` or the window holds more than
    ``max_ids``.  So an id is remembered at least ``max_age`` seconds unless the count bound
    bites first, and memory never exceeds ``max_ids`` digests plus one generation.
    """

    __slots__ = ("max_ids", "max_age", "_span", "_per_gen", "_gens", "_n")

    def __init__(self, max_ids: int, max_age: float, generations: int = 8) -> None:
        self.max_ids = max(1, max_ids)
        self.max_age = max_age
        self._span = max_age / generations
        self._per_gen = max(1, self.max_ids // generations)
        self._gens: deque[tuple[float, set[int]]] = deque()  # (started at, digests), oldest first
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __contains__(self, event_id: object) -> bool:
        if not isinstance(event_id, str) or not self._gens:
            return False
        h = id_digest(event_id)
        return any(h in ids for _, ids in reversed(self._gens))

    def add(self, event_id: str, now: float) -> None:
        gens = self._gens
        if not gens or now - gens[-1][0] >= self._span or len(gens[-1][1]) >= self._per_gen:
            gens.append((now, set()))
            # Expired: the newest id of a generation is at most its start + span old.
            while len(gens) > 1 and now - (gens[0][0] + self._span) > self.max_age:
                self._n -= len(gens.popleft()[1])
        ids = gens[-1][1]
        before = len(ids)
        ids.add(id_digest(event_id))
        self._n += len(ids) - before
        while self._n > self.max_ids and len(gens) > 1:
            self._n -= len(gens.popleft()[1])


class MsgWindow:
    """``Nats-Msg-Id`` -> (stream seq, stored at) for the last ``window`` seconds of stored time
    (the broker de-dup check, docs/event-bus.md step 2), bounded by ``max_n`` too.

    Kept compact: the key is the id's 64-bit ``hash`` (per process; a collision can only
    mis-count the mismatch metric, never drop an event) and the value one int packing the stream
    seq and the store time in milliseconds, in four generations of plain dicts dropped whole.
    """

    __slots__ = ("window", "max_n", "_span", "_gens", "_n", "_latest")

    _MS_BITS = 42  # stored-at milliseconds fit in 42 bits until the year 2109

    def __init__(self, window: float, max_n: int, generations: int = 4) -> None:
        self.window = window
        self.max_n = max(1, max_n)
        self._span = max(0.001, window / generations)
        self._gens: deque[tuple[float, dict[int, int]]] = deque()  # (first stored at, entries)
        self._n = 0
        self._latest = 0.0

    def __len__(self) -> int:
        return self._n

    def get(self, mid: str) -> tuple[int, float] | None:
        h = hash(mid)
        for _, d in reversed(self._gens):
            v = d.get(h)
            if v is not None:
                return v >> self._MS_BITS, (v & ((1 << self._MS_BITS) - 1)) / 1000
        return None

    def put(self, mid: str, stream_seq: int, stored_at: float) -> None:
        gens = self._gens
        self._latest = max(self._latest, stored_at)
        if not gens or stored_at - gens[-1][0] >= self._span:
            gens.append((stored_at, {}))
            # Entries older than the window can no longer show a mismatch.
            while len(gens) > 1 and self._latest - (gens[0][0] + self._span) > self.window:
                self._n -= len(gens.popleft()[1])
        d = gens[-1][1]
        before = len(d)
        d[hash(mid)] = (stream_seq << self._MS_BITS) | (int(stored_at * 1000) & ((1 << self._MS_BITS) - 1))
        self._n += len(d) - before
        while self._n > self.max_n and len(gens) > 1:
            self._n -= len(gens.popleft()[1])


class Forgotten:
    """Where workflows whose ordering state was evicted had got to: ``workflow_id`` -> last seq.

    Without it a copy of an old event of an evicted workflow (an outbox drained after JetStream's
    duplicate window, once the event-id window has passed too) would look like a workflow first
    seen mid-life and be delivered again.  Compact, since it covers a long horizon: the current
    generation is a dict keyed by the id's 64-bit ``hash`` (per process); older generations are
    frozen into two sorted arrays (8 + 8 bytes per workflow) searched by bisection.  A
    generation covers ``max_age / generations`` seconds; whole generations are dropped once
    older than ``max_age`` or when more than ``max_n`` workflows are remembered.
    """

    __slots__ = ("max_n", "max_age", "_span", "_live", "_live_since", "_frozen", "_n")

    def __init__(self, max_n: int, max_age: float, generations: int = 12) -> None:
        self.max_n = max(1, max_n)
        self.max_age = max_age
        self._span = max_age / generations
        self._live: dict[int, int] = {}
        self._live_since: float | None = None
        self._frozen: deque[tuple[float, array[int], array[int]]] = deque()  # (ended at, keys, seqs)
        self._n = 0

    def __len__(self) -> int:
        return self._n + len(self._live)

    def put(self, workflow_id: str, last_seq: int, now: float) -> None:
        if self._live_since is None:
            self._live_since = now
        elif now - self._live_since >= self._span or len(self._live) >= self.max_n:
            keys = sorted(self._live)
            self._frozen.append((now, array("q", keys), array("q", (self._live[k] for k in keys))))
            self._n += len(keys)
            self._live, self._live_since = {}, now
        while self._frozen and (now - self._frozen[0][0] > self.max_age
                                or self._n + len(self._live) > self.max_n):
            self._n -= len(self._frozen.popleft()[1])
        self._live[hash(workflow_id)] = last_seq

    def pop(self, workflow_id: str) -> int | None:
        """The last seq remembered for ``workflow_id`` (newest first), or None."""
        h = hash(workflow_id)
        seq = self._live.pop(h, None)
        if seq is not None:
            return seq
        for _, keys, seqs in reversed(self._frozen):
            i = bisect.bisect_left(keys, h)
            if i < len(keys) and keys[i] == h:
                return seqs[i]  # left in place: a frozen generation is immutable; the live state supersedes it
        return None
