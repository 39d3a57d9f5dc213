"""NodeAgent: what a workflow service runs on every node (and what `cbctl agent run` runs).

One agent, one asyncio event loop task tree:

* **registration** (:mod:`cbctl.core.agent.registration`): a leased record per node, created with
  create-if-absent.  Refuse first: the node id is checked and the record created before anything
  else starts (no event bus, no HTTP server, no machine-id file, no identity binding); a node id
  held by another live instance makes :meth:`NodeAgent.start` raise
  :class:`~cbctl.core.agent.registration.NodeIdConflict` with nothing started and the holder's records
  untouched (the refusal is reported on a lease of its own that expires).
* **live flags**: the rollout document is watched; each revision is applied without restart and
  the applied revision is written into the record (``applied_revision``), which is what
  ``cbctl stage advance --wait`` waits for.  A revision is applied all or nothing: the flags
  listeners see it first and may refuse it; a refused revision is rolled back everywhere, logged
  once, reported by ``/readyz`` and not retried until a newer revision arrives.  A deleted
  rollout document means stage 0 (everything off), also when the delete is found on a resync.
* **stop** (:meth:`NodeAgent.stop`): exception-safe and bounded by ``stop_timeout``: every step
  runs under its own budget, an error or a timeout in one (a frozen NATS in the bus's stop, a
  frozen Redis under a worker) is logged and the next step still runs, so the lease is revoked
  (or the log says that the revoke gave up and the lease expires on its own) and the HTTP server
  and the clients are always closed.  A second ``stop()`` waits for the first one, with the
  same bound.
* **lanes** (with ``cluster.enabled``): the lane inventory is shared among the live agents by
  rendezvous hashing (:mod:`cbctl.core.model.assignment`).  Each owned lane is an owner key on the
  node's lease (:mod:`cbctl.core.agent.ownership`) whose create_revision is the fencing token; the
  token is pushed to Redis at once (``LaneGuard.raise_fence``).  Lanes no longer assigned are
  released; lanes held by others are taken when their keys disappear.
* **lease loss** (keep-alive failure, TTL 0, partition — declared by
  :class:`~cbctl.core.backends.coord.base.LeaseKeeper` *before* the store can expire the lease) stops the
  work on every lane at once (worker tasks cancelled, and a per-lane "still owner" flag checked
  before each guarded write), counts ``cluster_lease_lost_total``, then the agent registers again
  with a **new** lease when the store answers — it never resumes with the old one.
* **lane workers**: per owned lane, read tasks (XREADGROUP; at takeover first XAUTOCLAIM what the
  previous owner left pending), run the handler, write state and ack through the fencing guard
  with the lane's token in the mode of ``ownership.guard``.  A denied write
  (``StaleFencingToken``) stops that worker: we are not the owner any more.
* **cluster.enabled = false**: no lane keys or ownership, but tasks are still processed: every
  agent consumes every lane as a competing consumer of the Redis group, guard off, token 0.
* **HTTP** (:mod:`cbctl.core.agent.http`): ``/metrics``, ``/healthz``, ``/readyz``.

Hooks for the other subsystems (event bus, bridge, preflight probes):

* ``agent.on_applied(hook)`` — ``async hook(update: AppliedUpdate)`` is awaited after the guard
  has applied a task and assigned its ``seq``, and BEFORE the task is acked: the apply and the
  ack are then two guarded script calls, so an event can be made durable between them.  If the
  hook raises, the task is not acked and is re-delivered (the re-apply is idempotent and returns
  the same seq, with ``already_applied=True``).
* ``agent.add_flags_listener(fn)`` — ``async fn(flags, revision)`` is awaited for every applied
  revision (and the initial one), before ``applied_revision`` is reported.
* ``agent.add_routes(routes)`` / ``agent.http_app`` — extra aiohttp routes (before ``start``).
* ``agent.add_lifecycle_hooks(start=, stop=)`` — ``async start()`` is awaited early in
  :meth:`NodeAgent.start` (before the HTTP server, the store and any lane work; if it raises,
  the start fails); ``async stop()`` in every teardown (also a failed start), after the lane
  workers have stopped and before the HTTP server and the lease go.  Used by the event bus
  (:mod:`cbctl.core.agent.bus.attach`), whose publisher must run before the first task is applied.
* ``agent.extra_record_fields`` / ``await agent.update_record(probes=..., clock=...)`` — fields
  of the registration record owned by other modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cbctl import __version__
from cbctl.core.model import keys
from cbctl.core.model.assignment import lanes_of
from cbctl.core.model.config import Context
from cbctl.core.backends.coord.base import Coordinator, Lease, LeaseKeeper
from cbctl.core.model.errors import BackendUnavailable, BadInput, CbctlError, Conflict, LeaseLost, StaleFencingToken
from cbctl.core.backends.redis.lanes import LaneGuard, LaneQueue, Task
from cbctl.core.model.metrics import AgentMetrics
from cbctl.core.agent.http import AgentHttp
from cbctl.core.agent.ownership import LaneClaim, acquire_lane, release_lane
from cbctl.core.agent.registration import (
    NodeIdConflict,
    check_identity,
    default_state_dir,
    holder_conflict,
    holder_is_dead_local,
    peek_machine_id,
    read_holder,
    record_refusal,
    register,
    save_machine_id,
    validate_node_id,
)
from cbctl.core.model.rollout import RolloutDocument, initial_document
from cbctl.core.agent.workload import lifecycle_handler

if TYPE_CHECKING:
    from aiohttp import web
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

__all__ = ["AppliedUpdate", "NodeAgent", "TaskHandler", "check_lease_settings", "redis_client_for"]

TaskHandler = Callable[[Task], Awaitable[Mapping[str, Any] | None]]
"""``async handler(task) -> update``: the workflow state fields to write for this task, or
``None`` to drop the task (it is acked without a state write).  An exception leaves the task
pending (it is retried after the worker restarts)."""

AppliedHook = Callable[["AppliedUpdate"], Awaitable[None]]
FlagsListener = Callable[[Mapping[str, Any], int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class AppliedUpdate:
    """A task the guard applied (or had applied before: ``already_applied``), before its ack."""

    node_id: str
    lane: str
    token: int
    workflow_id: str
    task_id: str
    type: str
    seq: int
    update: Mapping[str, Any]
    payload: Mapping[str, Any]
    occurred_at: float
    already_applied: bool
    decision: str
    history_id: str | None = None
    publish_versions: tuple[int, ...] | None = None  # the guard's publish decision (lanes.py); None = unknown


def check_lease_settings(lease_ttl: float, keepalive_interval: float) -> None:
    """Refuse lease settings under which a keep-alive hiccup would lose the lease (exit 2).

    The keeper must get at least three refresh attempts inside one TTL: it declares the lease
    lost one interval before the store can expire it, so with fewer the margin is gone.
    """
    if lease_ttl <= 0 or keepalive_interval <= 0:
        raise BadInput(f"lease TTL ({lease_ttl:g} s) and keep-alive interval ({keepalive_interval:g} s) must be positive")
    if keepalive_interval * 3 > lease_ttl:
        raise BadInput(
            f"keep-alive interval {keepalive_interval:g} s is too long for lease TTL {lease_ttl:g} s: "
            f"keep-alive * 3 must be <= TTL (use --keepalive <= {lease_ttl / 3:g} or a longer --lease-ttl)"
        )


@dataclass(eq=False)
class _LaneRun:
    """One lane being worked on. ``active`` is the "still owner" flag checked before writes."""

    lane: str
    token: int
    local: bool
    claim: LaneClaim | None = None
    active: bool = True
    stale: bool = False
    task: asyncio.Task[None] | None = None
    started: float = 0.0


@dataclass(eq=False)
class _Session:
    """One registration: a lease, the record on it, and the tasks that live as long as it."""

    number: int
    lease: Lease
    record_rev: int = 0
    keeper: LeaseKeeper | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    members: dict[str, bool] = field(default_factory=dict)  # node id -> cluster_enabled
    lost: bool = False
    lost_event: asyncio.Event = field(default_factory=asyncio.Event)


class NodeAgent:
    """The node agent. Use as ``await agent.start()`` ... ``await agent.stop()``, or
    ``async with NodeAgent(...) as agent``, or ``await agent.run()`` (until :meth:`request_stop`).

    ``config``: the context (cluster, lanes, endpoints, ``coordination.lease_ttl`` /
    ``keepalive_interval``).  ``handler``: the service's task handler (default: the demo
    lifecycle handler).  ``http_port``: 0 = a free port, ``None`` = no HTTP server.
    ``lease_ttl`` / ``keepalive_interval`` override the config; keep-alive * 3 > TTL raises
    ``BadInput``.  ``state_dir`` holds the machine identity.  ``coordinator`` / ``redis_client``
    may be passed in (then they are not closed by :meth:`stop`).  ``stop_timeout``: the bound
    of :meth:`stop` in seconds (``cbctl agent run`` must exit within 10 s of SIGTERM).
    """

    def __init__(
        self,
        config: Context,
        node_id: str,
        *,
        handler: TaskHandler | None = None,
        http_host: str = "127.0.0.1",
        http_port: int | None = 0,
        advertise_host: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        lease_ttl: float | None = None,
        keepalive_interval: float | None = None,
        heartbeat_interval: float | None = None,
        metrics: AgentMetrics | None = None,
        coordinator: Coordinator | None = None,
        redis_client: Redis | None = None,
        host: str | None = None,
        read_block_ms: int = 500,
        reclaim_idle: float | None = None,
        probes: bool = True,
        stop_timeout: float = 8.0,
    ) -> None:
        self.ctx = config
        # Periodic reachability probes (etcd, NATS with this node's credentials, Redis) and the
        # clock offset against ctx.ntp_servers, written into the record for `cbctl preflight`.
        self._probes_enabled = probes
        if stop_timeout <= 0:
            raise BadInput(f"stop timeout must be positive, got {stop_timeout!r}")
        self.stop_timeout = float(stop_timeout)
        self.node_id = validate_node_id(node_id)
        self.lease_ttl = float(lease_ttl if lease_ttl is not None else config.coordination.lease_ttl)
        self.keepalive_interval = float(
            keepalive_interval if keepalive_interval is not None else config.coordination.keepalive_interval
        )
        check_lease_settings(self.lease_ttl, self.keepalive_interval)
        if not config.lanes:
            raise BadInput(f"context {config.name!r}: no lanes configured")
        self.heartbeat_interval = float(heartbeat_interval or min(5.0, max(0.5, self.lease_ttl / 2)))
        self.handler: TaskHandler = handler or lifecycle_handler
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.host = host or socket.gethostname()
        self.instance_id = uuid.uuid4().hex
        self.machine_id: str | None = None
        self.version = __version__
        self.metrics = metrics or AgentMetrics(node_id, cluster=config.cluster)
        self.extra_record_fields: dict[str, Any] = {"probes": {}, "clock": {}}
        self.fatal_error: CbctlError | None = None

        self._coord = coordinator
        self._own_coord = coordinator is None
        self._redis = redis_client
        self._own_redis = redis_client is None
        self.guard: LaneGuard | None = None
        self.queue: LaneQueue | None = None
        self._block_ms = int(read_block_ms)
        # Entries pending on another consumer for this long are taken over even without an
        # ownership change (a paused ex-owner's blocked read can receive entries after takeover).
        self._reclaim_idle_ms = int(1000 * (reclaim_idle if reclaim_idle is not None else max(5.0, 2 * self.lease_ttl)))
        self._reclaim_period = max(1.0, self._reclaim_idle_ms / 2000)

        self._http: AgentHttp | None = None
        self._http_host = http_host
        self._http_port = http_port
        self._advertise_host = advertise_host
        self.http_address: str | None = None
        if http_port is not None:
            self._http = AgentHttp(self.node_id, self.metrics.render, self.readiness, http_host, http_port)

        self._flags: dict[str, Any] = dict(initial_document().flags)
        self._applied_revision = 0
        self._flags_applied = False
        self._apply_error: str | None = None
        # A revision the agent refused (bad document, or a listener refused it): not retried
        # until a newer one arrives (re-reads after store trouble would otherwise loop on it).
        self._refused_revision = 0
        self._doc_deleted = False
        self._applied_hooks: list[AppliedHook] = []
        self._flag_listeners: list[FlagsListener] = []
        self._start_hooks: list[Callable[[], Awaitable[None]]] = []
        self._stop_hooks: list[Callable[[], Awaitable[None]]] = []
        self._hooks_started = False

        self._owned: dict[str, _LaneRun] = {}
        self._local: dict[str, _LaneRun] = {}
        self._to_release: dict[str, LaneClaim] = {}
        self._lanes_lock = asyncio.Lock()
        self._record_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._session: _Session | None = None
        self._sessions = 0
        self._started_at = 0.0
        self._started = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._stop_outcome: list[str] = []  # what the teardown gave up on (for the log and tests)
        self._stop_requested = asyncio.Event()
        self._bg: list[asyncio.Task[None]] = []
        self.tasks_processed = 0

    # -- public API ------------------------------------------------------------------------

    @property
    def coordinator(self) -> Coordinator:
        if self._coord is None:
            raise RuntimeError("agent not started")
        return self._coord

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("agent not started")
        return self._redis

    @property
    def flags(self) -> dict[str, Any]:
        """The flags of the applied rollout revision (a copy)."""
        return dict(self._flags)

    @property
    def applied_revision(self) -> int:
        return self._applied_revision

    @property
    def cluster_enabled(self) -> bool:
        return bool(self._flags.get("cluster.enabled", False))

    @property
    def owned_lanes(self) -> dict[str, int]:
        """``{lane: fencing token}`` of the lanes this agent owns and works on right now."""
        return {lane: run.token for lane, run in sorted(self._owned.items()) if run.active}

    @property
    def registered(self) -> bool:
        return self._session is not None and not self._session.lost

    @property
    def lease(self) -> Lease | None:
        return self._session.lease if self._session is not None else None

    @property
    def session_number(self) -> int:
        return self._sessions

    @property
    def http_app(self) -> web.Application:
        """The aiohttp application (add routes before :meth:`start`)."""
        if self._http is None:
            raise RuntimeError("this agent has no HTTP server (http_port=None)")
        return self._http.app

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Add aiohttp routes to the agent's HTTP server; before :meth:`start`."""
        if self._http is None:
            raise RuntimeError("this agent has no HTTP server (http_port=None)")
        self._http.add_routes(routes)

    def on_applied(self, hook: AppliedHook) -> None:
        """Await ``hook(update)`` after each guarded apply and before the ack (module doc)."""
        self._applied_hooks.append(hook)

    async def notify_applied(self, update: AppliedUpdate) -> None:
        """Await every :meth:`on_applied` hook with ``update``, in order; a hook's error propagates.

        For guarded writes made outside the lane workers (routed signals,
        :mod:`cbctl.core.agent.signals`), so the hooks see every seq the guard assigns.
        """
        for hook in self._applied_hooks:
            await hook(update)

    def add_flags_listener(self, listener: FlagsListener) -> None:
        """Await ``listener(flags, revision)`` for every applied rollout revision."""
        self._flag_listeners.append(listener)

    def add_lifecycle_hooks(self, *, start: Callable[[], Awaitable[None]] | None = None,
                            stop: Callable[[], Awaitable[None]] | None = None) -> None:
        """Await ``start()`` early in :meth:`start` and ``stop()`` in every teardown (module doc)."""
        if start is not None:
            self._start_hooks.append(start)
        if stop is not None:
            self._stop_hooks.append(stop)

    async def update_record(self, **fields: Any) -> None:
        """Merge ``fields`` into :attr:`extra_record_fields` and rewrite the record now.

        Core fields (``node_id``, ``lanes``, ...) cannot be overridden.  Raises
        ``BackendUnavailable`` when the store cannot be reached (the fields are kept and go out
        with the next heartbeat).
        """
        self.extra_record_fields.update(fields)
        await self._write_record()

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        """(ready, checks): registered, flags applied, coordination store reachable."""
        session = self._session
        checks = {
            "registered": session is not None and not session.lost,
            "flags_applied": self._flags_applied and self._apply_error is None,
            "store_reachable": session is not None and not session.lost and not self._stopping,
        }
        return all(checks.values()), checks

    async def __aenter__(self) -> NodeAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, register, apply the current flags and start working; return when running.

        Refuse first: the only things done before the node's record exists are connecting to
        the store, reading the rollout document and the node's key, and granting the lease the
        record hangs on.  Everything else (machine-id file, identity binding, start hooks such
        as the event bus, HTTP, Redis, lane work) starts only once the record is ours.

        Raises ``NodeIdConflict`` (exit 3) if another live instance holds the node id,
        ``BackendUnavailable`` (exit 4) if the store or Redis cannot be reached, ``BadInput``
        for a bad state dir.  On failure nothing is left running.
        """
        if self._started:
            raise RuntimeError("agent already started")
        self._started = True
        self._started_at = time.time()
        try:
            # Read-only: the machine-id file is written only once the node id is ours.
            known_machine_id = peek_machine_id(self.state_dir)
            self.machine_id = known_machine_id or str(uuid.uuid4())
            if self._coord is None:
                from cbctl.core.backends.coord import make_coordinator

                self._coord = make_coordinator(self.ctx)
                await self._coord.connect()

            # The current flags first, so the record is created with them.
            start_rev = await self._coord.current_revision()
            kv = await self._coord.get(keys.rollout(self.ctx.cluster))
            # Registered with stage 0 flags; the document's flags are taken once every listener
            # accepted them (below), and the record is rewritten then.
            doc, revision = self._parse(kv.value if kv else None, kv.mod_revision if kv else 0)
            if doc is None and kv is not None:
                self._refused_revision = kv.mod_revision

            await self._open_session(first=True, start_tasks=False)

            # The node id is ours from here on: bind the identity, then start the rest.
            if known_machine_id is None:
                self.machine_id = await asyncio.to_thread(save_machine_id, self.state_dir, self.machine_id)
            await check_identity(
                self._coord, self.ctx.cluster, self.node_id,
                machine_id=self.machine_id, host=self.host, instance_id=self.instance_id,
            )
            log.info("agent %s: machine identity bound (machine %s)", self.node_id, self.machine_id)
            self._hooks_started = True
            for start_hook in self._start_hooks:
                await start_hook()
            if self._http is not None:
                bound_host, port = await self._http.start()
                adv = self._advertise_host or (bound_host if bound_host not in ("0.0.0.0", "::", "") else self.host)
                self.http_address = f"{adv}:{port}"
                log.info("agent %s: HTTP serving on %s", self.node_id, self.http_address)
            if self._redis is None:
                self._redis = redis_client_for(self.ctx, self._block_ms)
            self.guard = LaneGuard(self._redis, self.ctx.cluster, self.metrics, self.node_id,
                                   history_maxlen=self.ctx.redis.history_max, retention=self.ctx.redis.retention)
            self.queue = LaneQueue(self._redis, self.ctx.cluster, self.ctx.lanes)

            if doc is not None and await self._notify_flags(dict(doc.flags), revision):
                self._flags = dict(doc.flags)
                self._applied_revision = revision
                self._doc_deleted = kv is None
                self._flags_applied = True
            else:
                # Unreadable, or a listener refused it: run with stage 0 flags (everything off)
                # and report not ready until a revision that is accepted arrives.
                if doc is not None:
                    self._refused_revision = revision
                await self._notify_flags(dict(self._flags), 0)
                self._flags_applied = False
            await self._enter_mode(self.cluster_enabled)
            self.metrics.applied_revision.set(self._applied_revision)
            await self._write_record()
            session = self._session
            if session is not None:
                self._start_session_tasks(session)
            watch_from = max(start_rev, kv.mod_revision if kv else 0) + 1
            self._bg.append(self._spawn(self._rollout_loop(watch_from), "rollout-watch"))
            self._bg.append(self._spawn(self._supervise(), "supervisor"))
            if self._probes_enabled:
                from cbctl.core.backends.probes import probe_loop

                self._bg.append(self._spawn(
                    probe_loop(self.ctx, self.update_record, coord=self._coord, redis_client=self._redis),
                    "probes", fatal=False,
                ))
            log.info(
                "agent %s started: instance %s, host %s, http %s, lease %s (ttl %gs, keep-alive %gs), "
                "rollout revision %d, cluster.enabled=%s",
                self.node_id, self.instance_id, self.host, self.http_address, _lease_hex(self.lease),
                self.lease_ttl, self.keepalive_interval, self._applied_revision, self.cluster_enabled,
            )
        except BaseException:
            await self._teardown(revoke=True)
            raise

    def request_stop(self) -> None:
        """Ask :meth:`run` to return (signal handlers call this). Safe from any callback."""
        self._stop_requested.set()

    async def run(self) -> None:
        """Start, run until :meth:`request_stop` or a fatal error, then stop gracefully.

        Raises the fatal error (e.g. ``NodeIdConflict`` when the node id was taken while the
        agent was cut off) after stopping.
        """
        if not self._started:
            await self.start()
        await self._stop_requested.wait()
        await self.stop()
        if self.fatal_error is not None:
            raise self.fatal_error

    async def stop(self) -> None:
        """Graceful stop: stop workers, revoke the lease (record and lanes freed at once).

        Bounded by ``stop_timeout`` and exception-safe (module doc): returns when done or when
        the bound is reached, and never raises for a subsystem that failed to stop.  A second
        call waits for the first one's completion, with the same bound.
        """
        if self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.stop_timeout + 1.0):
                    await self._stopped.wait()
            return
        await self._teardown(revoke=True)

    async def crash(self) -> None:
        """Stop abruptly WITHOUT revoking the lease, as a killed process would (tests)."""
        await self._teardown(revoke=False)

    # -- sessions (registration + lease) ---------------------------------------------------

    async def _open_session(self, *, first: bool, start_tasks: bool = True) -> None:
        """Grant a new lease and create the record on it; start the session's tasks.

        The node's key is read first: a live holder that is not us is refused without a single
        write (:meth:`_refuse`).  The create-if-absent that follows is the atomic check (two
        starts racing both pass the read).  ``start_tasks=False`` leaves the session's tasks to
        :meth:`_start_session_tasks` (the first start creates the record before anything else).

        Raises ``NodeIdConflict`` if another instance holds the node id, ``BackendUnavailable``
        if the store cannot be reached.
        """
        coord = self.coordinator
        loop = asyncio.get_running_loop()
        waited_for_stale = False
        key = keys.node(self.ctx.cluster, self.node_id)
        while True:
            holder = await read_holder(coord, self.ctx.cluster, self.node_id)
            if holder is not None and holder.get("instance_id") != self.instance_id:
                if first and not waited_for_stale and self._holder_is_stale(holder):
                    await self._wait_stale_holder(holder, key)
                    waited_for_stale = True
                    continue
                await self._refuse(holder_conflict(self.node_id, key, holder))
            requested = loop.time()
            lease = await coord.grant_lease(self.lease_ttl)
            if lease.granted_at is None:  # a backend that does not stamp it: our request time
                lease.granted_at = requested
            session = _Session(number=self._sessions + 1, lease=lease)
            try:
                session.record_rev = await register(
                    coord, self.ctx.cluster, self.node_id, self._record(session), lease
                )
                break
            except NodeIdConflict as exc:
                await self._revoke(lease)
                holder = exc.holder
                if holder.get("instance_id") == self.instance_id:
                    # Our own previous session's record: we declared that lease lost before the
                    # store expired it.  Revoke it (never reuse it) and register afresh.
                    old = _lease_from_hex(holder.get("lease"))
                    if old is not None:
                        await self._revoke(old)
                    await asyncio.sleep(0.1)
                    continue
                if first and not waited_for_stale and self._holder_is_stale(holder):
                    await self._wait_stale_holder(holder, key)
                    waited_for_stale = True
                    continue
                await self._refuse(exc)
            except BaseException:
                await self._revoke(lease)
                raise
        self._sessions = session.number
        self._session = session
        session.keeper = coord.keep_alive(
            lease, interval=self.keepalive_interval, on_lost=lambda exc, s=session: self._on_lease_lost(s, exc)
        )
        if start_tasks:
            self._start_session_tasks(session)
        if not first:
            log.info("agent %s registered again: session %d, lease %s", self.node_id, session.number, _lease_hex(lease))

    def _start_session_tasks(self, session: _Session) -> None:
        session.tasks = [
            self._spawn(self._heartbeat_loop(session), "heartbeat"),
            self._spawn(self._members_loop(session), "members-watch"),
            self._spawn(self._lanes_watch_loop(session), "lanes-watch"),
            self._spawn(self._reconcile_loop(session), "reconcile"),
        ]
        self._wake.set()

    def _holder_is_stale(self, holder: dict[str, Any]) -> bool:
        """A record left by a dead process of this machine (a crash, then a restart)."""
        return bool(self.machine_id) and holder_is_dead_local(holder, machine_id=self.machine_id or "", host=self.host)

    async def _wait_stale_holder(self, holder: dict[str, Any], key: str) -> None:
        log.warning(
            "node id %s is still registered by a dead process of this machine (pid %s); "
            "waiting for its lease to expire", self.node_id, holder.get("pid"),
        )
        await self._wait_key_gone(key, 2 * self.lease_ttl + 15)

    async def _refuse(self, exc: NodeIdConflict) -> NoReturn:
        """Refuse a duplicate start: report it on an expiring lease of its own, then raise.

        Nothing of the holder's is written (record, identity binding, conflicts), so its
        preflight rows and the exit criteria stay as they were (see cbctl/core/agent/registration.py).
        """
        holder = exc.holder
        log.error("agent %s: %s", self.node_id, exc)
        with contextlib.suppress(BackendUnavailable, TimeoutError):
            async with asyncio.timeout(max(1.0, self.keepalive_interval)):
                await record_refusal(
                    self.coordinator, self.ctx.cluster, self.node_id, self.instance_id,
                    {
                        "kind": "duplicate-node-id",
                        "host": self.host,
                        "pid": os.getpid(),
                        "holder_instance_id": holder.get("instance_id"),
                        "holder_host": holder.get("host"),
                        "holder_pid": holder.get("pid"),
                    },
                )
        raise exc

    def _on_lease_lost(self, session: _Session, exc: LeaseLost | BackendUnavailable) -> None:
        """Synchronous on purpose: every lane stops in this very callback, before any await."""
        if session.lost or self._stopping:
            return
        session.lost = True
        lanes = sorted(self._owned)
        for run in self._owned.values():
            run.active = False
            if run.task is not None:
                run.task.cancel()
        self.metrics.lease_lost.inc()
        log.error("agent %s lost its lease %s (%s): stopped work on %d lanes %s",
                  self.node_id, _lease_hex(session.lease), exc, len(lanes), lanes)
        session.lost_event.set()

    async def _supervise(self) -> None:
        """Wait for a lost lease; then end that session and register again with a new lease."""
        while not self._stopping:
            session = self._session
            if session is None:
                return
            await session.lost_event.wait()
            await self._end_session(session, revoke=True)
            backoff = 0.1
            while not self._stopping:
                try:
                    await self._open_session(first=False)
                    break
                except NodeIdConflict as exc:
                    log.error("agent %s cannot register again: %s", self.node_id, exc)
                    self.fatal_error = exc
                    self.request_stop()
                    return
                except (BackendUnavailable, LeaseLost) as exc:
                    log.warning("agent %s: registering again failed (%s); retrying in %.1fs", self.node_id, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)

    async def _end_session(self, session: _Session, *, revoke: bool) -> None:
        """Stop everything that belongs to ``session``; revoke its lease (best effort).

        Bounded: each wait has a limit, and the lanes lock is not waited for longer than a
        second (a step stuck on a frozen store may hold it; the workers' "still owner" flags
        are dropped either way), so a stuck task can never keep the revoke from happening.
        """
        session.lost = True
        await _cancel_all(session.tasks, timeout=1.0)
        if session.keeper is not None:
            await session.keeper.stop(timeout=1.0)
        locked = False
        try:
            async with asyncio.timeout(1.0):
                await self._lanes_lock.acquire()
                locked = True
        except TimeoutError:
            log.warning("agent %s: lanes lock busy; ending session %d without it", self.node_id, session.number)
        try:
            runs = list(self._owned.values())
            self._owned.clear()
            self._to_release.clear()  # their keys die with the lease
            for run in runs:
                run.active = False
            await _cancel_all([r.task for r in runs], timeout=1.0)
            for run in runs:
                self.metrics.ownership_changes.labels(lane=run.lane).inc()
            self.metrics.owned_lanes.set(0)
        finally:
            if locked:
                self._lanes_lock.release()
        if revoke:
            await self._revoke(session.lease)
        if self._session is session:
            self._session = None

    async def _revoke(self, lease: Lease) -> None:
        """Revoke ``lease``; never raises (a lease we cannot revoke expires on its own)."""
        if self._coord is None:
            return
        budget = max(1.0, self.keepalive_interval)
        try:
            async with asyncio.timeout(budget):
                await self._coord.revoke_lease(lease)
        except (BackendUnavailable, LeaseLost, TimeoutError) as exc:
            why = str(exc) or f"no answer within {budget:g}s"
            if self._stopping:
                self._stop_outcome.append(f"lease {_lease_hex(lease)} not revoked ({why}); it expires on its own "
                                          f"within {self.lease_ttl:g}s")
            log.warning("gave up revoking lease %s (%s); it expires on its own within %gs",
                        _lease_hex(lease), why, self.lease_ttl)

    async def _wait_key_gone(self, key: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await self.coordinator.get(key) is None:
                return
            await asyncio.sleep(0.2)

    # -- the record ------------------------------------------------------------------------

    def _record(self, session: _Session) -> dict[str, Any]:
        rec: dict[str, Any] = dict(self.extra_record_fields)
        rec.update(
            {
                "node_id": self.node_id,
                "machine_id": self.machine_id,
                "instance_id": self.instance_id,
                "host": self.host,
                "pid": os.getpid(),
                "version": self.version,
                "started_at": self._started_at,
                "lease": _lease_hex(session.lease),
                "session": session.number,
                "applied_revision": self._applied_revision,
                "cluster_enabled": self.cluster_enabled,
                "guard": self._flags.get("ownership.guard", "off"),
                "lanes": sorted(lane for lane, run in self._owned.items() if run.active) if self._session is session else [],
                "heartbeat": time.time(),
                "http": self.http_address,
            }
        )
        return rec

    async def _write_record(self, session: _Session | None = None) -> None:
        """Rewrite our record by CAS on its revision (we only ever overwrite our own record).

        A conflict or a missing lease means the record is not ours any more: the session is
        declared lost.  Raises ``BackendUnavailable`` when the store cannot be reached.
        """
        session = session or self._session
        if session is None or session.lost:
            return
        async with self._record_lock:
            if session.lost:
                return
            body = json.dumps(self._record(session), sort_keys=True, separators=(",", ":")).encode()
            try:
                session.record_rev = await self.coordinator.commit(
                    keys.node(self.ctx.cluster, self.node_id), body,
                    expected_revision=session.record_rev, lease=session.lease,
                )
            except (Conflict, LeaseLost) as exc:
                self._on_lease_lost(session, LeaseLost(f"our record changed under us or its lease is gone: {exc}"))

    async def _heartbeat_loop(self, session: _Session) -> None:
        while not session.lost:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self._write_record(session)
            except BackendUnavailable as exc:
                log.warning("heartbeat of %s failed: %s", self.node_id, exc)

    # -- flags -----------------------------------------------------------------------------

    def _parse(self, value: bytes | None, revision: int) -> tuple[RolloutDocument | None, int]:
        if value is None:
            return initial_document(), revision
        try:
            return RolloutDocument.from_json(value), revision
        except BadInput as exc:
            self._apply_error = f"revision {revision}: {exc}"
            log.error("agent %s cannot apply rollout revision %d: %s", self.node_id, revision, exc)
            return None, revision

    async def _rollout_loop(self, watch_from: int) -> None:
        """Follow the rollout document; apply each revision; resync after store trouble."""
        key = keys.rollout(self.ctx.cluster)
        backoff = 0.1
        resync = False
        while not self._stopping:
            try:
                if resync:
                    start_rev = await self.coordinator.current_revision()
                    kv = await self.coordinator.get(key)
                    if kv is not None:
                        await self._apply(kv.value, kv.mod_revision)
                    elif not self._doc_deleted and (self._applied_revision or self._refused_revision):
                        # Deleted while we were not watching: the delete event is gone, but a
                        # missing document means stage 0 (everything off), as in the watch.
                        await self._apply(None, start_rev)
                    watch_from = max(start_rev, kv.mod_revision if kv else 0) + 1
                    resync = False
                async for ev in self.coordinator.watch(key, start_revision=watch_from):
                    backoff = 0.1
                    watch_from = ev.revision + 1
                    await self._apply(ev.value if ev.kind == "put" else None, ev.revision)
            except CbctlError as exc:  # unreachable store, compacted history: re-read, re-watch
                if self._stopping:
                    return
                log.warning("rollout watch of %s interrupted (%s); re-reading in %.1fs", self.node_id, exc, backoff)
                resync = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _apply(self, value: bytes | None, revision: int) -> None:
        """Apply one rollout revision, all or nothing, and report it in the record.

        ``value`` None is a deleted document: stage 0 flags.  Order: parse; hand the new flags
        to every listener (they may refuse: then the ones already told are given the running
        flags back and nothing else changed); only then switch this agent's own state and mode.
        A refused revision is logged once and skipped until a newer revision arrives.
        """
        if revision == self._refused_revision:
            return
        if revision < self._applied_revision or (revision == self._applied_revision and self._flags_applied):
            return
        doc, _ = self._parse(value, revision)
        if doc is None:
            self._refused_revision = revision
            return
        new_flags = dict(doc.flags)
        if not await self._notify_flags(new_flags, revision):
            self._refused_revision = revision
            return
        was_enabled = self.cluster_enabled
        self._flags = new_flags
        self._doc_deleted = value is None
        if self.cluster_enabled != was_enabled:
            await self._enter_mode(self.cluster_enabled)
        self._applied_revision = revision
        self._refused_revision = 0
        self._flags_applied = True
        self._apply_error = None
        self.metrics.applied_revision.set(revision)
        self._wake.set()
        log.info("agent %s applied rollout revision %d (stage %d%s)", self.node_id, revision, doc.stage,
                 ", document deleted" if value is None else "")
        try:
            await self._write_record()
        except BackendUnavailable as exc:
            log.warning("agent %s could not report revision %d yet: %s", self.node_id, revision, exc)

    async def _notify_flags(self, flags: Mapping[str, Any], revision: int) -> bool:
        """Hand ``flags`` to every listener; False (and listeners rolled back) if one refused.

        A listener refuses by raising.  The listeners that had already taken the new flags get
        the running ones again, so no subsystem is left half on the refused revision.
        """
        told = 0
        try:
            for listener in self._flag_listeners:
                await listener(dict(flags), revision)
                told += 1
        except Exception as exc:  # any refusal, also a listener's bug: the revision is not applied
            self._apply_error = f"revision {revision}: {exc}"
            log.error("agent %s refused rollout revision %d (%s); keeping revision %d until a newer one arrives",
                      self.node_id, revision, exc, self._applied_revision, exc_info=not isinstance(exc, CbctlError))
            for listener in self._flag_listeners[:told + 1]:
                try:
                    await listener(dict(self._flags), self._applied_revision)
                except Exception as back:  # noqa: BLE001 - logged; the refusal stands either way
                    log.error("agent %s: restoring revision %d in a flags listener failed: %s",
                              self.node_id, self._applied_revision, back)
            return False
        return True

    async def _enter_mode(self, enabled: bool) -> None:
        """Switch between coordinated ownership and local competing consumers."""
        async with self._lanes_lock:
            if enabled:
                runs = list(self._local.values())
                self._local.clear()
                await self._stop_runs(runs)
                log.info("agent %s: cluster.enabled — taking part in lane ownership", self.node_id)
            else:
                await self._release(list(self._owned.values()))
                for lane in self.ctx.lanes:
                    if lane not in self._local:
                        run = _LaneRun(lane=lane, token=0, local=True)
                        self._local[lane] = run
                        self._start_worker(run)
                log.info("agent %s: cluster disabled — consuming all %d lanes locally", self.node_id, len(self.ctx.lanes))
        self._wake.set()

    # -- ownership -------------------------------------------------------------------------

    async def _members_loop(self, session: _Session) -> None:
        """Keep ``session.members`` (live node ids and their cluster_enabled) current."""
        prefix = keys.nodes_prefix(self.ctx.cluster)
        backoff = 0.1
        while not session.lost:
            try:
                rev = await self.coordinator.current_revision()
                members: dict[str, bool] = {}
                for kv in await self.coordinator.list(prefix):
                    members[kv.key[len(prefix):]] = _enabled(kv.value)
                if members != session.members:
                    session.members = members
                    self._wake.set()
                async for ev in self.coordinator.watch(prefix, prefix=True, start_revision=rev + 1):
                    node = ev.key[len(prefix):]
                    before = session.members.get(node)
                    if ev.kind == "delete":
                        session.members.pop(node, None)
                    else:
                        session.members[node] = _enabled(ev.value)
                    if session.members.get(node) != before:
                        log.debug("agent %s: member %s %s", self.node_id, node, session.members.get(node))
                        self._wake.set()
                    backoff = 0.1
            except CbctlError as exc:
                log.warning("membership watch of %s interrupted: %s", self.node_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _lanes_watch_loop(self, session: _Session) -> None:
        """Wake the reconciler whenever a lane owner key disappears (released or expired)."""
        prefix = keys.lanes_prefix(self.ctx.cluster)
        backoff = 0.1
        while not session.lost:
            try:
                async for ev in self.coordinator.watch(prefix, prefix=True):
                    if ev.kind == "delete":
                        self._wake.set()
                    backoff = 0.1
            except CbctlError as exc:
                log.warning("lanes watch of %s interrupted: %s", self.node_id, exc)
                self._wake.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _reconcile_loop(self, session: _Session) -> None:
        period = max(0.5, self.keepalive_interval)
        while not session.lost:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._reconcile(session)
            except BackendUnavailable as exc:
                log.warning("lane reconciliation of %s failed (%s); retrying", self.node_id, exc)

    async def _reconcile(self, session: _Session) -> None:
        """Make the owned lanes match the rendezvous assignment (release first, then take)."""
        async with self._lanes_lock:
            if session.lost or self._session is not session:
                return
            changed = False
            for lane, claim in list(self._to_release.items()):
                await release_lane(self.coordinator, self.ctx.cluster, claim)
                del self._to_release[lane]
            if not self.cluster_enabled:
                changed = bool(self._owned)
                await self._release(list(self._owned.values()))
            else:
                members = {n for n, enabled in session.members.items() if enabled} | {self.node_id}
                mine = lanes_of(self.node_id, self.ctx.lanes, members)
                mine_set = set(mine)
                log.debug("agent %s reconcile: members %s, mine %s, owned %s", self.node_id, sorted(members), mine,
                          sorted(self._owned))
                leaving = [run for lane, run in self._owned.items() if lane not in mine_set or not run.active]
                changed = bool(leaving)
                await self._release(leaving)
                wanted = [lane for lane in mine if lane not in self._owned]
                if wanted:
                    results = await asyncio.gather(
                        *(acquire_lane(self.coordinator, self.ctx.cluster, lane, node_id=self.node_id,
                                       instance_id=self.instance_id, lease=session.lease) for lane in wanted),
                        return_exceptions=True,
                    )
                    failure: BaseException | None = None
                    for lane, result in zip(wanted, results):
                        if isinstance(result, BaseException):
                            failure = failure or result
                            continue
                        if result is None:
                            continue  # held by someone else: its delete event wakes us
                        if session.lost:
                            break  # the key dies with the lease; never work with a lost lease
                        run = _LaneRun(lane=lane, token=result.token, local=False, claim=result)
                        self._owned[lane] = run
                        self.metrics.ownership_changes.labels(lane=lane).inc()
                        self._start_worker(run)
                        changed = True
                        log.info("agent %s took lane %s (token %d)", self.node_id, lane, result.token)
                    if failure is not None and not isinstance(failure, BackendUnavailable):
                        raise failure
            self.metrics.owned_lanes.set(sum(1 for r in self._owned.values() if r.active))
        if changed:
            await self._write_record(session)

    async def _release(self, runs: list[_LaneRun]) -> None:
        """Stop the lanes' workers, then delete their owner keys (caller holds the lanes lock).

        Workers stop first, so no write with a token happens after its key is gone.
        """
        if not runs:
            return
        await self._stop_runs(runs)
        for run in runs:
            self._owned.pop(run.lane, None)
        claimed = [run for run in runs if run.claim is not None]
        results = await asyncio.gather(
            *(release_lane(self.coordinator, self.ctx.cluster, run.claim) for run in claimed if run.claim),
            return_exceptions=True,
        )
        for run, result in zip(claimed, results):
            assert run.claim is not None
            self.metrics.ownership_changes.labels(lane=run.lane).inc()
            log.info("agent %s released lane %s (token %d%s)", self.node_id, run.lane, run.token,
                     ", fenced off by a newer owner" if run.stale else "")
            if isinstance(result, BackendUnavailable):
                # Retried by the next reconciliation (or the key dies with the lease).
                log.warning("agent %s could not delete the owner key of lane %s yet: %s", self.node_id, run.lane, result)
                self._to_release[run.lane] = run.claim
            elif isinstance(result, BaseException):
                raise result

    async def _stop_runs(self, runs: list[_LaneRun]) -> None:
        for run in runs:
            run.active = False
        await _cancel_all([r.task for r in runs])

    # -- lane workers ----------------------------------------------------------------------

    def _start_worker(self, run: _LaneRun) -> None:
        run.started = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._lane_worker(run), name=f"{self.node_id}:lane-{run.lane}")
        task.add_done_callback(lambda t: self._worker_done(run, t))
        run.task = task

    def _worker_done(self, run: _LaneRun, task: asyncio.Task[None]) -> None:
        """A lane worker ended. If it died of an error (the handler's, or a bug) while we still
        own the lane, restart it after a pause; its unacked task is redelivered by the claim."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("agent %s: worker of lane %s failed; restarting it in 1s", self.node_id, run.lane,
                  exc_info=task.exception())
        self.metrics.tasks.labels(result="error").inc()

        def restart() -> None:
            if run.active and run.task is task and not self._stopping:
                self._start_worker(run)

        asyncio.get_running_loop().call_later(1.0, restart)

    async def _lane_worker(self, run: _LaneRun) -> None:
        """Work one lane until ``run.active`` drops, the task is cancelled, or we are fenced off."""
        assert self.guard is not None and self.queue is not None
        lane, consumer = run.lane, self.node_id
        loop = asyncio.get_running_loop()
        setup = True
        takeover = not run.local
        next_reclaim = 0.0
        backoff = 0.1
        while run.active:
            try:
                if setup:
                    await self.queue.ensure_group(lane)
                    await self._raise_fence(run)
                    setup = False
                if loop.time() >= next_reclaim:
                    if not takeover:
                        # Again every reclaim period: a Redis that restarted (the client may
                        # reconnect without us seeing an error) has forgotten the fence.
                        await self._raise_fence(run)
                    # At takeover: everything the previous owner read but never acked (idle 0);
                    # afterwards: entries stuck on another consumer for a long time.
                    idle = 0 if takeover else self._reclaim_idle_ms
                    claimed = await self.queue.claim_pending(lane, consumer, idle)
                    takeover = False
                    next_reclaim = loop.time() + self._reclaim_period
                    if claimed:
                        log.info("agent %s lane %s: took over %d pending tasks", self.node_id, lane, len(claimed))
                    for task in claimed:
                        if not run.active:
                            return
                        await self._process(run, task)
                tasks = await self.queue.read(lane, consumer, count=64, block_ms=self._block_ms)
                for task in tasks:
                    if not run.active:
                        return
                    await self._process(run, task)
                backoff = 0.1
            except BackendUnavailable as exc:
                log.warning("agent %s lane %s: %s; retrying in %.1fs", self.node_id, lane, exc, backoff)
                setup = True
                next_reclaim = 0.0
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except StaleFencingToken as exc:
                log.warning("agent %s lane %s: fenced off (%s); stopping work on it", self.node_id, lane, exc)
                run.active = False
                run.stale = True
                self._wake.set()
                return

    async def _raise_fence(self, run: _LaneRun) -> None:
        """Fence the previous owners off at Redis (no-op for token 0, i.e. local mode).

        Raises ``StaleFencingToken`` when Redis already holds a higher token: someone acquired
        the lane after us, so we are not the owner.
        """
        assert self.guard is not None
        if run.token <= 0:
            return
        fence = await self.guard.raise_fence(run.lane, run.token)
        if fence > run.token:
            raise StaleFencingToken(
                f"lane {run.lane!r}: our token {run.token} is already below the fence {fence}",
                lane=run.lane, token=run.token, current_token=fence,
            )

    async def _process(self, run: _LaneRun, task: Task) -> None:
        """Handle one task and write its result + ack through the guard with the lane's token."""
        assert self.guard is not None
        lane, token = run.lane, run.token
        mode = "off" if run.local else self._flags.get("ownership.guard", "off")
        canary = tuple(self._flags.get("canary.lanes", ()))
        if not task.workflow_id:
            log.warning("lane %s entry %s has no workflow id; dropping it", lane, task.entry_id)
            if run.active:
                await self.guard.ack(lane, token, mode, task.entry_id, canary_lanes=canary)
                self.metrics.tasks.labels(result="dropped").inc()
            return
        update = await self.handler(task)
        if not run.active:  # "still owner" check right before the guarded write
            return
        if update is None:
            await self.guard.ack(lane, token, mode, task.entry_id, canary_lanes=canary)
            self.metrics.tasks.labels(result="dropped").inc()
            return
        two_step = bool(self._applied_hooks)
        try:
            result = await self.guard.apply(
                lane, token, mode, task.workflow_id, task.task_id, update,
                None if two_step else task.entry_id,
                task_type=task.type or "task", canary_lanes=canary,
            )
        except ValueError as exc:  # the task itself is malformed (reserved field, bad id)
            log.error("lane %s: task %s of workflow %s is invalid (%s); dropping it", lane, task.task_id,
                      task.workflow_id, exc)
            await self.guard.ack(lane, token, mode, task.entry_id, canary_lanes=canary)
            self.metrics.tasks.labels(result="invalid").inc()
            return
        if two_step:
            applied = AppliedUpdate(
                node_id=self.node_id, lane=lane, token=token, workflow_id=task.workflow_id,
                task_id=task.task_id, type=task.type, seq=result.seq, update=update, payload=task.payload,
                occurred_at=time.time(), already_applied=result.already_applied, decision=result.decision,
                history_id=result.history_id, publish_versions=result.publish_versions,
            )
            for hook in self._applied_hooks:
                await hook(applied)
            if not run.active:
                return
            await self.guard.ack(lane, token, mode, task.entry_id, canary_lanes=canary)
        self.metrics.tasks.labels(result="duplicate" if result.already_applied else "applied").inc()
        self.tasks_processed += 1

    # -- plumbing --------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None], name: str, *, fatal: bool = True) -> asyncio.Task[None]:
        """A background task whose unexpected death is logged (and, if ``fatal``, stops the agent)."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=f"{self.node_id}:{name}")  # type: ignore[arg-type]
        task.add_done_callback(lambda t: self._task_done(t, fatal))
        return task

    def _task_done(self, task: asyncio.Task[None], fatal: bool) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        log.error("agent %s: task %s failed", self.node_id, task.get_name(), exc_info=exc)
        if fatal and not self._stopping:
            self.fatal_error = exc if isinstance(exc, CbctlError) else CbctlError(f"internal error in {task.get_name()}: {exc!r}")
            self.request_stop()

    async def _teardown(self, *, revoke: bool) -> None:
        """Stop everything, each step under its own budget inside ``stop_timeout``.

        No step can skip a later one: an error is logged, a step that overruns its budget is
        abandoned (cancelled, not awaited) with a log line saying what was given up.  Budgets
        keep time in reserve for the lease revoke and for closing HTTP and the clients.
        Unpublished events are never lost here: the event bus's stop settles them into its
        outbox, and a task whose event was not made durable was not acked, so it is delivered
        again after the restart.
        """
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout
        reserve_revoke = min(2.0, 0.25 * self.stop_timeout)
        reserve_close = min(1.5, 0.2 * self.stop_timeout)

        def until(reserved: float) -> float:
            return max(0.05, deadline - reserved - loop.time())

        try:
            # 1. Background and session tasks, then the lane workers: no more work.
            await self._bounded("background tasks", self._cancel_bg(), until(reserve_revoke + reserve_close + 1.0))
            await self._bounded("lane workers", self._stop_all_runs(), until(reserve_revoke + reserve_close + 0.5))
            # 2. Subsystems (the event bus settles its queue into the outbox), only if started.
            if self._hooks_started:
                for i, stop_hook in enumerate(self._stop_hooks):
                    name = getattr(stop_hook, "__qualname__", "stop hook")
                    # A fair share each: one hook stuck on a frozen server must not leave the
                    # next one (the signal router after the event bus) no time at all.
                    share = until(reserve_revoke + reserve_close) / (len(self._stop_hooks) - i)
                    await self._bounded(f"stop hook {name}", stop_hook(), share)
            # 3. The lease: revoked (record and lanes freed at once) or left to expire.
            session = self._session
            if session is not None:
                if revoke:
                    await self._bounded("lease revoke", self._end_session(session, revoke=True),
                                        until(reserve_close), gave_up=(
                                            f"lease {_lease_hex(session.lease)} not revoked; it expires on its own "
                                            f"within {self.lease_ttl:g}s"))
                else:
                    session.lost = True
                    await self._bounded("session tasks", _cancel_all(session.tasks, timeout=1.0), until(reserve_close))
                    if session.keeper is not None:
                        await self._bounded("lease keeper", session.keeper.stop(), until(reserve_close))
                self._owned.clear()
                self._session = None
            # 4. HTTP and the clients: always closed.
            if self._http is not None:
                await self._bounded("HTTP server", self._http.stop(), until(reserve_close * 0.5))
            if self._own_redis and self._redis is not None:
                redis, self._redis = self._redis, None
                await self._bounded("Redis client", redis.aclose(), until(reserve_close * 0.25))
            if self._own_coord and self._coord is not None:
                coord, self._coord = self._coord, None
                await self._bounded("coordinator", coord.close(), max(0.2, deadline - loop.time()))
        finally:
            self._stopped.set()
            gave_up = "; gave up on: " + "; ".join(self._stop_outcome) if self._stop_outcome else ""
            log.info("agent %s stopped (%s)%s", self.node_id,
                     "lease revoked" if revoke and not any("lease" in g for g in self._stop_outcome)
                     else "lease left to expire", gave_up)

    async def _cancel_bg(self) -> None:
        await _cancel_all(self._bg, timeout=1.0)
        self._bg.clear()
        if self._session is not None:
            # First, so that a reconciliation waiting on the store does not hold the lanes lock.
            self._session.lost = True
            await _cancel_all(self._session.tasks, timeout=1.0)

    async def _stop_all_runs(self) -> None:
        runs = list(self._local.values()) + list(self._owned.values())
        for run in runs:
            run.active = False  # the "still owner" flag: no guarded write after this
        self._local.clear()
        left = await _cancel_all([r.task for r in runs], timeout=1.5)
        if left:
            log.warning("agent %s: %d lane workers did not end within 1.5s (a command in flight); "
                        "their tasks are not acked and will be delivered again", self.node_id, left)

    async def _bounded(self, what: str, aw: Awaitable[Any], budget: float, *, gave_up: str | None = None) -> None:
        """Run ``aw`` as its own task for at most ``budget`` s; log (never raise) what failed.

        A separate task and ``asyncio.wait`` rather than ``asyncio.timeout``: a library that
        swallows a cancellation mid-command (redis-py 8.1) would make a timeout wait for the
        command; here the step is abandoned at its deadline and the teardown goes on.
        """
        task = asyncio.ensure_future(aw)
        done, _ = await asyncio.wait({task}, timeout=max(0.0, budget))
        if not done:
            task.cancel()
            msg = gave_up or f"{what} did not finish within {budget:.1f}s"
            self._stop_outcome.append(msg)
            log.warning("agent %s stop: %s; going on", self.node_id, msg)
            return
        exc = task.exception() if not task.cancelled() else None
        if exc is not None:
            self._stop_outcome.append(f"{what} failed: {exc}")
            log.error("agent %s stop: %s failed: %s; going on", self.node_id, what, exc,
                      exc_info=not isinstance(exc, CbctlError))


# -- helpers --------------------------------------------------------------------------------


def redis_client_for(ctx: Context, block_ms: int = 0) -> Redis:
    """The Redis client of a context, configured for lanes (:func:`cbctl.core.backends.redis.lanes.redis_client`).

    The socket timeout must outlast a blocking XREADGROUP of ``block_ms``.
    """
    from cbctl.core.backends.redis.lanes import redis_client

    secret = ctx.redis.password.resolve() if ctx.redis.password else None
    return redis_client(
        ctx.redis.url,
        password=secret.reveal() if secret is not None else None,
        # Generous: a reply that arrived while the process was suspended must still be read.
        socket_timeout=block_ms / 1000 + 10.0,
    )


async def _cancel_all(tasks: Iterable[asyncio.Task[Any] | None], timeout: float | None = None) -> int:
    """Cancel tasks and wait until they have finished (at most ``timeout`` s when given);
    return how many are still running.  Errors were logged by done callbacks.

    The cancel is repeated every 50 ms: redis-py 8.1's asyncio client swallows a cancel that
    arrives while a command is in flight (measured: 200 of 200 cancels during ``GET`` were
    lost — the command completed and the task went on), so one ``cancel()`` is not enough.
    Without ``timeout`` this waits as long as a task takes to give in: a command against a
    frozen server can take its whole socket timeout, so teardown paths always pass one.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    current = asyncio.current_task()
    pending = {t for t in tasks if t is not None and t is not current and not t.done()}
    while pending:
        if deadline is not None and loop.time() >= deadline:
            return len(pending)
        for t in pending:
            t.cancel()
        _done, pending = await asyncio.wait(pending, timeout=0.05)
    return 0


def _enabled(value: bytes) -> bool:
    try:
        rec = json.loads(value)
    except ValueError:
        return False
    return isinstance(rec, dict) and rec.get("cluster_enabled") is True


def _lease_hex(lease: Lease | None) -> str | None:
    if lease is None:
        return None
    return format(lease.id, "x") if isinstance(lease.id, int) else str(lease.id)


def _lease_from_hex(value: Any) -> Lease | None:
    if not isinstance(value, str):
        return None
    try:
        return Lease(id=int(value, 16), ttl=0)
    except ValueError:
        return None
