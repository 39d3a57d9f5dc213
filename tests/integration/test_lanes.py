"""Redis lanes and the fencing guard against a real redis-server (no mocks).

Tests that only need *a* Redis share the session's ``shared_redis`` and isolate themselves with a
unique cluster prefix; tests that restart, stop or pause Redis get their own ``redis_server``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cbctl.core.model.errors import BackendUnavailable, StaleFencingToken
from cbctl.core.backends.redis.client import redis_client
from cbctl.core.backends.redis.guard import ApplyRequest, LaneGuard
from cbctl.core.backends.redis.keys import LaneKeys
from cbctl.core.backends.redis.queue import LaneQueue, lane_for
from cbctl.core.model.metrics import AgentMetrics
from cbctl.sandbox.waiting import wait_until

pytestmark = pytest.mark.integration

LANES = [f"lane-{i}" for i in range(8)]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def cluster(unique_cluster: str) -> str:
    """A cluster name no other test uses: isolation on the shared Redis."""
    return unique_cluster


@pytest.fixture
def metrics() -> AgentMetrics:
    return AgentMetrics("node-a")


@pytest.fixture
async def client(shared_redis) -> AsyncIterator[aredis.Redis]:
    c = redis_client(shared_redis.url)
    yield c
    await c.aclose()


@pytest.fixture
def guard(client: aredis.Redis, cluster: str, metrics: AgentMetrics) -> LaneGuard:
    return LaneGuard(client, cluster, metrics, "node-a")


@pytest.fixture
def queue(client: aredis.Redis, cluster: str) -> LaneQueue:
    return LaneQueue(client, cluster, LANES)


def decisions(metrics: AgentMetrics) -> dict[str, float]:
    """Current values of redis_lane_ownership_decision_total by decision."""
    return {
        d: metrics.registry.get_sample_value("redis_lane_ownership_decision_total", {"decision": d}) or 0.0
        for d in ("allow", "would_deny", "deny")
    }


def stale_count(metrics: AgentMetrics) -> float:
    return metrics.registry.get_sample_value("redis_lane_stale_fencing_total") or 0.0


# -- guard decisions ------------------------------------------------------------------------

# (mode, caller token vs fence 10) -> (decision, written, fence afterwards)
CASES = [
    ("off", 11, "allow", True, 11),
    ("off", 10, "allow", True, 10),
    ("off", 9, "allow", True, 10),
    ("observe", 11, "allow", True, 11),
    ("observe", 10, "allow", True, 10),
    ("observe", 9, "would_deny", True, 10),
    ("enforce", 11, "allow", True, 11),
    ("enforce", 10, "allow", True, 10),
    ("enforce", 9, "deny", False, 10),
]


@pytest.mark.parametrize(("mode", "token", "decision", "written", "fence_after"), CASES)
async def test_guard_decision_per_mode(
    guard: LaneGuard, metrics: AgentMetrics, mode, token, decision, written, fence_after, caplog
) -> None:
    lane = "lane-1"
    assert await guard.raise_fence(lane, 10) == 10
    before = decisions(metrics)
    if decision == "deny":
        with caplog.at_level("WARNING", logger="cbctl.core.backends.redis.guard"):
            with pytest.raises(StaleFencingToken) as exc:
                await guard.apply(lane, token, mode, "wf-1", "task-1", {"state": "running"})
        assert (exc.value.lane, exc.value.token, exc.value.current_token) == (lane, 9, 10)
        assert stale_count(metrics) == 1
        # the log names lane, node, token and current token
        assert any(
            "lane=lane-1" in r.getMessage() and "node=node-a" in r.getMessage()
            and "token=9" in r.getMessage() and "current_token=10" in r.getMessage()
            for r in caplog.records
        )
    else:
        result = await guard.apply(lane, token, mode, "wf-1", "task-1", {"state": "running"})
        assert result.decision == decision
        assert result.applied is True
        assert result.seq == 1
        assert result.current_token == fence_after
        assert stale_count(metrics) == 0
    after = decisions(metrics)
    assert {d: after[d] - before[d] for d in after} == {
        d: (1.0 if d == decision else 0.0) for d in ("allow", "would_deny", "deny")
    }
    state = await guard.read_workflow("wf-1")
    history = await guard.history("wf-1")
    if written:
        assert state["state"] == "running" and state["seq"] == 1 and state["token"] == token
        assert [h["seq"] for h in history] == [1]
    else:
        assert state == {} and history == []
    assert await guard.current_fence(lane) == fence_after


async def test_canary_enforces_on_canary_lanes_only(guard: LaneGuard, metrics: AgentMetrics) -> None:
    for lane in ("lane-1", "lane-2"):
        await guard.raise_fence(lane, 10)
    with pytest.raises(StaleFencingToken):
        await guard.apply("lane-1", 9, "canary", "wf-1", "t1", {"state": "x"}, canary_lanes={"lane-1"})
    result = await guard.apply("lane-2", 9, "canary", "wf-2", "t1", {"state": "x"}, canary_lanes={"lane-1"})
    assert result.decision == "would_deny" and result.applied
    assert decisions(metrics) == {"allow": 0, "would_deny": 1, "deny": 1}


async def test_raise_fence_fences_the_old_owner_before_the_new_one_writes(client, cluster, metrics) -> None:
    old = LaneGuard(client, cluster, metrics, "node-old")
    new = LaneGuard(client, cluster, None, "node-new")
    assert (await old.apply("lane-3", 5, "enforce", "wf-1", "t1", {"state": "a"})).applied
    assert await new.raise_fence("lane-3", 7) == 7
    with pytest.raises(StaleFencingToken) as exc:
        await old.apply("lane-3", 5, "enforce", "wf-1", "t2", {"state": "b"})
    assert exc.value.current_token == 7
    # never lowers
    assert await new.raise_fence("lane-3", 6) == 7
    assert await old.current_fence("lane-3") == 7
    assert (await old.read_workflow("wf-1"))["state"] == "a"
    # other lanes are not affected
    assert (await old.apply("lane-4", 5, "enforce", "wf-9", "t1", {"state": "a"})).decision == "allow"


# -- sequence numbers and idempotency -------------------------------------------------------


async def test_seq_is_plus_one_per_update_across_owner_changes(client, cluster) -> None:
    """Seq is assigned in Redis, so it keeps counting without gaps when the lane moves."""
    nodes = [LaneGuard(client, cluster, None, f"node-{i}") for i in range(3)]
    seqs = []
    for i in range(30):
        owner = i // 10  # the lane moves twice, each new owner with a higher token
        g = nodes[owner]
        r = await g.apply("lane-0", 100 + owner, "enforce", "wf-seq", f"task-{i}", {"state": f"s{i}"})
        seqs.append(r.seq)
    assert seqs == list(range(1, 31))
    history = await nodes[0].history("wf-seq")
    assert [h["seq"] for h in history] == list(range(1, 31))
    assert [h["node"] for h in history] == ["node-0"] * 10 + ["node-1"] * 10 + ["node-2"] * 10
    assert [h["task_id"] for h in history] == [f"task-{i}" for i in range(30)]
    state = await nodes[0].read_workflow("wf-seq")
    assert state["seq"] == 30 and state["state"] == "s29" and state["node"] == "node-2"


async def test_concurrent_applies_get_distinct_gapless_seqs(guard: LaneGuard) -> None:
    results = await asyncio.gather(
        *(guard.apply("lane-0", 1, "enforce", "wf-c", f"t{i}", {"i": i}) for i in range(100))
    )
    assert sorted(r.seq for r in results) == list(range(1, 101))
    assert [h["seq"] for h in await guard.history("wf-c")] == list(range(1, 101))


async def test_reapplying_a_task_writes_nothing(guard: LaneGuard) -> None:
    first = await guard.apply("lane-0", 1, "enforce", "wf-i", "task-1", {"state": "running"})
    state = await guard.read_workflow("wf-i")
    again = await guard.apply("lane-0", 1, "enforce", "wf-i", "task-1", {"state": "other"})
    assert (first.applied, first.seq) == (True, 1)
    assert (again.applied, again.seq, again.already_applied, again.history_id) == (False, 1, True, None)
    assert await guard.read_workflow("wf-i") == state  # not even updated_at moved
    assert len(await guard.history("wf-i")) == 1
    nxt = await guard.apply("lane-0", 1, "enforce", "wf-i", "task-2", {"state": "done"})
    assert nxt.seq == 2


async def test_update_values_and_reserved_fields(guard: LaneGuard) -> None:
    await guard.apply("lane-0", 1, "enforce", "wf-v", "t1", {"state": "s", "n": 3, "d": {"a": [1]}, "b": True})
    state = await guard.read_workflow("wf-v")
    assert (state["state"], state["n"], state["d"], state["b"]) == ("s", "3", '{"a":[1]}', "true")
    assert (await guard.history("wf-v"))[0]["data"] == {"state": "s", "n": 3, "d": {"a": [1]}, "b": True}
    with pytest.raises(ValueError, match="reserved"):
        await guard.apply("lane-0", 1, "enforce", "wf-v", "t2", {"seq": 99})


async def test_update_strings_survive_the_script_byte_for_byte(guard: LaneGuard) -> None:
    update = {"state": 'ü "quoted" \\ back\nslash\x00nul 🚀', "clé": "", "big": 2**60, "f": 0.1 + 0.2}
    await guard.apply("lane-0", 1, "enforce", "wf-u", "t1", update)
    state = await guard.read_workflow("wf-u")
    assert state["state"] == update["state"] and state["clé"] == ""
    assert (state["big"], state["f"]) == (str(2**60), "0.30000000000000004")
    assert (await guard.history("wf-u"))[0]["data"] == update
    r = await guard.apply("lane-0", 1, "enforce", "wf-u", "t2", {})
    assert r.applied and r.seq == 2


# -- apply + ack ----------------------------------------------------------------------------


async def test_apply_and_ack_are_one_atomic_step(guard: LaneGuard, queue: LaneQueue, client) -> None:
    wf = "wf-ack"
    lane = queue.lane_of(wf)
    await queue.enqueue(wf, {"task_id": "t1", "type": "start", "payload": {"x": 1}})
    [task] = await queue.read(lane, "node-a", count=10)
    assert (task.workflow_id, task.task_id, task.type, task.payload) == (wf, "t1", "start", {"x": 1})
    assert await queue.pending_count(lane) == 1

    await guard.raise_fence(lane, 10)
    with pytest.raises(StaleFencingToken):
        await guard.apply(lane, 9, "enforce", wf, task.task_id, {"state": "started"}, task.entry_id)
    # denied: nothing written AND not acked
    assert await queue.pending_count(lane) == 1
    assert await guard.read_workflow(wf) == {}

    r = await guard.apply(lane, 10, "enforce", wf, task.task_id, {"state": "started"}, task.entry_id,
                          task_type=task.type)
    assert r.applied and r.seq == 1
    assert await queue.pending_count(lane) == 0
    assert await queue.length(lane) == 0  # acked entries are deleted
    assert (await guard.history(wf))[0]["type"] == "start"


async def test_observe_mode_stale_write_still_acks(guard: LaneGuard, queue: LaneQueue) -> None:
    wf = "wf-obs"
    lane = queue.lane_of(wf)
    await queue.enqueue(wf, {"task_id": "t1"})
    [task] = await queue.read(lane, "node-a")
    await guard.raise_fence(lane, 10)
    r = await guard.apply(lane, 9, "observe", wf, task.task_id, {"state": "x"}, task.entry_id)
    assert r.decision == "would_deny" and r.applied
    assert await queue.pending_count(lane) == 0


async def test_redelivered_task_is_acked_without_a_second_write(guard: LaneGuard, queue: LaneQueue) -> None:
    wf = "wf-redeliver"
    lane = queue.lane_of(wf)
    await guard.apply(lane, 1, "enforce", wf, "t1", {"state": "a"})
    await queue.enqueue(wf, {"task_id": "t1"})  # the same task delivered again
    [task] = await queue.read(lane, "node-a")
    r = await guard.apply(lane, 1, "enforce", wf, task.task_id, {"state": "b"}, task.entry_id)
    assert r.already_applied and r.seq == 1
    assert await queue.pending_count(lane) == 0
    assert (await guard.read_workflow(wf))["state"] == "a"


async def test_guarded_ack_without_state_write(guard: LaneGuard, queue: LaneQueue, metrics) -> None:
    wf = "wf-drop"
    lane = queue.lane_of(wf)
    await queue.enqueue(wf, {"task_id": "t1"})
    await queue.enqueue(wf, {"task_id": "t2"})
    t1, t2 = await queue.read(lane, "node-a")
    await guard.raise_fence(lane, 3)
    with pytest.raises(StaleFencingToken):
        await guard.ack(lane, 2, "enforce", t1.entry_id)
    assert await queue.pending_count(lane) == 2
    r = await guard.ack(lane, 3, "enforce", t1.entry_id)
    assert (r.decision, r.applied, r.seq) == ("allow", False, 0)
    assert await queue.pending_count(lane) == 1
    assert await guard.read_workflow(wf) == {}
    assert decisions(metrics) == {"allow": 1, "would_deny": 0, "deny": 1}


async def test_apply_many_reports_denials_per_request(guard: LaneGuard, metrics: AgentMetrics) -> None:
    await guard.raise_fence("lane-5", 10)
    reqs = [
        ApplyRequest("lane-4", 1, "enforce", "wf-m1", "t1", {"state": "a"}),
        ApplyRequest("lane-5", 9, "enforce", "wf-m2", "t1", {"state": "a"}),  # stale
        ApplyRequest("lane-4", 1, "enforce", "wf-m1", "t2", {"state": "b"}),
        ApplyRequest("lane-4", 1, "enforce", "wf-m1", "t1", {"state": "c"}),  # duplicate
    ]
    results = await guard.apply_many(reqs)
    assert [(r.decision, r.applied, r.seq) for r in results] == [
        ("allow", True, 1), ("deny", False, 0), ("allow", True, 2), ("allow", False, 1),
    ]
    assert decisions(metrics) == {"allow": 3, "would_deny": 0, "deny": 1}
    assert stale_count(metrics) == 1
    assert (await guard.read_workflow("wf-m1"))["state"] == "b"
    assert await guard.read_workflow("wf-m2") == {}


# -- the script cache -----------------------------------------------------------------------


async def test_guard_survives_script_flush(redis_server, cluster) -> None:
    # its own server: SCRIPT FLUSH on the shared one would pull the rug from other tests' scripts
    client = redis_client(redis_server.url)
    guard = LaneGuard(client, cluster, None, "node-a")
    try:
        await _flush_scenario(guard, client)
    finally:
        await client.aclose()


async def _flush_scenario(guard: LaneGuard, client: aredis.Redis) -> None:
    assert (await guard.apply("lane-0", 1, "enforce", "wf-f", "t1", {"state": "a"})).seq == 1
    await client.script_flush()
    assert (await guard.apply("lane-0", 1, "enforce", "wf-f", "t2", {"state": "b"})).seq == 2
    await client.script_flush()
    results = await guard.apply_many(
        [ApplyRequest("lane-0", 1, "enforce", "wf-f", f"t{i}", {"state": "c"}) for i in range(3, 6)]
    )
    assert [r.seq for r in results] == [3, 4, 5]
    await client.script_flush()
    assert await guard.raise_fence("lane-0", 2) == 2
    await client.script_flush()
    with pytest.raises(StaleFencingToken):
        await guard.apply("lane-0", 1, "enforce", "wf-f", "t9", {"state": "d"})


@pytest.mark.chaos
async def test_guard_survives_a_real_redis_restart(redis_server, cluster) -> None:
    """The harness runs Redis as production must (AOF, appendfsync everysec): a restart loses
    the script cache but keeps the fence, the workflow's seq, its applied markers and the lane
    queue, so a stale owner stays fenced off and no seq (hence no event id) is reused."""
    assert redis_server.appendonly and redis_server.appendfsync == "everysec"
    client = redis_client(redis_server.url)
    try:
        guard = LaneGuard(client, cluster, None, "node-a")
        queue = LaneQueue(client, cluster, LANES)
        first = await guard.apply("lane-0", 5, "enforce", "wf-r", "t1", {"state": "a"})
        assert first.applied and first.seq == 1
        await queue.enqueue("wf-r2", {"task_id": "x"})
        lane = queue.lane_of("wf-r2")
        assert (await client.info("persistence"))["aof_enabled"] == 1
        # restart = SIGTERM (Redis fsyncs its AOF on shutdown), then a new process on the same
        # port and data dir; off the event loop, since it blocks.
        await asyncio.to_thread(redis_server.restart)
        assert await client.script_exists(guard._sha) == [False]  # the script cache is gone...
        assert await guard.current_fence("lane-0") == 5  # ...the fence is not
        with pytest.raises(StaleFencingToken):
            await guard.apply("lane-0", 4, "enforce", "wf-r", "t2", {"state": "stale"})
        again = await guard.apply("lane-0", 5, "enforce", "wf-r", "t1", {"state": "a"})
        assert not again.applied and again.seq == 1  # the applied marker survived: no second seq
        nxt = await guard.apply("lane-0", 5, "enforce", "wf-r", "t2", {"state": "b"})
        assert nxt.applied and nxt.seq == 2  # the seq continues: seq 1 (and its event id) not reused
        assert [t.task_id for t in await queue.read(lane, "node-a")] == ["x"]  # the queued task too
    finally:
        await client.aclose()


@pytest.mark.chaos
async def test_a_restart_without_aof_forgets_the_fence(tmp_path, cluster) -> None:
    """Why preflight fails on a Redis without AOF: the same restart forgets the fence and the
    seq, so a stale owner's write is accepted and a seq (and its event id) is assigned again."""
    from cbctl.sandbox import RedisServer

    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        client = redis_client(server.url)
        try:
            guard = LaneGuard(client, cluster, None, "node-a")
            assert (await guard.apply("lane-0", 5, "enforce", "wf-n", "t1", {"state": "a"})).seq == 1
            await asyncio.to_thread(server.restart)
            stale = await guard.apply("lane-0", 4, "enforce", "wf-n", "t9", {"state": "stale"})
            assert stale.applied and stale.seq == 1
        finally:
            await client.aclose()


