"""Server-Sent Events: :func:`subscribe_events`, the client behind ``cbctl events tail``
(connect, parse with httpx-sse, resume, reconnect), and :class:`SseParser`, a minimal line parser
kept for the tests and benches that read an agent's stream line by line.

:class:`SseParser` contract: feed lines without their line ending, in order; a blank line
dispatches the message collected so far; comment lines (``:``) come back as comments so a reader
can tell a live-but-idle stream from a dead one. httpx and httpx-sse are imported only when
:func:`subscribe_events` is called, so importing this module stays light.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from cbctl.core.model.errors import BackendUnavailable, BadInput, CbctlError

__all__ = [
    "SseMessage", "SseParser", "StreamEvent", "StreamNotice", "SubscriptionRefused", "subscribe_events",
]


@dataclass(slots=True)
class SseMessage:
    """One dispatched message; ``comment`` is set (and the rest empty) for a comment line."""

    id: str | None = None
    event: str = "message"
    data: str = ""
    comment: str | None = None


@dataclass(slots=True)
class SseParser:
    """Incremental parser: :meth:`feed` one line, get a message when one is complete."""

    _id: str | None = None
    _event: str | None = None
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> SseMessage | None:
        if line == "":
            if self._event is None and not self._data and self._id is None:
                return None
            msg = SseMessage(id=self._id, event=self._event or "message", data="\n".join(self._data))
            self._id, self._event, self._data = None, None, []
            return msg
        if line.startswith(":"):
            return SseMessage(comment=line[1:].strip())
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


RETRY_SECONDS = 1.0
"""Pause between two attempts while refused, after the node ended the stream, or after a break."""


class SubscriptionRefused(CbctlError):
    """The node answered the subscription with an HTTP error (exit 2 for 400/404, else 1)."""

    def __init__(self, node_id: str, status: int, reason: str) -> None:
        super().__init__(f"node {node_id} refused the subscription (HTTP {status}): {reason}")
        self.status = status
        self.reason = reason
        self.exit_code = 2 if status in (400, 404) else 1


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of the stream: the canonical event as a JSON object, and its SSE ``id``."""

    event: dict[str, Any]
    id: str | None = None


@dataclass(frozen=True, slots=True)
class StreamNotice:
    """Something a human should know about the subscription (never an event).

    ``kind``: ``refused`` (HTTP ``status`` 403/503 while following: asking again every
    :data:`RETRY_SECONDS`; reported once per distinct reason), ``ended`` (the node ended the
    stream with ``event: end``; ``reconnecting`` says whether another attempt follows) or
    ``broken`` (the connection failed after the node had answered; following, so reconnecting).
    """

    kind: Literal["refused", "ended", "broken"]
    reason: str
    status: int | None = None
    reconnecting: bool = False


