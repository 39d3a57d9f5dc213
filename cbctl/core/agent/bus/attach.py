"""The event bus inside a node agent: :class:`AgentBus` wires the publisher and its outbox, the
bridge, the local stream and the SSE endpoints into a :class:`~cbctl.core.agent.node.NodeAgent`.

Attach before the agent starts (``attach_bus(agent)``; ``agent.start()`` then starts the bus first
and stops it in every teardown).  Contract: an applied update's event is acked by JetStream or
committed to the outbox before the agent acks its task (``PublishFailed`` otherwise); which
versions are published is the guard's decision (the publish marker, docs/backends.md and
cbctl/core/backends/redis/guard.py); unreachable NATS at start is a degraded start, refused
credentials are ``AuthFailed``; :meth:`AgentBus.close` is bounded and never raises.
docs/event-bus.md has the design.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbctl.core.agent.bus.bridge import Bridge
from cbctl.core.agent.bus.gap_fill import GapFill, event_of_update, fill_from_record
from cbctl.core.agent.bus.local_stream import LocalStream
from cbctl.core.agent.bus.outbox import DEFAULT_MAX_DEPTH, Outbox, OutboxCorrupt
from cbctl.core.agent.bus.publisher import Publisher
from cbctl.core.agent.bus.sse_server import SseServer
from cbctl.core.backends.nats.connect import close_nats, connect_nats
from cbctl.core.backends.retry import Backoff, BackoffPolicy
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, ConfigError
from cbctl.core.model.events import BadEvent
from cbctl.core.model.flags import (
    BRIDGE_OFF,
    BRIDGE_VALUES,
    CANARY_SUBSCRIBERS,
    CONSUMER_SCHEMA_VERSION,
    EVENTBUS_BRIDGE,
    EVENTBUS_PUBLISH,
    PUBLISH_OFF,
    SCHEMA_VERSIONS,
    SOURCE_LOCAL,
    SOURCE_VALUES,
    STREAM_SOURCE,
)
from cbctl.core.model.metric_names import PUBLISH_STATUS_ERROR


if TYPE_CHECKING:
    from nats.aio.client import Client

    from cbctl.core.agent.hooks import AppliedUpdate
    from cbctl.core.agent.node import NodeAgent
    from cbctl.core.backends.redis.guard import LaneGuard
    from cbctl.core.model.config import Context

log = logging.getLogger(__name__)

__all__ = ["AgentBus", "attach_bus", "outbox_max"]


class AgentBus:
    """The event bus of one :class:`~cbctl.core.agent.node.NodeAgent` (module doc).

    ``outbox_path`` defaults to ``<agent.state_dir>/outbox.sqlite``; its size limit is
    ``[agent] outbox-max`` (:func:`outbox_max`; ``ConfigError`` here if invalid).  ``publisher_options`` /
    ``bridge_options`` are passed to :class:`Publisher` / :class:`Bridge`.  ``keepalive``: seconds
    of silence before an SSE comment line; ``replay_page``: Redis history entries per request in a
    ``local`` SSE replay; ``max_queue`` / ``local_max_workflows``: the local stream's bounds.  NATS
    connections are opened with :func:`connect_nats` and the context's ``nats`` settings.
    ``close_timeout``: the bound of :meth:`close` (the agent's stop gives each stop hook a share of its own budget,
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
        self.sse = SseServer(self, keepalive=keepalive, replay_page=replay_page)
        self.close_timeout = close_timeout
        self.bridge_close_timeout = bridge_close_timeout
        self.outbox: Outbox | None = None
        self.outbox_recovered: OutboxCorrupt | None = None
        self.publisher: Publisher | None = None
        self.bridge: Bridge | None = None
        self._bridge_nc: Client | None = None
        self._bridge_ready = asyncio.Event()
        self._bridge_task: asyncio.Task[None] | None = None
        # Restarts of the connection task after it died: 0.5 s doubling to 30 s; reset once a
        # bridge runs.
        self._bridge_restart = Backoff(BackoffPolicy(0.5, 30.0))
        self._flags_ready = asyncio.Event()
        self._publish_mode: str = PUBLISH_OFF
        self._schema_versions: tuple[int, ...] = (1,)
        self._bridge_mode: str = BRIDGE_OFF
        self._consumer_version = 1
        self._canary: frozenset[str] = frozenset()
        self._source: str = SOURCE_LOCAL
        self._closing = False
        self._close_deadline: float | None = None  # loop time by which close() must be done
        self.closed_in: float | None = None  # seconds the last close() took (logs and tests)
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
            self.agent.add_routes(self.sse.routes())
            app.on_shutdown.append(self.sse.on_http_shutdown)
        return self

    @property
    def source(self) -> str:
        """The applied ``stream.source``."""
        return self._source

    @property
    def bridge_mode(self) -> str:
        """The applied ``eventbus.bridge``."""
        return self._bridge_mode

    @property
    def canary(self) -> frozenset[str]:
        """The applied ``canary.subscribers``."""
        return self._canary

    @property
    def consumer_version(self) -> int:
        """The applied ``consumers.schema_version``."""
        return self._consumer_version

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def guard(self) -> LaneGuard | None:
        """The agent's fencing guard (None until it has a Redis client)."""
        return self.agent.guard

    @property
    def bridge_ready(self) -> asyncio.Event:
        """Set while a bridge is running."""
        return self._bridge_ready

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
            "subscribers": self.sse.open_streams,
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
        self.sse.interrupt_all()
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
        self.sse.interrupt_canonical()
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
        delay = self._bridge_restart.next_delay()
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
        backoff = Backoff(BackoffPolicy(0.25, 5.0))  # connect attempts: 0.25 s doubling to 5 s
        while not self._closing:
            try:
                nc = await connect_nats(self.nats_cfg, name=f"cbctl-agent-{self.node_id}-bridge",
                                        reconnect_time_wait=self.reconnect_time_wait)
            except (BackendUnavailable, ConfigError) as exc:  # AuthFailed is a BackendUnavailable
                delay = backoff.next_delay()
                log.warning("agent %s: bridge cannot connect yet: %s (retry in %.1fs)", self.node_id, exc, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
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
                self._bridge_restart.reset()
                log.info("agent %s: bridge consuming as %s (mode %s)", self.node_id, bridge.durable,
                         self._bridge_mode)
                while not nc.is_closed:
                    await asyncio.sleep(0.5)
                log.warning("agent %s: bridge connection closed; reconnecting", self.node_id)
            finally:
                await self._close_bridge()

    # ------------------------------------------------------------------ agent hooks

    async def _on_flags(self, flags: Mapping[str, Any], revision: int) -> None:
        publish = str(flags.get(EVENTBUS_PUBLISH, PUBLISH_OFF))
        versions = tuple(flags.get(SCHEMA_VERSIONS) or (1,))
        bridge_mode = str(flags.get(EVENTBUS_BRIDGE, BRIDGE_OFF))
        consumer_version = flags.get(CONSUMER_SCHEMA_VERSION, 1)
        canary = frozenset(flags.get(CANARY_SUBSCRIBERS) or ())
        source = str(flags.get(STREAM_SOURCE, SOURCE_LOCAL))
        if bridge_mode not in BRIDGE_VALUES:
            raise BadInput(f"{EVENTBUS_BRIDGE}: unknown mode {bridge_mode!r}")
        guard = self.agent.guard
        if guard is not None:
            # First, before any await: from the next guarded write on, workflows this node
            # applies start publishing (or not) per these flags ("Publish marker" in
            # docs/backends.md; cbctl/core/backends/redis/guard.py).
            guard.publish_versions = versions if publish != PUBLISH_OFF else ()
        if source not in SOURCE_VALUES:
            raise BadInput(f"{STREAM_SOURCE}: unknown source {source!r} (allowed: {', '.join(SOURCE_VALUES)})")
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
            self.sse.interrupt_all()

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
                self.metrics.publish.labels(status=PUBLISH_STATUS_ERROR).inc()
                return
            if self.publisher is None:
                raise BackendUnavailable("event bus not started", backend="nats")
            # The guard's decision, not this node's flags: a workflow whose publishing began is
            # published by every node, also one that has not applied a flag change yet.
            versions = u.publish_versions
            if versions is None:  # an update from a caller that did not ask the guard
                versions = self._schema_versions if self._publish_mode != PUBLISH_OFF else ()
            await self.publisher.publish(ev, versions)  # PublishFailed propagates: the task is not acked
            self.local.publish(ev)
            offered = True
        finally:
            if not offered:  # failed or cancelled: do not make later seqs wait for this one
                self.local.abandon(u.workflow_id, u.seq)

    async def fill_gap(self, workflow_id: str, version: int, lo: int, hi: int) -> GapFill:
        """The bridge's gap filler (:func:`fill_from_record` on this agent's guard).  Raises
        ``BackendUnavailable`` (Redis unreachable, or the agent has no guard yet); the bridge retries."""
        guard = self.agent.guard
        if guard is None:
            raise BackendUnavailable("no Redis client yet", backend="redis")
        return await fill_from_record(guard, workflow_id, version, lo, hi)


def outbox_max(ctx: Context) -> int:
    """``[contexts.X.agent] outbox-max``: the outbox depth (events) at which the agent applies
    backpressure (:class:`~cbctl.core.agent.bus.outbox.Outbox` ``max_depth``); default
    :data:`~cbctl.core.agent.bus.outbox.DEFAULT_MAX_DEPTH`.  ``ConfigError`` unless a positive integer."""
    raw = (ctx.extra.get("agent") or {}).get("outbox-max", DEFAULT_MAX_DEPTH)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigError(f"contexts.{ctx.name}.agent.outbox-max: must be a positive integer (events), got {raw!r}")
    return raw


def attach_bus(agent: NodeAgent, **options: Any) -> AgentBus:
    """Create an :class:`AgentBus` for ``agent`` and hook it in (before ``agent.start()``)."""
    return AgentBus(agent, **options).attach()

