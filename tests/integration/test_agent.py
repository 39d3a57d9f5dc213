"""NodeAgent against real etcd and redis-server: registration, live flags, lanes, workload, CLI.

Agents run in-process (several NodeAgents in one event loop) unless a test needs a real
``cbctl agent run`` process (duplicate node id, exit codes).  Every wait is a condition with a
deadline.  Isolation on the shared servers: a unique cluster name per test.  The fixture stack
(``config_path`` .. ``agents``) is tests/integration/conftest.py's default: 8 lanes, no NATS.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.model import keys
from cbctl.core.agent.hooks import AppliedUpdate
from cbctl.core.agent.node import NodeAgent
from cbctl.core.backends.redis.client import redis_client_for
from cbctl.core.model.assignment import assign
from cbctl.core.model.config import Context
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model.errors import BadInput
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.agent.registration import read_refusals
from cbctl.core.agent.workload import generate, lifecycle_handler
from cbctl.sandbox.waiting import async_wait_until
from tests.helpers import CBCTL, cbctl_proc
from tests.support.agent_process import AgentProcess
from tests.support.metrics import http_get, metric_value
from tests.support.records import lane_owners, read_record, wait_record
from tests.support.rollout import advance, set_flags
from tests.support.workload import all_processed, check_exactly_once

pytestmark = pytest.mark.integration

LANE_COUNT = 8


# -- registration -----------------------------------------------------------------------------


async def test_registration_record_and_http(agents: Any, coord: Coordinator, ctx: Context, tmp_path: Path) -> None:
    agent = await agents("node-a")
    rec = await wait_record(coord, ctx.cluster, "node-a")
    for field in ("node_id", "machine_id", "instance_id", "host", "pid", "version", "started_at", "applied_revision",
                  "lanes", "heartbeat", "http", "cluster_enabled", "probes", "clock"):
        assert field in rec, field
    assert rec["node_id"] == "node-a" and rec["instance_id"] == agent.instance_id
    assert rec["pid"] == os.getpid() and rec["http"] == agent.http_address
    assert rec["applied_revision"] == 0 and rec["cluster_enabled"] is False and rec["lanes"] == []
    assert rec["probes"] == {} and rec["clock"] == {}
    # The record hangs on the node's lease.
    kv = await coord.get(keys.node(ctx.cluster, "node-a"))
    assert kv is not None and kv.lease == agent.lease.id  # type: ignore[union-attr]

    # Heartbeat refreshes.
    first = rec["heartbeat"]
    await wait_record(coord, ctx.cluster, "node-a", timeout=5, check=lambda r: r["heartbeat"] > first)

    # Probe fields from other modules.
    await agent.update_record(probes={"etcd": "ok"}, clock={"offset_ms": 0.1})
    rec = await read_record(coord, ctx.cluster, "node-a")
    assert rec is not None and rec["probes"] == {"etcd": "ok"} and rec["clock"] == {"offset_ms": 0.1}

    # HTTP surface.
    status, body = await asyncio.to_thread(http_get, agent.http_address, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = await asyncio.to_thread(http_get, agent.http_address, "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = await asyncio.to_thread(http_get, agent.http_address, "/metrics")
    assert status == 200
    for name in ("cluster_ownership_changes_total", "cluster_lease_lost_total", "cluster_rollout_applied_revision",
                 "redis_lane_ownership_decision_total"):
        assert name in body, name

    # Graceful stop revokes the lease: the record is gone at once; /readyz is gone with the server.
    machine = rec["machine_id"]
    await agent.stop()
    assert await read_record(coord, ctx.cluster, "node-a") is None

    # Same state dir -> same machine identity, new instance.
    again = await agents("node-a")
    rec2 = await wait_record(coord, ctx.cluster, "node-a")
    assert rec2["machine_id"] == machine and rec2["instance_id"] == again.instance_id != rec["instance_id"]


async def test_readyz_is_503_without_registration(agents: Any, coord: Coordinator, ctx: Context) -> None:
    agent = await agents("node-r")
    assert agent.readiness()[0]
    # Delete our record under us: the agent treats it as a lost registration and re-registers.
    await coord.delete(keys.node(ctx.cluster, "node-r"))
    await agent.update_record(probes={"x": 1})  # the CAS write fails -> session lost
    ready, checks = agent.readiness()
    assert not ready and not checks["registered"]
    rec = await wait_record(coord, ctx.cluster, "node-r", timeout=10, check=lambda r: r["session"] == 2)
    assert rec["instance_id"] == agent.instance_id
    await async_wait_until(lambda: agent.readiness()[0], 5, message="ready again")


def test_duplicate_node_id_refused(config_path: Path, ctx: Context, tmp_path: Path) -> None:
    holder = AgentProcess(config_path, "dup", tmp_path / "state-a", tmp_path)
    try:
        async def holder_record() -> dict[str, Any]:
            c = make_coordinator(ctx)
            await c.connect()
            try:
                return await wait_record(c, ctx.cluster, "dup", timeout=20)
            finally:
                await c.close()

        rec = asyncio.run(holder_record())
        second = subprocess.run(
            [CBCTL, "agent", "run", "--handler", "demo", "--node-id", "dup", "--state-dir", str(tmp_path / "state-b")],
            env={**os.environ, "CBCTL_CONFIG": str(config_path)}, capture_output=True, text=True, timeout=30,
        )
        assert second.returncode == 3, second.stderr
        assert rec["host"] in second.stderr and rec["instance_id"] in second.stderr
        assert "already registered" in second.stderr

        nodes = cbctl_proc(config_path, "nodes", "-o", "json")
        assert nodes.exit_code == 0, nodes.stderr
        rows = nodes.json()["nodes"]
        assert [r["node_id"] for r in rows] == ["dup"]
        # Refused first: the holder gets no conflict record (the refusal is reported on an
        # expiring lease instead, see tests/integration/test_agent_refuse.py).
        assert rows[0]["instance_id"] == rec["instance_id"] and rows[0]["conflicts"] == 0
        assert set(rows[0]) == {"node_id", "host", "instance_id", "applied_revision", "lag", "lanes", "heartbeat",
                                "conflicts", "state"}
        assert rows[0]["state"] == "live"

        async def refusals() -> dict[str, list[dict[str, Any]]]:
            c = make_coordinator(ctx)
            await c.connect()
            try:
                return await read_refusals(c, ctx.cluster)
            finally:
                await c.close()

        found = asyncio.run(refusals())["dup"]
        assert len(found) == 1 and found[0]["kind"] == "duplicate-node-id"
        assert found[0]["holder_instance_id"] == rec["instance_id"]
        assert holder.proc.poll() is None, "the holder must keep running"

        # Graceful stop of the holder: exit 0, record gone at once (lease revoked).
        holder.signal(signal.SIGTERM)
        assert holder.wait(15) == 0, holder.log()
        rows = cbctl_proc(config_path, "nodes", "-o", "json").json()["nodes"]
        assert all(r["instance_id"] is None for r in rows)
    finally:
        holder.stop()


async def test_unstable_node_id_recorded(agents: Any, coord: Coordinator, ctx: Context, tmp_path: Path) -> None:
    first = await agents("mover", state_dir=tmp_path / "machine-1")
    await first.stop()
    await agents("mover", state_dir=tmp_path / "machine-2")
    kvs = await coord.list(keys.conflicts_prefix(ctx.cluster) + "mover/")
    assert [kv.json()["kind"] for kv in kvs] == ["unstable-node-id"]
    assert kvs[0].json()["previous_machine_id"] == first.machine_id


def test_keepalive_times_three_above_ttl_is_refused(config_path: Path, ctx: Context, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="keep-alive"):
        NodeAgent(ctx, "n", handler=lifecycle_handler, lease_ttl=2, keepalive_interval=1)
    res = cbctl_proc(config_path, "agent", "run", "--handler", "demo", "--node-id", "n", "--lease-ttl", "2",
                     "--keepalive", "1", "--state-dir", str(tmp_path / "s"), timeout=20)
    assert res.exit_code == 2 and "keep-alive" in res.stderr, res.stderr


async def test_agent_run_without_handler_says_what_to_plug_in(config_path: Path, coord: Coordinator, ctx: Context,
                                                              tmp_path: Path) -> None:
    """The demo handler is not a default: without --handler (or with an unknown one) the agent
    exits 2 before touching anything, naming the option and the Python API."""
    for extra in ((), ("--handler", "nope")):
        res = await asyncio.to_thread(cbctl_proc, config_path, "agent", "run", *extra, "--node-id", "n",
                                      "--state-dir", str(tmp_path / "s"), timeout=20)
        assert res.exit_code == 2, (extra, res.stderr)
        assert "--handler demo" in res.stderr or "use one of demo" in res.stderr, res.stderr
        assert "NodeAgent(context, node_id, handler=...)" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert await read_record(coord, ctx.cluster, "n") is None, "no record: the refusal came before registering"
    assert not (tmp_path / "s").exists(), "no state dir written"


def test_node_agent_without_handler_says_what_to_plug_in(ctx: Context, tmp_path: Path) -> None:
    """The Python API has no default handler either: BadInput naming ``handler=`` and the demo's."""
    with pytest.raises(BadInput) as info:
        NodeAgent(ctx, "n", state_dir=tmp_path / "s")
    assert "handler=" in str(info.value) and "cbctl.core.agent.workload.lifecycle_handler" in str(info.value)
    assert info.value.exit_code == 2
    assert not (tmp_path / "s").exists(), "refused before anything was written"


