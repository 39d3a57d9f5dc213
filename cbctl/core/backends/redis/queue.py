"""Lane streams: which lane a workflow belongs to, enqueueing, reading and claiming tasks.

Reads and claims are not fenced (reading is harmless); acks are, through
:class:`~cbctl.core.backends.redis.guard.LaneGuard`.  Redis errors are converted by
:func:`~cbctl.core.backends.redis.client.redis_errors`.  :class:`StreamReader` is one blocking
XREADGROUP over many lanes on a connection of its own, which another connection can wake
(``CLIENT UNBLOCK``): the agent's one read over all its lanes (docs/agent.md, "Lane workers").
"""

from __future__ import annotations

import asyncio
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

__all__ = ["LaneQueue", "StreamReader", "Task", "lane_for"]

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
        self._sweep: Any = None  # the registered sweep script (redis-py Script), on first use

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
        return _tasks_by_lane(reply, {key: lane}).get(lane, [])

    async def read_many(self, lanes: Sequence[str], consumer: str, count: int = 100, block_ms: int | None = None,
                        *, client: Redis | None = None) -> dict[str, list[Task]]:
        """New tasks for ``consumer`` on any of ``lanes``: ONE XREADGROUP over their streams.

        Returns ``{lane: tasks}`` for the lanes that had something (up to ``count`` each, in
        stream order); ``{}`` when ``block_ms`` passed with nothing new, or when the read was
        woken by ``CLIENT UNBLOCK``.  ``client``: the connection to block on (a
        :class:`StreamReader`'s); default the queue's client.  A missing group (first use, a
        Redis restarted without persistence) is created for every lane and the read repeated.
        """
        if not lanes:
            return {}
        by_key = {self.keys.tasks(lane): lane for lane in lanes}
        streams = dict.fromkeys(by_key, ">")
        conn = client if client is not None else self.redis
        with redis_errors(f"read {len(lanes)} lanes"):
            try:
                reply = await conn.xreadgroup(self.group, consumer, streams, count=count, block=block_ms)
            except rexc.ResponseError as e:
                if not str(e).startswith("NOGROUP"):
                    raise
                for lane in lanes:
                    await self.ensure_group(lane)
                reply = await conn.xreadgroup(self.group, consumer, streams, count=count, block=block_ms)
        return _tasks_by_lane(reply, by_key)

    def reader(self) -> StreamReader:
        """A :class:`StreamReader` on a connection of its own from this queue's client pool."""
        return StreamReader(self)

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

    async def claim_pending_many(self, lanes: Sequence[str], consumer: str, min_idle_ms: int,
                                 count: int = 100) -> dict[str, list[Task]]:
        """:meth:`claim_pending` for many lanes: one pipelined round trip of XAUTOCLAIM (a page
        of up to ``count`` per lane); a lane with more pages is paged through on its own.

        Returns ``{lane: tasks}`` for lanes where something was claimed.  Lanes without a group
        give nothing.
        """
        if not lanes:
            return {}
        out: dict[str, list[Task]] = {}
        more: list[str] = []
        with redis_errors(f"claim pending tasks of {len(lanes)} lanes"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for lane in lanes:
                    pipe.xautoclaim(self.keys.tasks(lane), self.group, consumer, min_idle_time=min_idle_ms,
                                    start_id="0-0", count=count)
                replies = await pipe.execute(raise_on_error=False)
        for lane, reply in zip(lanes, replies):
            if isinstance(reply, rexc.ResponseError) and str(reply).startswith("NOGROUP"):
                continue
            if isinstance(reply, Exception):
                with redis_errors(f"claim pending tasks of lane {lane!r}"):
                    raise reply
            tasks = [t for t in (_task_from_entry(lane, eid, f) for eid, f in reply[1]) if t is not None]
            if as_str(reply[0]) != "0-0":
                more.append(lane)
            if tasks:
                out[lane] = tasks
        for lane in more:  # rare: a lane with more than one page pending
            seen = {t.entry_id for t in out.get(lane, [])}
            rest = [t for t in await self.claim_pending(lane, consumer, min_idle_ms) if t.entry_id not in seen]
            if rest:
                out.setdefault(lane, []).extend(rest)
        return out

    async def sweep(self, lanes: Sequence[str], min_idle_ms: int) -> tuple[dict[str, int], list[str]]:
        """One script call over many lanes: ``({lane: fence}, [lanes with a stuck entry])``.

        The fence is the guard's (0 where Redis has none); a lane is stuck when some entry has
        been pending on any consumer for at least ``min_idle_ms`` (lanes without a stream or a
        group are not).  Read-only: the agent's periodic check costs one round trip whatever the
        number of lanes, and claims (:meth:`claim_pending_many`) only where something is stuck.
        """
        if not lanes:
            return {}, []
        keys = [self.keys.tasks(lane) for lane in lanes] + [self.keys.fence(lane) for lane in lanes]
        if self._sweep is None:
            self._sweep = self.redis.register_script(_SWEEP_LUA)  # EVALSHA, reloaded after NOSCRIPT
        with redis_errors(f"check {len(lanes)} lanes"):
            fences, stuck = await self._sweep(keys=keys, args=[self.group, int(min_idle_ms)])
        return ({lane: int(as_str(f)) for lane, f in zip(lanes, fences)},
                [lanes[int(i) - 1] for i in stuck])

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


_SWEEP_LUA = """
-- KEYS: n lane streams, then the same n lanes' fence keys.  ARGV: group, min idle (ms).
-- Returns {fences, stuck}: fences[i] is lane i's fence ('0' if none); stuck lists the i whose
-- stream has an entry pending for at least the min idle time.
local n = #KEYS / 2
local fences, stuck = {}, {}
for i = 1, n do
  fences[i] = redis.call('GET', KEYS[n + i]) or '0'
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local p = redis.pcall('XPENDING', KEYS[i], ARGV[1], 'IDLE', ARGV[2], '-', '+', 1)
    if type(p) == 'table' and p.err == nil and #p > 0 then stuck[#stuck + 1] = i end
  end
end
return {fences, stuck}
"""


def _tasks_by_lane(reply: Any, by_key: Mapping[str, str]) -> dict[str, list[Task]]:
    """An XREADGROUP reply as ``{lane: tasks}`` (``by_key``: stream key -> lane)."""
    out: dict[str, list[Task]] = {}
    # redis-py shapes: RESP2 [[stream, entries]]; RESP3 {stream: [entries]} (one more list).
    if isinstance(reply, dict):
        batches = [(as_str(k), wrapped[0]) for k, wrapped in reply.items() if wrapped]
    else:
        batches = [(as_str(k), entries) for k, entries in (reply or [])]
    for key, entries in batches:
        lane = by_key.get(key)
        if lane is None:
            continue
        tasks = [t for t in (_task_from_entry(lane, eid, f) for eid, f in entries) if t is not None]
        if tasks:
            out.setdefault(lane, []).extend(tasks)
    return out


#: A blocked read is woken when its set of lanes changes (:meth:`StreamReader.wake`), so it may
#: block long: what bounds it is the delay a lost wake-up may cost, and the idle cost (one call
#: per block).
LONGEST_BLOCK_MS = 5000


class StreamReader:
    """One blocking XREADGROUP at a time over many lanes, on a connection of its own.

    The connection is taken from the queue client's pool (``Redis.client()``: same settings,
    so the socket timeout already outlasts the block time) and held until :meth:`aclose`.
    :meth:`wake` ends a read in progress early from the pool's other connections with
    ``CLIENT UNBLOCK`` (the read then returns ``{}``), so a caller can change the set of lanes
    it reads without waiting for the block time.  One reader serves one task: calls to
    :meth:`read` must not overlap.
    """

    def __init__(self, queue: LaneQueue) -> None:
        self.queue = queue
        self._client: Redis = queue.redis.client()
        timeout = queue.redis.connection_pool.connection_kwargs.get("socket_timeout")
        #: The longest block a read may ask for: half the client's socket timeout (a blocked read
        #: must never look like a dead server), at most :data:`LONGEST_BLOCK_MS`.
        self.longest_block_ms = LONGEST_BLOCK_MS if not timeout else max(1, min(LONGEST_BLOCK_MS, int(timeout * 500)))
        self._client_id: int | None = None
        self.reading = False
        self.closed = False

    async def read(self, lanes: Sequence[str], consumer: str, count: int, block_ms: int) -> dict[str, list[Task]]:
        """:meth:`LaneQueue.read_many` on this reader's connection (raises ``BackendUnavailable``)."""
        if self._client_id is None:
            # Who to unblock. redis-py may reconnect on its own (a new id); wake() notices a
            # stale id and makes us ask again.
            with redis_errors("identify the lane reader's connection"):
                self._client_id = int(await self._client.client_id())
        self.reading = True
        try:
            return await self.queue.read_many(lanes, consumer, count, block_ms, client=self._client)
        except BaseException:
            self._client_id = None  # the connection may have been dropped (or the read cancelled)
            raise
        finally:
            self.reading = False

    async def wake(self, *, tries: int = 5) -> bool:
        """End the read in progress now (``CLIENT UNBLOCK``); True if one was woken.

        Retried a few times 5 ms apart: the read may not have reached Redis yet.  When it never
        gets through (our id is stale after a silent reconnect), the id is asked for again
        before the next read and this read ends at its block time.  Never raises: a failed
        wake only costs that delay.
        """
        for _ in range(tries):
            cid = self._client_id
            if not self.reading or cid is None or self.closed:
                return False
            try:
                if await self.queue.redis.client_unblock(cid):
                    return True
            except (rexc.RedisError, OSError) as exc:
                log.debug("could not wake the lane reader: %s", exc)
                return False
            await asyncio.sleep(0.005)
        self._client_id = None
        return False

    async def aclose(self) -> None:
        """Give the connection back to the pool (disconnected if a read was cut short)."""
        self.closed = True
        await self._client.aclose()