async def subscribe_events(
    node_id: str,
    address: str,
    *,
    subscriber: str,
    workflow: str | None = None,
    after: int | None = None,
    follow: bool = False,
    duration: float | None = None,
    idle: float = 1.0,
    connect_timeout: float = 3.0,
) -> AsyncIterator[StreamEvent | StreamNotice]:
    """Subscribe to the SSE event stream of the agent at ``address`` (``host:port``) and yield
    its events as :class:`StreamEvent`, with :class:`StreamNotice` items in between.  Returns normally when done.

    Without ``follow``: yields what arrives until ``idle`` seconds pass with no event (or the
    node ends the stream: an ``ended`` notice, then return).  With ``follow``: reconnects after
    the node ends the stream or the connection breaks, and keeps asking while the node refuses
    with 403/503 (bridge off/read-only, not a canary subscriber), until ``duration`` elapses or
    the caller stops iterating.  Reconnects resume single-workflow streams with ``after`` = the
    last seq received, so nothing is repeated or skipped.  ``duration`` bounds the whole call.

    Raises ``BackendUnavailable`` when the node cannot be reached before it ever answered, or,
    without ``follow``, when the stream breaks (a clean end is ``event: end``; anything else
    means events may be missing); :class:`SubscriptionRefused` for any other HTTP refusal (and
    403/503 without ``follow``); ``BadInput`` for ``after`` without ``workflow``.
    """
    import asyncio

    import httpx  # here, not at module level: the parser above stays stdlib-only and light
    from httpx_sse import EventSource

    from cbctl.core.backends.retry import Backoff, BackoffPolicy

    if after is not None and workflow is None:
        raise BadInput("after needs a workflow (seqs are per workflow)")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration if duration is not None else None
    path = f"/v1/workflows/{quote(workflow, safe='')}/events" if workflow is not None else "/v1/events"
    url = f"http://{address}{path}"
    last = after
    answered = False  # the node answered at least once: later connection trouble is a break
    refused_reason: str | None = None

    def remaining(*ends: float | None) -> float | None:
        live = [t for t in (deadline, *ends) if t is not None]
        return None if not live else max(0.0, min(live) - loop.time())

    # A constant pause (RETRY_SECONDS, read at call time) through the shared backoff helper.
    backoff = Backoff(BackoffPolicy(initial=RETRY_SECONDS, cap=RETRY_SECONDS, multiplier=1.0))

    async def pause() -> bool:
        """Wait before the next attempt; False if ``duration`` runs out first."""
        t = remaining()
        if t is not None and t <= 0:
            return False
        delay = backoff.next_delay()
        await asyncio.sleep(min(delay, t) if t is not None else delay)
        return True

    async with httpx.AsyncClient(timeout=httpx.Timeout(connect_timeout, read=None), trust_env=False) as client:
        while True:
            params: dict[str, Any] = {"subscriber": subscriber}
            if last is not None and workflow is not None:
                params["after"] = last
            broke: str | None = None
            try:
                async with client.stream("GET", url, params=params) as resp:
                    if resp.status_code != 200:
                        answered = True
                        reason = _refusal_reason(await resp.aread())
                        if not (follow and resp.status_code in (403, 503)):
                            raise SubscriptionRefused(node_id, resp.status_code, reason)
                        # Not eligible yet: a standing subscriber waits for the rollout to reach it.
                        if reason != refused_reason:
                            refused_reason = reason
                            yield StreamNotice("refused", reason, status=resp.status_code, reconnecting=True)
                        if not await pause():
                            return
                        continue
                    answered = True
                    refused_reason = None
                    backoff.reset()
                    # httpx-sse parses the stream (comment lines, which keep it alive, are dropped).
                    messages = EventSource(resp).aiter_sse()
                    idle_deadline = None if follow else loop.time() + idle
                    while True:
                        t = remaining(idle_deadline)
                        if t is not None and t <= 0:
                            return
                        try:
                            msg = await asyncio.wait_for(anext(messages), t)
                        except TimeoutError:
                            return  # idle (without follow) or duration elapsed
                        except StopAsyncIteration:
                            broke = "the node closed the connection without ending the stream"
                            break
                        if msg.event == "end":
                            reason = _end_reason(msg.data)
                            yield StreamNotice("ended", reason, reconnecting=follow)
                            if not follow or not await pause():
                                return
                            break
                        try:
                            ev = json.loads(msg.data)
                        except ValueError as exc:
                            raise BackendUnavailable(f"node {node_id} sent an unreadable event ({exc})",
                                                     backend="agent") from None
                        if workflow is not None and isinstance(ev.get("seq"), int):
                            last = ev["seq"]
                        yield StreamEvent(ev, msg.id or None)  # httpx-sse spells "no id" as ""
                        if not follow:
                            idle_deadline = loop.time() + idle
                    if broke is None:
                        continue  # ended by the node and following: reconnect now
            except httpx.HTTPError as exc:
                if not answered:
                    raise BackendUnavailable(f"node {node_id} at {address} is unreachable: {exc}",
                                             backend="agent") from None
                broke = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not follow:
                raise BackendUnavailable(f"stream from node {node_id} broke ({broke}); events may be missing",
                                         backend="agent")
            yield StreamNotice("broken", broke, reconnecting=True)
            if not await pause():
                return


def _refusal_reason(body: bytes) -> str:
    """The ``reason`` of the agent's JSON error body, else the start of the body as text."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:200]
    if isinstance(obj, dict) and "reason" in obj:
        return str(obj["reason"])
    return body.decode(errors="replace")[:200]


def _end_reason(data: str) -> str:
    try:
        obj = json.loads(data or "{}")
    except ValueError:
        return data[:200] or "no reason given"
    return str(obj.get("reason") or "no reason given") if isinstance(obj, dict) else data[:200]
