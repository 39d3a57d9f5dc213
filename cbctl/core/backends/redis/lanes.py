"""Redis lanes and the fencing guard.

A *lane* is a Redis stream of tasks; every workflow hashes to exactly one lane
(:func:`lane_for`).  The lane's owner (a lease in the coordination store, see
``cbctl.core.agent.ownership``) reads the stream through the consumer group ``workers`` and applies
each task.  Every state write and every ack a lane worker makes goes through ONE Lua script, the
*guard*, which atomically

1. compares the caller's fencing token with the highest token Redis has seen for the lane
   (``fence``) and raises ``fence`` when the caller's token is higher (a new owner's first write
   raises the bar for everybody).  This happens in every mode, ``off`` included, so the bar is
   already right when the guard is switched to ``enforce``;
2. decides, per mode: ``off`` → no check, always ``allow``; ``observe`` → a lower token gives
   ``would_deny`` but the write happens; ``enforce`` → a lower token gives ``deny`` and NOTHING
   is written (not the state, not the history, not the ack).  ``canary`` is resolved by the
   caller into ``enforce`` (canary lane) or ``observe`` (any other lane): :func:`resolve_mode`;
3. applies the task once: a task id already applied to the workflow returns the seq it got then
   and writes nothing (so a redelivered task never writes workflow state twice); otherwise it
   assigns the workflow's next sequence number (strictly +1, no gaps), writes the state hash and
   appends one entry to the workflow's history stream;
4. acks (and by default deletes) the stream entry the task came from, in the same call, so a
   task is either applied *and* acked, or neither;
5. decides which schema versions of the update's canonical event are published (the *publish
   marker*, below) and, when the update finishes the workflow, sets the retention TTL.

Publish marker (no holes at a flag transition)
----------------------------------------------
The canonical stream promises, per workflow and schema version, every event from the first one
published for that workflow, with no gap.  Nodes apply a change of ``eventbus.publish`` /
``eventbus.schema_versions`` at slightly different times, and with competing consumers
(``cluster.enabled`` false) consecutive seqs of one workflow are applied by different nodes
within milliseconds: if each node decided from its own flags, seq 3 could be published by a
node already at ``shadow`` and seq 4 dropped by one still at ``off`` -- a hole nothing can fill.
So the decision is taken here, where every event of a workflow passes in seq order, atomically
with the seq assignment: the caller says which versions *it* would publish
(:attr:`LaneGuard.publish_versions`, from its flags), and the workflow hash keeps ``pub`` =
``"<version>:<first seq>,..."``: for each version, the seq at which the workflow's publishing
began.  A fresh apply by a publishing caller starts the versions it publishes that have not
begun (at this seq).  Every apply -- fresh or a re-apply of an earlier task -- answers with the
versions whose publishing began at or before the task's seq (:attr:`GuardResult.publish_versions`),
and the agent publishes exactly those, whatever its own flags say.  Consequences:

* off -> shadow/on: a workflow starts publishing at the first seq applied by a node that has the
  new flags; every later seq is published, also by nodes still at ``off``.
* on -> off (or a version dropped from ``eventbus.schema_versions``): a workflow whose
  publishing began keeps publishing until it ends; only workflows that have not begun stay
  unpublished.  Chosen over "stop at once" because stopping tears exactly the hole this
  prevents (and a later ``on`` would resume past it); the cost is that ``off`` takes effect
  per workflow, not per event.  The marker lives with the workflow's keys and expires with them.
* a re-applied task (redelivery after a crash) is published iff its seq is at or after the
  marker: a late re-publish never lands below the point where the workflow's stream begins.

Bounded state
-------------
Each workflow's history stream keeps at most ``history_max`` entries (exact ``MAXLEN``), and an
update that finishes the workflow (its ``finished`` field is true, e.g. the demo workload's last
transition) gives the workflow's three keys a TTL of ``retention`` seconds, so finished
workflows leave Redis after the retention period.  A workflow that never finishes keeps its keys
(the seq counter must never be reset under a live workflow, or event ids would be reused).

Equal tokens are allowed: the current owner writes with the token it raised the fence to.

Key layout (single Redis; no cluster hash tags needed), with ``P = cb:<cluster>:``:

=====================================  ======  ==================================================
key                                    type    content
=====================================  ======  ==================================================
``P lane:<lane>:tasks``                stream  tasks: ``workflow_id, task_id, type, payload``
                                               (JSON); consumer group ``workers``
``P lane:<lane>:fence``                string  highest fencing token seen for the lane
``P wf:<workflow_id>``                 hash    workflow state: the update's fields plus ``seq``,
                                               ``last_task``, ``node``, ``token``, ``lane``,
                                               ``workflow_id``, ``updated_at`` (ms, Redis clock),
                                               ``pub`` (the publish marker, see above)
``P wf:<workflow_id>:applied``         hash    ``task_id -> seq`` of every applied task
``P wf:<workflow_id>:history``         stream  one entry per applied update: ``seq, type,
                                               task_id, node, token, lane, at, data`` (JSON)
=====================================  ======  ==================================================

Every decision is counted in ``redis_lane_ownership_decision_total{decision}``; a deny also counts
``redis_lane_stale_fencing_total`` and logs lane, node, token and current token (WARNING);
a would_deny is logged at INFO.  ``raise_fence`` is not a decision and is not counted.

Redis's script cache is flushed by ``SCRIPT FLUSH`` and by every restart; the guard re-loads the
script on ``NOSCRIPT`` and retries (a ``NOSCRIPT`` reply means the script did not run).

Durability caveat: the fence, the streams and the applied markers live in Redis memory.  A Redis
that restarts without persistence forgets the fence (stale tokens pass until the current owner
writes again, or re-raises with :meth:`LaneGuard.raise_fence`) and forgets un-acked tasks.

Errors: Redis connection errors and timeouts (and ``READONLY``/``OOM`` replies) become
:class:`~cbctl.core.model.errors.BackendUnavailable` at this edge; a denied write raises
:class:`~cbctl.core.model.errors.StaleFencingToken`.  Any other Redis reply error is a bug in this
module and propagates unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import uuid
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from cbctl.core.model.config import DEFAULT_REDIS_HISTORY_MAX, DEFAULT_REDIS_RETENTION
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, StaleFencingToken
from cbctl.core.model.metrics import AgentMetrics

log = logging.getLogger(__name__)

GuardFlag = Literal["off", "observe", "canary", "enforce"]
"""Values of the ``ownership.guard`` flag."""

ScriptMode = Literal["off", "observe", "enforce"]
"""What the script is told: ``canary`` is resolved per lane before the call."""

Decision = Literal["allow", "would_deny", "deny"]
"""Guard decisions; also the ``decision`` label of ``redis_lane_ownership_decision_total``."""

GROUP = "workers"
"""Consumer group of every lane stream."""

RESERVED_FIELDS = frozenset({"seq", "last_task", "node", "token", "lane", "workflow_id", "updated_at", "pub"})
"""Workflow state fields written by the guard itself; an update may not set them."""

_RESERVED_SUFFIXES = frozenset({"history", "applied"})
_MAX_TOKEN = 2**53

# KEYS: 1 fence, 2 lane stream, [3 wf state, 4 wf history, 5 wf applied]  (apply ops only)
# ARGV: 1 "<op> <mode>"  op: fence|ack|apply|apply_ack, mode: off|observe|enforce
#       2 token
#       3 "<group> <delete acked 0|1> <history maxlen, 0 = unbounded> <retention s, 0 = none> <node id>"
#       4 lane, 5 workflow_id, 6 task_id, 7 task type, 8 stream entry id ('' = none)
#       9 the update as JSON (history 'data', types kept as given)
#       10 the update as a JSON array of strings [field, value, ...] (state hash fields)
#       11 "<finished 0|1> <versions the caller publishes, comma-separated, or ->"
# Constants are packed into ARGV 1 and 3 and the update's fields into one JSON array: every
# argument costs the Python client encoding work, and the client, not Redis, is what limits
# guarded writes/s (measured; see bench/guard.py).
# Returns ONE string "<decision> <seq> <fence> <applied 0|1> <history id or -> <versions to publish
# for this seq, comma-separated, or ->": a single bulk
# reply costs the client a fraction of what parsing a 5-element array does (measured: reply
# parsing was the largest client-side cost of a guarded write).
GUARD_LUA = r"""
local op, mode = string.match(ARGV[1], '^(%S+) (%S+)$')
local token_s = ARGV[2]
local token = tonumber(token_s)
local fence_s = redis.call('GET', KEYS[1]) or '0'
local fence = tonumber(fence_s)
if token > fence then
  -- a newer owner: raise the bar before anything else, so every older token is now stale
  redis.call('SET', KEYS[1], token_s)
  fence = token
  fence_s = token_s
