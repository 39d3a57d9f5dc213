"""No lossy skips under CPU contention (issue 9 item 2), against real etcd, nats-server and redis-server.

One busy loop per core (``python3 -c 'while True: pass'``, started here and killed at teardown)
while three agents with the event bus -- two real ``cbctl agent run`` processes and one in-process
agent (the subscriber's node), so publishes of one workflow race across processes as in the
sandbox -- run the bus at stage 3 under a workload, and
both rollback drills run in the middle of it: ``rollback event-bus`` then ``--clear`` (the
bridges stop consuming and start again on a backlog published meanwhile by every node), then
``rollback coordination`` then ``--clear``.  A subscriber streams every workflow through one
node's bridge (a :class:`~cbctl.core.agent.bus.subscription.Subscription`) the whole time.

What must hold (the issue saw 81 ordering violations and "seq 9..10 missing after 2.4s;
skipping ahead" within 13 s of ``rollback event-bus --clear`` on a busy machine):

* every event applied (the Redis history) is in the stream exactly once, with no hole per
  workflow;
* the subscriber received every update of every workflow, in seq order, each once;
* ``event_bus_bridge_ordering_violations_total`` is 0 on every agent.

Timings are generous: the point of the test is a machine whose cores are all busy.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.agent.bus.attach import AgentBus
from cbctl.core.model.events import Event
from cbctl.core.model.config import Context
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.agent.workload import WorkloadReport, generate
from cbctl.sandbox import NatsServer, async_wait_until
from tests.support.agent_process import AgentProcess
from tests.support.metrics import http_get, metric, metric_value
from tests.support.records import wait_record
from tests.support.rollout import advance, wait_applied
from tests.support.workload import all_processed, check_stream_exactly_once
from tests.support.stack import StackOptions


pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]


@pytest.fixture
def stack_options() -> StackOptions:
    """tests/integration/conftest.py's stack: 4 lanes, a nats-server of the test's own."""
    return StackOptions(lane_count=4, nats="own")


WORKFLOWS = 240
RATE = 8.0  # workflows/s: the workload lasts about 30 s, long enough for both drills to run inside it


@pytest.fixture
def busy_cores() -> Iterator[list[subprocess.Popen[bytes]]]:
    """One CPU-bound process per core, killed (and reaped) at teardown whatever happened."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
             for _ in range(os.cpu_count() or 2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)


async def _commit_rollback(cp: ControlPlane, capability: str, *, clear: bool = False) -> int:
    plan = await cp.plan_rollback(capability, clear=clear)
    return await cp.commit(plan, reason="contention drill")


async def test_rollback_drills_under_cpu_contention_lose_nothing(
    busy_cores: list[subprocess.Popen[bytes]], bus_agents: Any, coord: Coordinator, ctx: Context,
    guard: LaneGuard, queue: LaneQueue, nats: NatsServer, config_path: Path, tmp_path: Path,
) -> None:
    cp = ControlPlane(ctx, coord)
    procs = [AgentProcess(config_path, f"node-{i}", tmp_path / f"state-{i}", tmp_path) for i in range(2)]
    try:
        await _drills(cp, procs, bus_agents, coord, ctx, guard, queue, nats, busy_cores)
    finally:
        for p in procs:
            await asyncio.to_thread(p.stop)