# -- flags -------------------------------------------------------------------------------------


async def test_flags_applied_live_and_stage_advance_waits(agents: Any, coord: Coordinator, ctx: Context,
                                                          config_path: Path) -> None:
    nodes = [await agents(f"n{i}") for i in range(3)]
    seen: list[tuple[int, bool]] = []

    async def listener(flags: Any, revision: int) -> None:
        seen.append((revision, flags["cluster.enabled"]))

    nodes[0].add_flags_listener(listener)
    res = await asyncio.to_thread(cbctl_proc, config_path, "stage", "advance", "--yes", "--wait", "--timeout", "20",
                                "--force", "--reason", "test: no preflight in this test")
    assert res.exit_code == 0, res.stderr
    cp = ControlPlane(ctx, coord)
    _doc, revision = await cp.read()
    assert revision > 0
    # --wait returned, so every record already shows the revision (no waiting here).
    for n in nodes:
        rec = await read_record(coord, ctx.cluster, n.node_id)
        assert rec is not None and rec["applied_revision"] >= revision and rec["cluster_enabled"] is True
        assert n.flags["cluster.enabled"] is True and n.flags["ownership.guard"] == "observe"
    assert seen[-1] == (revision, True)

    # A live flag change (no restart): guard off via flags set, applied by all.
    rev2 = await set_flags(cp, **{"ownership__guard": "enforce"})
    result = await cp.wait_applied(rev2, timeout=10)
    assert result.ok and sorted(result.applied) == ["n0", "n1", "n2"]
    assert all(n.flags["ownership.guard"] == "enforce" for n in nodes)
    assert all(n.metrics.applied_revision.get() == rev2 for n in nodes)

    # cbctl nodes: lag 0 for everyone; lanes counted.
    await async_wait_until(lambda: sum(len(n.owned_lanes) for n in nodes) == LANE_COUNT, 10, message="lanes owned")
    out = await asyncio.to_thread(cbctl_proc, config_path, "nodes", "-o", "json")
    rows = out.json()["nodes"]
    assert [r["node_id"] for r in rows] == ["n0", "n1", "n2"]
    assert all(r["lag"] == 0 and r["applied_revision"] == rev2 for r in rows)
    assert sum(r["lanes"] for r in rows) == LANE_COUNT