end
if op == 'fence' then
  return 'allow 0 ' .. fence_s .. ' 0 - -'
end
local decision = 'allow'
if token < fence and mode ~= 'off' then
  if mode == 'enforce' then
    return 'deny 0 ' .. fence_s .. ' 0 - -'
  end
  decision = 'would_deny'
end
local group, delete_acked, maxlen, retention, node = string.match(ARGV[3], '^(%S+) ([01]) (%d+) (%d+) (.*)$')
local lane, workflow_id, task_id, task_type, entry_id = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local seq = '0'
local applied = '0'
local hid = '-'
local pubv = '-'
if op == 'apply' or op == 'apply_ack' then
  local finished, want = string.match(ARGV[11], '^([01]) (%S+)$')
  local prev = redis.call('HGET', KEYS[5], task_id)
  local pub = redis.call('HGET', KEYS[3], 'pub') or ''
  if prev then
    -- already applied (redelivery, retry after a lost reply): write nothing, report its seq
    seq = prev
  else
    seq = string.format('%d', redis.call('HINCRBY', KEYS[3], 'seq', 1))
    if want ~= '-' then
      -- the caller publishes: versions whose publishing has not begun begin at this seq
      local added = ''
      for v in string.gmatch(want, '%d+') do
        if not string.find(',' .. pub, ',' .. v .. ':', 1, true) then
          added = added .. ',' .. v .. ':' .. seq
        end
      end
      if added ~= '' then
        if pub == '' then pub = string.sub(added, 2) else pub = pub .. added end
        redis.call('HSET', KEYS[3], 'pub', pub)
      end
    end
    local t = redis.call('TIME')
    local now_ms = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
    local fields = cjson.decode(ARGV[10])
    -- reserved fields last, so they win over anything in the update
    local reserved = {'seq', seq, 'last_task', task_id, 'node', node, 'token', token_s,
                      'lane', lane, 'workflow_id', workflow_id, 'updated_at', now_ms}
    for i = 1, #reserved do fields[#fields + 1] = reserved[i] end
    redis.call('HSET', KEYS[3], unpack(fields))
    local entry = {'seq', seq, 'type', task_type, 'task_id', task_id, 'node', node,
                   'token', token_s, 'lane', lane, 'at', now_ms, 'data', ARGV[9]}
    if maxlen ~= '0' then
      hid = redis.call('XADD', KEYS[4], 'MAXLEN', maxlen, '*', unpack(entry))
    else
      hid = redis.call('XADD', KEYS[4], '*', unpack(entry))
    end
    redis.call('HSET', KEYS[5], task_id, seq)
    applied = '1'
    if finished == '1' and retention ~= '0' then
      redis.call('EXPIRE', KEYS[3], retention)
      redis.call('EXPIRE', KEYS[4], retention)
      redis.call('EXPIRE', KEYS[5], retention)
    end
  end
  if pub ~= '' then
    -- the versions whose publishing began at or before this seq
    local n = tonumber(seq)
    local out = ''
    for v, from in string.gmatch(pub, '(%d+):(%d+)') do
      if tonumber(from) <= n then out = out .. ',' .. v end
    end
    if out ~= '' then pubv = string.sub(out, 2) end
  end