# -- Redis unreachable ----------------------------------------------------------------------


def _impatient_client(url: str) -> aredis.Redis:
    """A client that gives up fast, so an outage surfaces within the test's budget."""
    return aredis.Redis.from_url(
        url, decode_responses=True, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1)
    )


@pytest.mark.chaos
@pytest.mark.parametrize("fault", ["stop", "sigkill"])
async def test_backend_unavailable_when_redis_is_down(redis_server, cluster, fault) -> None:
    client = _impatient_client(redis_server.url)
    try:
        guard = LaneGuard(client, cluster, None, "node-a")
        queue = LaneQueue(client, cluster, LANES)
        await guard.apply("lane-0", 1, "enforce", "wf-d", "t1", {"state": "a"})
        if fault == "stop":
            redis_server.stop()
        else:
            redis_server.kill()
            wait_until(lambda: not redis_server.is_running(), 5, message="redis-server died")
        with pytest.raises(BackendUnavailable) as exc:
            await guard.apply("lane-0", 1, "enforce", "wf-d", "t2", {"state": "b"})
        assert exc.value.backend == "redis" and exc.value.exit_code == 4
        with pytest.raises(BackendUnavailable):
            await guard.raise_fence("lane-0", 2)
        with pytest.raises(BackendUnavailable):
            await queue.enqueue("wf-d", {"task_id": "t3"})
        with pytest.raises(BackendUnavailable):
            await queue.read("lane-0", "node-a")
        with pytest.raises(BackendUnavailable):
            await guard.read_workflow("wf-d")
        redis_server.restart()
        assert (await guard.apply("lane-0", 1, "enforce", "wf-d", "t2", {"state": "b"})).applied
    finally:
        await client.aclose()


