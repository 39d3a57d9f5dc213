"""Publisher of canonical events to JetStream, with a durable outbox for degraded mode.

Contract of :meth:`Publisher.publish`: it returns only once every message of the event (one per
published schema version) is acknowledged by JetStream (``ok`` / ``duplicate``) or committed and
fsync'd in the outbox (``buffered``); with ``eventbus.publish = off`` it returns ``off`` at once.
Otherwise it raises :class:`PublishFailed` and the caller must not acknowledge its task.  While
the outbox holds anything every new event goes behind it (per-workflow order holds), and a
background task drains it oldest first.  ``event_bus_publish_total{status}`` counts per message.
All SQLite calls run on one dedicated thread.  The pipeline, degraded mode and metrics are
described in docs/event-bus.md ("Publisher").
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from cbctl.core.agent.bus.jetstream_sender import JetStreamSender, NcFactory
from cbctl.core.agent.bus.outbox import Outbox, OutboxMessage
from cbctl.core.backends.nats.connect import close_nats
from cbctl.core.backends.retry import Backoff, BackoffPolicy
from cbctl.core.model.config import StreamConfig
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, CbctlError, CheckFailed
from cbctl.core.model.events import SUPPORTED_SCHEMA_VERSIONS, Event, encode_event, msg_id, subject
from cbctl.core.model.flags import EVENTBUS_PUBLISH, PUBLISH_OFF, PUBLISH_VALUES
from cbctl.core.model.metric_names import (
    PUBLISH_STATUS_BUFFERED,
    PUBLISH_STATUS_DUPLICATE,
    PUBLISH_STATUS_ERROR,
    PUBLISH_STATUS_OK,
    PUBLISH_STATUSES,
)
from cbctl.core.model.metrics import AgentMetrics

log = logging.getLogger(__name__)

PublishStatus = Literal["off", "ok", "duplicate", "buffered"]
T = TypeVar("T")


class PublishFailed(CbctlError):
    """An event was neither acknowledged by JetStream nor committed to the outbox."""

    exit_code = 4


@dataclass(slots=True)
class _Pending:
    """Events handed over by one caller (one ``publish`` call or one chunk of ``publish_many``)."""

    messages: list[OutboxMessage]  # every message of every event, event by event
    owners: list[int]  # for each message, the index of its event in this pending
    n_events: int
    future: asyncio.Future[list[PublishStatus]]


@dataclass(slots=True)
class _Batch:
    """What the sender hands to the ack stage: pendings, their messages, the ack futures."""

    pendings: list[_Pending]
    messages: list[OutboxMessage]
    acks: list[asyncio.Future[Any] | None] | None  # None: not sent (degraded when taken)


def _event_status(statuses: list[str | None]) -> PublishStatus:
    """One event's status from its messages' (one per schema version)."""
    if PUBLISH_STATUS_BUFFERED in statuses:
        return PUBLISH_STATUS_BUFFERED
    if statuses and all(st == PUBLISH_STATUS_DUPLICATE for st in statuses):
        return PUBLISH_STATUS_DUPLICATE
    return PUBLISH_STATUS_OK


class Publisher(JetStreamSender):
    """Publishes canonical events; see the module docstring for the contract."""

    def __init__(
        self,
        nc_factory: NcFactory,
        stream_cfg: StreamConfig,
        outbox: Outbox,
        metrics: AgentMetrics,
        node_id: str,
        *,
        cluster: str,
        publish_mode: str = PUBLISH_OFF,
        schema_versions: Sequence[int] = (1,),
        retries: int = 3,
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
        ack_timeout: float = 2.0,
        batch_max: int = 1000,
        max_inflight: int = 4,
        drain_batch: int = 1000,
        reconnect_min: float = 0.25,
        reconnect_max: float = 5.0,
        poll_interval: float = 0.1,
    ) -> None:
        """``nc_factory`` opens a connection (typically ``lambda: connect_nats(cfg, name=...)``);
        it is called at start and again whenever the current connection is closed for good.
        The publisher closes connections it opened; it never closes ``outbox`` (the owner does).
        ``cluster``: events go to ``cb.<cluster>.events.v<N>.<workflow>`` (one subject space and
        one stream per cluster, :func:`cbctl.core.model.events.subject`).
        """
        # The pending limit covers everything the pipeline and the drain can have in flight.
        super().__init__(nc_factory, stream_cfg, cluster=cluster, ack_timeout=ack_timeout,
                         max_pending=(max_inflight + 2) * batch_max + drain_batch)
        self.outbox = outbox
        self.metrics = metrics
        self.node_id = node_id
        self.retries = retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        # Equal jitter: at least half the base, so retries of many agents spread out but never
        # collapse to zero delay.
        self.retry_policy = BackoffPolicy(backoff_initial, backoff_max, jitter=(0.5, 1.0))
        self.batch_max = batch_max
        self.max_inflight = max_inflight
        self.drain_batch = drain_batch
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.poll_interval = poll_interval
        self._mode: str = PUBLISH_OFF
        self._versions: tuple[int, ...] = (1,)
        self.apply_flags(publish_mode, schema_versions)

        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._inflight: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=max_inflight)
        self._degraded = False
        self._state_lock = asyncio.Lock()  # held while deciding "outbox or not" and while clearing degraded
        self._wake = asyncio.Event()
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbctl-outbox")
        self._worker: asyncio.Task[None] | None = None  # the sender
        self._acker: asyncio.Task[None] | None = None
        self._settling: _Batch | None = None  # the batch the ack stage is working on
        self._unsent = 0  # batches queued for the ack stage without having been sent
        self._maintainer: asyncio.Task[None] | None = None
        # Label children resolved once: labels() costs more than the increment itself.
        self._count = {status: metrics.publish.labels(status=status) for status in PUBLISH_STATUSES}
        self._closing = False
        self.outbox_busy = False  # after close(): an outbox write was still running on its thread

    # ------------------------------------------------------------------ flags & state

    def apply_flags(self, publish_mode: str, schema_versions: Sequence[int]) -> None:
        """Apply ``eventbus.publish`` and ``eventbus.schema_versions``; takes effect for events
        passed to :meth:`publish` from now on.  Raises ``BadInput`` for unknown values."""
        if publish_mode not in PUBLISH_VALUES:
            raise BadInput(f"{EVENTBUS_PUBLISH}: unknown mode {publish_mode!r} (allowed: {', '.join(PUBLISH_VALUES)})")
        versions = tuple(dict.fromkeys(schema_versions))  # de-duplicated, order kept
        if not versions:
            raise BadInput("eventbus.schema_versions: at least one version is required")
        for v in versions:
            if v not in SUPPORTED_SCHEMA_VERSIONS or isinstance(v, bool):
                raise BadInput(f"eventbus.schema_versions: unsupported version {v!r} "
                               f"(supported: {list(SUPPORTED_SCHEMA_VERSIONS)})")
        self._mode = publish_mode
        self._versions = versions

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def schema_versions(self) -> tuple[int, ...]:
        return self._versions

    @property
    def degraded(self) -> bool:
        """True while events go to the outbox."""
        return self._degraded

    @property
    def outbox_depth(self) -> int:
        return self.outbox.depth

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, create/verify the stream, start the worker and the drain task.

        A non-empty outbox starts the publisher degraded.  An unreachable bus is not an error
        (events will be buffered and a background task keeps trying); refused credentials are:
        ``AuthFailed`` propagates.
        """
        if self._worker is not None:
            return
        self._set_depth()
        if self.outbox.depth:
            log.warning("event outbox %s holds %d message(s) from a previous run: draining before new events",
                        self.outbox.path, self.outbox.depth)
            self._enter_degraded("outbox not empty at start")
        try:
            await self._connect()
        except AuthFailed:
            raise
        except BackendUnavailable as exc:
            log.warning("event bus unreachable at start (%s); events will be buffered until it is back", exc)
        self._worker = asyncio.create_task(self._send_loop(), name="cbctl-publisher-send")
        self._acker = asyncio.create_task(self._ack_loop(), name="cbctl-publisher-ack")
        for task in (self._worker, self._acker):
            task.add_done_callback(self._worker_done)
        self._maintainer = asyncio.create_task(self._maintain(), name="cbctl-publisher-drain")

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting events and stop everything within ``timeout`` seconds; never raises.

        1. Grace (``0.3 * timeout``): what is queued or in flight settles normally (acks that
           are on their way arrive; a healthy server answers in milliseconds).
        2. Then the ack stage stops waiting for acks and retries: every message not acked yet
           is committed to the outbox and its caller answered ``buffered``.  A message that
           JetStream did store but whose ack never came is published again from the outbox
           after the restart, with the same ``Nats-Msg-Id``: JetStream's duplicate window and
           the bridge's de-duplication drop the copy.  This is what keeps a frozen NATS (the
           socket open, no ack ever) from holding the stop: without it, each batch waited
           ``ack_timeout`` once plus ``retries`` more times (about 8 s by default).
        3. Anything still unanswered at ``0.75 * timeout`` (the outbox write itself hung) fails
           with :class:`PublishFailed`: its caller does not ack the task, which is delivered
           again after the restart, so nothing is lost either way.
        4. The connection is closed within what is left (a client that does not finish is
           abandoned and its socket aborted, :func:`~cbctl.core.backends.nats.connect.close_nats`), and
           the outbox thread is waited for, so the owner can close the outbox safely.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.1, timeout)
        self._closing = True
        if self._worker is not None and not self._worker.done():
            settled = asyncio.ensure_future(self._settled())
            try:
                done, _ = await asyncio.wait({settled}, timeout=0.3 * timeout)
                if not done:
                    log.warning("publisher close: events unacknowledged after %.1fs; committing them to the "
                                "outbox %s instead of waiting for acks", 0.3 * timeout, self.outbox.path)
                    self._set_abandon()
                    done, _ = await asyncio.wait({settled}, timeout=max(0.0, deadline - 0.25 * timeout - loop.time()))
                if not done:
                    log.error("publisher close: events neither acknowledged nor buffered after %.1fs; their "
                              "tasks are not acked and will be delivered again", timeout * 0.75)
            finally:
                settled.cancel()
        tasks = [t for t in (self._worker, self._acker, self._maintainer) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # Not awaited one by one: a task stuck in a library call that swallows the
            # cancellation must not hold the stop.
            await asyncio.wait(tasks, timeout=max(0.05, min(0.5, deadline - loop.time())))
        self._fail_queued("publisher closed before the event was published or buffered")
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not await close_nats(nc, max(0.05, deadline - loop.time() - 0.05)):
            log.warning("publisher close: the NATS connection did not close in time; its socket was aborted")
        # Every outbox call runs on this one thread, FIFO: once a no-op has run, none is left.
        last = loop.run_in_executor(self._db, lambda: None)
        done, _ = await asyncio.wait({last}, timeout=max(0.05, deadline - loop.time()))
        if not done:
            self.outbox_busy = True
            log.error("publisher close: an outbox write is still running on its thread")
        self._db.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ publishing API

    async def publish(self, event: Event, versions: Sequence[int] | None = None) -> PublishStatus:
        """Publish ``event`` per the current flags; see the module docstring for the contract.

        ``versions`` overrides the flags for this event: publish exactly these schema versions
        (``()`` = nothing, returns ``off``), whatever ``eventbus.publish`` says.  The agent passes
        what the fencing guard decided for the event's workflow (a workflow whose publishing has
        begun keeps publishing every later event: "Publish marker" in docs/backends.md and
        cbctl/core/backends/redis/guard.py), so a node that has not applied a flag change yet
        cannot tear a hole in the workflow's stream.

        Raises ``BadEvent`` (invalid event, nothing done) or :class:`PublishFailed`.
        """
        pendings = self._enqueue([event], versions)
        if not pendings:
            return PUBLISH_OFF
        status = (await pendings[0].future)[0]
        # Backpressure (cbctl/core/agent/bus/outbox.py): the event is acked or durably buffered; while
        # the outbox is full the caller waits here, so a lane worker takes no new task.
        await self.outbox.wait_for_room(self.metrics.outbox_backpressure.set)
        return status

    async def publish_many(self, events: Sequence[Event]) -> list[PublishStatus]:
        """Publish several events, pipelined; one status per event, in order.  Same contract
        as :meth:`publish` for every event; all are validated and enqueued before any waiting
        (so an invalid event raises ``BadEvent`` before anything is sent)."""
        pendings = self._enqueue(events)
        if not pendings:
            return [PUBLISH_OFF] * len(events)
        out: list[PublishStatus] = []
        for chunk in await asyncio.gather(*(p.future for p in pendings)):
            out.extend(chunk)
        return out

    def _enqueue(self, events: Sequence[Event], override: Sequence[int] | None = None) -> list[_Pending]:
        if self._closing or self._worker is None or self._worker.done():
            raise PublishFailed("publisher is not running (not started, closed, or its worker failed)")
        if override is None:
            if self._mode == PUBLISH_OFF:
                return []
            versions = self._versions
        else:
            versions = tuple(override)
            if not versions:
                return []
            for v in versions:
                if v not in SUPPORTED_SCHEMA_VERSIONS or isinstance(v, bool):
                    raise BadInput(f"cannot publish schema version {v!r} (supported: "
                                   f"{list(SUPPORTED_SCHEMA_VERSIONS)})")
        cluster = self.cluster
        loop = asyncio.get_running_loop()
        # Encode everything first, under the flags in effect now: a bad event raises here,
        # before any event of the call is sent.
        encoded: list[list[OutboxMessage]] = []
        for event in events:
            encoded.append([
                OutboxMessage(subject(cluster, v, event.workflow_id), msg_id(event.event_id, v), event.workflow_id,
                              encode_event(event, v))
                for v in versions
            ])
        per_chunk = max(1, self.batch_max // len(versions))
        pendings = []
        for start in range(0, len(encoded), per_chunk):
            chunk = encoded[start : start + per_chunk]
            msgs = [m for ev_msgs in chunk for m in ev_msgs]
            owners = [i for i, ev_msgs in enumerate(chunk) for _ in ev_msgs]
            pending = _Pending(msgs, owners, len(chunk), loop.create_future())
            self._queue.put_nowait(pending)
            pendings.append(pending)
        return pendings

    async def _settled(self) -> None:
        """Wait until everything enqueued so far has been answered."""
        await self._queue.join()
        await self._inflight.join()

    # ------------------------------------------------------------------ sender & ack stages

    async def _send_loop(self) -> None:
        """Take queued events, send them without waiting for acks, pass them on in order."""
        while True:
            pendings = [await self._queue.get()]
            n = len(pendings[0].messages)
            while n < self.batch_max and not self._queue.empty():
                p = self._queue.get_nowait()
                pendings.append(p)
                n += len(p.messages)
            msgs = [m for p in pendings for m in p.messages]
            # While degraded the ack stage decides (in order, under the lock) where they go.
            # Not connected: nothing is sent (nats-py would hold it in its reconnect buffer and
            # the caller would wait ack_timeout for nothing); the ack stage buffers it.
            # Batches queued unsent (while degraded) are sent or buffered by the ack stage in
            # order; until it has dealt with all of them, newer batches must not overtake them.
            if self._degraded or self._unsent:
                acks = None
                self._unsent += 1
            elif self.connected:
                acks = await self._start_send(msgs)
            else:
                acks = [None] * len(msgs)
            await self._inflight.put(_Batch(pendings, msgs, acks))  # blocks at max_inflight
            for _ in pendings:
                self._queue.task_done()

    async def _ack_loop(self) -> None:
        """Settle batches in order: wait for acks, retry, buffer, answer the callers."""
        while True:
            batch = await self._inflight.get()
            self._settling = batch
            try:
                await self._settle(batch)
            finally:
                self._settling = None
                self._inflight.task_done()

    async def _settle(self, batch: _Batch) -> None:
        msgs = batch.messages
        statuses: list[str | None] = [None] * len(msgs)
        if batch.acks is None:
            self._unsent -= 1
            async with self._state_lock:
                if self._degraded or self._abandon.is_set():  # still degraded (or closing): queue
                    # behind what is in the outbox
                    await self._buffer(list(range(len(msgs))), msgs, statuses, reason=None)
                    self._answer(batch, statuses)
                    return
            # The drain finished meanwhile: publish directly after all.
            batch.acks = await self._start_send(msgs) if self.connected else [None] * len(msgs)
        first = await self._collect(batch.acks)
        todo = []
        for i, st in enumerate(first):
            if st is None:
                todo.append(i)
            else:
                statuses[i] = st
        for attempt in range(1, self.retries + 1):
            if not todo or not self.connected or self._abandon.is_set():
                break  # nothing left, unreachable or closing: buffer now rather than make callers wait
            self.metrics.publish_retries.inc(len(todo))
            await asyncio.sleep(self.retry_policy.delay(attempt))
            if not self.connected:
                break
            again = await self._send([msgs[i] for i in todo])
            still = []
            for i, st in zip(todo, again, strict=True):
                if st is None:
                    still.append(i)
                else:
                    statuses[i] = st
            todo = still
        self._count_statuses(statuses)
        if todo:
            async with self._state_lock:
                await self._buffer(todo, msgs, statuses, reason=None if self._abandon.is_set()
                                   else "event bus unreachable or retries spent")
        self._answer(batch, statuses)

    def _count_statuses(self, statuses: Sequence[str | None]) -> None:
        ok = statuses.count(PUBLISH_STATUS_OK)
        dup = statuses.count(PUBLISH_STATUS_DUPLICATE)
        if ok:
            self._count[PUBLISH_STATUS_OK].inc(ok)
        if dup:
            self._count[PUBLISH_STATUS_DUPLICATE].inc(dup)

    async def _buffer(self, idx: list[int], msgs: list[OutboxMessage], statuses: list[str | None],
                      reason: str | None) -> None:
        """Commit ``msgs[i] for i in idx`` to the outbox (caller holds the state lock), mark them
        ``buffered`` (or ``error`` if the write failed) and enter degraded mode."""
        if reason is not None:
            self._enter_degraded(reason)
        try:
            await self._in_db(self.outbox.append, [msgs[i] for i in idx])
        except sqlite3.Error as exc:
            # Neither acked nor buffered: the callers must not acknowledge their state change.
            self._enter_degraded("outbox write failed")
            log.error("event outbox %s: write failed: %s", self.outbox.path, exc)
            for i in idx:
                statuses[i] = PUBLISH_STATUS_ERROR
            self._count[PUBLISH_STATUS_ERROR].inc(len(idx))
            return
        self._set_depth()
        for i in idx:
            statuses[i] = PUBLISH_STATUS_BUFFERED
        self._count[PUBLISH_STATUS_BUFFERED].inc(len(idx))

    def _answer(self, batch: _Batch, statuses: list[str | None]) -> None:
        """Resolve each pending with one status per event (worst of its messages)."""
        if all(st == PUBLISH_STATUS_OK for st in statuses):  # the common case, without per-event bookkeeping
            for p in batch.pendings:
                if not p.future.done():
                    p.future.set_result([PUBLISH_STATUS_OK] * p.n_events)
            return
        pos = 0
        for p in batch.pendings:
            per_event: list[list[str | None]] = [[] for _ in range(p.n_events)]
            for owner in p.owners:
                per_event[owner].append(statuses[pos])
                pos += 1
            if p.future.done():
                continue  # the caller gave up waiting (its events were still published)
            if any(PUBLISH_STATUS_ERROR in st for st in per_event):
                p.future.set_exception(PublishFailed(
                    f"event bus unreachable and the outbox {self.outbox.path} could not be written"))
                continue
            p.future.set_result([_event_status(st) for st in per_event])

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A bug, not an outage: fail loudly instead of leaving callers waiting forever.
            log.critical("event publisher task %s died: %r", task.get_name(), exc, exc_info=exc)
            self._closing = True
            self._fail_queued(f"event publisher task died: {exc!r}")

    def _fail_queued(self, why: str) -> None:
        """Fail every event not yet answered (shutdown, or a dead task)."""
        pendings: list[_Pending] = []
        while not self._queue.empty():
            pendings.append(self._queue.get_nowait())
            self._queue.task_done()
        if self._settling is not None:
            pendings.extend(self._settling.pendings)
        while not self._inflight.empty():
            pendings.extend(self._inflight.get_nowait().pendings)
            self._inflight.task_done()
        for p in pendings:
            if not p.future.done():
                self._count[PUBLISH_STATUS_ERROR].inc(len(p.messages))
                p.future.set_exception(PublishFailed(why))

    # ------------------------------------------------------------------ degraded mode

    def _enter_degraded(self, reason: str) -> None:
        if not self._degraded:
            self._degraded = True
            self.metrics.degraded.set(1)
            self.metrics.outages.inc()
            log.warning("event bus degraded (%s): events go to the outbox %s", reason, self.outbox.path)
        self._wake.set()

    def _set_depth(self) -> None:
        self.metrics.outbox_depth.set(self.outbox.depth)

    async def _in_db(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def _maintain(self) -> None:
        """Keep a connection, and drain the outbox while degraded."""
        # reconnect_min doubling to reconnect_max; a wake-up (new work) cuts a pause short.
        backoff = Backoff(BackoffPolicy(self.reconnect_min, self.reconnect_max), sleep=self._sleep_or_wake)
        while True:
            try:
                await self._connect()
            except (BackendUnavailable, CheckFailed) as exc:  # AuthFailed is a BackendUnavailable
                text = str(exc)
                if text != self._last_connect_error:
                    log.warning("event bus: %s (retrying)", text)
                    self._last_connect_error = text
                await backoff.pause()
                continue
            if self._degraded and self.connected:
                progressed = await self._drain_once()
                if progressed:
                    backoff.reset()
                    continue
                await backoff.pause()
                continue
            backoff.reset()
            # Poll: the connection's own reconnect loop gives us no callback we own.
            await self._sleep_or_wake(self.poll_interval)

    async def _sleep_or_wake(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _drain_once(self) -> bool:
        """Publish the oldest ``drain_batch`` rows and delete the acked ones. True on progress
        (including "outbox empty: degraded mode left")."""
        rows = await self._in_db(self.outbox.peek, self.drain_batch)
        if not rows:
            async with self._state_lock:
                if self.outbox.depth == 0 and self._degraded:
                    self._degraded = False
                    self.metrics.degraded.set(0)
                    log.warning("event bus recovered: outbox drained, publishing directly again")
            return True
        started = time.monotonic()
        sent = await self._send(rows)
        if not any(sent) and self._no_stream:
            # JetStream answered "no stream": it was deleted (or never created because JetStream
            # was down at connect time).  Create/verify it again before the next attempt.
            self._stream_verified = False
        acked: list[int] = []
        for row, status in zip(rows, sent, strict=True):
            if status is not None:
                acked.append(row.id)
        self._count_statuses(sent)
        if acked:
            try:
                await self._in_db(self.outbox.delete, acked)
            except sqlite3.Error as exc:
                # The rows stay and are re-sent: JetStream's window (or the bridge) drops the copies.
                log.error("event outbox %s: delete failed: %s", self.outbox.path, exc)
                return False
            self._set_depth()
            log.debug("drained %d/%d outbox rows in %.3fs", len(acked), len(rows), time.monotonic() - started)
        return bool(acked)


__all__ = ["PublishFailed", "PublishStatus", "Publisher"]
