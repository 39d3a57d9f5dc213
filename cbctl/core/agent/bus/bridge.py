"""The bridge: the canonical stream -> in-process subscribers, de-duplicated and in order per
workflow (docs/event-bus.md, "Bridge").

Contract: one durable pull consumer per node (``bridge-<node_id>``) on every schema version of
the cluster's subjects; subscribers get the pinned version (``consumers.schema_version``), per
workflow in strictly increasing seq order, nothing twice, per the mode (``eventbus.bridge``):
``off`` consumes nothing, ``read-only`` verifies and delivers to nobody, ``canary`` delivers to
``canary.subscribers`` only, ``streaming`` to all.  Every message is acked once handled.  A gap
is filled from the record or skipped and counted (:mod:`cbctl.core.agent.bus.sequencer`).
Memory is bounded by the constructor's options, never by uptime.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime

import nats.errors
import nats.js.api as jsapi
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cbctl.core.agent.bus.dedup import MsgWindow
from cbctl.core.agent.bus.gap_fill import GapFiller
from cbctl.core.agent.bus.sequencer import Sequencer
from cbctl.core.agent.bus.subscription import Subscription
from cbctl.core.backends.nats.stream import MSG_ID_HEADER
from cbctl.core.backends.retry import Backoff, BackoffPolicy
from cbctl.core.model.config import StreamConfig
from cbctl.core.model.errors import BackendUnavailable, BadInput
from cbctl.core.model.events import (
    BAD_EVENT_REASONS,
    SUPPORTED_SCHEMA_VERSIONS,
    BadEvent,
    Event,
    decode_event,
    stream_subjects,
    subject,
)
from cbctl.core.model.flags import BRIDGE_CANARY, BRIDGE_OFF, BRIDGE_STREAMING, BRIDGE_VALUES, EVENTBUS_BRIDGE
from cbctl.core.model.metric_names import ORIGIN_LOCAL, ORIGIN_REMOTE
from cbctl.core.model.metrics import AgentMetrics

log = logging.getLogger(__name__)


# Transient trouble talking to JetStream: back off and try again.
_TRANSIENT = (nats.errors.Error, OSError, asyncio.TimeoutError)


def _where(task: asyncio.Task[object]) -> str:
    """The innermost frame ``task`` is suspended in (``file:line``), for a log line."""
    coro: object = task.get_coro()
    where = "?"
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            where = f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno}"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where


def _retrieve(fut: asyncio.Future[object]) -> None:
    """Done callback: read a background step's outcome so it is never "never retrieved"."""
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("bridge: %s", fut.exception())



def durable_name(node_id: str) -> str:
    """The durable consumer name of ``node_id``'s bridge (characters JetStream rejects -> ``_``)."""
    return "bridge-" + re.sub(r"[^A-Za-z0-9_-]", "_", node_id)