@pytest.mark.chaos
async def test_backend_unavailable_when_redis_hangs(redis_server, cluster) -> None:
    client = _impatient_client(redis_server.url)
    try:
        guard = LaneGuard(client, cluster, None, "node-a")
        await guard.apply("lane-0", 1, "enforce", "wf-h", "t1", {"state": "a"})
        redis_server.pause()
        try:
            with pytest.raises(BackendUnavailable):
                await guard.apply("lane-0", 1, "enforce", "wf-h", "t2", {"state": "b"})
        finally:
            redis_server.resume()
        # the write that timed out may or may not have run once Redis woke up; re-applying the
        # same task id is safe either way and never writes twice
        r = await guard.apply("lane-0", 1, "enforce", "wf-h", "t2", {"state": "b"})
        assert r.seq == 2
        assert [h["seq"] for h in await guard.history("wf-h")] == [1, 2]
    finally:
        await client.aclose()


# -- queue ----------------------------------------------------------------------------------


async def test_claim_pending_hands_a_dead_consumers_tasks_to_the_new_owner(
    guard: LaneGuard, queue: LaneQueue
) -> None:
    wf = "wf-claim"
    lane = queue.lane_of(wf)
    ids = [await queue.enqueue(wf, {"task_id": f"t{i}", "payload": {"i": i}}) for i in range(5)]
    read = await queue.read(lane, "dead-node", count=10)
    assert [t.entry_id for t in read] == ids
    # the dead node never acks; nothing new is left to read
    assert await queue.read(lane, "new-node") == []
    assert await queue.claim_pending(lane, "new-node", min_idle_ms=60_000) == []
    claimed = await queue.claim_pending(lane, "new-node", min_idle_ms=0)
    assert [t.entry_id for t in claimed] == ids
    assert [t.payload for t in claimed] == [{"i": i} for i in range(5)]
    await guard.raise_fence(lane, 2)
    for t in claimed:
        await guard.apply(lane, 2, "enforce", wf, t.task_id, {"state": t.task_id}, t.entry_id)
    assert await queue.pending_count(lane) == 0
    assert [h["task_id"] for h in await guard.history(wf)] == [f"t{i}" for i in range(5)]