# -- lanes -------------------------------------------------------------------------------------


async def test_lanes_spread_by_rendezvous_and_tokens_increase(agents: Any, coord: Coordinator, ctx: Context,
                                                              config_path: Path) -> None:
    cp = ControlPlane(ctx, coord)
    await advance(cp, 1)
    nodes = [await agents(f"n{i}") for i in range(3)]
    expected = assign(ctx.lanes, [n.node_id for n in nodes])

    async def spread() -> bool:
        owners = await lane_owners(coord, ctx)
        return all(owners[lane][0] == expected[lane] for lane in ctx.lanes) and all(
            set(n.owned_lanes) == {lane for lane, o in expected.items() if o == n.node_id} for n in nodes
        )

    await async_wait_until(spread, 10, interval=0.05, message="lanes spread by rendezvous")
    owned = [lane for n in nodes for lane in n.owned_lanes]
    assert sorted(owned) == sorted(ctx.lanes), "each lane owned exactly once"
    before = await lane_owners(coord, ctx)
    # Tokens are the owner keys' create revisions, and Redis has the fence raised to them.
    guard = LaneGuard(nodes[0].redis, ctx.cluster, None, "reader")
    for lane, (_owner, token) in before.items():
        await async_wait_until(lambda lane=lane, token=token: _fence_at_least(guard, lane, token), 5,
                               message=f"fence of {lane}")

    # cbctl lanes JSON shape.
    res = await asyncio.to_thread(cbctl_proc, config_path, "lanes", "-o", "json")
    rows = res.json()["lanes"]
    assert [r["lane"] for r in rows] == list(ctx.lanes)
    assert all(set(r) == {"lane", "owner", "token", "since"} for r in rows)
    assert {r["lane"]: (r["owner"], r["token"]) for r in rows} == before

    # One leaves (gracefully): only its lanes move, each re-acquired with a higher token.
    leaving = nodes[1]
    moved = set(leaving.owned_lanes)
    rest = [nodes[0], nodes[2]]

    def changes() -> float:
        return sum(n.metrics.ownership_changes.labels(lane=lane)._value.get()  # type: ignore[attr-defined]
                   for n in rest for lane in ctx.lanes)

    changes_before = changes()
    await leaving.stop()
    expected2 = assign(ctx.lanes, [n.node_id for n in rest])
    assert all(expected2[lane] == expected[lane] for lane in ctx.lanes if lane not in moved)

    async def moved_over() -> bool:
        owners = await lane_owners(coord, ctx)
        return all(owners[lane][0] == expected2[lane] for lane in ctx.lanes)

    await async_wait_until(moved_over, 10, interval=0.05, message="lanes re-owned")
    after = await lane_owners(coord, ctx)
    for lane in ctx.lanes:
        if lane in moved:
            assert after[lane][1] > before[lane][1], lane  # type: ignore[operator]
        else:
            assert after[lane] == before[lane], lane  # untouched
    assert changes() - changes_before == len(moved), "only the leaver's lanes changed hands"

    # It joins again: it takes back exactly its lanes, again with new (higher) tokens.
    nodes[1] = await agents("n1")
    await async_wait_until(spread, 10, interval=0.05, message="lanes back after re-join")
    final = await lane_owners(coord, ctx)
    for lane in moved:
        assert final[lane][1] > after[lane][1]  # type: ignore[operator]


