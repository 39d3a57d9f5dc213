"""The JetStream side of the publisher: one connection, ``publish_async`` and ack collection.

Contract: :meth:`JetStreamSender._send` makes one attempt per message and answers, per message,
``ok`` / ``duplicate`` (JetStream acknowledged it) or ``None`` (not acknowledged: the caller
retries or buffers it), within ``ack_timeout``, or at once after :meth:`_set_abandon` (a closing
publisher stops waiting for acks a frozen server never sends).  Every message carries its
``Nats-Msg-Id``, so a re-send of a stored message comes back as ``duplicate``.  The stream is
created/verified once per connection.  :class:`~cbctl.core.agent.bus.publisher.Publisher`
subclasses it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from cbctl.core.backends.nats.stream import MSG_ID_HEADER, StreamStatus, ensure_stream
from cbctl.core.model.config import StreamConfig
from cbctl.core.model.metric_names import PUBLISH_STATUS_DUPLICATE, PUBLISH_STATUS_OK

log = logging.getLogger("cbctl.core.agent.bus.publisher")  # one logger for the publisher's story

__all__ = ["JetStreamSender", "NcFactory"]


NcFactory = Callable[[], Awaitable[Client]]

# Errors that mean "this message was not acknowledged": retry, then buffer.
SEND_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.Error,  # includes ConnectionClosed, OutboundBufferLimit, NoResponders, TooManyStalledMsgs, APIError
    OSError,
    asyncio.TimeoutError,
)


class _Wire(Protocol):
    """What :meth:`JetStreamSender._send` needs of a message (OutboxMessage and OutboxRow have it)."""

    @property
    def subject(self) -> str: ...
    @property
    def msg_id(self) -> str: ...
    @property
    def payload(self) -> bytes: ...



class JetStreamSender:
    """One JetStream connection and the wire half of publishing (module doc).

    ``nc_factory`` opens a connection; it is called by :meth:`_connect` whenever there is none or
    the current one is closed for good.  ``max_pending``: nats-py's limit of acks outstanding
    (sized above what the caller can have in flight, so publishing never blocks on it).
    """

    def __init__(self, nc_factory: NcFactory, stream_cfg: StreamConfig, *, cluster: str, ack_timeout: float,
                 max_pending: int) -> None:
        self._nc_factory = nc_factory
        self.stream_cfg = stream_cfg
        self.cluster = cluster
        self.ack_timeout = ack_timeout
        self.max_pending = max_pending
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._stream_verified = False
        self.stream_status: StreamStatus | None = None
        # Set by close() once the grace period is over: stop waiting for acks and retries, put
        # whatever is unsettled in the outbox (a frozen server would otherwise hold the stop).
        self._abandon = asyncio.Event()
        self._abandon_fut: asyncio.Future[None] | None = None  # done once _abandon is set
        self._no_stream = False  # the last send saw "no responders": the stream is missing
        self._last_connect_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def _connect(self) -> None:
        """(Re)open the connection if there is none; verify the stream once per connection."""
        if self._nc is None or self._nc.is_closed:
            self._nc = None
            self._js = None
            self._stream_verified = False
            nc = await self._nc_factory()
            self._nc = nc
            self._js = nc.jetstream(timeout=self.ack_timeout, publish_async_max_pending=self.max_pending)
            self._last_connect_error = None
        if not self._stream_verified and self._nc.is_connected and self._js is not None:
            status = await ensure_stream(self._js, self.stream_cfg, cluster=self.cluster)
            self.stream_status = status
            self._stream_verified = True
            if status.created:
                log.info("created JetStream stream %s", status.name)
            for m in status.mismatches:
                log.warning("JetStream stream %s: %s", status.name, m)

    async def _send(self, msgs: Sequence[_Wire]) -> list[str | None]:
        """One attempt: send every message, wait for all acks; a status or None per message."""
        return await self._collect(await self._start_send(msgs))

    async def _start_send(self, msgs: Sequence[_Wire]) -> list[asyncio.Future[Any] | None]:
        """publish_async every message (None where sending failed at once); no waiting for acks."""
        js = self._js
        if js is None:
            return [None] * len(msgs)
        self._no_stream = False
        futures: list[asyncio.Future[Any] | None] = []
        for m in msgs:
            try:
                # wait_stall stays None: with a timeout nats-py wraps the semaphore wait in a
                # task, which yields to the loop on every message and makes the flusher write
                # one message per syscall (measured: ~5x slower).  The pending limit is sized
                # above what the pipeline can have in flight, so the semaphore never blocks.
                fut = await js.publish_async(m.subject, m.payload, headers={MSG_ID_HEADER: m.msg_id})
            except SEND_ERRORS as exc:
                self._note_send_error(exc)
                futures.append(None)
            else:
                futures.append(fut)
        return futures

    async def _collect(self, futures: Sequence[asyncio.Future[Any] | None]) -> list[str | None]:
        """Wait (at most ``ack_timeout``) for acks: ``ok``/``duplicate``, or None if not acked."""
        live = [f for f in futures if f is not None and not f.done()]
        if live:
            # Acks come back in order on one connection: _wait_or_abandon waits for the last one
            # first (one callback instead of one per message), then for any stragglers.  close()
            # ends the wait early, so a server that never answers cannot hold the stop.
            await self._wait_or_abandon(live, self.ack_timeout)
            for f in live:
                if not f.done():
                    # publish_async futures have no timeout of their own (a message lost with the
                    # connection would wait forever): cancelling releases nats-py's pending slot,
                    # and a late ack is then ignored.
                    f.cancel()
        out: list[str | None] = []
        for fut in futures:
            if fut is None or fut.cancelled():
                out.append(None)
                continue
            exc = fut.exception()
            if exc is not None:
                self._note_send_error(exc)
                out.append(None)
                continue
            out.append(PUBLISH_STATUS_DUPLICATE if getattr(fut.result(), "duplicate", None) else PUBLISH_STATUS_OK)
        return out

    def _set_abandon(self) -> None:
        self._abandon.set()
        if self._abandon_fut is not None and not self._abandon_fut.done():
            self._abandon_fut.set_result(None)

    async def _wait_or_abandon(self, futures: Sequence[asyncio.Future[Any]], timeout: float) -> None:
        """Wait until every one of ``futures`` is done, ``timeout`` passes or close() abandons acks.

        One shared "abandoned" future joins each wait: no extra task on the hot path."""
        if self._abandon_fut is None:
            self._abandon_fut = asyncio.get_running_loop().create_future()
            if self._abandon.is_set():
                self._abandon_fut.set_result(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = [f for f in futures if not f.done()]
        while pending and not self._abandon.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            # Acks come back in order: waiting for the last pending one usually settles all.
            await asyncio.wait([pending[-1], self._abandon_fut], timeout=remaining,
                               return_when=asyncio.FIRST_COMPLETED)
            pending = [f for f in pending if not f.done()]

    def _note_send_error(self, exc: BaseException) -> None:
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            self._no_stream = True
        log.debug("publish attempt failed: %s: %s", type(exc).__name__, exc)
