"""The event bus's SSE endpoints on the agent's HTTP server (docs/event-bus.md, "SSE endpoints").

``GET /v1/workflows/{id}/events?subscriber=NAME&after=SEQ``, ``GET /v1/events?subscriber=NAME``
and ``GET /v1/bus`` (status JSON).  Contract: one SSE message per update (``id: seq``,
``event: type``, ``data:`` the canonical event in the pinned ``consumers.schema_version``);
per workflow strictly increasing seqs with no gap and no repeat across an ``after`` replay;
the source (``stream.source``) is decided when the request arrives; refusals are plain HTTP
answers with a JSON body before the stream starts; a stream whose answer a flag change altered
ends with ``event: end`` and a JSON ``reason`` (the client reconnects with ``after``).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from cbctl.core.agent.bus.gap_fill import history_events
from cbctl.core.agent.bus.local_stream import LocalStream, LocalSubscription
from cbctl.core.agent.bus.subscription import SubscriberLagged, Subscription
from cbctl.core.model.errors import BackendUnavailable
from cbctl.core.model.events import Event, encode_event
from cbctl.core.model.flags import BRIDGE_CANARY, BRIDGE_OFF, BRIDGE_READ_ONLY, SOURCE_CANONICAL, SOURCE_LOCAL

if TYPE_CHECKING:
    from cbctl.core.agent.bus.bridge import Bridge
    from cbctl.core.backends.redis.guard import LaneGuard

__all__ = ["BusView", "SseServer", "sse_message"]


def sse_message(ev: Event, schema_version: int) -> bytes:
    """One SSE message for ``ev``: ``id: seq``, ``event: type``, ``data: canonical JSON``.

    The JSON never contains a raw newline (the encoder escapes them), so one ``data:`` line holds
    it; the type is a single line by construction of the id rules but is sanitised anyway.
    """
    etype = ev.type.replace("\r", " ").replace("\n", " ")
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (ev.seq, etype.encode(), encode_event(ev, schema_version))


def _end_message(reason: str, **extra: Any) -> bytes:
    return b"event: end\ndata: " + json.dumps({"reason": reason, **extra}).encode() + b"\n\n"


class _Stream:
    """One open SSE response; ``interrupt()`` ends its current subscription so it re-evaluates."""

    def __init__(self) -> None:
        self.sub: Subscription | LocalSubscription | None = None
        self.interrupted = asyncio.Event()

    def interrupt(self) -> None:
        self.interrupted.set()
        if self.sub is not None:
            self.sub.close()


class BusView(Protocol):
    """What the SSE endpoints read of the bus (:class:`~cbctl.core.agent.bus.attach.AgentBus`)."""

    @property
    def node_id(self) -> str: ...
    @property
    def bridge(self) -> Bridge | None: ...
    @property
    def local(self) -> LocalStream: ...
    @property
    def source(self) -> str: ...
    @property
    def bridge_mode(self) -> str: ...
    @property
    def canary(self) -> frozenset[str]: ...
    @property
    def consumer_version(self) -> int: ...
    @property
    def closing(self) -> bool: ...
    @property
    def guard(self) -> LaneGuard | None: ...
    @property
    def bridge_ready(self) -> asyncio.Event: ...

    def status(self) -> dict[str, Any]: ...


class SseServer:
    """The SSE handlers of one bus.  ``keepalive``: seconds of silence before a comment line;
    ``replay_page``: Redis history entries per request in a ``local`` replay."""

    def __init__(self, bus: BusView, *, keepalive: float, replay_page: int) -> None:
        self.bus = bus
        self.keepalive = keepalive
        self.replay_page = replay_page
        self._streams: set[_Stream] = set()
        self._http_down = False  # the HTTP server is shutting down: end streams, accept none

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/workflows/{workflow_id}/events", self._sse_workflow),
            web.get("/v1/events", self._sse_all),
            web.get("/v1/bus", self._status),
        ]

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def interrupt_all(self) -> None:
        """Every open stream re-evaluates its answer (it ends if the answer changed)."""
        for s in list(self._streams):
            s.interrupt()

    def interrupt_canonical(self) -> None:
        """Streams reading the bridge re-evaluate (the bridge is going away)."""
        for s in list(self._streams):
            if s.sub is not None and isinstance(s.sub, Subscription):
                s.interrupt()

    async def on_http_shutdown(self, app: web.Application) -> None:
        self._http_down = True
        self.interrupt_all()

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.bus.status())

    async def _sse_workflow(self, request: web.Request) -> web.StreamResponse:
        return await self._sse(request, request.match_info["workflow_id"])

    async def _sse_all(self, request: web.Request) -> web.StreamResponse:
        return await self._sse(request, None)

    def _refusal(self, name: str) -> tuple[int, str] | None:
        """Why a canonical subscriber gets nothing under the current flags (None: it gets events)."""
        mode = self.bus.bridge_mode
        if mode == BRIDGE_OFF:
            return 503, "eventbus.bridge is off: no canonical stream on this node"
        if mode == BRIDGE_READ_ONLY:
            return 403, "eventbus.bridge is read-only: events are verified but delivered to nobody"
        if mode == BRIDGE_CANARY and name not in self.bus.canary:
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
        if self.bus.closing or self._http_down:
            return _json_error(503, "the agent is stopping")
        source = self.bus.source
        if source == SOURCE_CANONICAL:
            refused = self._refusal(name)
            if refused is not None:
                return _json_error(refused[0], refused[1], source=source, bridge=self.bus.bridge_mode)
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            "X-Cbctl-Source": source, "X-Cbctl-Node": self.bus.node_id,
        })
        await resp.prepare(request)
        await resp.write(f": cbctl node={self.bus.node_id} source={source} subscriber={name}\n\n".encode())
        stream = _Stream()
        self._streams.add(stream)
        try:
            if source == SOURCE_CANONICAL:
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
        if self.bus.closing or self._http_down:
            return "the agent is stopping"
        if self.bus.source != source:
            return f"stream.source changed to {self.bus.source}; reconnect"
        if source == SOURCE_CANONICAL:
            refused = self._refusal(name)
            if refused is not None:
                return refused[1]
        return None

    async def _pump_canonical(self, resp: web.StreamResponse, stream: _Stream, workflow_id: str | None,
                              name: str, after: int | None) -> None:
        last = after
        while True:
            stream.interrupted.clear()
            if self.bus.bridge is None:
                # NATS not reachable yet: wait for the bridge, keeping the connection alive.
                wait = asyncio.ensure_future(self.bus.bridge_ready.wait())
                intr = asyncio.ensure_future(stream.interrupted.wait())
                try:
                    done, _ = await asyncio.wait({wait, intr}, timeout=self.keepalive,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wait.cancel()
                    intr.cancel()
                if not done:
                    await resp.write(b": waiting for the event bus\n\n")
                reason = await self._end_reason(SOURCE_CANONICAL, name)
                if reason is not None:
                    await resp.write(_end_message(reason))
                    return
                continue
            bridge = self.bus.bridge
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
            reason = await self._end_reason(SOURCE_CANONICAL, name)
            if reason is not None:
                await resp.write(_end_message(reason, last_seq=last))
                return

    async def _pump_local(self, resp: web.StreamResponse, stream: _Stream, workflow_id: str | None,
                          after: int | None) -> None:
        sub = self.bus.local.subscribe(workflow_id)  # first, so nothing falls between replay and live
        stream.sub = sub
        version = self.bus.consumer_version
        last = after
        guard = self.bus.guard
        if workflow_id is not None and after is not None and guard is not None:
            async for ev in history_events(guard, workflow_id, after, self.replay_page):
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
                await resp.write(sse_message(ev, self.bus.consumer_version))
                if workflow_id is not None:
                    last = ev.seq
        except StopAsyncIteration:
            reason = await self._end_reason(SOURCE_LOCAL, "") or "interrupted; reconnect"
            await resp.write(_end_message(reason, last_seq=last))
        except SubscriberLagged:
            await resp.write(_end_message("lagged", last_seq=last))


def _json_error(status: int, reason: str, **extra: Any) -> web.Response:
    error = {400: "bad request", 403: "not allowed", 503: "unavailable"}.get(status, "error")
    return web.json_response({"error": error, "reason": reason, **extra}, status=status)

