"""Lane workers: the agent's one blocking read over every worked lane (:class:`LaneFeed`) and,
per lane, a task that runs the handler and writes the result and the ack through the fencing
guard with the lane's token, in stream order (see docs/agent.md, "Lane workers").

Contract: a lane's task writes only while its :class:`LaneRun` is ``active`` (the "still owner"
flag, checked right before each guarded write); cancelling ``run.task`` stops the lane's work at
once; a denied write or a fence above our token (``StaleFencingToken``) ends the lane's task
and marks the run ``stale``; a lane task that dies of an error while the lane is still ours is
restarted after a second (its unacked tasks are redelivered by the claim).  The feed only reads:
what it read for a lane that is no longer worked stays pending in Redis for the next owner's
claim.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cbctl.core.agent.hooks import AppliedHook, AppliedUpdate, TaskHandler
from cbctl.core.agent.ownership import LaneClaim
from cbctl.core.agent.tasks import LOOP_BACKOFF
from cbctl.core.backends.retry import Backoff
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue, StreamReader, Task
from cbctl.core.model.errors import BackendUnavailable, StaleFencingToken
from cbctl.core.model.flags import CANARY_LANES, GUARD_OFF, OWNERSHIP_GUARD
from cbctl.core.model.metrics import AgentMetrics

log = logging.getLogger(__name__)

__all__ = ["LaneFeed", "LaneRun", "LaneWorkers"]

#: Tasks one read takes per lane at most, and the most an owned lane's inbox may hold before
#: it is left out of the read.  An owned lane is read ahead (nobody else reads it; a blocked read
#: always covers it).  A competing-consumer lane (cluster.enabled = false) is read only when its
#: inbox is empty, like a consumer reading for itself: an agent busy with a lane leaves that
#: lane's new tasks to the other consumers.
BATCH = 64


def _room(run: LaneRun) -> int:
    """How many tasks ``run``'s inbox may hold and the lane still be read."""
    return 1 if run.local else BATCH
#: Lane set-ups (group, fence, takeover claim) running at once: a takeover of many lanes must
#: not open a Redis connection per lane.
SETUP_SLOTS = 4