async def _fence_at_least(guard: LaneGuard, lane: str, token: int | None) -> bool:
    return token is not None and await guard.current_fence(lane) >= token


# -- workload ----------------------------------------------------------------------------------


async def test_workload_processed_exactly_once_across_moves(agents: Any, coord: Coordinator, ctx: Context,
                                                            queue: LaneQueue, guard: LaneGuard) -> None:
    cp = ControlPlane(ctx, coord)
    await advance(cp, 1)
    applied: list[AppliedUpdate] = []
    nodes = [await agents("w0"), await agents("w1")]

    async def hook(update: AppliedUpdate) -> None:
        # Runs after the guard assigned the seq and before the ack.
        assert update.seq >= 1 and update.workflow_id
        applied.append(update)

    nodes[0].on_applied(hook)
    report = await generate(queue, workflows=40, rate=400, tasks_per_workflow=3, seed=3)
    # Membership changes while tasks flow: a third node joins, then one leaves.
    nodes.append(await agents("w2"))
    report2 = await generate(queue, workflows=40, rate=400, tasks_per_workflow=3, seed=4, prefix="wf2")
    await nodes[1].stop()
    report.workflows.update(report2.workflows)
    await async_wait_until(lambda: all_processed(guard, report), 30, interval=0.1, message="workload processed")
    await check_exactly_once(guard, report)
    assert applied and all(u.node_id == "w0" for u in applied)
    for lane in ctx.lanes:
        assert await queue.pending_count(lane) == 0

    # Guard observe at stage 1: every decision allowed (no one was stale).
    for n in (nodes[0], nodes[2]):
        text = n.metrics.render().decode()
        assert metric_value(text, "redis_lane_ownership_decision_total", 'decision="deny"') == 0