end
if (op == 'ack' or op == 'apply_ack') and entry_id ~= '' then
  redis.call('XACK', KEYS[2], group, entry_id)
  if delete_acked == '1' then
    redis.call('XDEL', KEYS[2], entry_id)
  end
end
return decision .. ' ' .. seq .. ' ' .. fence_s .. ' ' .. applied .. ' ' .. hid .. ' ' .. pubv
"""

# ARGV 1 for every (op, mode), encoded once.
_OP_MODE: dict[tuple[str, str], bytes] = {
    (op, mode): f"{op} {mode}".encode()
    for op in ("fence", "ack", "apply", "apply_ack")
    for mode in ("off", "observe", "enforce")
}
# One reusable encoder: json.dumps with non-default arguments builds a new encoder per call.
# ensure_ascii=False: the JSON goes to Redis as UTF-8, so cjson needs no \u decoding.
_json_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


# -- helpers --------------------------------------------------------------------------------


def lane_for(workflow_id: str, lanes: Sequence[str]) -> str:
    """The lane ``workflow_id`` belongs to.

    Stable across processes, hosts and Python versions (CRC-32 of the UTF-8 id, not the salted
    built-in ``hash``), and it depends on the *order* of ``lanes``: every node must use the same
    inventory list.  Raises ``ValueError`` if ``lanes`` is empty.
    """
    if not lanes:
        raise ValueError("no lanes configured")
    return lanes[zlib.crc32(workflow_id.encode("utf-8")) % len(lanes)]


def resolve_mode(flag: GuardFlag, lane: str, canary_lanes: Collection[str] = ()) -> ScriptMode:
    """The mode the script enforces for ``lane`` under the ``ownership.guard`` flag.

    ``canary`` enforces on the lanes in ``canary_lanes`` and observes everywhere else; the other
    flag values apply to every lane.  Raises ``ValueError`` for an unknown flag value.
    """
    if flag == "canary":
        return "enforce" if lane in canary_lanes else "observe"
    if flag in ("off", "observe", "enforce"):
        return flag
    raise ValueError(f"unknown ownership.guard mode {flag!r} (expected one of off, observe, canary, enforce)")


def _s(value: Any) -> str:
    """A Redis reply item as ``str`` whether or not the client decodes responses."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


