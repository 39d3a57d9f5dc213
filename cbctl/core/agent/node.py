"""NodeAgent: what a workflow service runs on every node (and what ``cbctl agent run`` runs).

The facade: public API, start (refuse first), run, stop (bounded teardown).  The work is done by
its parts, mixed into :class:`NodeAgent`: :mod:`cbctl.core.agent.session` (lease session and
registration), :mod:`cbctl.core.agent.follower` (rollout follower), :mod:`cbctl.core.agent.lanes`
(lane mode and reconciliation), :mod:`cbctl.core.agent.worker` (lane workers).  Hooks for other
subsystems (event bus, signal router, probes): :meth:`NodeAgent.on_applied`,
:meth:`NodeAgent.add_flags_listener`, :meth:`NodeAgent.add_routes`,
:meth:`NodeAgent.add_lifecycle_hooks`, :meth:`NodeAgent.update_record`.  Design: docs/agent.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbctl import __version__
from cbctl.core.agent.hooks import AppliedHook, AppliedUpdate, FlagsListener, TaskHandler
from cbctl.core.agent.http import AgentHttp
from cbctl.core.agent.lanes import LaneReconciler
from cbctl.core.agent.ownership import LaneClaim
from cbctl.core.agent.follower import RolloutFollower
from cbctl.core.agent.registration import check_identity, default_state_dir, peek_machine_id, save_machine_id, validate_node_id
from cbctl.core.agent.session import LeaseSession, Session, check_lease_settings, lease_hex
from cbctl.core.agent.tasks import cancel_all
from cbctl.core.agent.worker import LaneRun, LaneWorkers
from cbctl.core.backends.coord.base import Coordinator, Lease
from cbctl.core.backends.redis.client import redis_client_for
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.model import keys
from cbctl.core.model.config import Context
from cbctl.core.model.errors import BadInput, CbctlError
from cbctl.core.model.flags import CLUSTER_ENABLED
from cbctl.core.model.metrics import AgentMetrics
from cbctl.core.model.rollout import initial_document

if TYPE_CHECKING:
    from aiohttp import web
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

__all__ = ["NodeAgent"]


class NodeAgent(LeaseSession, RolloutFollower, LaneReconciler, LaneWorkers):
    """The node agent. Use as ``await agent.start()`` ... ``await agent.stop()``, or
    ``async with NodeAgent(...) as agent``, or ``await agent.run()`` (until :meth:`request_stop`).

    ``config``: the context (cluster, lanes, endpoints, ``coordination.lease_ttl`` /
    ``keepalive_interval``).  ``handler``: the service's task handler, required (none raises
    ``BadInput``; the demo workload's is :func:`cbctl.core.agent.workload.lifecycle_handler`, what
    ``cbctl agent run --handler demo`` runs).  ``http_port``: 0 = a free port, ``None`` = no HTTP server.
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
        if handler is None:  # no silent demo workload in production: the caller says what runs
            raise BadInput("NodeAgent needs a task handler: pass handler=... (the demo workload's is "
                           "cbctl.core.agent.workload.lifecycle_handler)")
        self.handler: TaskHandler = handler
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

        self._owned: dict[str, LaneRun] = {}
        self._local: dict[str, LaneRun] = {}
        self._to_release: dict[str, LaneClaim] = {}
        self._lanes_lock = asyncio.Lock()
        self._record_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._session: Session | None = None
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
        return bool(self._flags.get(CLUSTER_ENABLED, False))

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
        """Await ``hook(update)`` after each guarded apply and before the ack (docs/agent.md)."""
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
        """Await ``start()`` early in :meth:`start` and ``stop()`` in every teardown (docs/agent.md)."""
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
                self.node_id, self.instance_id, self.host, self.http_address, lease_hex(self.lease),
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

        Bounded by ``stop_timeout`` and exception-safe (docs/agent.md): returns when done or when
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
                                            f"lease {lease_hex(session.lease)} not revoked; it expires on its own "
                                            f"within {self.lease_ttl:g}s"))
                else:
                    session.lost = True
                    await self._bounded("session tasks", cancel_all(session.tasks, timeout=1.0), until(reserve_close))
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
        await cancel_all(self._bg, timeout=1.0)
        self._bg.clear()
        if self._session is not None:
            # First, so that a reconciliation waiting on the store does not hold the lanes lock.
            self._session.lost = True
            await cancel_all(self._session.tasks, timeout=1.0)

    async def _stop_all_runs(self) -> None:
        runs = list(self._local.values()) + list(self._owned.values())
        for run in runs:
            run.active = False  # the "still owner" flag: no guarded write after this
        self._local.clear()
        left = await cancel_all([r.task for r in runs], timeout=1.5)
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