async def test_cluster_disabled_processes_locally(agents: Any, coord: Coordinator, ctx: Context,
                                                  queue: LaneQueue, guard: LaneGuard) -> None:
    nodes = [await agents("l0"), await agents("l1")]
    assert not any(n.cluster_enabled for n in nodes)
    report = await generate(queue, workflows=30, rate=0, tasks_per_workflow=2, seed=5)
    await async_wait_until(lambda: all_processed(guard, report), 20, interval=0.1, message="processed locally")
    await check_exactly_once(guard, report, ordered=False)
    assert (await lane_owners(coord, ctx)) == {lane: (None, None) for lane in ctx.lanes}, "no ownership keys"
    # Token 0, guard off: every write allowed; both nodes took part (competing consumers).
    hist = [e for wf in report.workflows for e in await guard.history(wf)]
    assert {e["token"] for e in hist} == {0}
    assert {e["node"] for e in hist} == {"l0", "l1"}

    # Enabling the cluster live hands the lanes over to owners.
    cp = ControlPlane(ctx, coord)
    rev = await advance(cp, 1)
    assert (await cp.wait_applied(rev, timeout=10)).ok
    await async_wait_until(lambda: sum(len(n.owned_lanes) for n in nodes) == LANE_COUNT, 10, message="owned")
    report2 = await generate(queue, workflows=20, rate=0, tasks_per_workflow=2, seed=6, prefix="wfb")
    await async_wait_until(lambda: all_processed(guard, report2), 20, interval=0.1, message="processed by owners")
    await check_exactly_once(guard, report2)
    hist = [e for wf in report2.workflows for e in await guard.history(wf)]
    assert all(e["token"] > 0 for e in hist)

    # And disabling it again, live: lanes released, local processing resumes.
    rev = await set_flags(cp, cluster__enabled=False)
    assert (await cp.wait_applied(rev, timeout=10)).ok
    await async_wait_until(lambda: not any(n.owned_lanes for n in nodes), 10, message="lanes released")
    assert (await lane_owners(coord, ctx)) == {lane: (None, None) for lane in ctx.lanes}
    report3 = await generate(queue, workflows=10, rate=0, tasks_per_workflow=1, seed=7, prefix="wfc")
    await async_wait_until(lambda: all_processed(guard, report3), 20, interval=0.1, message="processed locally again")
    await check_exactly_once(guard, report3, ordered=False)


def test_agent_load_command(config_path: Path, ctx: Context) -> None:
    res = cbctl_proc(config_path, "agent", "load", "--workflows", "5", "--tasks-per-workflow", "2", "--fail-rate", "0",
                     "-o", "json")
    assert res.exit_code == 0, res.stderr
    assert res.json() == {"workflows": 5, "messages": 30, "elapsed": res.json()["elapsed"]}

    async def total() -> int:
        r = redis_client_for(ctx)
        try:
            q = LaneQueue(r, ctx.cluster, ctx.lanes)
            return sum([await q.length(lane) for lane in ctx.lanes])
        finally:
            await r.aclose()

    assert asyncio.run(total()) == 30


async def test_publish_hook_failure_leaves_task_unacked_and_redelivers(coord: Coordinator, ctx: Context, queue: LaneQueue,
                                                                       guard: LaneGuard, tmp_path: Path) -> None:
    """The on_applied hook runs between the guarded apply and the ack: if it fails, the task is
    not acked, comes back, is re-applied idempotently (same seq, already_applied) and the hook
    sees it again — so an event can be made durable before the ack."""
    cp = ControlPlane(ctx, coord)
    await advance(cp, 1)
    node = NodeAgent(ctx, "h0", handler=lifecycle_handler, state_dir=tmp_path / "state", http_port=None)
    calls: list[AppliedUpdate] = []
    failed = False

    async def hook(update: AppliedUpdate) -> None:
        nonlocal failed
        calls.append(update)
        if update.task_id.endswith("/t0/1") and not failed:
            failed = True
            raise RuntimeError("event bus down (test)")

    node.on_applied(hook)
    await node.start()
    try:
        report = await generate(queue, workflows=1, rate=0, tasks_per_workflow=1, fail_rate=0, seed=9, prefix="hook")
        await async_wait_until(lambda: all_processed(guard, report), 10, interval=0.05, message="processed")
        await check_exactly_once(guard, report)
        wf = next(iter(report.workflows))
        retried = [u for u in calls if u.task_id == f"{wf}/t0/1"]
        assert len(retried) == 2 and retried[0].seq == retried[1].seq == 2
        assert (retried[0].already_applied, retried[1].already_applied) == (False, True)
        assert node.metrics.tasks.labels(result="error")._value.get() == 1  # type: ignore[attr-defined]
        for lane in ctx.lanes:
            assert await queue.pending_count(lane) == 0
    finally:
        await node.stop()


async def test_nodes_lag_counts_transitions_behind(coord: Coordinator, ctx: Context) -> None:
    from cbctl.core.agent.registration import read_nodes

    cp = ControlPlane(ctx, coord)
    r1 = await set_flags(cp, signals__routing="all")
    await coord.put(keys.node(ctx.cluster, "laggard"), json.dumps({"node_id": "laggard", "applied_revision": r1,
                                                                    "lanes": [], "heartbeat": time.time()}).encode())
    views, current = await read_nodes(coord, ctx.cluster)
    assert current == r1 and [v.lag for v in views] == [0]
    await set_flags(cp, signals__routing="off")
    r3 = await set_flags(cp, signals__routing="all")
    views, current = await read_nodes(coord, ctx.cluster)
    assert current == r3 and [v.lag for v in views] == [2]