class Bridge(Sequencer):
    """Consumes the canonical stream and fans events out to subscribers; see the module doc."""

    def __init__(
        self,
        nc: Client,
        stream_cfg: StreamConfig,
        metrics: AgentMetrics,
        node_id: str,
        *,
        cluster: str,
        mode: str = BRIDGE_OFF,
        schema_version: int = 1,
        canary_subscribers: Iterable[str] = (),
        durable: str | None = None,
        deliver_new: bool = True,
        gap_timeout: float = 0.5,
        give_up_after: float = 60.0,
        filler: GapFiller | None = None,
        dedup_max_ids: int = 200_000,
        dedup_max_age: float | None = None,
        max_workflows: int = 10_000,
        forget_max: int = 500_000,
        forget_max_age: float = 3600.0,
        max_held: int = 10_000,
        history: int = 16,
        history_workflows: int = 1_000,
        fetch_batch: int = 256,
        fetch_timeout: float = 0.5,
        max_queue: int = 10_000,
        rewind: int = 1000,
        api_timeout: float = 2.0,
    ) -> None:
        """``nc`` is a connected client the caller owns (the bridge never closes it).
        ``cluster``: whose subjects are consumed (``cb.<cluster>.events.v<N>.>``).
        ``deliver_new``: a consumer created from scratch starts at new messages (a node joining
        late does not replay the stream's whole history); False starts at the beginning.
        ``filler``: reads missing events from the authoritative record (docs/event-bus.md, step 4);
        ``gap_timeout``: how long a gap stays open before the filler is asked;
        ``give_up_after``: how long a gap nothing can fill is waited for before it is skipped.

        Memory is bounded by these settings, not by uptime: ``max_workflows`` workflows'
        ordering state (least recently active forgotten first), ``history`` released events kept
        for ``after_seq`` replays for each of the ``history_workflows`` most recently active
        workflows, ``dedup_max_ids`` event ids kept ``dedup_max_age`` seconds (default: the
        stream's duplicate window + 60 s), the last seq of up to ``forget_max`` evicted workflows
        for ``forget_max_age`` seconds (about 16 bytes each), ``max_held`` held events per
        workflow, and ``max_queue`` events per subscriber (docs/event-bus.md, "Memory bounds")."""
        if dedup_max_age is None:
            dedup_max_age = stream_cfg.duplicate_window + 60.0
        if dedup_max_age <= stream_cfg.duplicate_window:
            raise BadInput(
                f"bridge de-dup age {dedup_max_age}s must exceed the stream's duplicate window "
                f"{stream_cfg.duplicate_window}s"
            )
        super().__init__(
            metrics, gap_timeout=gap_timeout,
            give_up_after=give_up_after, filler=filler, dedup_max_ids=dedup_max_ids, dedup_max_age=dedup_max_age,
            max_workflows=max_workflows, forget_max=forget_max, forget_max_age=forget_max_age, max_held=max_held,
            history=history, history_workflows=history_workflows, deliver_new=deliver_new,
        )
        self.nc = nc
        # A JetStream API request in flight when the server dies only ends by this timeout.
        self.js: JetStreamContext = nc.jetstream(timeout=api_timeout)
        self.stream_cfg = stream_cfg
        self.node_id = node_id
        self.cluster = cluster
        self.durable = durable or durable_name(node_id)
        self.fetch_batch = fetch_batch
        self.fetch_timeout = fetch_timeout
        self.max_queue = max_queue
        self.rewind = rewind

        self._mode: str = BRIDGE_OFF
        self._canary: frozenset[str] = frozenset()
        self._wake = asyncio.Event()
        self.apply_flags(mode, schema_version, canary_subscribers)
        # The versions this bridge has delivered from, as subject tokens ("v1"), so a message of
        # any other version is skipped without decoding it.
        self._consumed_tokens: frozenset[str] = frozenset()
        self._psub: JetStreamContext.PullSubscription | None = None
        self._last_stream_seq = 0
        self._seen_msgs = MsgWindow(stream_cfg.duplicate_window, dedup_max_ids)  # msg id -> (stream seq, stored at)
        self._by_workflow: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._tasks: list[asyncio.Task[None]] = []
        # Set by close() before it cancels the consumer: nats-py swallows a cancellation that
        # lands in its flush (an ack) or turns it into ConnectionClosedError once the connection
        # is closed, and the consumer would then retry forever on a closed connection.
        self._stopped = False
        for reason in BAD_EVENT_REASONS:
            metrics.bad_events.labels(reason=reason)
        for origin in (ORIGIN_LOCAL, ORIGIN_REMOTE):
            metrics.bridge_delivered.labels(origin=origin)

    # ------------------------------------------------------------------ flags

    def apply_flags(self, mode: str, schema_version: int, canary_subscribers: Iterable[str] = ()) -> None:
        """Apply ``eventbus.bridge``, ``consumers.schema_version`` and ``canary.subscribers``.
        Raises ``BadInput`` for unknown values; a version change re-creates the consumer."""
        if mode not in BRIDGE_VALUES:
            raise BadInput(f"{EVENTBUS_BRIDGE}: unknown mode {mode!r} (allowed: {', '.join(BRIDGE_VALUES)})")
        if schema_version not in SUPPORTED_SCHEMA_VERSIONS or isinstance(schema_version, bool):
            raise BadInput(
                f"consumers.schema_version: unsupported version {schema_version!r} "
                f"(supported: {list(SUPPORTED_SCHEMA_VERSIONS)})"
            )
        self._mode = mode
        self._version = schema_version
        self._pinned_token = f"v{schema_version}"  # its subjects' version token
        self._canary = frozenset(canary_subscribers)
        self._wake.set()

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def schema_version(self) -> int:
        return self._version

    def last_delivered_seq(self, workflow_id: str) -> int | None:
        """The last seq released (delivered or, in read-only mode, verified) for a workflow."""
        wf = self._workflows.get(workflow_id)
        return wf.last if wf is not None else None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start consuming (per the current mode) and the gap timer. Returns at once."""
        if self._tasks:
            return
        if self._consumer_since is None:
            # Where this bridge's stream begins, whatever the mode now: a consumer created later
            # (the mode leaves "off") starts here, not at the flag change (docs/event-bus.md).
            self._consumer_since = time.time() if self.deliver_new else 0.0
        self._tasks = [
            asyncio.create_task(self._consume(), name="cbctl-bridge"),
            asyncio.create_task(self._tick_loop(), name="cbctl-bridge-gaps"),
        ]

    async def close(self, timeout: float = 2.0) -> None:
        """Stop consuming, end every subscription, unsubscribe; within ``timeout`` seconds.

        The connection stays open (its owner closes it).  Subscriptions end first (no await
        before), so SSE streams end at once whatever the server does.  The consumer's tasks are
        cancelled and waited for, but not past the deadline: a gap fill stuck in a Redis call
        that swallows the cancellation, or a fetch on a frozen server, is abandoned (it can do no
        harm: the subscriptions are closed).  The unsubscribe goes first among the network steps
        because nats-py's close/drain wait on an active pull subscription; it is bounded too,
        since on a frozen server the flush behind it can wait forever.  Never raises.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.05, timeout)
        self._stopped = True
        for sub in list(self._all) + [s for subs in self._by_workflow.values() for s in subs]:
            sub.close()
        tasks = [*self._tasks, *self._fill_tasks]
        self._tasks = []
        self._fill_tasks.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=max(0.01, 0.5 * (deadline - loop.time())))
            if stuck:
                log.warning("bridge close: %d task(s) did not end when cancelled (%s); abandoned", len(stuck),
                            ", ".join(sorted(f"{t.get_name()} at {_where(t)}" for t in stuck)))
        psub, self._psub = self._psub, None
        if psub is not None:
            unsub = asyncio.ensure_future(psub.unsubscribe())
            unsub.add_done_callback(_retrieve)
            done, _ = await asyncio.wait({unsub}, timeout=max(0.01, deadline - loop.time()))
            if not done:
                unsub.cancel()
                log.warning("bridge close: unsubscribing %s did not finish in time; the connection's close "
                            "ends it", self.durable)

    # ------------------------------------------------------------------ subscribers

    def subscribe(self, workflow_id: str | None, subscriber_name: str, *, after_seq: int | None = None,
                  max_queue: int | None = None) -> Subscription:
        """Subscribe to one workflow (or all with None) under ``subscriber_name`` (the name
        ``canary.subscribers`` lists; several subscriptions may share one).  ``after_seq``
        (single workflow only): replay released events with a higher seq first."""
        if after_seq is not None and workflow_id is None:
            raise BadInput("after_seq needs a workflow_id: seqs are per workflow")
        sub = Subscription(self, workflow_id, subscriber_name, after_seq, max_queue or self.max_queue)
        if workflow_id is None:
            self._all.add(sub)
        else:
            self._by_workflow.setdefault(workflow_id, set()).add(sub)
            if after_seq is not None:
                # Everything up to the workflow's current last seq comes from the replay; the
                # queue gets what is released from now on.  No await between these two steps.
                wf = self._workflows.get(workflow_id)
                sub._replay_upto = wf.last if wf is not None else None
        return sub

    def _remove(self, sub: Subscription) -> None:
        if sub.workflow_id is None:
            self._all.discard(sub)
        else:
            subs = self._by_workflow.get(sub.workflow_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_workflow[sub.workflow_id]

    def _eligible(self, sub: Subscription) -> bool:
        return self._mode == BRIDGE_STREAMING or (self._mode == BRIDGE_CANARY and sub.name in self._canary)

    async def _replay(self, sub: Subscription) -> list[Event]:
        """Released events of the subscription's workflow with after_seq < seq <= the last seq
        released when it subscribed, oldest first; nothing if the subscriber is not eligible."""
        workflow_id, after_seq, upto = sub.workflow_id, sub.after_seq, sub._replay_upto
        if workflow_id is None or after_seq is None or not self._eligible(sub):
            return []
        if upto is None:
            # The bridge has released nothing of this workflow yet (it started late, e.g. on a
            # node that joined mid-workflow): what came before is only in the stream.  Read it
            # to its end; live events at or below what the replay yields are skipped.
            return await self._replay_from_stream(workflow_id, after_seq, None)
        if upto <= after_seq:
            return []
        wf = self._workflows.get(workflow_id)
        if wf is not None and wf.history and wf.history[0].seq <= after_seq + 1:  # None/empty: not kept
            return [ev for ev in wf.history if after_seq < ev.seq <= upto]
        return await self._replay_from_stream(workflow_id, after_seq, upto)

    async def _replay_from_stream(self, workflow_id: str, after_seq: int, upto: int | None) -> list[Event]:
        """Read the workflow's subject back from the stream (one request per message); ``upto``
        None = to the end of the stream.  All or nothing: a transient NATS error raises
        ``BackendUnavailable`` (never a partial list, which would be a silent seq hole)."""
        subject_name = subject(self.cluster, self._version, workflow_id)
        found: dict[int, Event] = {}
        stream_seq = 1
        while True:
            try:
                raw = await self.js.get_msg(self.stream_cfg.name, seq=stream_seq, subject=subject_name, next=True)
            except nats.js.errors.NotFoundError:
                break
            except _TRANSIENT as exc:
                # A partial replay would hand the subscriber a seq hole it cannot see; fail the
                # whole replay so the stream ends with a reason and the client resumes with `after`.
                log.warning("bridge replay of %s from the stream failed: %s", workflow_id, exc)
                raise BackendUnavailable(
                    f"replay of workflow {workflow_id!r} from stream {self.stream_cfg.name} failed "
                    f"after seq {max(found, default=after_seq)}: {type(exc).__name__}: {exc}",
                    backend="nats",
                ) from exc
            stream_seq = (raw.seq or stream_seq) + 1
            try:
                _, ev = decode_event(raw.data or b"", subject=subject_name)
            except BadEvent:
                continue  # counted when the live consumer saw it
            if after_seq < ev.seq and (upto is None or ev.seq <= upto):
                found.setdefault(ev.seq, ev)
            if upto is not None and ev.seq >= upto:
                break
        return [found[s] for s in sorted(found)]

    # ------------------------------------------------------------------ consuming

    async def _consume(self) -> None:
        backoff = Backoff(BackoffPolicy(0.1, 5.0))  # transient consume errors: 0.1 s doubling to 5 s
        last_check = time.monotonic()
        seen_reconnects = self.nc.stats.get("reconnects", 0)
        while not self._stopped:
            if self._mode == BRIDGE_OFF:
                await self._unsubscribe()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self._psub is None:
                    await self._bind()
                    last_check = time.monotonic()
                assert self._psub is not None
                msgs = await self._psub.fetch(self.fetch_batch, timeout=self.fetch_timeout)
            except TimeoutError:  # nats.errors.TimeoutError too: no messages right now
                reconnects = self.nc.stats.get("reconnects", 0)
                # A consumer created just before the server was SIGKILLed may not have been
                # persisted: check at once after a reconnect, and now and then anyway.
                if reconnects != seen_reconnects or time.monotonic() - last_check > 10 * self.fetch_timeout:
                    seen_reconnects = reconnects
                    last_check = time.monotonic()
                    await self._check_consumer()
                continue
            except _TRANSIENT as exc:
                if self._stopped:
                    return  # a cancellation nats-py turned into an error (see _stopped)
                log.warning("bridge: consuming %s failed: %s: %s (retrying)", self.stream_cfg.name,
                            type(exc).__name__, exc)
                await self._unsubscribe()
                await backoff.pause()
                continue
            backoff.reset()
            self._consuming(self._version)
            for msg in msgs:
                try:
                    if self._mode == BRIDGE_OFF:
                        # Turned off while this fetch was pending: hand the message back so it
                        # is delivered when the bridge is turned on again, not silently consumed.
                        await msg.nak()
                        continue
                    self._handle(msg)
                    await msg.ack()
                except _TRANSIENT as exc:
                    # Unacked: it redelivers after ack_wait and the de-dup drops it then.
                    log.debug("bridge: ack failed: %s", exc)

    async def _check_consumer(self) -> None:
        """Notice a consumer that vanished (e.g. memory storage lost in a server restart)."""
        try:
            await self.js.consumer_info(self.stream_cfg.name, self.durable)
        except nats.js.errors.NotFoundError:
            log.warning("bridge: consumer %s is gone; re-creating it", self.durable)
            await self._unsubscribe()
        except _TRANSIENT:
            pass  # the next fetch will tell

    async def _unsubscribe(self) -> None:
        psub, self._psub = self._psub, None
        if psub is not None:
            try:
                await psub.unsubscribe()
            except _TRANSIENT:
                pass

    async def _bind(self) -> None:
        """Create the durable consumer (or re-create one left on an older filter) and bind to it."""
        await self._unsubscribe()
        stream = self.stream_cfg.name
        want = stream_subjects(self.cluster)  # every version: a version switch keeps the consumer
        start_seq: int | None = None
        try:
            info = await self.js.consumer_info(stream, self.durable)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and info.config.filter_subject != want:
            floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
            start_seq = max(1, max(floor, self._last_stream_seq) + 1 - self.rewind)
            log.info("bridge: switching consumer %s from %s to %s at stream seq %d",
                     self.durable, info.config.filter_subject, want, start_seq)
            await self.js.delete_consumer(stream, self.durable)
            info = None
        if info is None and start_seq is None and self._last_stream_seq:
            # Our consumer vanished after we had consumed from it: resume where we were rather
            # than at "new" (events in between would be skipped) or at the very beginning.
            start_seq = max(1, self._last_stream_seq + 1 - self.rewind)
        if info is None:
            start_time: datetime | None = None
            if start_seq is not None:
                policy = jsapi.DeliverPolicy.BY_START_SEQUENCE
            elif self.deliver_new and self._consumer_since:
                # What was stored since this bridge started (docs/event-bus.md), not only what comes
                # after the mode left "off": that is when this node applied a flag, which can be
                # seconds after the other nodes began publishing.
                policy = jsapi.DeliverPolicy.BY_START_TIME
                start_time = datetime.fromtimestamp(self._consumer_since, UTC)
            elif self.deliver_new:
                policy = jsapi.DeliverPolicy.NEW
            else:
                policy = jsapi.DeliverPolicy.ALL
            log.info("bridge: creating consumer %s on %s (%s%s)", self.durable, want, policy.value,
                     f" {start_seq}" if start_seq is not None else f" {start_time.isoformat()}" if start_time else "")
            await self.js.add_consumer(
                stream,
                jsapi.ConsumerConfig(
                    durable_name=self.durable,
                    filter_subject=want,
                    ack_policy=jsapi.AckPolicy.EXPLICIT,
                    deliver_policy=policy,
                    opt_start_seq=start_seq,
                    opt_start_time=start_time,
                    ack_wait=30.0,
                    max_ack_pending=max(1000, 4 * self.fetch_batch),
                ),
            )
        self._psub = await self.js.pull_subscribe_bind(self.durable, stream)
        self._consuming(self._version)
        if self._consumer_since is None:
            # Normally set by start().  Fills for a workflow first seen mid-life reach back to
            # here (minus the skew margin): what was applied before this bridge began is not its
            # to deliver.  A consumer that reads the stream from its start (deliver_new=False)
            # owns everything.
            self._consumer_since = time.time() if self.deliver_new else 0.0

    def _consuming(self, version: int) -> None:
        """Record that this bridge delivers from ``version`` (pinned while consuming)."""
        if version not in self._consumed_versions:
            self._consumed_versions.add(version)
            self._consumed_tokens = frozenset(f"v{v}" for v in self._consumed_versions)

    # ------------------------------------------------------------------ per message

    def _handle(self, msg: Msg) -> None:
        """Steps 1-5 of docs/event-bus.md ("Per message") for one message (synchronous: no interleaving)."""
        self.stats.received += 1
        now = time.monotonic()
        try:
            meta = msg.metadata
        except nats.errors.Error:
            meta = None
        if meta is not None:
            self._last_stream_seq = max(self._last_stream_seq, meta.sequence.stream)
        parts = msg.subject.split(".", 4)
        if (len(parts) == 5 and parts[3].startswith("v") and parts[3] != self._pinned_token
                and parts[3] not in self._consumed_tokens):
            # Another version's copy (the consumer reads every version's subjects): not ours.
            # A malformed subject falls through to decode_event, which counts it.
            return
        try:
            version, ev = decode_event(msg.data, subject=msg.subject)
        except BadEvent as exc:
            self.stats.bad += 1
            self.metrics.bad_events.labels(reason=exc.reason).inc()
            log.debug("bridge: bad event on %s: %s", msg.subject[:200], exc)
            return
        if version != self._version:
            # A version this bridge delivered from before the pinned one (a left-over fetched
            # before the switch, or published after it by a node still at the old version).
            # Not delivered (subscribers now get the pinned version's content), but not
            # forgotten either: for a workflow whose new-version publishing began later (or not
            # at all) this seq exists only in the old version, and if it was the workflow's last
            # event no later one would ever reveal the gap.  So it marks the seq as owed: the
            # gap filler brings it from the record unless the pinned version's copy comes first.
            self._owe(ev, now)
            return
        hdr = msg.headers.get(MSG_ID_HEADER) if msg.headers else None
        if hdr and meta is not None:
            self._check_broker_dedup(hdr, meta.sequence.stream, meta.timestamp.timestamp(), now)
        self._accept(ev, now)

    def _check_broker_dedup(self, mid: str, stream_seq: int, stored_at: float, now: float) -> None:
        prev = self._seen_msgs.get(mid)
        if prev is None:
            self._seen_msgs.put(mid, stream_seq, stored_at)  # forgets what is older than the window
            return
        prev_seq, prev_ts = prev
        # Same stream sequence = a redelivery of one stored message, not a second copy.
        # The 50 ms margin keeps copies right at the window's edge from counting.
        if stream_seq != prev_seq and abs(stored_at - prev_ts) < self.stream_cfg.duplicate_window - 0.05:
            self.stats.dedup_mismatches += 1
            self.metrics.consumer_dedup_mismatch.inc()
            log.warning("bridge: message id %s stored twice (stream seq %d and %d, %.3fs apart) within the "
                        "duplicate window", mid, prev_seq, stream_seq, abs(stored_at - prev_ts))

    def _deliver(self, ev: Event) -> None:
        """Fan a released event out by mode (docs/event-bus.md, step 5)."""
        if self._mode not in (BRIDGE_CANARY, BRIDGE_STREAMING):
            return  # read-only: verified, delivered to nobody
        delivered = False
        for sub in (*self._by_workflow.get(ev.workflow_id, ()), *self._all):
            if self._eligible(sub) and sub._offer(ev):
                delivered = True
        if delivered:
            self.stats.delivered += 1
            self.metrics.bridge_delivered.labels(origin=ORIGIN_LOCAL if ev.node_id == self.node_id else ORIGIN_REMOTE).inc()


__all__ = ["Bridge", "durable_name"]
