"""The lane fencing guard: every write and ack a lane worker makes, through one Lua script.

Contract (the script's steps, the publish marker, bounded state: docs/backends.md): one call
atomically raises the lane's fence to a higher token, decides ``allow``/``would_deny``/``deny``
per mode, applies a task at most once (next seq, state hash, history entry, applied marker),
acks its stream entry, and says which schema versions of the event are published.  A ``deny``
writes nothing and raises :class:`~cbctl.core.model.errors.StaleFencingToken`; Redis transport
failures raise ``BackendUnavailable`` (:func:`~cbctl.core.backends.redis.client.redis_errors`).
Every decision is counted in ``redis_lane_ownership_decision_total{decision}``.
The script itself is guard.lua next to this module (shipped as package data).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from redis import exceptions as rexc
from redis.asyncio import Redis

from cbctl.core.backends.redis.client import as_str, json_compact, redis_errors
from cbctl.core.backends.redis.keys import GROUP, LaneKeys, check_name, check_workflow_id
from cbctl.core.model.config import DEFAULT_REDIS_HISTORY_MAX, DEFAULT_REDIS_RETENTION
from cbctl.core.model.errors import BackendUnavailable, StaleFencingToken
from cbctl.core.model.flags import GUARD_CANARY, GUARD_ENFORCE, GUARD_OBSERVE, GUARD_OFF, GUARD_VALUES
from cbctl.core.model.metrics import AgentMetrics

__all__ = [
    "GUARD_LUA", "RESERVED_FIELDS", "ApplyRequest", "Decision", "GuardFlag", "GuardResult", "LaneGuard",
    "ScriptMode", "WorkflowRecord", "resolve_mode",
]

log = logging.getLogger(__name__)

GuardFlag = Literal["off", "observe", "canary", "enforce"]
"""Values of the ``ownership.guard`` flag, for type checkers (a Literal cannot name constants;
the values are ``flags.GUARD_VALUES``, which the code compares against)."""

ScriptMode = Literal["off", "observe", "enforce"]
"""What the script is told: ``canary`` is resolved per lane before the call."""

_SCRIPT_MODES: tuple[str, ...] = (GUARD_OFF, GUARD_OBSERVE, GUARD_ENFORCE)
"""The flag values the script takes as they are (guard.lua's ARGV 1 mode)."""

Decision = Literal["allow", "would_deny", "deny"]
"""Guard decisions; also the ``decision`` label of ``redis_lane_ownership_decision_total``."""

RESERVED_FIELDS = frozenset({"seq", "last_task", "node", "token", "lane", "workflow_id", "updated_at", "pub"})
"""Workflow state fields written by the guard itself; an update may not set them."""

_MAX_TOKEN = 2**53

GUARD_LUA: str = resources.files(__package__).joinpath("guard.lua").read_text(encoding="utf-8")
"""The guard script (KEYS/ARGV/reply contract at its top)."""

# ARGV 1 for every (op, mode), encoded once.  Constants are packed into ARGV 1 and 3 and the
# update's fields into one JSON array, and the reply is one string: every argument costs the
# Python client encoding work and reply parsing was its largest cost (measured, bench/guard.py).
_OP_MODE: dict[tuple[str, str], bytes] = {
    (op, mode): f"{op} {mode}".encode()
    for op in ("fence", "ack", "apply", "apply_ack")
    for mode in _SCRIPT_MODES
}


def resolve_mode(flag: GuardFlag, lane: str, canary_lanes: Collection[str] = ()) -> ScriptMode:
    """The mode the script enforces for ``lane`` under the ``ownership.guard`` flag.

    ``canary`` enforces on the lanes in ``canary_lanes`` and observes everywhere else; the other
    flag values apply to every lane.  Raises ``ValueError`` for an unknown flag value.
    """
    if flag == GUARD_CANARY:
        return GUARD_ENFORCE if lane in canary_lanes else GUARD_OBSERVE
    if flag in _SCRIPT_MODES:
        return flag
    raise ValueError(f"unknown ownership.guard mode {flag!r} (expected one of {', '.join(GUARD_VALUES)})")


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


def _check_token(token: int) -> None:
    # Lua compares numbers as doubles: above 2**53 two different tokens could compare equal.
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < _MAX_TOKEN:
        raise ValueError(f"fencing token must be an int in [0, 2**53), got {token!r}")


@dataclass(frozen=True, slots=True)
class GuardResult:
    """What the guard did for one call.

    ``decision`` is the counted decision.  ``seq`` is the workflow sequence number of the task:
    freshly assigned when ``applied`` is true, the one assigned earlier when the task had already
    been applied (``already_applied``), 0 when nothing was applied (deny, ack-only, fence).
    ``current_token`` is the lane's fence after the call.  ``history_id`` is the id of the
    history entry written by this call, if any.  ``publish_versions``: the schema versions the
    event of this seq must be published in (the publish marker, docs/backends.md); ``()`` = none.
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
    f = {as_str(k): as_str(v) for k, v in fields.items()}
    return {
        "id": as_str(entry_id),
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
    keeps it current (docs/backends.md, "Publish marker").
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
        with redis_errors(f"apply task {task_id!r} on lane {lane!r}"):
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
        with redis_errors(f"apply {len(requests)} tasks"):
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
        check_name("lane", lane)
        _check_token(token)
        script_mode = resolve_mode(mode, lane, canary_lanes)
        keys = [self.keys.fence(lane), self.keys.tasks(lane)]
        args = [_OP_MODE["ack", script_mode], token, self._settings, lane, "", "", "", stream_entry_id, "{}", "[]"]
        with redis_errors(f"ack entry {stream_entry_id!r} on lane {lane!r}"):
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
        check_name("lane", lane)
        _check_token(token)
        keys = [self.keys.fence(lane), self.keys.tasks(lane)]
        args = [_OP_MODE["fence", GUARD_ENFORCE], token, self._settings, lane, "", "", "", "", "{}", "[]"]
        with redis_errors(f"raise the fence of lane {lane!r}"):
            raw = await self._eval(keys, args)
        return int(as_str(raw).split(" ")[2])

    async def current_fence(self, lane: str) -> int:
        """The highest fencing token Redis has seen for ``lane`` (0 if none)."""
        with redis_errors(f"read the fence of lane {lane!r}"):
            value = await self.redis.get(self.keys.fence(lane))
        return int(value) if value is not None else 0

    async def read_workflow(self, workflow_id: str) -> dict[str, Any]:
        """The workflow's state hash; ``{}`` if it has none.

        ``seq``, ``token`` and ``updated_at`` are ints; every other field is the stored string.
        """
        with redis_errors(f"read workflow {workflow_id!r}"):
            raw = await self.redis.hgetall(self.keys.workflow(workflow_id))
        state: dict[str, Any] = {as_str(k): as_str(v) for k, v in raw.items()}
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
        with redis_errors(f"read the history of workflow {workflow_id!r}"):
            entries = await self.redis.xrange(self.keys.history(workflow_id), min=start, count=count)
        return [_history_entry(entry_id, fields) for entry_id, fields in entries]

    async def record(self, workflow_id: str, lo: int, hi: int, *, page: int = 64) -> WorkflowRecord:
        """The workflow's publish marker and its history entries with ``lo <= seq <= hi``.

        Reads the history from its newest end backwards, ``page`` entries per request, and stops
        below ``lo``: a gap is usually recent, and the whole history is never loaded at once.
        Raises ``BackendUnavailable`` when Redis cannot be reached.
        """
        keys = self.keys
        with redis_errors(f"read the record of workflow {workflow_id!r}"):
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
                top = f"({as_str(batch[-1][0])}"
        marker: dict[int, int] = {}
        if pub_raw:
            for part in as_str(pub_raw).split(","):
                v, _, from_seq = part.partition(":")
                marker[int(v)] = int(from_seq)
        oldest = _history_entry(first[0][0], first[0][1])["seq"] if first else None
        entries.reverse()
        return WorkflowRecord(publish_from=marker, entries=entries, oldest=oldest)

    # -- internals ---------------------------------------------------------------------------

    def _apply_call(self, req: ApplyRequest, canary_lanes: Collection[str]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the script for one apply request (validates the request)."""
        check_name("lane", req.lane)
        _check_token(req.token)
        check_workflow_id(req.workflow_id)
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
            pairs.append(value if isinstance(value, str) else json_compact(value))
        args = [op_mode, req.token, self._settings, req.lane, wf, req.task_id, req.task_type,
                req.stream_entry_id or "", json_compact(req.update), json_compact(pairs),
                self._publish_arg[_finishes(req.update)]]
        return k, args

    async def _load(self) -> str:
        self._sha = as_str(await self.redis.script_load(self._script))
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
        decision, seq, fence, applied, hid, pubv = as_str(raw).split(" ")
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
