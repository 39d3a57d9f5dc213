"""The signal router: answers routed signals for one agent (the receiver side of
``cbctl signal send``; the sender is :mod:`cbctl.core.operator.signal_sender`, the shared contract
:mod:`cbctl.core.model.signals`, the design docs/agent.md, "Signals").

Contract: a request is applied at once through the fencing guard with the agent's current token
for the workflow's lane and the guard mode of its flags, and answered with the seq the guard
assigned; a lane the agent does not own (or a token the guard fenced off) is answered
``not_owner``.  Queued ``signal`` tasks (the local route) write exactly what a routed signal
writes (:func:`attach_signals` wraps the agent's handler).  Counted in
``signals_routed_total{result}`` with the values of :data:`ROUTER_RESULTS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import nats.errors

from cbctl.core.agent.hooks import AppliedUpdate
from cbctl.core.agent.node import NodeAgent
from cbctl.core.agent.ownership import lane_owner
from cbctl.core.backends.nats.connect import close_nats, connect_nats
from cbctl.core.backends.retry import Backoff, BackoffPolicy
from cbctl.core.backends.redis.queue import Task, lane_for
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, CbctlError, ConfigError, StaleFencingToken
from cbctl.core.model.flags import CANARY_LANES, GUARD_OFF, OWNERSHIP_GUARD
from cbctl.core.model.signals import (
    SIGNAL_TYPE,
    WIRE_VERSION,
    check_signal,
    encode_reply,
    refusal,
    signal_subject,
    signal_task_payload,
    signal_update,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

    from cbctl.core.agent.hooks import TaskHandler

log = logging.getLogger(__name__)

__all__ = ["ROUTER_RESULTS", "SignalRouter", "attach_signals"]

ROUTER_RESULTS = ("applied", "duplicate", "not_owner", "invalid", "error")
"""Values of the ``result`` label of ``signals_routed_total``."""


async def _close_nc(nc: Client, timeout: float = 2.0) -> None:
    # Bounded: a close on a connection that is half gone must not hold the caller
    # (close_nats aborts the socket at the deadline; a plain timeout could be swallowed).
    await close_nats(nc, timeout)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Done callback: read a background step's outcome so it is never "never retrieved"."""
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("signal router: %r", fut.exception())