async def test_claim_pending_pages_through_many_entries(queue: LaneQueue) -> None:
    wf = "wf-many"
    lane = queue.lane_of(wf)
    for i in range(250):
        await queue.enqueue(wf, {"task_id": f"t{i}"})
    assert len(await queue.read(lane, "dead", count=1000)) == 250
    assert len(await queue.claim_pending(lane, "new", min_idle_ms=0, count=120)) == 120
    assert len(await queue.claim_pending(lane, "new", min_idle_ms=0)) == 250


async def test_read_blocks_until_a_task_arrives(queue: LaneQueue) -> None:
    wf = "wf-block"
    lane = queue.lane_of(wf)
    await queue.ensure_group(lane)
    reader = asyncio.create_task(queue.read(lane, "node-a", block_ms=5_000))
    await asyncio.sleep(0.05)  # let XREADGROUP reach Redis; correctness does not depend on it
    await queue.enqueue(wf, {"task_id": "late"})
    tasks = await asyncio.wait_for(reader, 5)
    assert [t.task_id for t in tasks] == ["late"]
    assert await queue.read(lane, "node-a", block_ms=50) == []


async def test_enqueue_lands_on_the_workflows_lane(queue: LaneQueue, client, cluster) -> None:
    keys = LaneKeys(cluster)
    wfs = [f"wf-{i}" for i in range(200)]
    for wf in wfs:
        await queue.enqueue(wf, {})
    counts = {lane: await client.xlen(keys.tasks(lane)) for lane in LANES}
    expected = {lane: sum(1 for wf in wfs if lane_for(wf, LANES) == lane) for lane in LANES}
    assert counts == expected
    assert all(c > 0 for c in counts.values())
    with pytest.raises(ValueError):
        await queue.enqueue("wf-1", {"bogus": 1})


async def test_missing_group_is_recreated(queue: LaneQueue, client, cluster) -> None:
    wf = "wf-nogroup"
    lane = queue.lane_of(wf)
    assert await queue.pending_count(lane) == 0
    assert await queue.claim_pending(lane, "x", 0) == []
    await queue.enqueue(wf, {"task_id": "a"})
    await queue.ensure_group(lane)
    await queue.ensure_group(lane)  # BUSYGROUP is fine
    await client.delete(LaneKeys(cluster).tasks(lane))
    await queue.enqueue(wf, {"task_id": "b"})  # stream re-created without a group
    assert [t.task_id for t in await queue.read(lane, "n")] == ["b"]