_NO_VERSIONS: tuple[int, ...] = ()


@functools.lru_cache(maxsize=64)
def _versions(csv: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)`` (cached: a handful of distinct values)."""
    return tuple(int(v) for v in csv.split(","))


def _finishes(update: Mapping[str, Any]) -> bool:
    """True when ``update`` finishes its workflow (its ``finished`` field is true): the guard
    then starts the retention TTL of the workflow's keys."""
    f = update.get("finished")
    if isinstance(f, str):
        return f.strip().lower() in ("1", "true", "yes")
    return f is True or (isinstance(f, int) and f == 1)


def _check_name(kind: str, name: str) -> None:
    # ':' separates key segments; a cluster or lane name containing one could alias another key.
    if not name or ":" in name:
        raise ValueError(f"invalid {kind} name {name!r}: must be non-empty and contain no ':'")


def _check_workflow_id(workflow_id: str) -> None:
    # Workflow ids may contain ':', but one ending in ':history' or ':applied' would alias the
    # history/applied keys of another workflow.
    if not workflow_id:
        raise ValueError("empty workflow id")
    if ":" in workflow_id and workflow_id.rsplit(":", 1)[1] in _RESERVED_SUFFIXES:
        raise ValueError(f"invalid workflow id {workflow_id!r}: must not end in ':history' or ':applied'")


def _check_token(token: int) -> None:
    # Lua compares numbers as doubles: above 2**53 two different tokens could compare equal.
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < _MAX_TOKEN:
        raise ValueError(f"fencing token must be an int in [0, 2**53), got {token!r}")


@contextlib.contextmanager
def _redis_edge(action: str) -> Iterator[None]:
    """Convert Redis transport failures into cbctl errors (the backend edge)."""
    try:
        yield
    except rexc.AuthenticationError as e:
        raise AuthFailed(f"redis refused our credentials while trying to {action}: {e}", backend="redis") from e
    except (rexc.ConnectionError, rexc.TimeoutError) as e:
        raise BackendUnavailable(f"redis unreachable while trying to {action}: {e}", backend="redis") from e
    except (rexc.ReadOnlyError, rexc.OutOfMemoryError) as e:
        # The server answers but cannot take writes: unusable for lanes until an operator acts.
        raise BackendUnavailable(f"redis cannot accept writes while trying to {action}: {e}", backend="redis") from e


def redis_client(
    url: str,
    *,
    password: str | None = None,
    socket_timeout: float = 5.0,
    connect_timeout: float = 2.0,
    retries: int = 3,
    decode_responses: bool = True,
) -> Redis:
    """A ``redis.asyncio`` client configured the way lanes need it.

    Connection errors and timeouts are retried ``retries`` times with a short jittered backoff
    (10 ms doubling, capped at 500 ms) before the call fails (and the guard raises
    ``BackendUnavailable``).  This matters after a Redis restart: every pooled connection is
    then stale and the first command on each fails once.  ``Redis.from_url`` in redis-py 8.1
    configures no retry at all, so a bare ``from_url`` client surfaces every restart as an error.
    ``socket_timeout`` must exceed any ``block_ms`` passed to :meth:`LaneQueue.read`.
    """
    return Redis.from_url(
        url,
        password=password,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), retries),
        decode_responses=decode_responses,
    )


class LaneKeys:
    """The key layout of one cluster (see the module docstring)."""

    def __init__(self, cluster: str) -> None:
        _check_name("cluster", cluster)
        self.cluster = cluster
        self.prefix = f"cb:{cluster}:"

    def tasks(self, lane: str) -> str:
        """The lane's task stream."""
        return f"{self.prefix}lane:{lane}:tasks"

    def fence(self, lane: str) -> str:
        """The lane's highest fencing token."""
        return f"{self.prefix}lane:{lane}:fence"

    def workflow(self, workflow_id: str) -> str:
        """The workflow's state hash."""
        return f"{self.prefix}wf:{workflow_id}"

    def history(self, workflow_id: str) -> str:
        """The workflow's append-only history stream."""
        return f"{self.prefix}wf:{workflow_id}:history"

    def applied(self, workflow_id: str) -> str:
        """The workflow's applied-task markers (``task_id -> seq``)."""
        return f"{self.prefix}wf:{workflow_id}:applied"


