"""The bridge: canonical stream -> in-process subscribers, de-duplicated and in order per workflow.

Consumption
-----------
Each node has its own durable pull consumer, ``bridge-<node_id>`` (every node delivers every
workflow to its own subscribers, so nodes must not share one), filtered to every event subject of
this cluster, ``cb.<cluster>.events.>`` (:func:`cbctl.core.model.events.stream_subjects`), all schema
versions.  Subscribers get the pinned version (flag ``consumers.schema_version``); a message of
another version is skipped unread unless this bridge has delivered from that version before
(step 1).  So changing the pinned version needs no new consumer: the same one goes on where it
was.  (It used to be filtered to the pinned version, ``cb.<cluster>.events.v<N>.>``, and
re-created on the new filter at a switch.  Then an event published only in the old version and
stored after the old consumer's last fetch -- a lagging node still publishing v1 only, the tail
of a workflow whose v2 publishing never began -- was never seen by either consumer, and with no
later event of that workflow to reveal the gap its subscribers silently missed it.  A durable
consumer still on such a filter is re-created on the new one ``rewind`` stream messages before
where it had got to; whatever is seen twice that way is removed by the de-duplication below.)
Every message is acked once handled, including undecodable ones, so nothing redelivers forever.
A consumer created from scratch starts at the stream messages stored since this bridge *started*
(``deliver_new``; the consumer itself is only created once ``eventbus.bridge`` leaves ``off``):
a node joining late does not replay the stream's history, and a node that applies
``off -> read-only`` later than the others (a busy machine) still reads everything published
since it started, like a durable consumer that was paused while ``off``.  Starting at "new
messages as of the flag change" tied a bridge's view to how late its node heard of the change:
a lagging node's bridge missed whatever the others published meanwhile (all of it, in the
flag-transition test of ``tests/integration/test_bus_holes.py``).  One that vanished (a server
restart can lose a consumer created just before it was killed) is re-created from the last
stream sequence seen, minus ``rewind``, and is looked for at once after every reconnect.

Per message, in order:

1. Decode (:func:`cbctl.core.model.events.decode_event`, subject checked too).  Garbage bytes, an
   unknown schema version, a malformed event: ``event_bus_bad_events_total{reason}``, skipped.
   A message of a version other than the pinned one: skipped (acked, not even decoded) unless
   this bridge has delivered from that version before -- i.e. after ``consumers.schema_version``
   moved, the old version's messages.  Those are not delivered (subscribers get the pinned
   version's content) but mark their seq as owed: the gap filler brings it from the record
   unless the pinned version's copy comes first (a seq published only in the old version, e.g.
   by a node that has not applied the dual-publish window yet, has none).  Left-overs fetched
   before the switch and handled after it are treated the same way.
2. Broker de-dup check: the same ``Nats-Msg-Id`` stored twice (two stream sequences) within the
   stream's duplicate window means JetStream failed to suppress a duplicate it should have:
   ``event_bus_consumer_dedup_mismatch_total``.  (Copies further apart than the window are
   expected, e.g. an outbox drained after a long outage; step 3 handles them.)
3. De-dup: ``event_bus_bridge_duplicates_suppressed_total``.  ``event_id`` is deterministic
   (one per workflow and seq, the same in every schema version), so a copy is recognised two
   ways.  (a) By ``event_id`` over a window a little longer than JetStream's duplicate window
   (default: the window + 60 s, at most 200,000 ids), kept as 128-bit integers in a few
   generations of sets dropped whole (about 90 bytes an id instead of about 300 for a string in
   an ordered dict: at 200 events/s this was the agent's largest growing structure).  (b) By the
   workflow's seq order, however late the copy: a seq at or below the last one released is not
   released again (step 4).  That covers workflows whose ordering state is kept (the
   ``max_workflows`` most recently active) and, through a compact record of where each evicted
   workflow had got to (``forget_max`` workflows for ``forget_max_age``, default 1 hour, about
   16 bytes each), evicted ones too: so an outbox drained long after an outage (after both
   JetStream's window and the id window) still delivers nothing twice.  The dual-published copy
   of an event read again after a version switch is removed the same way.
4. Reorder per workflow by ``seq``: seq n+1 is released only after n.  A later seq is held back.
   A late event is never dropped for being late: if the gap is still open after ``gap_timeout``
   the bridge asks its *gap filler* (the agent reads the workflow's Redis history, the
   authoritative record of every applied event, and its publish marker, see
   :mod:`cbctl.core.backends.redis.lanes`) for the missing seqs and releases them from there, in order; the
   stream copy that arrives later has the same deterministic ``event_id`` and is suppressed by
   step 3.  Only a seq that is provably gone (trimmed from the history by ``history-max``, or
   the workflow's keys expired) is skipped, or -- when there is no filler, or Redis cannot be
   read -- one still missing after ``give_up_after``: then the bridge counts
   ``event_bus_bridge_ordering_violations_total`` (subscribers really miss it) and goes on from
   the lowest held seq.  A copy of a skipped seq that turns up afterwards is dropped (subscribers
   were promised increasing seqs) and not counted again.
   A workflow first seen at a seq above 1 starts where its stream starts *for this bridge*: the
   filler says at which seq the workflow's publishing began, and which of the missing events
   were applied after this bridge's consumer was created (those are in the part of the stream
   the consumer reads, so they are filled); events from before the consumer existed are not
   this bridge's to deliver (a node joining late does not replay history).  Without a filler,
   lower seqs arriving within ``gap_timeout`` go first and the bridge then starts at the lowest
   held seq.  Neither case is a violation.
5. Release: track the workflow's last released seq, keep it in a short per-workflow history (for
   ``after_seq`` replays) and fan out by mode (flag ``eventbus.bridge``):
   ``off`` consumes nothing; ``read-only`` runs steps 1-4 and delivers to nobody; ``canary``
   delivers only to subscribers whose name is in ``canary.subscribers``; ``streaming`` to all.
   ``event_bus_bridge_delivered_total{origin}`` counts each event that reached at least one
   subscriber, ``origin`` ``local`` when this node published it (its ``node_id``), else ``remote``.

Subscribers
-----------
:meth:`Bridge.subscribe` returns a :class:`Subscription`, an async iterator of :class:`Event`.
Per workflow, a subscription sees strictly increasing seqs.  With ``after_seq`` (single-workflow
subscriptions only) it first replays what the bridge already released with a higher seq (from
the in-memory history, else read back from the stream), then continues live without a gap or a
repeat.  A replay read back from the stream is all or nothing: if NATS fails part-way,
iterating raises ``BackendUnavailable`` (nothing of the replay is yielded; subscribe again with
the same ``after_seq``).  A subscriber that falls ``max_queue`` events behind is dropped:
iterating raises :class:`SubscriberLagged`, carrying the last seq it got, to resubscribe from.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import logging
import re
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import nats.errors
import nats.js.api as jsapi
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cbctl.core.model.config import StreamConfig
from cbctl.core.model.errors import BackendUnavailable, BadInput, CbctlError
from cbctl.core.model.events import (
    BAD_EVENT_REASONS,
    SUPPORTED_SCHEMA_VERSIONS,
    BadEvent,
    Event,
    decode_event,
    stream_subjects,
    subject,
)
from cbctl.core.model.metrics import AgentMetrics

log = logging.getLogger(__name__)

BridgeMode = Literal["off", "read-only", "canary", "streaming"]
BRIDGE_MODES: tuple[str, ...] = ("off", "read-only", "canary", "streaming")
MSG_ID_HEADER = "Nats-Msg-Id"

# Transient trouble talking to JetStream: back off and try again.
_TRANSIENT = (nats.errors.Error, OSError, asyncio.TimeoutError)


def _where(task: asyncio.Task[object]) -> str:
    """The innermost frame ``task`` is suspended in (``file:line``), for a log line."""
    coro: object = task.get_coro()
    where = "?"
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            where = f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno}"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where


def _retrieve(fut: asyncio.Future[object]) -> None:
    """Done callback: read a background step's outcome so it is never "never retrieved"."""
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("bridge: %s", fut.exception())


