"""The event bus inside a node agent: publisher + outbox, bridge, local stream, SSE endpoints.

Attach before the agent starts::

    agent = NodeAgent(ctx, "node-1", ...)
    bus = attach_bus(agent)          # hooks itself into the agent's lifecycle, flags and HTTP
    await agent.start()              # starts the bus first; stops it in every teardown

What it does
------------
* **Publishing** (flags ``eventbus.publish``, ``eventbus.schema_versions``).  The agent's
  ``on_applied`` hook builds the canonical :class:`~cbctl.core.model.events.Event` of every applied
  task (``seq`` from the fencing guard, deterministic ``event_id``, ``type``, ``lane``,
  ``node_id``, ``occurred_at``; ``payload`` = the workflow state update the guard wrote, so a
  replay from the Redis history yields the same payload) and awaits
  :meth:`Publisher.publish`: the event is acked by JetStream or committed to the outbox at
  ``<state_dir>/outbox.sqlite`` BEFORE the agent acks the task.  A crash in between re-delivers
  the task; the re-apply returns the same seq, hence the same ``event_id``, which JetStream and
  the bridge de-duplicate.  WHICH versions are published is decided by the fencing guard, not
  by this node's flags alone: the guard records per workflow where its publishing began and
  tells every node to keep publishing that workflow's later events (``AppliedUpdate.
  publish_versions``; see "Publish marker" in :mod:`cbctl.core.backends.redis.lanes`), so nodes that apply a
  flag change at different times cannot tear a hole in a workflow's stream.  This node tells
  the guard what it would publish (``eventbus.publish``/``eventbus.schema_versions``) as soon as
  it applies the flags.  A workflow that has not begun publishing publishes nothing (the local
  stream still gets the update).
* **Start**: one NATS connection for the publisher, one for the bridge (nats-py reconnects
  both).  Unreachable NATS at start does not stop the agent: it starts degraded, events go to
  the outbox, and background tasks keep trying.  Refused credentials are a clear
  ``AuthFailed`` (exit 4) from ``agent.start()``: retrying would only hammer the server, and
  ``cbctl agent run`` exits instead of looping.  Credentials refused *later* (rotated while
  running) are retried with capped exponential backoff, never a tight loop.
* **Bridge** (flags ``eventbus.bridge``, ``consumers.schema_version``, ``canary.subscribers``):
  a :class:`~cbctl.core.agent.bus.bridge.Bridge` with this node's durable consumer, created as soon
  as a connection exists and re-created if the connection is closed for good.  Its gap filler
  reads missing events from the workflow's Redis history (the authoritative record), so a late
  event is released in order instead of skipped (:meth:`AgentBus.fill_gap`).
* **Local stream**: every update this node applied is also fanned out in-process, for
  ``stream.source = local``, in seq order per workflow even though the lane worker and the
  signal router publish concurrently (:class:`LocalStream`).
* **Memory** is bounded by the options (bridge: ``bridge_options``; local stream:
  ``max_queue``/``local_max_workflows``), never by uptime.
* **Bridge connection task**: if it dies of an unexpected error its connection is closed, the
  error is logged and the task is restarted with capped backoff (never while closing).

SSE endpoints (on the agent's HTTP server)
------------------------------------------
``GET /v1/workflows/{id}/events?subscriber=NAME&after=SEQ`` and ``GET /v1/events?subscriber=NAME``
(every workflow).  ``text/event-stream``; one message per update::

    id: <seq>
    event: <type>
    data: <the canonical event, JSON, in the pinned consumers.schema_version>

``after`` (or the ``Last-Event-ID`` header; single-workflow streams only) replays what came
after that seq first, then continues live with no gap and no repeat.  A comment line
(``: keepalive``) goes out every ``keepalive`` seconds of silence.

Source, decided when the request arrives (flag ``stream.source``):

* ``canonical``: the bridge.  Every update of the workflow, made on any node, in seq order.
  Refusals are plain HTTP answers with a JSON body ``{"error", "reason", ...}`` before the
  stream starts: ``503`` when the bridge is ``off``; ``403`` when it is ``read-only`` (it
  delivers to nobody) or ``canary`` and the subscriber is not in ``canary.subscribers``.
  Chosen over an open-but-silent stream so a misconfigured subscriber learns why at once.
* ``local``: only the updates this node applies; ``after`` replays from the workflow's Redis
  history (which holds every node's updates), read page by page (``replay_page`` entries per
  Redis request, written out as they come: a long history is never loaded at once), and then
  continues with this node's live ones.

When a flag change makes an open stream's answer different (the source switched, or the
subscriber is no longer eligible) the stream ends with ``event: end`` and a JSON ``reason``; a
client reconnects with ``after`` = the last seq it got and gets the new answer.  A subscriber
that falls too far behind also gets ``event: end`` (reason ``lagged``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cbctl.core.agent.bus.bridge import BRIDGE_MODES, Bridge, GapFill, SubscriberLagged, Subscription
from cbctl.core.backends.nats.connect import close_nats, connect_nats
from cbctl.core.agent.bus.outbox import DEFAULT_MAX_DEPTH, Outbox, OutboxCorrupt
from cbctl.core.agent.bus.publisher import Publisher
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, CbctlError, ConfigError
from cbctl.core.model.events import BadEvent, Event, deterministic_event_id, encode_event, make_event

if TYPE_CHECKING:
    from nats.aio.client import Client

    from cbctl.core.model.config import Context
    from cbctl.core.backends.redis.guard import LaneGuard

    from cbctl.core.agent.hooks import AppliedUpdate
    from cbctl.core.agent.node import NodeAgent

log = logging.getLogger(__name__)

__all__ = ["AgentBus", "LocalStream", "attach_bus", "fill_from_record", "outbox_max", "sse_message"]

SOURCES = ("local", "canonical")


def sse_message(ev: Event, schema_version: int) -> bytes:
    """One SSE message for ``ev``: ``id: seq``, ``event: type``, ``data: canonical JSON``.

    The JSON never contains a raw newline (the encoder escapes them), so one ``data:`` line holds
    it; the type is a single line by construction of the id rules but is sanitised anyway.
    """
    etype = ev.type.replace("\r", " ").replace("\n", " ")
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (ev.seq, etype.encode(), encode_event(ev, schema_version))


def _end_message(reason: str, **extra: Any) -> bytes:
    return b"event: end\ndata: " + json.dumps({"reason": reason, **extra}).encode() + b"\n\n"


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
class _LocalWorkflow:
    """Ordering state of one workflow in :class:`LocalStream`."""

    last: int | None = None  # highest seq released to subscribers
    inflight: dict[int, int] = field(default_factory=dict)  # seq -> hooks still publishing it
    held: dict[int, Event] = field(default_factory=dict)  # published, waiting for a lower in-flight seq
    skipped: set[int] | None = None  # in-flight seqs given up on (a late copy is a violation); made when needed
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class LocalStreamStats:
    """Counters for tests and ``GET /v1/bus``."""

    released: int = 0
    duplicates: int = 0
    held: int = 0
    ordering_violations: int = 0


class LocalStream:
    """In-process fan-out of the updates this node applied (``stream.source = local``).

    Per workflow, seqs offered are strictly increasing and each is offered once (a re-applied
    update, e.g. a re-delivered task, has the same seq and is not offered twice).

    Several writers apply updates of one workflow concurrently (the lane worker and the signal
    router), and each awaits its publish before offering here, so seq N+1 can finish first.
    Each writer therefore calls :meth:`reserve` with its seq as soon as the guard has assigned it
    and before any await; :meth:`publish` holds an event back while a lower seq of the same workflow
    is still reserved, and releases held events in seq order once it is not.  Seqs that are
    never reserved here (applied on another node while it owned the lane) are legitimate gaps
    and delay nothing.  Every reservation is settled: the agent's hook publishes or abandons it
    in a ``finally`` (also when cancelled), so a late one is waited for, however late (a busy
    machine makes publishes slow, not lost).  Only two bounds end a wait early: more than
    ``max_held`` events waiting behind it (memory), or ``gap_timeout`` seconds when one is given
    (``None``, the default: no time limit).  Then the held events go out and
    ``ordering_violations`` is counted; should that seq still arrive, it is dropped (subscribers
    were promised increasing seqs) and not counted again.  At most ``max_workflows`` idle
    workflows' ordering state is kept (least recently active forgotten first).
    """

    def __init__(self, max_queue: int = 10_000, max_workflows: int = 10_000, *, gap_timeout: float | None = None,
                 max_held: int = 10_000) -> None:
        self.max_queue = max_queue
        self.max_workflows = max_workflows
        self.gap_timeout = gap_timeout
        self.max_held = max_held
        self.stats = LocalStreamStats()
        self._wf: OrderedDict[str, _LocalWorkflow] = OrderedDict()
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
        wf = self._wf.get(workflow_id)
        if wf is None:
            wf = self._wf[workflow_id] = _LocalWorkflow()
            self._evict()
        else:
            self._wf.move_to_end(workflow_id)
        return wf

    def _evict(self) -> None:
        # Forget the least recently active workflows, never one with work in progress.
        excess = len(self._wf) - self.max_workflows
        for workflow_id in list(itertools.islice(self._wf, max(0, excess) * 2)):  # oldest first, O(excess)
            if excess <= 0:
                break
            wf = self._wf[workflow_id]
            if not wf.inflight and not wf.held:
                del self._wf[workflow_id]
                excess -= 1

    def reserve(self, workflow_id: str, seq: int) -> None:
        """Announce that ``seq`` (just assigned by the guard) is being published; higher seqs of
        the workflow wait for it.  Pair with :meth:`publish` or :meth:`abandon`."""
        wf = self._state(workflow_id)
        if wf.last is not None and seq <= wf.last:
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
        if (wf.last is not None and ev.seq <= wf.last) or ev.seq in wf.held:
            if wf.skipped is not None and ev.seq in wf.skipped:
                wf.skipped.discard(ev.seq)
                log.warning("local stream: workflow %s seq %d published after seq %d was released; dropped",
                            ev.workflow_id, ev.seq, wf.last)
            else:
                self.stats.duplicates += 1
            return
        wf.held[ev.seq] = ev
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
        while wf.held:
            nxt = min(wf.held)
            if any(r < nxt for r in wf.inflight):
                break
            self._release(wf, wf.held.pop(nxt))
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
        if wf.skipped is None:
            wf.skipped = set()
        for r in stuck:
            del wf.inflight[r]
            wf.skipped.add(r)
        while len(wf.skipped) > 1000:  # bounded: only recent give-ups can still turn up
            wf.skipped.discard(min(wf.skipped))
        self._violation()
        log.warning("local stream: workflow %s: seq(s) %s still not published; releasing %d held",
                    workflow_id, ", ".join(map(str, stuck[:10])), len(wf.held))
        self._release_ready(workflow_id, wf)

    def _violation(self) -> None:
        # Not the bridge's Prometheus counter (a different stream); logged and in GET /v1/bus.
        self.stats.ordering_violations += 1

    def _release(self, wf: _LocalWorkflow, ev: Event) -> None:
        wf.last = ev.seq
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


class _Stream:
    """One open SSE response; ``interrupt()`` ends its current subscription so it re-evaluates."""

    def __init__(self) -> None:
        self.sub: Subscription | LocalSubscription | None = None
        self.interrupted = asyncio.Event()

    def interrupt(self) -> None:
        self.interrupted.set()
        if self.sub is not None:
            self.sub.close()


class AgentBus:
    """The event bus of one :class:`~cbctl.core.agent.node.NodeAgent` (module doc).

    ``outbox_path`` defaults to ``<agent.state_dir>/outbox.sqlite``; its size limit is
    ``[agent] outbox-max`` (:func:`outbox_max`; ``ConfigError`` here if invalid).  ``publisher_options`` /
    ``bridge_options`` are passed to :class:`Publisher` / :class:`Bridge`.  ``keepalive``:
    seconds of silence before an SSE comment line.  ``connect``: how to open a NATS connection
    (default :func:`connect_nats` with the context's ``nats`` settings).  ``close_timeout``: the
    bound of :meth:`close` (the agent's stop gives each stop hook a share of its own budget,
    about 2 s by default: this stays below it); ``bridge_close_timeout``: the bound of closing a
    bridge whose connection was lost while running.
    """

    def __init__(
        self,
        agent: NodeAgent,
        *,
        outbox_path: str | Path | None = None,
        publisher_options: Mapping[str, Any] | None = None,
        bridge_options: Mapping[str, Any] | None = None,
        keepalive: float = 15.0,
        reconnect_time_wait: float = 0.5,
        max_queue: int = 10_000,
        local_max_workflows: int = 10_000,
        replay_page: int = 256,
        close_timeout: float = 1.5,
        bridge_close_timeout: float = 2.0,
    ) -> None:
        self.agent = agent
        self.node_id = agent.node_id
        self.metrics = agent.metrics
        self.nats_cfg = agent.ctx.nats
        self.outbox_path = Path(outbox_path) if outbox_path is not None else agent.state_dir / "outbox.sqlite"
        self.outbox_max = outbox_max(agent.ctx)  # checked now: a bad setting refuses before anything starts
        self.publisher_options = dict(publisher_options or {})
        self.bridge_options = dict(bridge_options or {})
        self.keepalive = keepalive
        self.reconnect_time_wait = reconnect_time_wait
        self.local = LocalStream(max_queue=max_queue, max_workflows=local_max_workflows)
        self.replay_page = replay_page
        self.close_timeout = close_timeout
        self.bridge_close_timeout = bridge_close_timeout
        self.outbox: Outbox | None = None
        self.outbox_recovered: OutboxCorrupt | None = None
        self.publisher: Publisher | None = None
        self.bridge: Bridge | None = None
        self._bridge_nc: Client | None = None
        self._bridge_ready = asyncio.Event()
        self._bridge_task: asyncio.Task[None] | None = None
        self._bridge_failures = 0  # consecutive deaths of the connection task (restart backoff)
        self._flags_ready = asyncio.Event()
        self._publish_mode = "off"
        self._schema_versions: tuple[int, ...] = (1,)
        self._bridge_mode = "off"
        self._consumer_version = 1
        self._canary: frozenset[str] = frozenset()
        self._source = "local"
        self._streams: set[_Stream] = set()
        self._closing = False
        self._close_deadline: float | None = None  # loop time by which close() must be done
        self.closed_in: float | None = None  # seconds the last close() took (logs and tests)
        self._http_down = False  # the HTTP server is shutting down: end streams, accept none
        self._started = False

    # ------------------------------------------------------------------ wiring

    def attach(self) -> AgentBus:
        """Hook into the agent (before ``agent.start()``): lifecycle, flags, applied updates, routes."""
        self.agent.add_lifecycle_hooks(start=self.start, stop=self.close)
        self.agent.add_flags_listener(self._on_flags)
        self.agent.on_applied(self._on_applied)
        try:
            app = self.agent.http_app
        except RuntimeError:  # an agent without an HTTP server: no SSE endpoints
            app = None
        if app is not None:
            self.agent.add_routes([
                web.get("/v1/workflows/{workflow_id}/events", self._sse_workflow),
                web.get("/v1/events", self._sse_all),
                web.get("/v1/bus", self._status),
            ])
            app.on_shutdown.append(self._on_http_shutdown)
        return self

    @property
    def source(self) -> str:
        """The applied ``stream.source``."""
        return self._source

    @property
    def degraded(self) -> bool:
        return self.publisher is not None and self.publisher.degraded

    def status(self) -> dict[str, Any]:
        """A JSON-able summary (also ``GET /v1/bus``)."""
        pub = self.publisher
        br = self.bridge
        return {
            "node_id": self.node_id,
            "publish": self._publish_mode,
            "schema_versions": list(self._schema_versions),
            "bridge": self._bridge_mode,
            "consumers_schema_version": self._consumer_version,
            "source": self._source,
            "connected": pub.connected if pub is not None else False,
            "degraded": self.degraded,
            "outbox_depth": pub.outbox_depth if pub is not None else 0,
            "bridge_running": br is not None,
            "bridge_stats": None if br is None else {
                "received": br.stats.received, "bad": br.stats.bad, "duplicates": br.stats.duplicates,
                "released": br.stats.released, "delivered": br.stats.delivered,
                "ordering_violations": br.stats.ordering_violations,
            },
            "subscribers": len(self._streams),
            "local_stats": {
                "released": self.local.stats.released, "duplicates": self.local.stats.duplicates,
                "held": self.local.stats.held, "ordering_violations": self.local.stats.ordering_violations,
            },
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the outbox, start the publisher and the bridge's connection task.

        Raises ``AuthFailed`` (NATS refused the credentials) or ``ConfigError`` (bad local auth
        settings); an unreachable NATS is not an error (degraded start).  ``OutboxCorrupt`` is
        logged as an error and the recovered rows are kept and drained (never a silent empty
        start); the damaged file stays next to it for inspection.
        """
        if self._started:
            return
        self._started = True
        self.outbox_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.outbox = Outbox(self.outbox_path, max_depth=self.outbox_max)
        except OutboxCorrupt as exc:
            log.error("agent %s: %s", self.node_id, exc)
            self.outbox_recovered = exc
            self.outbox = Outbox(self.outbox_path, max_depth=self.outbox_max)
        opts: dict[str, Any] = {"reconnect_max": 2.0, **self.publisher_options}
        self.publisher = Publisher(
            lambda: connect_nats(self.nats_cfg, name=f"cbctl-agent-{self.node_id}-pub",
                                 reconnect_time_wait=self.reconnect_time_wait),
            self.nats_cfg.stream, self.outbox, self.metrics, self.node_id, cluster=self.agent.ctx.cluster,
            publish_mode=self._publish_mode, schema_versions=self._schema_versions, **opts,
        )
        try:
            await self.publisher.start()
        except (AuthFailed, ConfigError):
            await self._close_outbox()
            self.publisher = None
            raise
        self._start_bridge_task(0.0)
        log.info("agent %s: event bus started (outbox %s, depth %d, %s)", self.node_id, self.outbox_path,
                 self.outbox.depth, "connected" if self.publisher.connected else "NATS unreachable: degraded")

    async def close(self, timeout: float | None = None) -> None:
        """Stop everything the bus started, within ``timeout`` seconds (default ``close_timeout``).

        Idempotent (a second call returns at once); safe if :meth:`start` never ran or failed;
        never raises.  Open SSE streams end first.  Then, concurrently so that each may use the
        whole budget: the bridge (its connection task cancelled, subscriptions ended, the pull
        subscription unsubscribed, its connection closed: :meth:`Bridge.close`,
        :func:`~cbctl.core.backends.nats.connect.close_nats`) and the publisher (what is queued settles
        briefly, then every unacknowledged event is committed to the outbox instead of waiting
        for acks that a frozen server never sends: :meth:`Publisher.close`).  Every network step
        is bounded, so a frozen NATS (SIGSTOP: socket open, no answer) or a frozen Redis (a gap
        fill in flight) cannot hold the agent's stop.  Unpublished events stay in the outbox;
        an event that could not even be buffered in time fails its publish, so its task is not
        acked and is delivered again after the restart.
        """
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        budget = self.close_timeout if timeout is None else max(0.1, timeout)
        deadline = self._close_deadline = loop.time() + budget
        started = loop.time()
        for s in list(self._streams):
            s.interrupt()
        self.local.close_all()

        async def stop_bridge() -> None:
            task, self._bridge_task = self._bridge_task, None
            if task is not None and not task.done():
                task.cancel()  # its finally runs _close_bridge, bounded by our deadline
                done, _ = await asyncio.wait({task}, timeout=max(0.05, deadline - loop.time()))
                if not done:
                    log.warning("agent %s: bus close: the bridge connection task did not end in time", self.node_id)
            await self._close_bridge(max(0.05, deadline - loop.time()))

        async def stop_publisher() -> None:
            if self.publisher is not None:
                await self.publisher.close(max(0.1, deadline - loop.time() - 0.05))

        results = await asyncio.gather(stop_bridge(), stop_publisher(), return_exceptions=True)
        for what, res in zip(("bridge", "publisher"), results, strict=True):
            if isinstance(res, BaseException):
                log.error("agent %s: bus close: stopping the %s failed: %r", self.node_id, what, res)
        if self.publisher is not None and self.publisher.outbox_busy:
            # Closing the SQLite connection under a write still running on the publisher's
            # thread is unsafe; the process exit closes it (the write is a transaction).
            log.error("agent %s: bus close: an outbox write is still running; outbox left open", self.node_id)
            self.outbox = None
        await self._close_outbox()
        self._flags_ready.set()  # release any hook still waiting (it will fail on the closed publisher)
        self.closed_in = loop.time() - started
        log.debug("agent %s: event bus closed in %.2fs (budget %.2fs)", self.node_id, self.closed_in, budget)

    async def _close_outbox(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None

    async def _close_bridge(self, timeout: float | None = None) -> None:
        """Close the bridge and its connection within ``timeout`` (default
        ``bridge_close_timeout``): unsubscribe first (nats-py's close waits on an active pull
        subscription), then close the connection, abandoning it if it does not finish."""
        loop = asyncio.get_running_loop()
        if timeout is not None:
            deadline = loop.time() + timeout
        elif self._close_deadline is not None:  # the bus is closing: its deadline bounds this too
            deadline = self._close_deadline
        else:
            deadline = loop.time() + self.bridge_close_timeout
        bridge, self.bridge = self.bridge, None
        self._bridge_ready.clear()
        nc, self._bridge_nc = self._bridge_nc, None
        for s in list(self._streams):
            if s.sub is not None and isinstance(s.sub, Subscription):
                s.interrupt()
        if bridge is not None:
            await bridge.close(max(0.05, 0.6 * (deadline - loop.time())))
        if nc is not None and not await close_nats(nc, max(0.05, deadline - loop.time())):
            log.warning("agent %s: the bridge's NATS connection did not close in time; its socket was aborted",
                        self.node_id)

    def _start_bridge_task(self, delay: float) -> None:
        """(Re)start the bridge's connection task, after ``delay`` seconds."""
        task = asyncio.create_task(self._bridge_loop(delay), name=f"{self.node_id}:bridge-conn")
        task.add_done_callback(self._bridge_task_done)
        self._bridge_task = task

    def _bridge_task_done(self, task: asyncio.Task[None]) -> None:
        """The connection task ended: unless the bus is closing, log why and restart it with
        backoff, so an unexpected error cannot leave the node without a bridge, silently."""
        if task is not self._bridge_task or task.cancelled():
            return
        exc = task.exception()  # retrieve it in every case: never "exception was never retrieved"
        if self._closing:
            return
        self._bridge_failures += 1
        delay = min(30.0, 0.5 * 2 ** (self._bridge_failures - 1))
        if exc is not None:
            log.error("agent %s: bridge connection task died (%s: %s); restarting in %.1fs", self.node_id,
                      type(exc).__name__, exc, delay, exc_info=(type(exc), exc, exc.__traceback__))
        else:
            log.error("agent %s: bridge connection task ended; restarting in %.1fs", self.node_id, delay)
        self._start_bridge_task(delay)

    async def _bridge_loop(self, initial_delay: float = 0.0) -> None:
        """Keep a connection and a bridge on it; re-create both if the connection closes for good.

        Whatever way an iteration ends (connection closed, an error, cancellation) the bridge and
        its connection are closed before the next one or before the task ends."""
        if initial_delay > 0:
            await asyncio.sleep(initial_delay)
        delay = 0.25
        while not self._closing:
            try:
                nc = await connect_nats(self.nats_cfg, name=f"cbctl-agent-{self.node_id}-bridge",
                                        reconnect_time_wait=self.reconnect_time_wait)
            except (BackendUnavailable, ConfigError) as exc:  # AuthFailed is a BackendUnavailable
                log.warning("agent %s: bridge cannot connect yet: %s (retry in %.1fs)", self.node_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            delay = 0.25
            self._bridge_nc = nc  # owned from here on: _close_bridge closes it on every way out
            try:
                opts: dict[str, Any] = {"fetch_timeout": 0.25, **self.bridge_options}
                opts.setdefault("filler", self.fill_gap)
                bridge = Bridge(nc, self.nats_cfg.stream, self.metrics, self.node_id, cluster=self.agent.ctx.cluster,
                                mode=self._bridge_mode, schema_version=self._consumer_version,
                                canary_subscribers=self._canary, **opts)
                self.bridge = bridge
                await bridge.start()
                self._bridge_ready.set()
                self._bridge_failures = 0
                log.info("agent %s: bridge consuming as %s (mode %s)", self.node_id, bridge.durable,
                         self._bridge_mode)
                while not nc.is_closed:
                    await asyncio.sleep(0.5)
                log.warning("agent %s: bridge connection closed; reconnecting", self.node_id)
            finally:
                await self._close_bridge()

    # ------------------------------------------------------------------ agent hooks

    async def _on_flags(self, flags: Mapping[str, Any], revision: int) -> None:
        publish = str(flags.get("eventbus.publish", "off"))
        versions = tuple(flags.get("eventbus.schema_versions") or (1,))
        bridge_mode = str(flags.get("eventbus.bridge", "off"))
        consumer_version = flags.get("consumers.schema_version", 1)
        canary = frozenset(flags.get("canary.subscribers") or ())
        source = str(flags.get("stream.source", "local"))
        if bridge_mode not in BRIDGE_MODES:
            raise BadInput(f"eventbus.bridge: unknown mode {bridge_mode!r}")
        guard = self.agent.guard
        if guard is not None:
            # First, before any await: from the next guarded write on, workflows this node
            # applies start publishing (or not) per these flags ("Publish marker", lanes.py).
            guard.publish_versions = versions if publish != "off" else ()
        if source not in SOURCES:
            raise BadInput(f"stream.source: unknown source {source!r} (allowed: {', '.join(SOURCES)})")
        if self.publisher is not None:
            self.publisher.apply_flags(publish, versions)
        if self.bridge is not None:
            self.bridge.apply_flags(bridge_mode, consumer_version, canary)
        changed = (bridge_mode, consumer_version, canary, source) != (
            self._bridge_mode, self._consumer_version, self._canary, self._source)
        self._publish_mode, self._schema_versions = publish, versions
        self._bridge_mode, self._consumer_version, self._canary, self._source = (
            bridge_mode, int(consumer_version), canary, source)
        self._flags_ready.set()
        if changed:
            # Open streams re-evaluate: they end (event: end) if their answer changed.
            for s in list(self._streams):
                s.interrupt()

    async def _on_applied(self, u: AppliedUpdate) -> None:
        """Build the canonical event and make it durable before the task's ack (module doc)."""
        # Before any await: the lane worker and the signal router publish for the same workflow
        # concurrently, and a higher seq must not reach local subscribers before this one.
        self.local.reserve(u.workflow_id, u.seq)
        offered = False
        try:
            if not self._flags_ready.is_set():
                # A lane worker can apply a task before the agent has handed us the flags: do not
                # publish under the default "off" (the event would be lost), wait for them.
                await self._flags_ready.wait()
            try:
                ev = event_of_update(u)
            except BadEvent as exc:
                # A poison task would otherwise be re-delivered forever; its state change is applied.
                log.error("agent %s: workflow %s seq %d: cannot build its event (%s); not published",
                          self.node_id, u.workflow_id, u.seq, exc)
                self.metrics.publish.labels(status="error").inc()
                return
            if self.publisher is None:
                raise BackendUnavailable("event bus not started", backend="nats")
            # The guard's decision, not this node's flags: a workflow whose publishing began is
            # published by every node, also one that has not applied a flag change yet.
            versions = u.publish_versions
            if versions is None:  # an update from a caller that did not ask the guard
                versions = self._schema_versions if self._publish_mode != "off" else ()
            await self.publisher.publish(ev, versions)  # PublishFailed propagates: the task is not acked
            self.local.publish(ev)
            offered = True
        finally:
            if not offered:  # failed or cancelled: do not make later seqs wait for this one
                self.local.abandon(u.workflow_id, u.seq)

    # ------------------------------------------------------------------ SSE

    async def _on_http_shutdown(self, app: web.Application) -> None:
        self._http_down = True
        for s in list(self._streams):
            s.interrupt()

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _sse_workflow(self, request: web.Request) -> web.StreamResponse:
        return await self._sse(request, request.match_info["workflow_id"])

    async def _sse_all(self, request: web.Request) -> web.StreamResponse:
        return await self._sse(request, None)

    def _refusal(self, name: str) -> tuple[int, str] | None:
        """Why a canonical subscriber gets nothing under the current flags (None: it gets events)."""
        mode = self._bridge_mode
        if mode == "off":
            return 503, "eventbus.bridge is off: no canonical stream on this node"
        if mode == "read-only":
            return 403, "eventbus.bridge is read-only: events are verified but delivered to nobody"
        if mode == "canary" and name not in self._canary:
            return 403, f"eventbus.bridge is canary and subscriber {name!r} is not in canary.subscribers"
        return None

    async def _sse(self, request: web.Request, workflow_id: str | None) -> web.StreamResponse:
        name = request.query.get("subscriber", "").strip()
        if not name:
            return _json_error(400, "missing ?subscriber=NAME (the name canary.subscribers lists)")
        after: int | None = None
        raw_after = request.query.get("after") or request.headers.get("Last-Event-ID")
        if raw_after:
            try:
                after = int(raw_after)
            except ValueError:
                return _json_error(400, f"after={raw_after!r}: must be an integer seq")
            if after < 0:
                return _json_error(400, f"after={after}: must be >= 0")
            if workflow_id is None:
                return _json_error(400, "after needs a workflow: seqs are per workflow")
        if self._closing or self._http_down:
            return _json_error(503, "the agent is stopping")
        source = self._source
        if source == "canonical":
            refused = self._refusal(name)
            if refused is not None:
                return _json_error(refused[0], refused[1], source=source, bridge=self._bridge_mode)
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            "X-Cbctl-Source": source, "X-Cbctl-Node": self.node_id,
        })
        await resp.prepare(request)
        await resp.write(f": cbctl node={self.node_id} source={source} subscriber={name}\n\n".encode())
        stream = _Stream()
        self._streams.add(stream)
        try:
            if source == "canonical":
                await self._pump_canonical(resp, stream, workflow_id, name, after)
            else:
                await self._pump_local(resp, stream, workflow_id, after)
        except ConnectionResetError:
            pass  # the subscriber went away mid-write; a disconnect while waiting cancels the
            # handler instead, and that CancelledError must propagate (the finally cleans up)
        finally:
            self._streams.discard(stream)
            if stream.sub is not None:
                stream.sub.close()
        return resp

    async def _end_reason(self, source: str, name: str) -> str | None:
        """After an interruption: why the stream must end, or None to go on."""
        if self._closing or self._http_down:
            return "the agent is stopping"
        if self._source != source:
            return f"stream.source changed to {self._source}; reconnect"
        if source == "canonical":
            refused = self._refusal(name)
            if refused is not None:
                return refused[1]
        return None

    async def _pump_canonical(self, resp: web.StreamResponse, stream: _Stream, workflow_id: str | None,
                              name: str, after: int | None) -> None:
        last = after
        while True:
            stream.interrupted.clear()
            if self.bridge is None:
                # NATS not reachable yet: wait for the bridge, keeping the connection alive.
                wait = asyncio.ensure_future(self._bridge_ready.wait())
                intr = asyncio.ensure_future(stream.interrupted.wait())
                try:
                    done, _ = await asyncio.wait({wait, intr}, timeout=self.keepalive,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wait.cancel()
                    intr.cancel()
                if not done:
                    await resp.write(b": waiting for the event bus\n\n")
                reason = await self._end_reason("canonical", name)
                if reason is not None:
                    await resp.write(_end_message(reason))
                    return
                continue
            bridge = self.bridge
            sub = bridge.subscribe(workflow_id, name, after_seq=last if workflow_id is not None else None)
            stream.sub = sub
            try:
                while True:
                    try:
                        ev = await sub.next(self.keepalive)
                    except TimeoutError:
                        await resp.write(b": keepalive\n\n")
                        continue
                    await resp.write(sse_message(ev, bridge.schema_version))
                    if workflow_id is not None:
                        last = ev.seq
            except StopAsyncIteration:
                pass
            except SubscriberLagged:
                await resp.write(_end_message("lagged", last_seq=last))
                return
            except BackendUnavailable as exc:
                # The after= replay could not be read back from the stream (NATS trouble): end
                # with a reason rather than continue live past a hole; the client resumes with after.
                await resp.write(_end_message(f"{exc}; reconnect", last_seq=last))
                return
            finally:
                sub.close()
                stream.sub = None
            reason = await self._end_reason("canonical", name)
            if reason is not None:
                await resp.write(_end_message(reason, last_seq=last))
                return

    async def _pump_local(self, resp: web.StreamResponse, stream: _Stream, workflow_id: str | None,
                          after: int | None) -> None:
        sub = self.local.subscribe(workflow_id)  # first, so nothing falls between replay and live
        stream.sub = sub
        version = self._consumer_version
        last = after
        if workflow_id is not None and after is not None:
            async for ev in self._history_events(workflow_id, after):
                if isinstance(ev, bytes):
                    await resp.write(ev)  # a comment (trimmed history)
                    continue
                await resp.write(sse_message(ev, version))
                last = ev.seq
        try:
            while True:
                try:
                    ev = await sub.next(self.keepalive)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if workflow_id is not None and last is not None and ev.seq <= last:
                    continue  # already sent by the replay
                await resp.write(sse_message(ev, self._consumer_version))
                if workflow_id is not None:
                    last = ev.seq
        except StopAsyncIteration:
            reason = await self._end_reason("local", "") or "interrupted; reconnect"
            await resp.write(_end_message(reason, last_seq=last))
        except SubscriberLagged:
            await resp.write(_end_message("lagged", last_seq=last))

    async def _history_events(self, workflow_id: str, after: int) -> AsyncIterator[Event | bytes]:
        """The workflow's updates with seq > ``after`` from its Redis history (every node's), one
        page (``replay_page`` entries) per request; a gap left by ``history-max`` trimming is
        announced with an SSE comment (bytes).  Stops quietly if Redis fails mid-way."""
        guard = self.agent.guard
        if guard is None:
            return
        cursor = "-"
        first = True
        while True:
            try:
                entries = await guard.history(workflow_id, after=cursor, count=self.replay_page)
            except (BackendUnavailable, ValueError) as exc:
                log.warning("agent %s: history of %s unavailable for a replay: %s", self.node_id, workflow_id, exc)
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
                ev = _event_of_entry(workflow_id, e)
                if ev is not None:
                    yield ev
            if len(entries) < self.replay_page:
                return
            cursor = entries[-1]["id"]

    async def fill_gap(self, workflow_id: str, version: int, lo: int, hi: int) -> GapFill:
        """The bridge's gap filler (:func:`fill_from_record` on this agent's guard).  Raises
        ``BackendUnavailable`` (Redis unreachable, or the agent has no guard yet); the bridge retries."""
        guard = self.agent.guard
        if guard is None:
            raise BackendUnavailable("no Redis client yet", backend="redis")
        return await fill_from_record(guard, workflow_id, version, lo, hi)


async def fill_from_record(guard: LaneGuard, workflow_id: str, version: int, lo: int, hi: int) -> GapFill:
    """``workflow_id``'s events ``lo..hi`` from its Redis history (the authoritative record), with
    the seq its publishing began at in each schema version (``GapFill.begins``).

    Every recorded event at or after the EARLIEST marker is returned, not only those published in
    ``version``: after ``consumers.schema_version`` moves (say 1 -> 2 right after a v1+v2 window
    opened) a bridge that was delivering a workflow in v1 goes on delivering it, and the seqs
    between where it had got to and where v2 publishing began for that workflow exist only in
    v1.  The bridge decides which of them are its to deliver (``Bridge._apply_fill``).
    ``BackendUnavailable`` when Redis cannot be read."""
    rec = await guard.record(workflow_id, lo, hi)
    begins = dict(rec.publish_from)
    events: dict[int, Event] = {}
    applied_at: dict[int, float] = {}
    if begins:
        floor = min(begins.values())
        for e in rec.entries:
            if e["seq"] < floor:
                continue  # never published in any version
            ev = _event_of_entry(workflow_id, e)
            if ev is not None:
                events[ev.seq] = ev
                applied_at[ev.seq] = e["at"] / 1000
    return GapFill(begin=begins.get(version), events=events, applied_at=applied_at, oldest=rec.oldest, begins=begins)


def outbox_max(ctx: Context) -> int:
    """``[contexts.X.agent] outbox-max``: the outbox depth (events) at which the agent applies
    backpressure (:class:`~cbctl.core.agent.bus.outbox.Outbox` ``max_depth``); default
    :data:`~cbctl.core.agent.bus.outbox.DEFAULT_MAX_DEPTH`.  ``ConfigError`` unless a positive integer."""
    raw = (ctx.extra.get("agent") or {}).get("outbox-max", DEFAULT_MAX_DEPTH)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigError(f"contexts.{ctx.name}.agent.outbox-max: must be a positive integer (events), got {raw!r}")
    return raw


def _event_of_entry(workflow_id: str, e: Mapping[str, Any]) -> Event | None:
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


def _json_error(status: int, reason: str, **extra: Any) -> web.Response:
    error = {400: "bad request", 403: "not allowed", 503: "unavailable"}.get(status, "error")
    return web.json_response({"error": error, "reason": reason, **extra}, status=status)


def attach_bus(agent: NodeAgent, **options: Any) -> AgentBus:
    """Create an :class:`AgentBus` for ``agent`` and hook it in (before ``agent.start()``)."""
    return AgentBus(agent, **options).attach()