class SignalRouter:
    """Answers routed signals for one :class:`~cbctl.core.agent.node.NodeAgent` (module doc).

    :meth:`start` returns at once: the router connects to NATS (its own connection) and
    subscribes to :func:`signal_subject` in the background, retrying with backoff while NATS is
    unreachable or refuses the credentials, so the agent keeps running either way; a bad local
    NATS setting (``ConfigError``) is logged and routing stays off for this agent.  Once
    connected, nats-py's reconnect loop restores the subscription after an outage.  Requests are
    handled one at a time, in arrival order (two signals to one workflow apply in the order
    they arrived).  :meth:`close` stops answering (in-flight requests are finished first) and
    is idempotent.  Before the agent has started (or after it stopped) every request is
    answered ``not_owner``.  :func:`attach_signals` ties the router's close to the agent's stop.
    """

    def __init__(self, agent: NodeAgent, *, min_backoff: float = 0.2, max_backoff: float = 5.0) -> None:
        self.agent = agent
        self.subject = signal_subject(agent.ctx.cluster, agent.node_id)
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._nc: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._subscribed = asyncio.Event()
        self.last_error: str | None = None
        for result in ROUTER_RESULTS:
            agent.metrics.signals_routed.labels(result=result)

    @property
    def connected(self) -> bool:
        """True while subscribed on a live NATS connection."""
        return self._subscribed.is_set() and self._nc is not None and self._nc.is_connected

    async def wait_subscribed(self, timeout: float) -> None:
        """Wait until the subscription is in place (``TimeoutError`` after ``timeout``)."""
        async with asyncio.timeout(timeout):
            await self._subscribed.wait()
        # A request published right after SUB could overtake it: a round trip orders them.
        nc = self._nc
        if nc is not None and nc.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await nc.flush(timeout=max(1, int(timeout)))

    def start(self) -> None:
        """Start connecting and answering in the background (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.agent.node_id}:signals")

    async def close(self, timeout: float = 1.5) -> None:
        """Stop answering within ``timeout`` seconds: the connection task is cancelled, the
        subscription drained (the request in flight, if any, replies first), the connection
        closed.  Never raises; idempotent.

        Every step is bounded and runs as its own task: against a frozen NATS (SIGSTOP: socket
        open, no answer) nats-py's drain and close can wait forever, and a cancellation that
        lands in its flush is swallowed, so an ``asyncio.timeout`` around them would not end
        them.  What is left at the deadline is abandoned: :func:`close_nats` aborts the socket.
        The default stays below the share of the agent's stop budget a stop hook gets (about
        2 s with the event bus before it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.1, timeout)
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=max(0.01, 0.25 * (deadline - loop.time())))
            if not done:
                log.warning("agent %s signal router: its connection task did not end when cancelled; abandoned",
                            self.agent.node_id)
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: an error there was logged where it happened
        nc, self._nc = self._nc, None
        self._subscribed.clear()
        if nc is None or nc.is_closed:
            return
        drain = asyncio.ensure_future(nc.drain())  # the callback in flight (if any) replies first
        drain.add_done_callback(_retrieve)
        done, _ = await asyncio.wait({drain}, timeout=max(0.01, 0.5 * (deadline - loop.time())))
        if done and not drain.cancelled() and drain.exception() is None and nc.is_closed:
            return
        if not done:
            drain.cancel()
        if not await close_nats(nc, max(0.05, deadline - loop.time())):
            log.warning("agent %s signal router: NATS connection did not close in time; its socket was aborted",
                        self.agent.node_id)

    async def _run(self) -> None:
        backoff = Backoff(BackoffPolicy(initial=self._min_backoff, cap=self._max_backoff, jitter=(0.8, 1.2)))
        while not self._closing:
            closed = asyncio.Event()
            delay: float | None = None  # the pause after this round, once known

            async def on_closed(ev: asyncio.Event = closed) -> None:
                ev.set()

            async def on_error(exc: Exception) -> None:
                log.warning("agent %s signal router: NATS error: %r", self.agent.node_id, exc)

            try:
                nc = await connect_nats(self.agent.ctx.nats, name=f"cbctl-signals-{self.agent.node_id}",
                                        closed_cb=on_closed, error_cb=on_error)
            except ConfigError as exc:
                self.last_error = str(exc)
                log.error("agent %s: signal routing disabled on this node: %s", self.agent.node_id, exc)
                return
            except BackendUnavailable as exc:  # AuthFailed included: credentials may be rotated back
                self.last_error = str(exc)
                level = logging.ERROR if isinstance(exc, AuthFailed) else logging.WARNING
                delay = backoff.next_delay()
                log.log(level, "agent %s signal router: %s; retrying in %.1fs", self.agent.node_id, exc, delay)
            else:
                if self._closing:  # close() ran while we were connecting: do not leave this one open
                    await _close_nc(nc, 1.0)
                    return
                self._nc = nc
                try:
                    await nc.subscribe(self.subject, cb=self._on_msg)
                    await nc.flush(timeout=2)
                except (nats.errors.Error, TimeoutError) as exc:
                    self.last_error = f"subscribe failed: {exc!r}"
                    log.warning("agent %s signal router: cannot subscribe to %s: %r", self.agent.node_id, self.subject, exc)
                    self._nc = None
                    await _close_nc(nc)
                else:
                    self.last_error = None
                    self._subscribed.set()
                    backoff.reset()
                    log.info("agent %s answers signals on %s", self.agent.node_id, self.subject)
                    # Only a closed client comes back here (nats-py reconnects by itself;
                    # repeated credential refusals close it): then build a new one.
                    await closed.wait()
                    self._subscribed.clear()
                    self._nc = None
                    log.warning("agent %s signal router: NATS connection closed; reconnecting", self.agent.node_id)
            await asyncio.sleep(delay if delay is not None else backoff.next_delay())

    async def _on_msg(self, msg: Msg) -> None:
        try:
            request = json.loads(msg.data)
        except (ValueError, UnicodeDecodeError):
            request = None
        reply = await self.handle(request)
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):  # the sender retries on no reply
                await msg.respond(encode_reply(reply))

    async def handle(self, request: Any) -> dict[str, Any]:
        """Apply one decoded request; return the reply (shape: :mod:`cbctl.core.model.signals`). Counts the result.

        Never raises for a bad request, a lane we do not own, or an unreachable Redis (those are
        replies); a bug in a hook propagates.
        """
        result, reply = await self._handle(request)
        self.agent.metrics.signals_routed.labels(result=result).inc()
        reply.setdefault("node", self.agent.node_id)
        return reply

    async def _handle(self, request: Any) -> tuple[str, dict[str, Any]]:
        agent = self.agent
        if not isinstance(request, dict) or request.get("v") != WIRE_VERSION:
            return "invalid", refusal("invalid", "not a version-1 signal request")
        workflow_id, name, sid = request.get("workflow_id"), request.get("name"), request.get("signal_id")
        payload = request.get("payload")
        if not isinstance(sid, str) or not sid:
            return "invalid", refusal("invalid", "missing signal_id")
        try:
            check_signal(workflow_id, name, payload)
        except BadInput as exc:
            return "invalid", refusal("invalid", str(exc))
        lane = lane_for(workflow_id, agent.ctx.lanes)
        if request.get("lane") not in (None, lane):
            # Sender and receiver disagree on the lane inventory: a config error, not a move.
            return "invalid", refusal("invalid", f"workflow maps to lane {lane} here, not {request.get('lane')} "
                                                  "(lane inventories differ between nodes)")
        token = agent.owned_lanes.get(lane)
        guard = agent.guard
        if token is None or guard is None:
            return "not_owner", refusal("not_owner", f"node {agent.node_id} does not own lane {lane}",
                                         owner=await self._owner_hint(lane))
        flags = agent.flags
        update = signal_update(name, sid, payload)
        try:
            applied = await guard.apply(
                lane, token, flags.get(OWNERSHIP_GUARD, GUARD_OFF), workflow_id, sid, update,
                task_type=SIGNAL_TYPE, canary_lanes=tuple(flags.get(CANARY_LANES, ())),
            )
        except StaleFencingToken as exc:
            return "not_owner", refusal("not_owner", str(exc), owner=await self._owner_hint(lane))
        except ValueError as exc:  # a workflow id the guard refuses (aliases another's keys)
            return "invalid", refusal("invalid", str(exc))
        except BackendUnavailable as exc:
            log.warning("agent %s: signal %s for %s not applied: %s", agent.node_id, sid, workflow_id, exc)
            return "error", refusal("error", str(exc))
        try:
            await agent.notify_applied(AppliedUpdate(
                node_id=agent.node_id, lane=lane, token=token, workflow_id=workflow_id, task_id=sid,
                type=SIGNAL_TYPE, seq=applied.seq, update=update,
                payload=signal_task_payload(name, sid, payload), occurred_at=time.time(),
                already_applied=applied.already_applied, decision=applied.decision, history_id=applied.history_id,
                publish_versions=applied.publish_versions,
            ))
        except CbctlError as exc:
            # Applied but not made durable downstream (e.g. the event outbox failed): no ack, so
            # the sender retries; the retry is a no-op apply that runs the hooks again.
            log.warning("agent %s: signal %s applied (seq %d) but a hook failed: %s", agent.node_id, sid,
                        applied.seq, exc)
            return "error", refusal("error", f"applied as seq {applied.seq} but not acknowledged: {exc}")
        log.info("agent %s applied signal %r (%s) to %s as seq %d%s", agent.node_id, name, sid, workflow_id,
                 applied.seq, " (already applied)" if applied.already_applied else "")
        return ("duplicate" if applied.already_applied else "applied"), {
            "ok": True, "seq": applied.seq, "lane": lane, "token": token, "already_applied": applied.already_applied,
        }

    async def _owner_hint(self, lane: str) -> str | None:
        """Who the store says owns ``lane`` (for the sender's messages); None if unknown."""
        with contextlib.suppress(BackendUnavailable, RuntimeError):  # RuntimeError: agent stopped
            return await lane_owner(self.agent.coordinator, self.agent.ctx.cluster, lane)
        return None


