"""Signal routing: deliver a workflow's signal to the node that owns the workflow's lane.

Route (decided by the sender from the rollout document, flag ``signals.routing``):

* ``all``, or ``canary`` with the workflow's lane (:func:`~cbctl.core.backends.redis.lanes.lane_for`) in
  ``canary.lanes`` -> **routed**: a NATS request to the owner's subject
  ``cb.signals.<cluster>.<node_id>`` (:func:`signal_subject`).  The owner's
  :class:`SignalRouter` applies the signal at once through the fencing guard, with its current
  token for the lane and the guard mode of its flags, and replies with the seq the guard
  assigned.
* ``off``, or ``canary`` with any other lane -> **local**: the signal is appended to the lane
  stream as a task of type ``signal`` (:meth:`~cbctl.core.backends.redis.lanes.LaneQueue.enqueue`); the owner's
  lane worker applies it later, in stream order with the workflow's other tasks.

Both routes write the same thing: a history entry of type ``signal`` whose task id is the
signal id and whose data is :func:`signal_update` (``signal``, ``signal_id``,
``signal_payload``; the same fields land in the workflow state hash).  A signal id is a fresh
UUID per :func:`send_signal` call (or the caller's): it is the guard's idempotency key, so a
retry after a lost reply, or the same signal arriving by both the queue and a request, is
applied once and reports the seq of the first apply (``result == "duplicate"``).

Ownership moves (the sender's view of the owner is a read of the lane's owner key, which can be
stale by the time the request arrives): the receiver replies ``not_owner`` when the lane is not
in its ``owned_lanes`` or the guard fenced its token off; the sender also treats "no reply
within ``request_timeout``" and "no responders" as a move.  In each case it re-reads the owner
from the coordination store and retries, with exponential backoff and jitter, up to
``max_attempts`` requests inside ``timeout`` seconds.

Wire format (UTF-8 JSON).  Request: ``{"v": 1, "workflow_id", "name", "payload", "signal_id",
"lane"}``.  Reply: ``{"ok": true, "seq", "node", "lane", "token", "already_applied"}`` or
``{"ok": false, "error": "not_owner" | "invalid" | "error", "message", "node", "owner"?}``
(``owner``: the owner key's node as the receiver read it, for messages only).

Metrics (receiver side, the agent's registry): ``signals_routed_total{result}`` with
``applied``, ``duplicate``, ``not_owner``, ``invalid``, ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import nats.errors

from cbctl.core.model import keys
from cbctl.core.agent.hooks import AppliedUpdate
from cbctl.core.agent.node import NodeAgent
from cbctl.core.backends.nats.connect import close_nats, connect_nats
from cbctl.core.model.config import Context
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, CbctlError, ConfigError, StaleFencingToken
from cbctl.core.backends.redis.lanes import LaneQueue, Task, lane_for
from cbctl.core.model.flags import CANARY_LANES, OWNERSHIP_GUARD, SIGNALS_ROUTING

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from redis.asyncio import Redis

    from cbctl.core.agent.hooks import TaskHandler

log = logging.getLogger(__name__)

__all__ = [
    "SIGNAL_TYPE",
    "SignalNotDelivered",
    "SignalResult",
    "SignalRouter",
    "attach_signals",
    "decide_route",
    "lane_owner",
    "send_signal",
    "signal_subject",
    "signal_update",
]

SIGNAL_TYPE = "signal"
"""Task / history entry type of a signal (both routes)."""

ROUTER_RESULTS = ("applied", "duplicate", "not_owner", "invalid", "error")
"""Values of the ``result`` label of ``signals_routed_total``."""

Route = Literal["routed", "local"]
_WIRE_VERSION = 1
_MAX_NAME = 256


class SignalNotDelivered(CbctlError):
    """No owner applied the signal within the timeout / attempts (exit 1; nothing applied
    as far as the sender knows — a late apply of the same signal id is still idempotent)."""

    exit_code = 1

    def __init__(self, message: str, *, attempts: int, last_error: str, signal_id: str) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error
        self.signal_id = signal_id


@dataclass(frozen=True, slots=True)
class SignalResult:
    """What :func:`send_signal` did.

    ``route``: ``routed`` (applied by ``node`` with ``seq``) or ``local`` (queued on the lane
    stream as ``entry_id``; ``node``/``seq`` are None: the owner's worker assigns the seq when it
    applies the task).  ``result``: ``applied``, ``duplicate`` (this signal id had been applied
    before; ``seq`` is that apply's) or ``queued``.  ``attempts``: requests sent (routed), 1
    (local).
    """

    route: Route
    node: str | None
    seq: int | None
    attempts: int
    result: Literal["applied", "duplicate", "queued"]
    workflow_id: str
    name: str
    signal_id: str
    lane: str
    routing: str
    entry_id: str | None = None

    def public(self) -> dict[str, Any]:
        """JSON-ready dict (``cbctl signal send -o json``)."""
        return asdict(self)


# -- shared helpers ---------------------------------------------------------------------------


def signal_subject(cluster: str, node_id: str) -> str:
    """The NATS subject a node's :class:`SignalRouter` answers on."""
    return f"cb.signals.{cluster}.{node_id}"


def signal_update(name: str, signal_id: str, payload: Any) -> dict[str, Any]:
    """The guarded update a signal writes (history ``data`` and workflow state fields)."""
    return {"signal": name, "signal_id": signal_id, "signal_payload": payload}


def decide_route(flags: Mapping[str, Any], lane: str) -> Route:
    """``routed`` under ``signals.routing=all`` or ``canary`` with ``lane`` in ``canary.lanes``;
    ``local`` otherwise (``off``, a non-canary lane, an unknown value)."""
    routing = flags.get(SIGNALS_ROUTING, "off")
    if routing == "all":
        return "routed"
    if routing == "canary" and lane in tuple(flags.get(CANARY_LANES, ())):
        return "routed"
    return "local"


async def lane_owner(coord: Coordinator, cluster: str, lane: str) -> str | None:
    """The node id in the lane's owner key, or None when the lane is free (or the key unreadable).

    Raises ``BackendUnavailable`` when the store cannot be reached.
    """
    kv = await coord.get(keys.lane(cluster, lane))
    if kv is None:
        return None
    try:
        body = kv.json()
    except ValueError:
        return None
    owner = body.get("owner") if isinstance(body, dict) else None
    return owner if isinstance(owner, str) and owner else None


def _check_signal(workflow_id: str, name: str, payload: Any) -> str:
    """Validate what the caller gave; return the payload as compact JSON. ``BadInput`` if bad."""
    if not isinstance(workflow_id, str) or not workflow_id:
        raise BadInput("signal: the workflow id is empty")
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME:
        raise BadInput(f"signal name {name!r}: must be non-empty and at most {_MAX_NAME} characters")
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"signal payload is not JSON-serializable: {exc}") from None