# -- the guard ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuardResult:
    """What the guard did for one call.

    ``decision`` is the counted decision.  ``seq`` is the workflow sequence number of the task:
    freshly assigned when ``applied`` is true, the one assigned earlier when the task had already
    been applied (``already_applied``), 0 when nothing was applied (deny, ack-only, fence).
    ``current_token`` is the lane's fence after the call.  ``history_id`` is the id of the
    history entry written by this call, if any.  ``publish_versions``: the schema versions the
    event of this seq must be published in (the publish marker, module doc); ``()`` = none.
    """

    decision: Decision
    seq: int
    current_token: int
    applied: bool
    history_id: str | None = None
    publish_versions: tuple[int, ...] = ()

    @property
    def already_applied(self) -> bool:
        """True when the task had been applied before: nothing was written this time."""
        return self.decision != "deny" and not self.applied and self.seq > 0


@dataclass(frozen=True, slots=True)
class WorkflowRecord:
    """Part of a workflow's record (:meth:`LaneGuard.record`): ``publish_from`` maps each schema
    version whose publishing has begun to the seq it began at; ``entries`` are history entries
    (as :meth:`LaneGuard.history` returns them) in seq order; ``oldest`` is the lowest seq the
    history still holds (``None``: no history, e.g. the workflow's keys expired)."""

    publish_from: dict[int, int]
    entries: list[dict[str, Any]]
    oldest: int | None


def _history_entry(entry_id: Any, fields: Mapping[Any, Any]) -> dict[str, Any]:
    f = {_s(k): _s(v) for k, v in fields.items()}
    return {
        "id": _s(entry_id),
        "seq": int(f["seq"]),
        "type": f.get("type", ""),
        "task_id": f.get("task_id", ""),
        "node": f.get("node", ""),
        "token": int(f.get("token", "0")),
        "lane": f.get("lane", ""),
        "at": int(f.get("at", "0")),
        "data": json.loads(f.get("data", "{}")),
    }


@dataclass(frozen=True, slots=True)
class ApplyRequest:
    """One task transition for :meth:`LaneGuard.apply_many` (same meaning as ``apply``'s args)."""

    lane: str
    token: int
    mode: GuardFlag
    workflow_id: str
    task_id: str
    update: Mapping[str, Any]
    stream_entry_id: str | None = None
    task_type: str = "update"