@dataclass(eq=False)
class LaneRun:
    """One lane being worked on. ``active`` is the "still owner" flag checked before writes.

    ``inbox`` holds the tasks the feed read (or a claim took over) for this lane, in the order
    they are to be applied; the lane's task removes one only once it is applied and acked.
    """

    lane: str
    token: int
    local: bool
    claim: LaneClaim | None = None
    active: bool = True
    stale: bool = False
    task: asyncio.Task[None] | None = None
    started: float = 0.0
    inbox: collections.deque[Task] = field(default_factory=collections.deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class LaneFeed:
    """ONE blocking XREADGROUP over the streams of every attached lane, feeding their inboxes.

    Idle, it costs one Redis call per block (up to
    :data:`~cbctl.core.backends.redis.queue.LONGEST_BLOCK_MS`, and never past the next
    maintenance) whatever the number of lanes, on one connection (a :class:`~cbctl.core.backends.redis.queue.StreamReader`).  A lane is read while
    its inbox has room (:func:`_room`).  Attaching or detaching a lane, or a lane's inbox
    getting room again, changes the set read:
    the read in progress is woken (``CLIENT UNBLOCK``) and started again with the new set.
    Every ``period`` seconds ``maintain(runs)`` runs between two reads (fence check, claim of
    stuck entries).  The feed's task runs while at least one lane is attached and ends when
    the last one detaches.
    """

    def __init__(self, queue: LaneQueue, consumer: str, period: float,
                 maintain: Callable[[list[LaneRun]], Awaitable[None]]) -> None:
        self.queue = queue
        self.consumer = consumer
        self.period = period
        self.maintain = maintain
        self.runs: dict[str, LaneRun] = {}
        self.setup_slots = asyncio.Semaphore(SETUP_SLOTS)
        self.reads = 0  # XREADGROUP calls made (tests and the idle-cost bench look at it)
        self._task: asyncio.Task[None] | None = None
        self._reader: StreamReader | None = None
        self._changed = asyncio.Event()
        self._gen = 0  # bumped by every change of what should be read
        self._read_gen = 0  # the generation the read in progress was started with
        self._waker: asyncio.Task[None] | None = None
        self._reading: frozenset[str] = frozenset()  # the lanes of the read in progress
        self._read_done = asyncio.Event()

    # -- the set of lanes --------------------------------------------------------------------

    def attach(self, run: LaneRun) -> None:
        """Read ``run.lane`` from now on, into ``run.inbox`` (replaces an earlier run of it)."""
        self.runs[run.lane] = run
        self.wake()
        self._ensure_running()

    def detach(self, run: LaneRun) -> None:
        """Stop reading ``run.lane`` (no-op if a newer run of the lane is attached)."""
        if self.runs.get(run.lane) is not run:
            return
        del self.runs[run.lane]
        if not self.runs and self._task is not None:
            self._task.cancel()  # nothing left to read: drop the blocked read at once
        else:
            self.wake()

    async def drop(self, lanes: list[str], timeout: float = 1.0) -> bool:
        """Wait (at most ``timeout`` s) until no read in progress covers ``lanes``; True if so.

        Called after detaching released lanes and before their owner keys go: once it returns
        True, this node reads nothing more from them, so nothing a new owner is due gets
        stuck pending on us.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while self._reader is not None and self._reader.reading and self._reading.intersection(lanes):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            self.wake()
            self._read_done.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._read_done.wait()
        return True

    def deliver(self, run: LaneRun, tasks: list[Task], *, dedupe: bool = False) -> int:
        """Append ``tasks`` to the run's inbox (``dedupe``: skip entries already in it)."""
        if dedupe:
            have = {t.entry_id for t in run.inbox}
            tasks = [t for t in tasks if t.entry_id not in have]
        if tasks:
            run.inbox.extend(tasks)
            run.ready.set()
        return len(tasks)

    def wake(self) -> None:
        """The set of lanes to read changed: restart the read in progress promptly."""
        self._gen += 1
        self._changed.set()
        reader = self._reader
        if self._waker is None and reader is not None and reader.reading and self._read_gen != self._gen:
            self._waker = asyncio.get_running_loop().create_task(self._wake_reader(reader, self._gen))

    async def _wake_reader(self, reader: StreamReader, gen: int) -> None:
        try:
            await reader.wake()
        finally:
            self._waker = None
        if self._gen != gen:  # changed again while we were waking: the new read may be stale
            self.wake()

    # -- the read loop -----------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self.runs and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.consumer}:lane-feed")
            self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("agent %s: the lane feed failed; restarting it in 1s", self.consumer, exc_info=task.exception())
            asyncio.get_running_loop().call_later(1.0, self._ensure_running)
        elif self.runs:  # a detach cancelled it, then a lane was attached before it ended
            self._ensure_running()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = self.queue.reader()
        self._reader = reader
        backoff = Backoff(LOOP_BACKOFF)
        next_maintenance = loop.time() + self.period
        try:
            while self.runs:
                if loop.time() >= next_maintenance:
                    try:
                        await self.maintain([r for r in self.runs.values() if r.active])
                        next_maintenance = loop.time() + self.period
                    except BackendUnavailable as exc:
                        delay = backoff.next_delay()
                        log.warning("agent %s: lane maintenance failed (%s); retrying in %.1fs", self.consumer, exc, delay)
                        next_maintenance = loop.time() + delay
                lanes = [lane for lane, run in self.runs.items() if run.active and len(run.inbox) < _room(run)]
                self._changed.clear()
                self._read_gen = self._gen
                wait = max(0.001, next_maintenance - loop.time())
                if not lanes:  # every lane is busy (or none active): wait for a change, no Redis call
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._changed.wait()
                    continue
                self._reading = frozenset(lanes)
                try:
                    self.reads += 1
                    block = min(reader.longest_block_ms, max(1, int(wait * 1000)))
                    got = await reader.read(lanes, self.consumer, BATCH, block)
                    backoff.reset()
                except BackendUnavailable as exc:
                    delay = backoff.next_delay()
                    log.warning("agent %s: reading %d lanes failed (%s); retrying in %.1fs", self.consumer, len(lanes),
                                exc, delay)
                    await asyncio.sleep(delay)
                    continue
                finally:
                    self._reading = frozenset()
                    self._read_done.set()
                for lane, tasks in got.items():
                    run = self.runs.get(lane)
                    if run is not None and run.active:
                        self.deliver(run, tasks)
                    # else: left pending on us; the lane's next owner claims it at takeover.
        finally:
            self._reader = None
            self._reading = frozenset()
            self._read_done.set()
            await reader.aclose()


class LaneWorkers:
    """The lane-worker part of :class:`~cbctl.core.agent.node.NodeAgent` (a mixin).

    Uses the attributes below, which the agent sets; ``guard`` and ``queue`` exist once the
    agent started.  The feed is created on first use.
    """

    node_id: str
    metrics: AgentMetrics
    handler: TaskHandler
    guard: LaneGuard | None
    queue: LaneQueue | None
    tasks_processed: int
    _flags: dict[str, Any]
    _applied_hooks: list[AppliedHook]
    _wake: asyncio.Event
    _stopping: bool
    _reclaim_idle_ms: int
    _reclaim_period: float
    _feed: LaneFeed | None = None

    def _lane_feed(self) -> LaneFeed:
        assert self.queue is not None
        if self._feed is None or self._feed.queue is not self.queue:
            self._feed = LaneFeed(self.queue, self.node_id, self._reclaim_period, self._maintain)
        return self._feed

    def _start_worker(self, run: LaneRun) -> None:
        run.started = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._lane_worker(run), name=f"{self.node_id}:lane-{run.lane}")
        task.add_done_callback(lambda t: self._worker_done(run, t))
        run.task = task

    def _worker_done(self, run: LaneRun, task: asyncio.Task[None]) -> None:
        """A lane's task ended: the feed stops reading the lane.  If it died of an error (the
        handler's, or a bug) while we still own the lane, restart it after a pause; its unacked
        tasks are redelivered by the claim."""
        if self._feed is not None and run.task is task:
            self._feed.detach(run)
        if task.cancelled() or task.exception() is None:
            return
        log.error("agent %s: worker of lane %s failed; restarting it in 1s", self.node_id, run.lane,
                  exc_info=task.exception())
        self.metrics.tasks.labels(result="error").inc()

        def restart() -> None:
            if run.active and run.task is task and not self._stopping:
                self._start_worker(run)

        asyncio.get_running_loop().call_later(1.0, restart)

    async def _unfeed(self, lanes: list[str]) -> None:
        """After stopping these lanes' tasks: wait until the feed reads none of them (bounded)."""
        if self._feed is not None and not await self._feed.drop(lanes):
            log.warning("agent %s: the lane read did not end within 1s; entries it still receives stay pending "
                        "until the next owner's claim", self.node_id)

    def _fenced_off(self, run: LaneRun, exc: StaleFencingToken) -> None:
        """We are not the lane's owner any more: stop its work; the reconciler releases it."""
        log.warning("agent %s lane %s: fenced off (%s); stopping work on it", self.node_id, run.lane, exc)
        run.active = False
        run.stale = True
        self._wake.set()
        if run.task is not None and run.task is not asyncio.current_task():
            run.task.cancel()

    async def _lane_worker(self, run: LaneRun) -> None:
        """Set the lane up (group, fence, takeover claim), attach it to the feed, then apply its
        inbox in order until ``run.active`` drops, the task is cancelled, or we are fenced off."""
        assert self.guard is not None and self.queue is not None
        feed = self._lane_feed()
        lane = run.lane
        run.inbox.clear()  # a restarted lane: what was read before is claimed again below
        backoff = Backoff(LOOP_BACKOFF)
        while run.active:
            try:
                async with feed.setup_slots:
                    await self.queue.ensure_group(lane)
                    await self._raise_fence(run)
                    # At takeover: everything the previous owner read but never acked (idle 0).
                    # Competing consumers (local) only take what is stuck for a long time.
                    idle = self._reclaim_idle_ms if run.local else 0
                    claimed = await self.queue.claim_pending(lane, self.node_id, idle)
                break
            except BackendUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("agent %s lane %s: %s; retrying in %.1fs", self.node_id, lane, exc, delay)
                await asyncio.sleep(delay)
            except StaleFencingToken as exc:
                self._fenced_off(run, exc)
                return
        if not run.active:
            return
        if claimed:
            log.info("agent %s lane %s: took over %d pending tasks", self.node_id, lane, len(claimed))
            feed.deliver(run, claimed)
        feed.attach(run)
        backoff.reset()
        while run.active:
            if not run.inbox:
                run.ready.clear()
                await run.ready.wait()
                continue
            try:
                # Applied, then removed: after a Redis error the same task is tried again (the
                # guard's apply is idempotent per task id), so the lane's order holds.
                await self._process(run, run.inbox[0])
            except BackendUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("agent %s lane %s: %s; retrying in %.1fs", self.node_id, lane, exc, delay)
                await asyncio.sleep(delay)
                continue
            except StaleFencingToken as exc:
                self._fenced_off(run, exc)
                return
            if run.inbox:
                run.inbox.popleft()
                if len(run.inbox) == _room(run) - 1:
                    feed.wake()  # room again: the feed reads this lane again
            backoff.reset()

    async def _raise_fence(self, run: LaneRun) -> None:
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

    async def _process(self, run: LaneRun, task: Task) -> None:
        """Handle one task and write its result + ack through the guard with the lane's token."""
        assert self.guard is not None
        lane, token = run.lane, run.token
        mode = GUARD_OFF if run.local else self._flags.get(OWNERSHIP_GUARD, GUARD_OFF)
        canary = tuple(self._flags.get(CANARY_LANES, ()))
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

    async def _maintain(self, runs: list[LaneRun]) -> None:
        """Every reclaim period, for all worked lanes at once: one script call
        (:meth:`~cbctl.core.backends.redis.queue.LaneQueue.sweep`) reads the fences and finds the
        lanes with an entry pending for longer than the reclaim idle time.

        * A fence below our token means Redis forgot it (restarted without persistence; the
          client may reconnect without us seeing an error): raised again.  One above means a
          newer owner exists: that lane stops (fenced off) once the tasks already read for it
          went to the guard.
        * Stuck entries (a paused ex-owner's blocked read can receive entries after our
          takeover; a competing consumer died) are claimed and appended to their lane's inbox.
        """
        assert self.queue is not None
        feed = self._feed
        active = [r for r in runs if r.active]
        fences, stuck = await self.queue.sweep([r.lane for r in active], self._reclaim_idle_ms)
        for run in active:
            fence = fences.get(run.lane, 0)
            if run.token <= 0 or fence == run.token or not run.active:
                continue
            if fence > run.token and run.inbox:
                # Its tasks first, as they were read, like a worker that checks between batches:
                # the guard decides on each (denied with enforce, counted with observe).
                continue
            try:
                if fence > run.token:
                    raise StaleFencingToken(
                        f"lane {run.lane!r}: our token {run.token} is below the fence {fence}",
                        lane=run.lane, token=run.token, current_token=fence,
                    )
                log.warning("agent %s lane %s: redis lost the fence (%d < our %d); raising it again",
                            self.node_id, run.lane, fence, run.token)
                await self._raise_fence(run)
            except StaleFencingToken as exc:
                self._fenced_off(run, exc)
        if not stuck:
            return
        claimed = await self.queue.claim_pending_many(stuck, self.node_id, self._reclaim_idle_ms)
        for run in active:
            tasks = claimed.get(run.lane)
            if tasks and run.active and feed is not None:
                n = feed.deliver(run, tasks, dedupe=True)
                if n:
                    log.info("agent %s lane %s: claimed %d tasks stuck on another consumer", self.node_id, run.lane, n)