# -- sender -----------------------------------------------------------------------------------


async def send_signal(
    ctx: Context,
    workflow_id: str,
    name: str,
    payload: Any = None,
    *,
    nc: Client | None = None,
    coord: Coordinator | None = None,
    redis_client: Redis | None = None,
    timeout: float = 10.0,
    request_timeout: float = 2.0,
    max_attempts: int = 8,
    signal_id: str | None = None,
) -> SignalResult:
    """Deliver signal ``name`` (with a JSON-able ``payload``) to ``workflow_id``; see the module doc.

    The route follows the rollout document's flags, read from the store at the call.  ``nc`` /
    ``coord`` / ``redis_client`` may be passed in (not closed here); otherwise they are opened
    from ``ctx`` when the route needs them (NATS only for ``routed``, Redis only for ``local``)
    and closed before returning.  ``signal_id`` defaults to a new UUID; pass the same id to
    retry a send whose outcome is unknown.

    Raises ``BadInput`` (empty name, payload not JSON-able, a workflow id the owner refuses),
    ``BackendUnavailable`` (store, NATS or Redis unreachable, credentials refused; exit 4),
    ``SignalNotDelivered`` (routed: no owner applied it within ``timeout`` / ``max_attempts``;
    exit 1).
    """
    _check_signal(workflow_id, name, payload)
    if timeout <= 0 or request_timeout <= 0 or max_attempts < 1:
        raise BadInput("signal: timeout and request timeout must be > 0 and max attempts >= 1")
    sid = signal_id or uuid.uuid4().hex
    lane = lane_for(workflow_id, ctx.lanes)
    own_coord = coord is None
    if coord is None:
        from cbctl.core.backends.coord import make_coordinator

        coord = make_coordinator(ctx)
    try:
        if own_coord:
            await coord.connect()
        from cbctl.core.operator.controlplane import ControlPlane

        doc, _revision = await ControlPlane(ctx, coord).read()
        routing = str(doc.flags.get(SIGNALS_ROUTING, "off"))
        if decide_route(doc.flags, lane) == "local":
            entry_id = await _enqueue_local(ctx, workflow_id, name, sid, payload, redis_client)
            return SignalResult(route="local", node=None, seq=None, attempts=1, result="queued",
                                workflow_id=workflow_id, name=name, signal_id=sid, lane=lane, routing=routing,
                                entry_id=entry_id)
        own_nc = nc is None
        if nc is None:
            nc = await connect_nats(ctx.nats, name="cbctl-signal", reconnect=False)
        try:
            return await _route(ctx, coord, nc, workflow_id, name, payload, sid, lane, routing,
                                timeout=timeout, request_timeout=request_timeout, max_attempts=max_attempts)
        finally:
            if own_nc:
                await _close_nc(nc)
    finally:
        if own_coord:
            await coord.close()