def _id_digest(event_id: str) -> int:
    """A 128-bit integer standing for ``event_id``: the id itself when it is 32 hex digits (what
    :func:`cbctl.core.model.events.deterministic_event_id` makes: lossless), else a BLAKE2b digest.
    About 44 bytes as a Python int, against about 300 for the string and its dict entry."""
    if len(event_id) == 32:
        try:
            return int(event_id, 16)
        except ValueError:
            pass
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=16).digest(), "big")


class _IdWindow:
    """Event ids seen recently (membership only), bounded by age and by count.

    Digests (:func:`_id_digest`) in ``generations`` sets, each covering about ``max_age /
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
        h = _id_digest(event_id)
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
        ids.add(_id_digest(event_id))
        self._n += len(ids) - before
        while self._n > self.max_ids and len(gens) > 1:
            self._n -= len(gens.popleft()[1])


class _MsgWindow:
    """``Nats-Msg-Id`` -> (stream seq, stored at) for the last ``window`` seconds of stored time
    (the broker de-dup check, module doc step 2), bounded by ``max_n`` too.

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


class _Forgotten:
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


class SubscriberLagged(CbctlError):
    """A subscriber fell too far behind and was dropped; resubscribe with ``after_seq``."""

    exit_code = 1

    def __init__(self, name: str, workflow_id: str | None, last_seq: int | None) -> None:
        super().__init__(
            f"subscriber {name!r} fell behind and was dropped (last seq {last_seq} of workflow {workflow_id!r})"
        )
        self.name = name
        self.workflow_id = workflow_id
        self.last_seq = last_seq


_CLOSED = object()
_LAGGED = object()