async def _drills(cp: ControlPlane, procs: list[AgentProcess], bus_agents: Any, coord: Coordinator, ctx: Context,
                  guard: LaneGuard, queue: LaneQueue, nats: NatsServer,
                  busy_cores: list[subprocess.Popen[bytes]]) -> None:
    # The subscriber's bridge opens a gap after only 50 ms (default 0.5 s): on a busy machine
    # events of one workflow from different processes then arrive "late" all the time, which
    # is the case the issue saw end in lossy skips; they must be waited for or filled instead.
    agent, bus = await bus_agents("node-2", bus_options={"bridge_options": {"gap_timeout": 0.05}})
    records = {p.node_id: await wait_record(coord, ctx.cluster, p.node_id, timeout=60, check=lambda r: r.get("http"))
               for p in procs}

    async def applied(rev: int) -> None:
        await wait_applied([agent], rev)
        for p in procs:
            await wait_record(coord, ctx.cluster, p.node_id, timeout=60,
                              check=lambda r: r["applied_revision"] >= rev)

    await applied(await advance(cp, 1))
    await applied(await advance(cp, 2, canary=list(ctx.lanes[:2])))
    await applied(await advance(cp, 3))
    await async_wait_until(lambda: bus.bridge is not None and bus.bridge.mode == "streaming", 60,
                           interval=0.1, message="the bridge streaming")
    assert all(p.poll() is None for p in busy_cores)  # the contention is real while the test runs

    # The subscriber: every workflow, through node-2's bridge, for the whole test.
    bridge = bus.bridge
    assert bridge is not None
    sub = bridge.subscribe(None, "ops")
    received: list[Event] = []

    async def consume() -> None:
        async for ev in sub:
            received.append(ev)

    reader = asyncio.create_task(consume())

    names = [f"busy-{n:06d}" for n in range(WORKFLOWS)]  # generate()'s workflow ids

    async def processed() -> int:
        """Tasks applied so far on every node: the sum of the workflows' seqs (one round trip)."""
        pipe = guard.redis.pipeline(transaction=False)
        for wf in names:
            pipe.hget(guard.keys.workflow(wf), "seq")
        return sum(int(v) for v in await pipe.execute() if v is not None)

    async def more_work(n: int, what: str) -> None:
        """Wait until ``n`` more tasks were applied (the drill step ran under load)."""
        target = await processed() + n

        async def done() -> bool:
            return await processed() >= target

        await async_wait_until(done, 120, interval=0.2, message=f"{n} tasks {what}")

    workload: asyncio.Task[WorkloadReport] = asyncio.create_task(
        generate(queue, workflows=WORKFLOWS, rate=RATE, tasks_per_workflow=2, fail_rate=0.2, seed=9, prefix="busy"))
    try:
        await more_work(150, "before the drills")
        # Drill 1: rollback event-bus, then --clear.
        await applied(await _commit_rollback(cp, "event-bus"))
        assert bus.bridge is not None and bus.bridge.mode == "off"
        await more_work(200, "with the bridges off")
        await applied(await _commit_rollback(cp, "event-bus", clear=True))
        await more_work(150, "after the event-bus drill")
        # Drill 2: rollback coordination, then --clear.
        await applied(await _commit_rollback(cp, "coordination"))
        await more_work(150, "with the guard off")
        await applied(await _commit_rollback(cp, "coordination", clear=True))
        # The drills ran while the workload was still being enqueued, or the test proves nothing.
        assert not workload.done(), "the workload ended before the drills did: they did not run under load"
        report = await asyncio.wait_for(workload, 180)

        await async_wait_until(lambda: all_processed(guard, report), 240, interval=0.2, message="all work applied")
        await async_wait_until(lambda: _outboxes_empty(bus, records), 120, interval=0.2,
                               message="every outbox drained")
        total = sum(report.workflows.values())
        await async_wait_until(lambda: len(received) >= total, 240, interval=0.2,
                               message=f"subscriber received {total} events")

        # Every applied event in the stream, exactly once, seq 1..N per workflow.
        await check_stream_exactly_once(nats.url, guard, report)
        # The subscriber: every update of every workflow, in order, each once.
        per_wf: dict[str, list[int]] = {}
        for ev in received:
            per_wf.setdefault(ev.workflow_id, []).append(ev.seq)
        assert set(per_wf) == set(report.workflows), set(per_wf) ^ set(report.workflows)
        for wf, n in report.workflows.items():
            assert per_wf[wf] == list(range(1, n + 1)), (wf, per_wf[wf])
        assert len(received) == total
        assert metric(agent, "event_bus_bridge_ordering_violations_total") == 0, bus.status()["bridge_stats"]
        for node, rec in records.items():
            _, text = await asyncio.to_thread(http_get, rec["http"], "/metrics")
            assert metric_value(text, "event_bus_bridge_ordering_violations_total") == 0, node
        # The subscription outlived both drills (the bridge was never re-created under it).
        assert bus.bridge is bridge and not reader.done()
        assert bridge.stats.late_dropped == 0, bus.status()["bridge_stats"]
        print(f"contention drills: {total} events, {len(report.workflows)} workflows, on node-2: "
              f"{agent.tasks_processed} applied, {bridge.stats.filled} filled from Redis, "
              f"bridge stats {bus.status()['bridge_stats']}")
    finally:
        workload.cancel()
        reader.cancel()
        sub.close()
        await asyncio.gather(workload, reader, return_exceptions=True)


async def _outboxes_empty(bus: AgentBus, records: dict[str, dict[str, Any]]) -> bool:
    """Nothing buffered on any node (the in-process one directly, the others by their metrics)."""
    if bus.publisher is None or bus.publisher.outbox_depth or bus.publisher.degraded:
        return False
    for rec in records.values():
        _, text = await asyncio.to_thread(http_get, rec["http"], "/metrics")
        if metric_value(text, "event_bus_outbox_depth") or metric_value(text, "event_bus_degraded"):
            return False
    return True