async def _enqueue_local(ctx: Context, workflow_id: str, name: str, signal_id: str, payload: Any,
                         redis_client: Redis | None) -> str:
    """The local path: a ``signal`` task on the workflow's lane stream; returns the entry id."""
    own = redis_client is None
    if redis_client is None:
        from cbctl.core.agent.node import redis_client_for

        redis_client = redis_client_for(ctx, 0)
    try:
        queue = LaneQueue(redis_client, ctx.cluster, ctx.lanes)
        try:
            return await queue.enqueue(workflow_id, {
                "task_id": signal_id,
                "type": SIGNAL_TYPE,
                "payload": {"signal": name, "signal_id": signal_id, "payload": payload},
            })
        except ValueError as exc:  # the workflow id aliases another workflow's keys
            raise BadInput(f"signal for workflow {workflow_id!r}: {exc}") from None
    finally:
        if own:
            await redis_client.aclose()


async def _route(
    ctx: Context, coord: Coordinator, nc: Client, workflow_id: str, name: str, payload: Any, sid: str,
    lane: str, routing: str, *, timeout: float, request_timeout: float, max_attempts: int,
) -> SignalResult:
    """Request/reply to the lane owner, re-reading the owner and retrying on a move."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body = json.dumps({"v": _WIRE_VERSION, "workflow_id": workflow_id, "name": name, "payload": payload,
                       "signal_id": sid, "lane": lane}, separators=(",", ":"), ensure_ascii=False).encode()
    attempts = 0
    last = "no owner seen yet"
    backoff = 0.05
    while True:
        # Module-global lookup on purpose (tests interpose here to move a lane mid-flight).
        owner = await lane_owner(coord, ctx.cluster, lane)
        if owner is None:
            last = f"lane {lane} has no owner"
        else:
            attempts += 1
            wait = max(0.05, min(request_timeout, deadline - loop.time()))
            try:
                msg = await nc.request(signal_subject(ctx.cluster, owner), body, timeout=wait)
            except nats.errors.NoRespondersError:
                last = f"node {owner} does not answer on its signal subject (stopped, or its router is not connected)"
            except nats.errors.TimeoutError:
                last = f"no reply from node {owner} within {wait:.2g}s"
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
                    nats.errors.StaleConnectionError) as exc:
                raise BackendUnavailable(f"NATS connection lost while routing signal {sid}: {exc!r}",
                                         backend="nats") from None
            else:
                reply = _decode_reply(msg.data)
                if reply.get("ok") is True and isinstance(reply.get("seq"), int):
                    return SignalResult(
                        route="routed", node=str(reply.get("node") or owner), seq=reply["seq"], attempts=attempts,
                        result="duplicate" if reply.get("already_applied") else "applied",
                        workflow_id=workflow_id, name=name, signal_id=sid, lane=lane, routing=routing,
                    )
                error = str(reply.get("error") or "error")
                message = str(reply.get("message") or "")
                if error == "invalid":
                    raise BadInput(f"node {owner} refused signal {name!r} for workflow {workflow_id!r}: {message}")
                last = f"node {owner}: {error}" + (f" ({message})" if message else "")
            log.info("signal %s for %s attempt %d: %s", sid, workflow_id, attempts, last)
        pause = backoff * random.uniform(0.5, 1.5)
        if attempts >= max_attempts or loop.time() + pause >= deadline:
            raise SignalNotDelivered(
                f"signal {name!r} for workflow {workflow_id!r} (lane {lane}, id {sid}) not delivered after "
                f"{attempts} request(s) in {timeout:g}s: {last}",
                attempts=attempts, last_error=last, signal_id=sid,
            )
        await asyncio.sleep(pause)
        backoff = min(backoff * 2, 1.0)


def _decode_reply(data: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {"ok": False, "error": "error", "message": f"unreadable reply {data[:80]!r}"}
    return reply if isinstance(reply, dict) else {"ok": False, "error": "error", "message": "reply is not an object"}


async def _close_nc(nc: Client, timeout: float = 2.0) -> None:
    # Bounded: a close on a connection that is half gone must not hold the caller
    # (close_nats aborts the socket at the deadline; a plain timeout could be swallowed).
    await close_nats(nc, timeout)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Done callback: read a background step's outcome so it is never "never retrieved"."""
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("signal router: %r", fut.exception())