class Subscription:
    """Async iterator of events for one subscriber. Create with :meth:`Bridge.subscribe`."""

    def __init__(self, bridge: Bridge, workflow_id: str | None, name: str, after_seq: int | None,
                 max_queue: int) -> None:
        self.workflow_id = workflow_id
        self.name = name
        self.after_seq = after_seq
        self._bridge = bridge
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._max_queue = max_queue
        self._replay: list[Event] | None = None
        self._replay_task: asyncio.Task[list[Event]] | None = None
        self._replay_upto: int | None = None  # live events at or below this seq were replayed
        self._last_seq: int | None = after_seq  # last seq handed to the consumer (one workflow)
        self._closed = False
        self._lagged = False

    @property
    def last_seq(self) -> int | None:
        """The last seq this subscription yielded (single-workflow subscriptions)."""
        return self._last_seq

    def _offer(self, ev: Event) -> bool:
        if self._closed or self._lagged:
            return False
        if self._queue.qsize() >= self._max_queue:
            # Blocking the bridge for one slow subscriber would stall every other one.
            self._lagged = True
            self._queue.put_nowait(_LAGGED)
            self._bridge._remove(self)
            return False
        self._queue.put_nowait(ev)
        return True

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._replay is None and self.after_seq is not None and self.workflow_id is not None:
            # The replay runs as its own task: a read back from the stream can outlast the
            # caller's timeout (next(keepalive)), and cancelling it would restart it from scratch
            # on every call, never finishing.
            if self._replay_task is None:
                self._replay_task = asyncio.ensure_future(self._bridge._replay(self))
            task = self._replay_task
            try:
                replay = await asyncio.shield(task)
            finally:
                if task.done():
                    self._replay_task = None  # a failed replay is tried afresh on the next call
            self._replay = list(reversed(replay))  # pop() from the end = oldest first
        while True:
            if self._replay:
                ev = self._replay.pop()
            else:
                item = await self._queue.get()
                if item is _CLOSED:
                    self._queue.put_nowait(_CLOSED)  # keep raising on further calls
                    raise StopAsyncIteration
                if item is _LAGGED:
                    raise SubscriberLagged(self.name, self.workflow_id, self._last_seq)
                assert isinstance(item, Event)
                ev = item
            if self.workflow_id is not None and self._last_seq is not None and ev.seq <= self._last_seq:
                continue  # already yielded by the replay
            if self.workflow_id is not None:
                self._last_seq = ev.seq
            return ev

    async def next(self, timeout: float | None = None) -> Event:
        """The next event, or ``asyncio.TimeoutError`` after ``timeout`` seconds."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    def pending(self) -> int:
        """Events queued and not yet taken."""
        return self._queue.qsize() + len(self._replay or ())

    def close(self) -> None:
        """Stop receiving; iteration ends after what is already queued."""
        if not self._closed:
            self._closed = True
            self._bridge._remove(self)
            self._queue.put_nowait(_CLOSED)
            task, self._replay_task = self._replay_task, None
            if task is not None:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # mark a failure retrieved: nobody is left to be told


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


@dataclass(slots=True)
class _Workflow:
    last_seq: int  # last seq released (or skipped over)
    # False until something is released: the bridge may have started in the middle of the
    # workflow, so where its sequence starts is not known yet (see _order).
    baseline_known: bool = True
    held: dict[int, Event] = field(default_factory=dict)
    gap_since: float | None = None
    # Created only when needed (an empty deque costs ~750 bytes, a set ~200: times
    # max_workflows, that was most of the bridge's ordering state).
    history: deque[Event] | None = None  # only for the history_workflows most recently active
    filling: bool = False  # a gap fill is in flight
    skipped: set[int] | None = None  # seqs given up on (their late copies are dropped)
    first_seq: int | None = None  # lowest seq released (a copy at or above it is a duplicate)
    owed: int = 0  # highest seq seen only in a previous version's left-over message (see _owe)


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


def durable_name(node_id: str) -> str:
    """The durable consumer name of ``node_id``'s bridge (characters JetStream rejects -> ``_``)."""
    return "bridge-" + re.sub(r"[^A-Za-z0-9_-]", "_", node_id)


