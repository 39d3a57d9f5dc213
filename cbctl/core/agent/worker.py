"""Lane workers: one task per worked lane reads the lane stream, runs the handler and writes the
result and the ack through the fencing guard with the lane's token (see docs/agent.md).

Contract: a worker writes only while its :class:`LaneRun` is ``active`` (the "still owner"
flag, checked right before each guarded write); a denied write (``StaleFencingToken``) ends
the worker and marks the run ``stale``; a worker that dies of an error while the lane is still
ours is restarted after a second (its unacked task is redelivered by the claim).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from cbctl.core.agent.hooks import AppliedHook, AppliedUpdate, TaskHandler
from cbctl.core.agent.ownership import LaneClaim
from cbctl.core.agent.tasks import LOOP_BACKOFF
from cbctl.core.backends.retry import Backoff
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue, Task
from cbctl.core.model.errors import BackendUnavailable, StaleFencingToken
from cbctl.core.model.flags import CANARY_LANES, GUARD_OFF, OWNERSHIP_GUARD
from cbctl.core.model.metrics import AgentMetrics

log = logging.getLogger(__name__)

__all__ = ["LaneRun", "LaneWorkers"]


@dataclass(eq=False)
class LaneRun:
    """One lane being worked on. ``active`` is the "still owner" flag checked before writes."""

    lane: str
    token: int
    local: bool
    claim: LaneClaim | None = None
    active: bool = True
    stale: bool = False
    task: asyncio.Task[None] | None = None
    started: float = 0.0

class LaneWorkers:
    """The lane-worker part of :class:`~cbctl.core.agent.node.NodeAgent` (a mixin).

    Uses the attributes below, which the agent sets; ``guard`` and ``queue`` exist once the
    agent started.
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
    _block_ms: int
    _reclaim_idle_ms: int
    _reclaim_period: float

    def _start_worker(self, run: LaneRun) -> None:
        run.started = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._lane_worker(run), name=f"{self.node_id}:lane-{run.lane}")
        task.add_done_callback(lambda t: self._worker_done(run, t))
        run.task = task

    def _worker_done(self, run: LaneRun, task: asyncio.Task[None]) -> None:
        """A lane worker ended. If it died of an error (the handler's, or a bug) while we still
        own the lane, restart it after a pause; its unacked task is redelivered by the claim."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("agent %s: worker of lane %s failed; restarting it in 1s", self.node_id, run.lane,
                  exc_info=task.exception())
        self.metrics.tasks.labels(result="error").inc()

        def restart() -> None:
            if run.active and run.task is task and not self._stopping:
                self._start_worker(run)

        asyncio.get_running_loop().call_later(1.0, restart)

    async def _lane_worker(self, run: LaneRun) -> None:
        """Work one lane until ``run.active`` drops, the task is cancelled, or we are fenced off."""
        assert self.guard is not None and self.queue is not None
        lane, consumer = run.lane, self.node_id
        loop = asyncio.get_running_loop()
        setup = True
        takeover = not run.local
        next_reclaim = 0.0
        backoff = Backoff(LOOP_BACKOFF)
        while run.active:
            try:
                if setup:
                    await self.queue.ensure_group(lane)
                    await self._raise_fence(run)
                    setup = False
                if loop.time() >= next_reclaim:
                    if not takeover:
                        # Again every reclaim period: a Redis that restarted (the client may
                        # reconnect without us seeing an error) has forgotten the fence.
                        await self._raise_fence(run)
                    # At takeover: everything the previous owner read but never acked (idle 0);
                    # afterwards: entries stuck on another consumer for a long time.
                    idle = 0 if takeover else self._reclaim_idle_ms
                    claimed = await self.queue.claim_pending(lane, consumer, idle)
                    takeover = False
                    next_reclaim = loop.time() + self._reclaim_period
                    if claimed:
                        log.info("agent %s lane %s: took over %d pending tasks", self.node_id, lane, len(claimed))
                    for task in claimed:
                        if not run.active:
                            return
                        await self._process(run, task)
                tasks = await self.queue.read(lane, consumer, count=64, block_ms=self._block_ms)
                for task in tasks:
                    if not run.active:
                        return
                    await self._process(run, task)
                backoff.reset()
            except BackendUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("agent %s lane %s: %s; retrying in %.1fs", self.node_id, lane, exc, delay)
                setup = True
                next_reclaim = 0.0
                await asyncio.sleep(delay)
            except StaleFencingToken as exc:
                log.warning("agent %s lane %s: fenced off (%s); stopping work on it", self.node_id, lane, exc)
                run.active = False
                run.stale = True
                self._wake.set()
                return

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