# -- receiver ---------------------------------------------------------------------------------


class SignalRouter:
    """Answers routed signals for one :class:`~cbctl.core.agent.node.NodeAgent` (see the module doc).

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
        backoff = self._min_backoff
        while not self._closing:
            closed = asyncio.Event()

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
                log.log(level, "agent %s signal router: %s; retrying in %.1fs", self.agent.node_id, exc, backoff)
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
                    backoff = self._min_backoff
                    log.info("agent %s answers signals on %s", self.agent.node_id, self.subject)
                    # Only a closed client comes back here (nats-py reconnects by itself;
                    # repeated credential refusals close it): then build a new one.
                    await closed.wait()
                    self._subscribed.clear()
                    self._nc = None
                    log.warning("agent %s signal router: NATS connection closed; reconnecting", self.agent.node_id)
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self._max_backoff)

    async def _on_msg(self, msg: Msg) -> None:
        try:
            request = json.loads(msg.data)
        except (ValueError, UnicodeDecodeError):
            request = None
        reply = await self.handle(request)
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):  # the sender retries on no reply
                await msg.respond(json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode())

    async def handle(self, request: Any) -> dict[str, Any]:
        """Apply one decoded request; return the reply (see the module doc). Counts the result.

        Never raises for a bad request, a lane we do not own, or an unreachable Redis (those are
        replies); a bug in a hook propagates.
        """
        result, reply = await self._handle(request)
        self.agent.metrics.signals_routed.labels(result=result).inc()
        reply.setdefault("node", self.agent.node_id)
        return reply

    async def _handle(self, request: Any) -> tuple[str, dict[str, Any]]:
        agent = self.agent
        if not isinstance(request, dict) or request.get("v") != _WIRE_VERSION:
            return "invalid", _refusal("invalid", "not a version-1 signal request")
        workflow_id, name, sid = request.get("workflow_id"), request.get("name"), request.get("signal_id")
        payload = request.get("payload")
        if not isinstance(sid, str) or not sid:
            return "invalid", _refusal("invalid", "missing signal_id")
        try:
            _check_signal(workflow_id, name, payload)
        except BadInput as exc:
            return "invalid", _refusal("invalid", str(exc))
        lane = lane_for(workflow_id, agent.ctx.lanes)
        if request.get("lane") not in (None, lane):
            # Sender and receiver disagree on the lane inventory: a config error, not a move.
            return "invalid", _refusal("invalid", f"workflow maps to lane {lane} here, not {request.get('lane')} "
                                                  "(lane inventories differ between nodes)")
        token = agent.owned_lanes.get(lane)
        guard = agent.guard
        if token is None or guard is None:
            return "not_owner", _refusal("not_owner", f"node {agent.node_id} does not own lane {lane}",
                                         owner=await self._owner_hint(lane))
        flags = agent.flags
        update = signal_update(name, sid, payload)
        try:
            applied = await guard.apply(
                lane, token, flags.get(OWNERSHIP_GUARD, "off"), workflow_id, sid, update,
                task_type=SIGNAL_TYPE, canary_lanes=tuple(flags.get(CANARY_LANES, ())),
            )
        except StaleFencingToken as exc:
            return "not_owner", _refusal("not_owner", str(exc), owner=await self._owner_hint(lane))
        except ValueError as exc:  # a workflow id the guard refuses (aliases another's keys)
            return "invalid", _refusal("invalid", str(exc))
        except BackendUnavailable as exc:
            log.warning("agent %s: signal %s for %s not applied: %s", agent.node_id, sid, workflow_id, exc)
            return "error", _refusal("error", str(exc))
        try:
            await agent.notify_applied(AppliedUpdate(
                node_id=agent.node_id, lane=lane, token=token, workflow_id=workflow_id, task_id=sid,
                type=SIGNAL_TYPE, seq=applied.seq, update=update,
                payload={"signal": name, "signal_id": sid, "payload": payload}, occurred_at=time.time(),
                already_applied=applied.already_applied, decision=applied.decision, history_id=applied.history_id,
                publish_versions=applied.publish_versions,
            ))
        except CbctlError as exc:
            # Applied but not made durable downstream (e.g. the event outbox failed): no ack, so
            # the sender retries; the retry is a no-op apply that runs the hooks again.
            log.warning("agent %s: signal %s applied (seq %d) but a hook failed: %s", agent.node_id, sid,
                        applied.seq, exc)
            return "error", _refusal("error", f"applied as seq {applied.seq} but not acknowledged: {exc}")
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


def _refusal(error: str, message: str, *, owner: str | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": False, "error": error, "message": message}
    if owner is not None:
        reply["owner"] = owner
    return reply


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
