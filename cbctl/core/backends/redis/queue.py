"""Lane streams: which lane a workflow belongs to, enqueueing, reading and claiming tasks.

Reads and claims are not fenced (reading is harmless); acks are, through
:class:`~cbctl.core.backends.redis.guard.LaneGuard`.  Redis errors are converted by
:func:`~cbctl.core.backends.redis.client.redis_errors`.
"""

from __future__ import annotations

import json
import logging
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis

from cbctl.core.backends.redis.client import as_str, json_compact, redis_errors
from cbctl.core.backends.redis.keys import GROUP, LaneKeys, check_name, check_workflow_id

__all__ = ["LaneQueue", "Task", "lane_for"]

log = logging.getLogger(__name__)


def lane_for(workflow_id: str, lanes: Sequence[str]) -> str:
    """The lane ``workflow_id`` belongs to.

    Stable across processes, hosts and Python versions (CRC-32 of the UTF-8 id, not the salted
    built-in ``hash``), and it depends on the *order* of ``lanes``: every node must use the same
    inventory list.  Raises ``ValueError`` if ``lanes`` is empty.
    """
    if not lanes:
        raise ValueError("no lanes configured")
    return lanes[zlib.crc32(workflow_id.encode("utf-8")) % len(lanes)]


@dataclass(frozen=True, slots=True)
class Task:
    """One task read from a lane stream. ``entry_id`` is what ``apply`` acks."""

    entry_id: str
    lane: str
    workflow_id: str
    task_id: str
    type: str
    payload: dict[str, Any] = field(default_factory=dict)


def _task_from_entry(lane: str, entry_id: Any, fields: Mapping[Any, Any] | None) -> Task | None:
    """A Task from a stream entry; ``None`` for an entry deleted while it was pending."""
    if fields is None:
        return None
    f = {as_str(k): as_str(v) for k, v in fields.items()}
    eid = as_str(entry_id)
    raw_payload = f.get("payload", "{}")
    try:
        payload = json.loads(raw_payload)
    except json.JSONDecodeError:
        # Still returned (not skipped) so the worker can ack it; otherwise it stays pending forever.
        log.warning("lane %s entry %s has a payload that is not JSON; passing it as {'raw': ...}", lane, eid)
        payload = {"raw": raw_payload}
    if not isinstance(payload, dict):
        payload = {"value": payload}
    return Task(
        entry_id=eid,
        lane=lane,
        workflow_id=f.get("workflow_id", ""),
        task_id=f.get("task_id") or eid,
        type=f.get("type", ""),
        payload=payload,
    )


