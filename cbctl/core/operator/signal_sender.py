"""The sender of ``cbctl signal send``: deliver a workflow's signal by the route the rollout flags
choose (see docs/agent.md, "Signals"; the contract shared with the agent's router is
:mod:`cbctl.core.model.signals`).

Contract: the route is decided from the rollout document read at the call.  **routed**: a NATS
request to the lane owner's subject; on ``not_owner``, no reply within ``request_timeout`` or no
responders (the owner moved, or our read of the owner key was stale) the owner is read again and
the request retried, with exponential backoff and jitter, up to ``max_attempts`` requests inside
``timeout`` seconds.  **local**: a ``signal`` task appended to the workflow's lane stream, which
the owner's lane worker applies in stream order.  The signal id (a fresh UUID unless given) is
the guard's idempotency key: a retry, or one signal arriving by both routes, is applied once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import nats.errors

from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.backends.nats.connect import close_nats, connect_nats
from cbctl.core.backends.retry import Backoff, BackoffPolicy
from cbctl.core.backends.redis.queue import LaneQueue, lane_for
from cbctl.core.backends.redis.client import redis_client_for
from cbctl.core.model import keys
from cbctl.core.model.config import Context
from cbctl.core.model.errors import BackendUnavailable, BadInput, CbctlError
from cbctl.core.model.flags import ROUTING_OFF, SIGNALS_ROUTING
from cbctl.core.model.records import lane_owner_in
from cbctl.core.model.signals import (
    SIGNAL_TYPE,
    Route,
    check_signal,
    decide_route,
    decode_reply,
    encode_request,
    signal_subject,
    signal_task_payload,
)
from cbctl.core.operator.controlplane import ControlPlane

if TYPE_CHECKING:
    from nats.aio.client import Client
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

__all__ = ["SignalNotDelivered", "SignalResult", "lane_owner", "send_signal", "workflow_exists"]

_ROUTE_BACKOFF = BackoffPolicy(initial=0.05, cap=1.0, jitter=(0.5, 1.5))
"""Pause between routed attempts (the owner is read again after each)."""


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


async def lane_owner(coord: Coordinator, cluster: str, lane: str) -> str | None:
    """The node id in the lane's owner key (:func:`cbctl.core.model.records.lane_owner_in`, the
    reading the agent's router shares); None when the lane is free or the key unreadable.

    Raises ``BackendUnavailable`` when the store cannot be reached.
    """
    kv = await coord.get(keys.lane(cluster, lane))
    return lane_owner_in(kv.value if kv is not None else None)


async def workflow_exists(ctx: Context, workflow_id: str, redis_client: Redis | None = None) -> bool:
    """Whether Redis holds the workflow: its state hash or its history (a workflow that never
    started has neither; a finished one loses both once ``[redis] retention`` expires them).
    Raises ``BackendUnavailable`` when Redis cannot be reached."""
    from redis import exceptions as rexc

    from cbctl.core.backends.redis.keys import LaneKeys

    own = redis_client is None
    client = redis_client if redis_client is not None else redis_client_for(ctx)
    names = LaneKeys(ctx.cluster)
    try:
        return bool(await client.exists(names.workflow(workflow_id), names.history(workflow_id)))
    except rexc.RedisError as exc:
        raise BackendUnavailable(f"redis is unreachable: {exc}", backend="redis") from None
    finally:
        if own:
            await client.aclose()


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
    require_existing: bool = False,
) -> SignalResult:
    """Deliver signal ``name`` (with a JSON-able ``payload``) to ``workflow_id``; see the module doc.

    The route follows the rollout document's flags, read from the store at the call.  ``nc`` /
    ``coord`` / ``redis_client`` may be passed in (not closed here); otherwise they are opened
    from ``ctx`` when the route needs them (NATS only for ``routed``, Redis only for ``local``)
    and closed before returning.  ``signal_id`` defaults to a new UUID; pass the same id to
    retry a send whose outcome is unknown.  ``require_existing`` (``cbctl signal send``): refuse
    (``BadInput``, nothing sent) a workflow Redis does not hold (:func:`workflow_exists`), since
    a signal would otherwise start it at seq 1; read after the route, so an unreachable store
    still says so first.

    Raises ``BadInput`` (empty name, payload not JSON-able, a workflow id the owner refuses),
    ``BackendUnavailable`` (store, NATS or Redis unreachable, credentials refused; exit 4),
    ``SignalNotDelivered`` (routed: no owner applied it within ``timeout`` / ``max_attempts``;
    exit 1).
    """
    check_signal(workflow_id, name, payload)
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
        doc, _revision = await ControlPlane(ctx, coord).read()
        routing = str(doc.flags.get(SIGNALS_ROUTING, ROUTING_OFF))
        if require_existing and not await workflow_exists(ctx, workflow_id, redis_client):
            raise BadInput(f"workflow {workflow_id!r} does not exist in cluster {ctx.cluster} (Redis holds no state or "
                           "history for it: never started, or finished and expired); nothing sent")
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
        # The agent's lane client settings, for a caller that never blocks on a read.
        redis_client = redis_client_for(ctx)
    try:
        queue = LaneQueue(redis_client, ctx.cluster, ctx.lanes)
        try:
            return await queue.enqueue(workflow_id, {
                "task_id": signal_id,
                "type": SIGNAL_TYPE,
                "payload": signal_task_payload(name, signal_id, payload),
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
    body = encode_request(workflow_id, name, payload, sid, lane)
    attempts = 0
    last = "no owner seen yet"
    backoff = Backoff(_ROUTE_BACKOFF)
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
                reply = decode_reply(msg.data)
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
        pause = backoff.next_delay()
        if attempts >= max_attempts or loop.time() + pause >= deadline:
            raise SignalNotDelivered(
                f"signal {name!r} for workflow {workflow_id!r} (lane {lane}, id {sid}) not delivered after "
                f"{attempts} request(s) in {timeout:g}s: {last}",
                attempts=attempts, last_error=last, signal_id=sid,
            )
        await asyncio.sleep(pause)


async def _close_nc(nc: Client, timeout: float = 2.0) -> None:
    # Bounded: a close on a connection that is half gone must not hold the caller
    # (close_nats aborts the socket at the deadline; a plain timeout could be swallowed).
    await close_nats(nc, timeout)