class LaneGuard:
    """Every write a lane worker makes in Redis, through the fencing script.

    ``redis_client`` is a ``redis.asyncio.Redis`` (with or without ``decode_responses``); its
    retry policy decides how long a call waits for an unreachable Redis before
    ``BackendUnavailable``.  ``metrics`` may be ``None`` (CLI, tests).  Safe to share between
    coroutines.

    ``history_maxlen``: entries kept per workflow history (``None``/0 = unbounded; default the
    config default ``redis.history-max``); ``retention``: seconds a finished workflow's keys live
    (0 = forever; default ``redis.retention``).  :attr:`publish_versions` is what this node
    publishes under its current flags (``()`` while ``eventbus.publish`` is off); the event bus
    keeps it current (module doc, "Publish marker").
    """

    def __init__(
        self,
        redis_client: Redis,
        cluster: str,
        metrics: AgentMetrics | None,
        node_id: str,
        *,
        group: str = GROUP,
        delete_acked: bool = True,
        history_maxlen: int | None = DEFAULT_REDIS_HISTORY_MAX,
        retention: float = DEFAULT_REDIS_RETENTION,
    ) -> None:
        self.redis = redis_client
        self.keys = LaneKeys(cluster)
        self.metrics = metrics
        self.node_id = node_id
        self.group = group
        if not group or any(c.isspace() for c in group):
            raise ValueError(f"invalid consumer group name {group!r}")
        if history_maxlen is not None and history_maxlen < 0:
            raise ValueError("history_maxlen must be >= 0")
        if retention < 0:
            raise ValueError("retention must be >= 0")
        self.history_maxlen = history_maxlen or 0
        # EXPIRE takes whole seconds; a positive retention below 1 s still expires (after 1 s).
        self.retention = max(1, math.ceil(retention)) if retention > 0 else 0
        self._settings = (f"{group} {1 if delete_acked else 0} {self.history_maxlen} {self.retention} "
                          f"{node_id}").encode()
        self._publish_arg = {False: b"0 -", True: b"1 -"}
        self._publish_versions: tuple[int, ...] = ()
        self._script = GUARD_LUA
        self._sha: str | None = None
        # Labelled children resolved once: .labels() costs a dict lookup and a lock per call.
        self._counters: dict[str, Any] = {}
        if metrics is not None:
            for d in ("allow", "would_deny", "deny"):
                self._counters[d] = metrics.lane_decisions.labels(decision=d)

    # -- public API --------------------------------------------------------------------------

    @property
    def publish_versions(self) -> tuple[int, ...]:
        """The schema versions this node publishes under its flags (``()`` = publish off)."""
        return self._publish_versions

    @publish_versions.setter
    def publish_versions(self, versions: Collection[int]) -> None:
        vs = tuple(sorted({int(v) for v in versions}))
        if any(v < 1 for v in vs):
            raise ValueError(f"schema versions must be >= 1, got {vs}")
        self._publish_versions = vs
        want = ",".join(map(str, vs)) or "-"
        self._publish_arg = {False: f"0 {want}".encode(), True: f"1 {want}".encode()}

    async def apply(
        self,
        lane: str,
        token: int,
        mode: GuardFlag,
        workflow_id: str,
        task_id: str,
        update: Mapping[str, Any],
        stream_entry_id: str | None = None,
        *,
        task_type: str = "update",
        canary_lanes: Collection[str] = (),
    ) -> GuardResult:
        """Apply one task transition to ``workflow_id`` (and ack ``stream_entry_id``), guarded.

        Atomic: the fence check, the seq assignment, the state write, the history entry, the
        applied marker and the ack happen in one script call or not at all.  A ``task_id``
        already applied to the workflow writes nothing (the entry is still acked) and returns
        ``applied=False`` with the earlier seq.  ``update`` values are stored as strings (non-str
        values as JSON) and may not use :data:`RESERVED_FIELDS`.

        Raises ``StaleFencingToken`` when the decision is ``deny`` (after counting it and
        ``redis_lane_stale_fencing_total``): nothing was written or acked, the entry stays
        pending.  Raises ``BackendUnavailable`` when Redis cannot be reached.
        """
        req = ApplyRequest(lane, token, mode, workflow_id, task_id, update, stream_entry_id, task_type)
        keys, args = self._apply_call(req, canary_lanes)
        with _redis_edge(f"apply task {task_id!r} on lane {lane!r}"):
            raw = await self._eval(keys, args)
        result = self._record(raw, req.lane, req.token, workflow_id=workflow_id, task_id=task_id)
        if result.decision == "deny":
            raise self._stale(lane, token, result.current_token)
        return result

    async def apply_many(
        self, requests: Sequence[ApplyRequest], *, canary_lanes: Collection[str] = ()
    ) -> list[GuardResult]:
        """Apply several transitions in one pipelined round trip (not one transaction).

        Each request is atomic on its own exactly as in :meth:`apply`; results come back in
        request order.  A denied request does NOT raise: its result has ``decision == "deny"``
        (counted and logged like in ``apply``) and the others still run.  Raises
        ``BackendUnavailable`` when Redis cannot be reached; requests that ran before the
        failure stay applied (re-applying them is safe: task ids are idempotent).
        """
        if not requests:
            return []
        calls = [self._apply_call(r, canary_lanes) for r in requests]
        with _redis_edge(f"apply {len(requests)} tasks"):
            raws = await self._eval_pipelined(calls)
        results: list[GuardResult] = []
        for req, raw in zip(requests, raws):
            results.append(self._record(raw, req.lane, req.token, workflow_id=req.workflow_id, task_id=req.task_id))
        return results

    async def ack(
        self,
        lane: str,
        token: int,
        mode: GuardFlag,
        stream_entry_id: str,
        *,
        canary_lanes: Collection[str] = (),
    ) -> GuardResult:
        """Ack (and delete, unless ``delete_acked=False``) a stream entry without a state write.

        For tasks the worker drops (malformed, obsolete).  Guarded and counted like
        :meth:`apply`; raises ``StaleFencingToken`` on deny (the entry stays pending).
        """
        _check_name("lane", lane)
        _check_token(token)
        script_mode = resolve_mode(mode, lane, canary_lanes)
        keys = [self.keys.fence(lane), self.keys.tasks(lane)]
        args = [_OP_MODE["ack", script_mode], token, self._settings, lane, "", "", "", stream_entry_id, "{}", "[]"]
        with _redis_edge(f"ack entry {stream_entry_id!r} on lane {lane!r}"):
            raw = await self._eval(keys, args)
        result = self._record(raw, lane, token)
        if result.decision == "deny":
            raise self._stale(lane, token, result.current_token)
        return result

    async def raise_fence(self, lane: str, token: int) -> int:
        """Raise the lane's fence to ``token`` (never lowers it); return the fence afterwards.

        A new owner calls this right after acquiring the lane, so the previous owner is fenced
        off before the new one has written anything.  A return value greater than ``token``
        means the caller's token is already stale.  Not a guard decision: nothing is counted.
        """
        _check_name("lane", lane)
        _check_token(token)
        keys = [self.keys.fence(lane), self.keys.tasks(lane)]
        args = [_OP_MODE["fence", "enforce"], token, self._settings, lane, "", "", "", "", "{}", "[]"]
        with _redis_edge(f"raise the fence of lane {lane!r}"):
            raw = await self._eval(keys, args)
        return int(_s(raw).split(" ")[2])

    async def current_fence(self, lane: str) -> int:
        """The highest fencing token Redis has seen for ``lane`` (0 if none)."""
        with _redis_edge(f"read the fence of lane {lane!r}"):
            value = await self.redis.get(self.keys.fence(lane))
        return int(value) if value is not None else 0

    async def read_workflow(self, workflow_id: str) -> dict[str, Any]:
        """The workflow's state hash; ``{}`` if it has none.

        ``seq``, ``token`` and ``updated_at`` are ints; every other field is the stored string.
        """
        with _redis_edge(f"read workflow {workflow_id!r}"):
            raw = await self.redis.hgetall(self.keys.workflow(workflow_id))
        state: dict[str, Any] = {_s(k): _s(v) for k, v in raw.items()}
        for k in ("seq", "token", "updated_at"):
            if k in state:
                state[k] = int(state[k])
        return state

    async def history(self, workflow_id: str, *, after: str = "-", count: int | None = None) -> list[dict[str, Any]]:
        """The workflow's applied updates in seq order (oldest first).

        Each item: ``id`` (history stream id), ``seq``, ``token``, ``at`` (ints), ``type``,
        ``task_id``, ``node``, ``lane`` (str) and ``data`` (the update as given).  ``after`` is
        an exclusive history id to resume from (``"-"`` = from the start).
        """
        start = "-" if after == "-" else f"({after}"
        with _redis_edge(f"read the history of workflow {workflow_id!r}"):
            entries = await self.redis.xrange(self.keys.history(workflow_id), min=start, count=count)
        return [_history_entry(entry_id, fields) for entry_id, fields in entries]

    async def record(self, workflow_id: str, lo: int, hi: int, *, page: int = 64) -> WorkflowRecord:
        """The workflow's publish marker and its history entries with ``lo <= seq <= hi``.

        Reads the history from its newest end backwards, ``page`` entries per request, and stops
        below ``lo``: a gap is usually recent, and the whole history is never loaded at once.
        Raises ``BackendUnavailable`` when Redis cannot be reached.
        """
        keys = self.keys
        with _redis_edge(f"read the record of workflow {workflow_id!r}"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(keys.workflow(workflow_id), "pub")
                pipe.xrange(keys.history(workflow_id), count=1)
                pub_raw, first = await pipe.execute()
            entries: list[dict[str, Any]] = []
            top = "+"
            done = False
            while not done:
                batch = await self.redis.xrevrange(keys.history(workflow_id), max=top, min="-", count=page)
                if not batch:
                    break
                for entry_id, fields in batch:
                    e = _history_entry(entry_id, fields)
                    if e["seq"] < lo:
                        done = True
                        break
                    if e["seq"] <= hi:
                        entries.append(e)
                if len(batch) < page:
                    break
                top = f"({_s(batch[-1][0])}"
        marker: dict[int, int] = {}
        if pub_raw:
            for part in _s(pub_raw).split(","):
                v, _, from_seq = part.partition(":")
                marker[int(v)] = int(from_seq)
        oldest = _history_entry(first[0][0], first[0][1])["seq"] if first else None
        entries.reverse()
        return WorkflowRecord(publish_from=marker, entries=entries, oldest=oldest)

    # -- internals ---------------------------------------------------------------------------

    def _apply_call(self, req: ApplyRequest, canary_lanes: Collection[str]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the script for one apply request (validates the request)."""
        _check_name("lane", req.lane)
        _check_token(req.token)
        _check_workflow_id(req.workflow_id)
        if not req.task_id:
            raise ValueError("empty task id")
        bad = RESERVED_FIELDS.intersection(req.update)
        if bad:
            raise ValueError(f"update sets reserved workflow fields: {', '.join(sorted(bad))}")
        script_mode = resolve_mode(req.mode, req.lane, canary_lanes)
        keys = self.keys
        wf = req.workflow_id
        k = [keys.fence(req.lane), keys.tasks(req.lane), keys.workflow(wf), keys.history(wf), keys.applied(wf)]
        op_mode = _OP_MODE["apply_ack" if req.stream_entry_id else "apply", script_mode]
        pairs: list[str] = []
        for name, value in req.update.items():
            pairs.append(name)
            pairs.append(value if isinstance(value, str) else _json_compact(value))
        args = [op_mode, req.token, self._settings, req.lane, wf, req.task_id, req.task_type,
                req.stream_entry_id or "", _json_compact(req.update), _json_compact(pairs),
                self._publish_arg[_finishes(req.update)]]
        return k, args

    async def _load(self) -> str:
        self._sha = _s(await self.redis.script_load(self._script))
        return self._sha

    async def _eval(self, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script first if needed and again after ``NOSCRIPT``.

        ``NOSCRIPT`` means the script did not run, so the retry cannot apply anything twice.
        """
        sha = self._sha or await self._load()
        try:
            return await self.redis.evalsha(sha, len(keys), *keys, *args)
        except rexc.NoScriptError:
            # The script cache was flushed (SCRIPT FLUSH, or Redis restarted).
            log.info("redis lost the lane guard script (NOSCRIPT); reloading it")
            sha = await self._load()
            return await self.redis.evalsha(sha, len(keys), *keys, *args)

    async def _eval_pipelined(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Pipelined EVALSHA of every call; calls that got ``NOSCRIPT`` are re-sent after a load."""
        sha = self._sha or await self._load()
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    keys, args = calls[i]
                    pipe.evalsha(sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
            retry: list[int] = []
            for i, reply in zip(todo, replies):
                if isinstance(reply, rexc.NoScriptError):
                    retry.append(i)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    results[i] = reply
            if not retry:
                return results
            log.info("redis lost the lane guard script (NOSCRIPT); reloading it")
            sha = await self._load()
            todo = retry
        raise BackendUnavailable("redis keeps losing the lane guard script (NOSCRIPT after reload)", backend="redis")

    def _record(self, raw: Any, lane: str, token: int, *, workflow_id: str = "", task_id: str = "") -> GuardResult:
        """Turn a script reply into a GuardResult; count it and log stale tokens."""
        decision, seq, fence, applied, hid, pubv = _s(raw).split(" ")
        current = int(fence)
        result = GuardResult(
            decision=decision,  # type: ignore[arg-type]  # the script only returns Decision values
            seq=int(seq),
            current_token=current,
            applied=applied == "1",
            history_id=None if hid == "-" else hid,
            publish_versions=_NO_VERSIONS if pubv == "-" else _versions(pubv),
        )
        counter = self._counters.get(decision)
        if counter is not None:
            counter.inc()
        if decision == "deny":
            if self.metrics is not None:
                self.metrics.stale_fencing.inc()
            log.warning(
                "stale fencing token denied: lane=%s node=%s token=%d current_token=%d workflow=%s task=%s",
                lane, self.node_id, token, current, workflow_id, task_id,
            )
        elif decision == "would_deny":
            log.info(
                "stale fencing token (observe, allowed): lane=%s node=%s token=%d current_token=%d workflow=%s task=%s",
                lane, self.node_id, token, current, workflow_id, task_id,
            )
        return result

    def _stale(self, lane: str, token: int, current: int) -> StaleFencingToken:
        return StaleFencingToken(
            f"lane {lane!r}: fencing token {token} of node {self.node_id!r} is stale (current {current})",
            lane=lane,
            token=token,
            current_token=current,
        )


# -- the queue ------------------------------------------------------------------------------


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
    f = {_s(k): _s(v) for k, v in fields.items()}
    eid = _s(entry_id)
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
            _check_name("lane", lane)
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
        _check_workflow_id(workflow_id)
        unknown = set(task) - {"task_id", "type", "payload"}
        if unknown:
            raise ValueError(f"unknown task keys: {', '.join(sorted(unknown))}")
        fields = {
            "workflow_id": workflow_id,
            "task_id": str(task.get("task_id") or uuid.uuid4().hex),
            "type": str(task.get("type", "task")),
            "payload": _json_compact(task.get("payload", {})),
        }
        lane = self.lane_of(workflow_id)
        with _redis_edge(f"enqueue a task on lane {lane!r}"):
            entry_id = await self.redis.xadd(
                self.keys.tasks(lane), fields, maxlen=self.maxlen, approximate=True
            )
        return _s(entry_id)

    async def ensure_group(self, lane: str) -> None:
        """Create the lane's stream and consumer group if missing (from the first entry)."""
        with _redis_edge(f"create the consumer group of lane {lane!r}"):
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
        with _redis_edge(f"read lane {lane!r}"):
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
        with _redis_edge(f"claim pending tasks of lane {lane!r}"):
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
                cursor = _s(reply[0])
                for entry_id, fields in reply[1]:
                    task = _task_from_entry(lane, entry_id, fields)
                    if task is not None:
                        tasks.append(task)
                if cursor == "0-0":
                    break
        return tasks

    async def pending_count(self, lane: str) -> int:
        """Tasks read but not yet acked on ``lane`` (0 if the lane has no group)."""
        with _redis_edge(f"count pending tasks of lane {lane!r}"):
            try:
                info = await self.redis.xpending(self.keys.tasks(lane), self.group)
            except rexc.ResponseError as e:
                if str(e).startswith("NOGROUP"):
                    return 0
                raise
        return int(info["pending"])

    async def length(self, lane: str) -> int:
        """Entries in the lane stream (acked entries are deleted by the guard by default)."""
        with _redis_edge(f"measure lane {lane!r}"):
            return int(await self.redis.xlen(self.keys.tasks(lane)))