class LaneQueue:
    """Lane streams: enqueue tasks, read them through the ``workers`` group, take over pending.

    Reads and claims are not fenced (reading is harmless); the ack is, through
    :class:`LaneGuard`.  ``lanes`` is the lane inventory, in the same order on every node.
    """

    def __init__(
        self,
        redis_client: Redis,
        cluster: str,
        lanes: Sequence[str],
        *,
        group: str = GROUP,
        maxlen: int | None = None,
    ) -> None:
        for lane in lanes:
            check_name("lane", lane)
        self.redis = redis_client
        self.keys = LaneKeys(cluster)
        self.lanes = list(lanes)
        self.group = group
        self.maxlen = maxlen

    def lane_of(self, workflow_id: str) -> str:
        """The lane of ``workflow_id`` in this queue's inventory (:func:`lane_for`)."""
        return lane_for(workflow_id, self.lanes)

    async def enqueue(self, workflow_id: str, task: Mapping[str, Any]) -> str:
        """Append a task to the workflow's lane stream; return the stream entry id.

        ``task`` may hold ``task_id`` (default: a new UUID; the idempotency key of the apply),
        ``type`` (default ``"task"``) and ``payload`` (a JSON-able dict, default ``{}``); any
        other key is a ``ValueError``.  ``maxlen`` (constructor) trims the stream approximately,
        which can drop tasks nobody read yet: leave it ``None`` unless the load is synthetic.
        A client retry after a lost reply can add the entry twice; the second apply of the same
        ``task_id`` is a no-op, so give tasks a ``task_id`` when duplicates matter.
        """
        check_workflow_id(workflow_id)
        unknown = set(task) - {"task_id", "type", "payload"}
        if unknown:
            raise ValueError(f"unknown task keys: {', '.join(sorted(unknown))}")
        fields = {
            "workflow_id": workflow_id,
            "task_id": str(task.get("task_id") or uuid.uuid4().hex),
            "type": str(task.get("type", "task")),
            "payload": json_compact(task.get("payload", {})),
        }
        lane = self.lane_of(workflow_id)
        with redis_errors(f"enqueue a task on lane {lane!r}"):
            entry_id = await self.redis.xadd(
                self.keys.tasks(lane), fields, maxlen=self.maxlen, approximate=True
            )
        return as_str(entry_id)

    async def ensure_group(self, lane: str) -> None:
        """Create the lane's stream and consumer group if missing (from the first entry)."""
        with redis_errors(f"create the consumer group of lane {lane!r}"):
            try:
                await self.redis.xgroup_create(self.keys.tasks(lane), self.group, id="0", mkstream=True)
            except rexc.ResponseError as e:
                if not str(e).startswith("BUSYGROUP"):
                    raise

    async def read(self, lane: str, consumer: str, count: int = 100, block_ms: int | None = None) -> list[Task]:
        """New tasks for ``consumer`` (XREADGROUP ``>``); they stay pending until acked.

        ``block_ms``: ``None`` returns at once, ``N`` waits up to N ms for something to arrive
        (the client's socket timeout must be longer).  Creates the group if it is missing (first
        use, or a Redis that restarted without persistence).
        """
        key = self.keys.tasks(lane)
        with redis_errors(f"read lane {lane!r}"):
            try:
                reply = await self.redis.xreadgroup(self.group, consumer, {key: ">"}, count=count, block=block_ms)
            except rexc.ResponseError as e:
                if not str(e).startswith("NOGROUP"):
                    raise
                await self.ensure_group(lane)
                reply = await self.redis.xreadgroup(self.group, consumer, {key: ">"}, count=count, block=block_ms)
        tasks: list[Task] = []
        # redis-py shapes: RESP2 [[stream, entries]]; RESP3 {stream: [entries]} (one more list).
        if isinstance(reply, dict):
            batches = [wrapped[0] for wrapped in reply.values() if wrapped]
        else:
            batches = [entries for _stream, entries in (reply or [])]
        for entries in batches:
            for entry_id, fields in entries:
                task = _task_from_entry(lane, entry_id, fields)
                if task is not None:
                    tasks.append(task)
        return tasks

    async def claim_pending(self, lane: str, consumer: str, min_idle_ms: int, count: int = 1000) -> list[Task]:
        """Take over up to ``count`` tasks other consumers read but have not acked for
        ``min_idle_ms`` (XAUTOCLAIM): a new owner picks up what a dead owner left pending.

        Claimed tasks are pending on ``consumer`` afterwards.  Entries deleted while pending are
        dropped from the pending list by Redis and not returned.  A lane with no group gives [].
        """
        key = self.keys.tasks(lane)
        tasks: list[Task] = []
        cursor = "0-0"
        with redis_errors(f"claim pending tasks of lane {lane!r}"):
            while len(tasks) < count:
                try:
                    reply = await self.redis.xautoclaim(
                        key, self.group, consumer, min_idle_time=min_idle_ms, start_id=cursor,
                        count=min(100, count - len(tasks)),
                    )
                except rexc.ResponseError as e:
                    if str(e).startswith("NOGROUP"):
                        return tasks
                    raise
                cursor = as_str(reply[0])
                for entry_id, fields in reply[1]:
                    task = _task_from_entry(lane, entry_id, fields)
                    if task is not None:
                        tasks.append(task)
                if cursor == "0-0":
                    break
        return tasks

    async def pending_count(self, lane: str) -> int:
        """Tasks read but not yet acked on ``lane`` (0 if the lane has no group)."""
        with redis_errors(f"count pending tasks of lane {lane!r}"):
            try:
                info = await self.redis.xpending(self.keys.tasks(lane), self.group)
            except rexc.ResponseError as e:
                if str(e).startswith("NOGROUP"):
                    return 0
                raise
        return int(info["pending"])

    async def length(self, lane: str) -> int:
        """Entries in the lane stream (acked entries are deleted by the guard by default)."""
        with redis_errors(f"measure lane {lane!r}"):
            return int(await self.redis.xlen(self.keys.tasks(lane)))