class Bridge:
    """Consumes the canonical stream and fans events out to subscribers; see the module doc."""

    def __init__(
        self,
        nc: Client,
        stream_cfg: StreamConfig,
        metrics: AgentMetrics,
        node_id: str,
        *,
        cluster: str,
        mode: str = "off",
        schema_version: int = 1,
        canary_subscribers: Iterable[str] = (),
        durable: str | None = None,
        deliver_new: bool = True,
        gap_timeout: float = 0.5,
        give_up_after: float = 60.0,
        filler: GapFiller | None = None,
        dedup_max_ids: int = 200_000,
        dedup_max_age: float | None = None,
        max_workflows: int = 10_000,
        forget_max: int = 500_000,
        forget_max_age: float = 3600.0,
        max_held: int = 10_000,
        history: int = 16,
        history_workflows: int = 1_000,
        fetch_batch: int = 256,
        fetch_timeout: float = 0.5,
        max_queue: int = 10_000,
        rewind: int = 1000,
        api_timeout: float = 2.0,
    ) -> None:
        """``nc`` is a connected client the caller owns (the bridge never closes it).
        ``cluster``: whose subjects are consumed (``cb.<cluster>.events.v<N>.>``).
        ``deliver_new``: a consumer created from scratch starts at new messages (a node joining
        late does not replay the stream's whole history); False starts at the beginning.
        ``filler``: reads missing events from the authoritative record (module doc, step 4);
        ``gap_timeout``: how long a gap stays open before the filler is asked;
        ``give_up_after``: how long a gap nothing can fill is waited for before it is skipped.

        Memory is bounded by these settings, not by uptime: ``max_workflows`` workflows'
        ordering state (least recently active forgotten first), ``history`` released events kept
        for ``after_seq`` replays for each of the ``history_workflows`` most recently active
        workflows, ``dedup_max_ids`` event ids kept ``dedup_max_age`` seconds (default: the
        stream's duplicate window + 60 s), the last seq of up to ``forget_max`` evicted workflows
        for ``forget_max_age`` seconds (about 16 bytes each), ``max_held`` held events per
        workflow, and ``max_queue`` events per subscriber (module doc, step 3)."""
        if dedup_max_age is None:
            dedup_max_age = stream_cfg.duplicate_window + 60.0
        if dedup_max_age <= stream_cfg.duplicate_window:
            raise BadInput(
                f"bridge de-dup age {dedup_max_age}s must exceed the stream's duplicate window "
                f"{stream_cfg.duplicate_window}s"
            )
        self.nc = nc
        # A JetStream API request in flight when the server dies only ends by this timeout.
        self.js: JetStreamContext = nc.jetstream(timeout=api_timeout)
        self.stream_cfg = stream_cfg
        self.metrics = metrics
        self.node_id = node_id
        self.cluster = cluster
        self.durable = durable or durable_name(node_id)
        self.deliver_new = deliver_new
        self.gap_timeout = gap_timeout
        self.give_up_after = give_up_after
        self.filler = filler
        self.history_workflows = history_workflows
        # Wall-clock time this bridge's stream begins (its start; events applied before it are
        # not ours to fill for a workflow first seen mid-life); a margin covers clock skew.
        self._consumer_since: float | None = None
        self.skew_margin = 5.0
        self._with_history: OrderedDict[str, None] = OrderedDict()
        self._fill_tasks: set[asyncio.Task[None]] = set()
        self.max_concurrent_fills = 16
        self.dedup_max_ids = dedup_max_ids
        self.dedup_max_age = dedup_max_age
        self.max_workflows = max_workflows
        self.max_held = max_held
        self.history = history
        self.fetch_batch = fetch_batch
        self.fetch_timeout = fetch_timeout
        self.max_queue = max_queue
        self.rewind = rewind
        self.stats = BridgeStats()

        self._mode = "off"
        self._version = 1
        self._canary: frozenset[str] = frozenset()
        self._wake = asyncio.Event()
        self.apply_flags(mode, schema_version, canary_subscribers)
        # Every version this bridge has delivered from (been pinned to while consuming): their
        # seqs are its to deliver (step 1 and _begin).  Kept as subject tokens too ("v1"), so a
        # message of any other version is skipped without decoding it.
        self._consumed_versions: set[int] = set()
        self._consumed_tokens: frozenset[str] = frozenset()
        self._psub: JetStreamContext.PullSubscription | None = None
        self._last_stream_seq = 0
        self._seen_ids = _IdWindow(dedup_max_ids, dedup_max_age)  # event ids seen (monotonic time)
        self._seen_msgs = _MsgWindow(stream_cfg.duplicate_window, dedup_max_ids)  # msg id -> (stream seq, stored at)
        self._forgotten = _Forgotten(forget_max, forget_max_age)  # evicted workflow -> its last seq
        self._workflows: OrderedDict[str, _Workflow] = OrderedDict()
        self._gapped: set[str] = set()
        self._by_workflow: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._tasks: list[asyncio.Task[None]] = []
        # Set by close() before it cancels the consumer: nats-py swallows a cancellation that
        # lands in its flush (an ack) or turns it into ConnectionClosedError once the connection
        # is closed, and the consumer would then retry forever on a closed connection.
        self._stopped = False
        for reason in BAD_EVENT_REASONS:
            metrics.bad_events.labels(reason=reason)
        for origin in ("local", "remote"):
            metrics.bridge_delivered.labels(origin=origin)

    # ------------------------------------------------------------------ flags

    def apply_flags(self, mode: str, schema_version: int, canary_subscribers: Iterable[str] = ()) -> None:
        """Apply ``eventbus.bridge``, ``consumers.schema_version`` and ``canary.subscribers``.
        Raises ``BadInput`` for unknown values; a version change re-creates the consumer."""
        if mode not in BRIDGE_MODES:
            raise BadInput(f"eventbus.bridge: unknown mode {mode!r} (allowed: {', '.join(BRIDGE_MODES)})")
        if schema_version not in SUPPORTED_SCHEMA_VERSIONS or isinstance(schema_version, bool):
            raise BadInput(
                f"consumers.schema_version: unsupported version {schema_version!r} "
                f"(supported: {list(SUPPORTED_SCHEMA_VERSIONS)})"
            )
        self._mode = mode
        self._version = schema_version
        self._pinned_token = f"v{schema_version}"  # its subjects' version token
        self._canary = frozenset(canary_subscribers)
        self._wake.set()

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def schema_version(self) -> int:
        return self._version

    def last_delivered_seq(self, workflow_id: str) -> int | None:
        """The last seq released (delivered or, in read-only mode, verified) for a workflow."""
        wf = self._workflows.get(workflow_id)
        return wf.last_seq if wf is not None else None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start consuming (per the current mode) and the gap timer. Returns at once."""
        if self._tasks:
            return
        if self._consumer_since is None:
            # Where this bridge's stream begins, whatever the mode now: a consumer created later
            # (the mode leaves "off") starts here, not at the flag change (module doc).
            self._consumer_since = time.time() if self.deliver_new else 0.0
        self._tasks = [
            asyncio.create_task(self._consume(), name="cbctl-bridge"),
            asyncio.create_task(self._tick_loop(), name="cbctl-bridge-gaps"),
        ]

    async def close(self, timeout: float = 2.0) -> None:
        """Stop consuming, end every subscription, unsubscribe; within ``timeout`` seconds.

        The connection stays open (its owner closes it).  Subscriptions end first (no await
        before), so SSE streams end at once whatever the server does.  The consumer's tasks are
        cancelled and waited for, but not past the deadline: a gap fill stuck in a Redis call
        that swallows the cancellation, or a fetch on a frozen server, is abandoned (it can do no
        harm: the subscriptions are closed).  The unsubscribe goes first among the network steps
        because nats-py's close/drain wait on an active pull subscription; it is bounded too,
        since on a frozen server the flush behind it can wait forever.  Never raises.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.05, timeout)
        self._stopped = True
        for sub in list(self._all) + [s for subs in self._by_workflow.values() for s in subs]:
            sub.close()
        tasks = [*self._tasks, *self._fill_tasks]
        self._tasks = []
        self._fill_tasks.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=max(0.01, 0.5 * (deadline - loop.time())))
            if stuck:
                log.warning("bridge close: %d task(s) did not end when cancelled (%s); abandoned", len(stuck),
                            ", ".join(sorted(f"{t.get_name()} at {_where(t)}" for t in stuck)))
        psub, self._psub = self._psub, None
        if psub is not None:
            unsub = asyncio.ensure_future(psub.unsubscribe())
            unsub.add_done_callback(_retrieve)
            done, _ = await asyncio.wait({unsub}, timeout=max(0.01, deadline - loop.time()))
            if not done:
                unsub.cancel()
                log.warning("bridge close: unsubscribing %s did not finish in time; the connection's close "
                            "ends it", self.durable)

    # ------------------------------------------------------------------ subscribers

    def subscribe(self, workflow_id: str | None, subscriber_name: str, *, after_seq: int | None = None,
                  max_queue: int | None = None) -> Subscription:
        """Subscribe to one workflow (or all with None) under ``subscriber_name`` (the name
        ``canary.subscribers`` lists; several subscriptions may share one).  ``after_seq``
        (single workflow only): replay released events with a higher seq first."""
        if after_seq is not None and workflow_id is None:
            raise BadInput("after_seq needs a workflow_id: seqs are per workflow")
        sub = Subscription(self, workflow_id, subscriber_name, after_seq, max_queue or self.max_queue)
        if workflow_id is None:
            self._all.add(sub)
        else:
            self._by_workflow.setdefault(workflow_id, set()).add(sub)
            if after_seq is not None:
                # Everything up to the workflow's current last seq comes from the replay; the
                # queue gets what is released from now on.  No await between these two steps.
                wf = self._workflows.get(workflow_id)
                sub._replay_upto = wf.last_seq if wf is not None else None
        return sub

    def _remove(self, sub: Subscription) -> None:
        if sub.workflow_id is None:
            self._all.discard(sub)
        else:
            subs = self._by_workflow.get(sub.workflow_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_workflow[sub.workflow_id]

    def _eligible(self, sub: Subscription) -> bool:
        return self._mode == "streaming" or (self._mode == "canary" and sub.name in self._canary)

    async def _replay(self, sub: Subscription) -> list[Event]:
        """Released events of the subscription's workflow with after_seq < seq <= the last seq
        released when it subscribed, oldest first; nothing if the subscriber is not eligible."""
        workflow_id, after_seq, upto = sub.workflow_id, sub.after_seq, sub._replay_upto
        if workflow_id is None or after_seq is None or not self._eligible(sub):
            return []
        if upto is None:
            # The bridge has released nothing of this workflow yet (it started late, e.g. on a
            # node that joined mid-workflow): what came before is only in the stream.  Read it
            # to its end; live events at or below what the replay yields are skipped.
            return await self._replay_from_stream(workflow_id, after_seq, None)
        if upto <= after_seq:
            return []
        wf = self._workflows.get(workflow_id)
        if wf is not None and wf.history and wf.history[0].seq <= after_seq + 1:  # None/empty: not kept
            return [ev for ev in wf.history if after_seq < ev.seq <= upto]
        return await self._replay_from_stream(workflow_id, after_seq, upto)

    async def _replay_from_stream(self, workflow_id: str, after_seq: int, upto: int | None) -> list[Event]:
        """Read the workflow's subject back from the stream (one request per message); ``upto``
        None = to the end of the stream.  All or nothing: a transient NATS error raises
        ``BackendUnavailable`` (never a partial list, which would be a silent seq hole)."""
        subject_name = subject(self.cluster, self._version, workflow_id)
        found: dict[int, Event] = {}
        stream_seq = 1
        while True:
            try:
                raw = await self.js.get_msg(self.stream_cfg.name, seq=stream_seq, subject=subject_name, next=True)
            except nats.js.errors.NotFoundError:
                break
            except _TRANSIENT as exc:
                # A partial replay would hand the subscriber a seq hole it cannot see; fail the
                # whole replay so the stream ends with a reason and the client resumes with `after`.
                log.warning("bridge replay of %s from the stream failed: %s", workflow_id, exc)
                raise BackendUnavailable(
                    f"replay of workflow {workflow_id!r} from stream {self.stream_cfg.name} failed "
                    f"after seq {max(found, default=after_seq)}: {type(exc).__name__}: {exc}",
                    backend="nats",
                ) from exc
            stream_seq = (raw.seq or stream_seq) + 1
            try:
                _, ev = decode_event(raw.data or b"", subject=subject_name)
            except BadEvent:
                continue  # counted when the live consumer saw it
            if after_seq < ev.seq and (upto is None or ev.seq <= upto):
                found.setdefault(ev.seq, ev)
            if upto is not None and ev.seq >= upto:
                break
        return [found[s] for s in sorted(found)]

    # ------------------------------------------------------------------ consuming

    async def _consume(self) -> None:
        delay = 0.1
        last_check = time.monotonic()
        seen_reconnects = self.nc.stats.get("reconnects", 0)
        while not self._stopped:
            if self._mode == "off":
                await self._unsubscribe()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self._psub is None:
                    await self._bind()
                    last_check = time.monotonic()
                assert self._psub is not None
                msgs = await self._psub.fetch(self.fetch_batch, timeout=self.fetch_timeout)
            except TimeoutError:  # nats.errors.TimeoutError too: no messages right now
                reconnects = self.nc.stats.get("reconnects", 0)
                # A consumer created just before the server was SIGKILLed may not have been
                # persisted: check at once after a reconnect, and now and then anyway.
                if reconnects != seen_reconnects or time.monotonic() - last_check > 10 * self.fetch_timeout:
                    seen_reconnects = reconnects
                    last_check = time.monotonic()
                    await self._check_consumer()
                continue
            except _TRANSIENT as exc:
                if self._stopped:
                    return  # a cancellation nats-py turned into an error (see _stopped)
                log.warning("bridge: consuming %s failed: %s: %s (retrying)", self.stream_cfg.name,
                            type(exc).__name__, exc)
                await self._unsubscribe()
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            delay = 0.1
            self._consuming(self._version)
            for msg in msgs:
                try:
                    if self._mode == "off":
                        # Turned off while this fetch was pending: hand the message back so it
                        # is delivered when the bridge is turned on again, not silently consumed.
                        await msg.nak()
                        continue
                    self._handle(msg)
                    await msg.ack()
                except _TRANSIENT as exc:
                    # Unacked: it redelivers after ack_wait and the de-dup drops it then.
                    log.debug("bridge: ack failed: %s", exc)

    async def _check_consumer(self) -> None:
        """Notice a consumer that vanished (e.g. memory storage lost in a server restart)."""
        try:
            await self.js.consumer_info(self.stream_cfg.name, self.durable)
        except nats.js.errors.NotFoundError:
            log.warning("bridge: consumer %s is gone; re-creating it", self.durable)
            await self._unsubscribe()
        except _TRANSIENT:
            pass  # the next fetch will tell

    async def _unsubscribe(self) -> None:
        psub, self._psub = self._psub, None
        if psub is not None:
            try:
                await psub.unsubscribe()
            except _TRANSIENT:
                pass

    async def _bind(self) -> None:
        """Create the durable consumer (or re-create one left on an older filter) and bind to it."""
        await self._unsubscribe()
        stream = self.stream_cfg.name
        want = stream_subjects(self.cluster)  # every version: a version switch keeps the consumer
        start_seq: int | None = None
        try:
            info = await self.js.consumer_info(stream, self.durable)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and info.config.filter_subject != want:
            floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
            start_seq = max(1, max(floor, self._last_stream_seq) + 1 - self.rewind)
            log.info("bridge: switching consumer %s from %s to %s at stream seq %d",
                     self.durable, info.config.filter_subject, want, start_seq)
            await self.js.delete_consumer(stream, self.durable)
            info = None
        if info is None and start_seq is None and self._last_stream_seq:
            # Our consumer vanished after we had consumed from it: resume where we were rather
            # than at "new" (events in between would be skipped) or at the very beginning.
            start_seq = max(1, self._last_stream_seq + 1 - self.rewind)
        if info is None:
            start_time: datetime | None = None
            if start_seq is not None:
                policy = jsapi.DeliverPolicy.BY_START_SEQUENCE
            elif self.deliver_new and self._consumer_since:
                # What was stored since this bridge started (module doc), not only what comes
                # after the mode left "off": that is when this node applied a flag, which can be
                # seconds after the other nodes began publishing.
                policy = jsapi.DeliverPolicy.BY_START_TIME
                start_time = datetime.fromtimestamp(self._consumer_since, UTC)
            elif self.deliver_new:
                policy = jsapi.DeliverPolicy.NEW
            else:
                policy = jsapi.DeliverPolicy.ALL
            log.info("bridge: creating consumer %s on %s (%s%s)", self.durable, want, policy.value,
                     f" {start_seq}" if start_seq is not None else f" {start_time.isoformat()}" if start_time else "")
            await self.js.add_consumer(
                stream,
                jsapi.ConsumerConfig(
                    durable_name=self.durable,
                    filter_subject=want,
                    ack_policy=jsapi.AckPolicy.EXPLICIT,
                    deliver_policy=policy,
                    opt_start_seq=start_seq,
                    opt_start_time=start_time,
                    ack_wait=30.0,
                    max_ack_pending=max(1000, 4 * self.fetch_batch),
                ),
            )
        self._psub = await self.js.pull_subscribe_bind(self.durable, stream)
        self._consuming(self._version)
        if self._consumer_since is None:
            # Normally set by start().  Fills for a workflow first seen mid-life reach back to
            # here (minus the skew margin): what was applied before this bridge began is not its
            # to deliver.  A consumer that reads the stream from its start (deliver_new=False)
            # owns everything.
            self._consumer_since = time.time() if self.deliver_new else 0.0

    def _consuming(self, version: int) -> None:
        """Record that this bridge delivers from ``version`` (pinned while consuming)."""
        if version not in self._consumed_versions:
            self._consumed_versions.add(version)
            self._consumed_tokens = frozenset(f"v{v}" for v in self._consumed_versions)

    # ------------------------------------------------------------------ per message

    def _handle(self, msg: Msg) -> None:
        """Steps 1-5 of the module docstring for one message (synchronous: no interleaving)."""
        self.stats.received += 1
        now = time.monotonic()
        try:
            meta = msg.metadata
        except nats.errors.Error:
            meta = None
        if meta is not None:
            self._last_stream_seq = max(self._last_stream_seq, meta.sequence.stream)
        parts = msg.subject.split(".", 4)
        if (len(parts) == 5 and parts[3].startswith("v") and parts[3] != self._pinned_token
                and parts[3] not in self._consumed_tokens):
            # Another version's copy (the consumer reads every version's subjects): not ours.
            # A malformed subject falls through to decode_event, which counts it.
            return
        try:
            version, ev = decode_event(msg.data, subject=msg.subject)
        except BadEvent as exc:
            self.stats.bad += 1
            self.metrics.bad_events.labels(reason=exc.reason).inc()
            log.debug("bridge: bad event on %s: %s", msg.subject[:200], exc)
            return
        if version != self._version:
            # A version this bridge delivered from before the pinned one (a left-over fetched
            # before the switch, or published after it by a node still at the old version).
            # Not delivered (subscribers now get the pinned version's content), but not
            # forgotten either: for a workflow whose new-version publishing began later (or not
            # at all) this seq exists only in the old version, and if it was the workflow's last
            # event no later one would ever reveal the gap.  So it marks the seq as owed: the
            # gap filler brings it from the record unless the pinned version's copy comes first.
            self._owe(ev, now)
            return
        hdr = msg.headers.get(MSG_ID_HEADER) if msg.headers else None
        if hdr and meta is not None:
            self._check_broker_dedup(hdr, meta.sequence.stream, meta.timestamp.timestamp(), now)
        if ev.event_id in self._seen_ids:
            self.stats.duplicates += 1
            self.metrics.bridge_duplicates.inc()
            return
        self._seen_ids.add(ev.event_id, now)
        self._order(ev, now)

    def _check_broker_dedup(self, mid: str, stream_seq: int, stored_at: float, now: float) -> None:
        prev = self._seen_msgs.get(mid)
        if prev is None:
            self._seen_msgs.put(mid, stream_seq, stored_at)  # forgets what is older than the window
            return
        prev_seq, prev_ts = prev
        # Same stream sequence = a redelivery of one stored message, not a second copy.
        # The 50 ms margin keeps copies right at the window's edge from counting.
        if stream_seq != prev_seq and abs(stored_at - prev_ts) < self.stream_cfg.duplicate_window - 0.05:
            self.stats.dedup_mismatches += 1
            self.metrics.consumer_dedup_mismatch.inc()
            log.warning("bridge: message id %s stored twice (stream seq %d and %d, %.3fs apart) within the "
                        "duplicate window", mid, prev_seq, stream_seq, abs(stored_at - prev_ts))

    def _owe(self, ev: Event, now: float) -> None:
        """``ev`` is known to exist but is not delivered from this message (see :meth:`_handle`)."""
        wf = self._state_of(ev)
        if ev.seq <= wf.last_seq or ev.seq in wf.held or ev.seq <= wf.owed:
            return
        wf.owed = ev.seq
        if wf.gap_since is None:
            wf.gap_since = now
            self._gapped.add(ev.workflow_id)

    def _state_of(self, ev: Event) -> _Workflow:
        """The ordering state of ``ev``'s workflow, created (or restored) on first sight."""
        wf = self._workflows.get(ev.workflow_id)
        if wf is None:
            last = self._forgotten.pop(ev.workflow_id)
            if last is not None:
                # Evicted earlier: it goes on from where it had got to (a copy of an old event is
                # a duplicate however late it comes; module doc, step 3).
                wf = self._workflows[ev.workflow_id] = _Workflow(last_seq=last, first_seq=1)
            else:
                # A workflow first seen at seq 1 starts here.  One first seen later is held back
                # like any gap until the filler (or, without one, the gap timeout) says where its
                # stream starts for this bridge (module doc, step 4).
                wf = self._workflows[ev.workflow_id] = _Workflow(last_seq=0, baseline_known=ev.seq == 1)
            self._evict_workflows()
        else:
            self._workflows.move_to_end(ev.workflow_id)
        return wf

    def _order(self, ev: Event, now: float) -> None:
        wf = self._state_of(ev)
        if ev.seq <= wf.last_seq:
            # A copy of a seq released already or given up on: never delivered out of order.
            # Its loss was counted when the gap was skipped (if it was one), not again here.
            if wf.skipped is not None and ev.seq in wf.skipped:
                self.stats.late_dropped += 1
                wf.skipped.discard(ev.seq)
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
        if ev.seq == wf.last_seq + 1 and wf.baseline_known:
            self._release(wf, ev)
            self._release_run(ev.workflow_id, wf, now)
            return
        wf.held[ev.seq] = ev
        self.stats.held += 1
        if wf.gap_since is None:
            wf.gap_since = now
            self._gapped.add(ev.workflow_id)
        if len(wf.held) > self.max_held:
            # Memory bound: stop waiting for what is missing below the held events.
            self._skip_gap(ev.workflow_id, wf, now, why=f"more than {self.max_held} events held")

    def _release_run(self, workflow_id: str, wf: _Workflow, now: float) -> None:
        """Release held events that are now contiguous; restart the gap clock if some remain."""
        while wf.held and (wf.last_seq + 1) in wf.held:
            self._release(wf, wf.held.pop(wf.last_seq + 1))
        if wf.held or wf.owed > wf.last_seq:
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
                        workflow_id, wf.last_seq + 1, nxt - 1, now - (wf.gap_since or now), why)
            if wf.skipped is None:
                wf.skipped = set()
            wf.skipped.update(range(max(wf.last_seq + 1, nxt - 100), nxt))  # bounded: recent ones only
            while len(wf.skipped) > 1000:
                wf.skipped.discard(min(wf.skipped))
        else:
            log.debug("bridge: workflow %s first seen at seq %d; starting there", workflow_id, nxt)
        self._start_at(wf, nxt)
        self._release_run(workflow_id, wf, now)

    @staticmethod
    def _start_at(wf: _Workflow, seq: int) -> None:
        wf.last_seq = seq - 1
        wf.baseline_known = True

    def _drop_held_below(self, wf: _Workflow) -> None:
        """Held events at or below the new start can never be released: drop them (left in
        ``held`` they would keep the workflow gapped and unevictable forever)."""
        for seq in [s for s in wf.held if s <= wf.last_seq]:
            del wf.held[seq]
            self.stats.late_dropped += 1

    def tick(self, now: float | None = None) -> None:
        """Deal with gaps older than ``gap_timeout``: ask the filler, or (without one) skip
        (runs periodically by itself after start)."""
        now = time.monotonic() if now is None else now
        for workflow_id in list(self._gapped):
            wf = self._workflows.get(workflow_id)
            if wf is None or not (wf.held or wf.owed > wf.last_seq):
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
            lo = wf.last_seq + 1 if wf.baseline_known else 1
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
                        and (wf.held or wf.owed > wf.last_seq)):
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
        if not wf.held and wf.owed <= wf.last_seq:
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
        for seq in range(wf.last_seq + 1, hi + 1):
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
        if not wf.held and wf.owed <= wf.last_seq:
            return
        # Still a gap: is what is missing provably gone (before the publishing began, trimmed
        # from the history, or the workflow's keys expired)?  Then skip; else keep waiting.
        missing = wf.last_seq + 1
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

    def _evict_workflows(self) -> None:
        # Forget the least recently active workflows; never one with held events (the gap timer
        # resolves those soon).
        excess = len(self._workflows) - self.max_workflows
        if excess <= 0:
            return
        for workflow_id in list(itertools.islice(self._workflows, excess * 2)):
            if excess <= 0:
                break
            old = self._workflows[workflow_id]
            if not old.held and old.owed <= old.last_seq:
                del self._workflows[workflow_id]
                self._with_history.pop(workflow_id, None)
                if old.baseline_known:
                    self._forgotten.put(workflow_id, old.last_seq, time.monotonic())
                excess -= 1

    def _release(self, wf: _Workflow, ev: Event) -> None:
        wf.baseline_known = True
        wf.last_seq = ev.seq
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
        if self._mode not in ("canary", "streaming"):
            return  # read-only: verified, delivered to nobody
        delivered = False
        for sub in (*self._by_workflow.get(ev.workflow_id, ()), *self._all):
            if self._eligible(sub) and sub._offer(ev):
                delivered = True
        if delivered:
            self.stats.delivered += 1
            self.metrics.bridge_delivered.labels(origin="local" if ev.node_id == self.node_id else "remote").inc()


__all__ = ["BRIDGE_MODES", "Bridge", "BridgeMode", "BridgeStats", "GapFill", "GapFiller", "SubscriberLagged",
           "Subscription", "durable_name"]