def _signal_handler(inner: TaskHandler) -> TaskHandler:
    """Wrap a lane worker's handler so queued ``signal`` tasks (the local path) write
    :func:`signal_update`, exactly what a routed signal writes; other tasks go to ``inner``."""

    async def handler(task: Task) -> Mapping[str, Any] | None:
        p = task.payload
        if task.type == SIGNAL_TYPE and isinstance(p.get("signal"), str):
            return signal_update(p["signal"], str(p.get("signal_id") or task.task_id), p.get("payload"))
        return await inner(task)

    handler.__wrapped_signals__ = True  # type: ignore[attr-defined]
    return handler


def attach_signals(agent: NodeAgent, *, start: bool = True) -> SignalRouter:
    """Give ``agent`` signal routing: a :class:`SignalRouter` (started now unless ``start=False``)
    that the agent closes in its teardown, and a task handler that applies queued signals like
    routed ones.

    May be called before or after ``await agent.start()`` (inside the event loop): until the
    agent owns lanes, every request is answered ``not_owner`` and the sender retries.  The
    router is closed by the agent's stop hook, after the lane workers stopped and before the
    lease is revoked; an explicit ``await router.close()`` earlier is harmless.
    """
    if not getattr(agent.handler, "__wrapped_signals__", False):
        agent.handler = _signal_handler(agent.handler)
    router = SignalRouter(agent)
    agent.add_lifecycle_hooks(stop=router.close)
    if start:
        router.start()
    return router
