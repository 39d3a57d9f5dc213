"""Event bus faults for real: nats-server SIGKILLed under load, outbox drained after the duplicate
window, an agent SIGKILLed with a full outbox, a lane moving mid-stream, refused credentials.

Agents run in-process (several NodeAgents in one loop, each with its own state dir / outbox)
unless a SIGKILL of the agent itself is needed (then a real `cbctl agent run`).  Subscribers are
real SSE clients.  The NATS outage lasts until every condition it is meant to show holds (the
agents went degraded, and went on executing tasks while NATS was down), under a deadline.
Blocking service calls (kill, restart: the restart waits for readiness) run in a thread, off
the event loop the in-process agents share, so the agents are not frozen while they run.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.agent.bus.outbox import Outbox, OutboxMessage
from cbctl.core.model.config import Context, default_stream_name, load_config
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model.events import msg_id
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.agent.workload import WorkloadReport, generate, workflow_transitions
from cbctl.sandbox import NatsServer, async_wait_until
from tests.helpers import CBCTL, bus_config
from tests.support.agent_process import AgentProcess
from tests.support.metrics import http_get, metric, metric_value
from tests.support.rollout import streaming, wait_applied, wait_lanes_spread
from tests.support.sse import SseReader
from tests.support.workload import all_processed, check_stream_exactly_once, check_subscriber, stream_event_ids
from tests.support.stack import StackOptions


pytestmark = pytest.mark.chaos


@pytest.fixture
def stack_options() -> StackOptions:
    """tests/integration/conftest.py's stack: 4 lanes, a nats-server of the test's own."""
    return StackOptions(lane_count=4, nats="own")


async def test_nats_sigkill_under_load(
    bus_agents: Any, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue, nats: NatsServer,
) -> None:
    a, _ = await bus_agents("node-a")
    b, _ = await bus_agents("node-b")
    c, bus_c = await bus_agents("node-c")
    rev = await streaming(coord, ctx)
    await wait_applied([a, b, c], rev)
    await wait_lanes_spread([a, b, c], len(ctx.lanes))
    await async_wait_until(lambda: bus_c.bridge is not None, 10, interval=0.05, message="bridge")
    reader = await SseReader(c.http_address or "", "/v1/events", "ops").start()
    seen_degraded: set[str] = set()

    async def watch() -> None:
        while True:
            for ag in (a, b, c):
                if metric(ag, "event_bus_degraded") == 1:
                    seen_degraded.add(ag.node_id)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    load = asyncio.create_task(generate(queue, workflows=300, rate=50, tasks_per_workflow=2, fail_rate=0.2, seed=7,
                                        prefix="kill"))

    def processed() -> int:
        return sum(ag.tasks_processed for ag in (a, b, c))

    await async_wait_until(lambda: processed() >= 50, 30, interval=0.05, message="load running before the kill")
    await asyncio.to_thread(nats.kill)
    at_kill = processed()
    # The outage lasts until it has shown what it is for: agents degraded, and work going on
    # without NATS.  Only what was executed between the kill and the restart counts.
    await async_wait_until(lambda: bool(seen_degraded) and processed() - at_kill >= 50, 30, interval=0.05,
                           message="agents degraded and executing during the outage")
    executed_during = processed() - at_kill
    await asyncio.to_thread(nats.restart)
    report = await load
    await async_wait_until(lambda: all_processed(guard, report), 30, interval=0.1, message="all processed")
    await async_wait_until(lambda: all(metric(ag, "event_bus_degraded") == 0 for ag in (a, b, c)), 30, interval=0.1,
                           message="every agent left degraded mode")
    watcher.cancel()
    assert seen_degraded, "no agent went degraded while NATS was down"
    assert executed_during >= 50, "work stopped while NATS was down"
    assert sum(metric(ag, "event_bus_outages_total") for ag in (a, b, c)) >= 1
    await check_stream_exactly_once(nats.url, guard, report)
    total = sum(report.workflows.values())
    await async_wait_until(lambda: len(reader.events) >= total, 30, interval=0.1,
                           message=f"subscriber got {total} events")
    check_subscriber(reader, report)  # every update, in order, no duplicate
    await reader.stop()


async def test_outbox_drained_after_duplicate_window_no_duplicate_to_subscriber(
    tmp_path: Path, unique_cluster: str, shared_etcd: Any, shared_redis: Any, nats: NatsServer, bus_agents: Any,
    coord: Coordinator, guard: LaneGuard, queue: LaneQueue,
) -> None:
    """Rows a crash left in the outbox after they were published (the delete never happened) are
    drained after JetStream's (shortened, 1 s) window: JetStream stores them again; the bridge
    must still deliver each event once."""
    path = bus_config(tmp_path / "short.toml", unique_cluster, shared_etcd.client_url, shared_redis.url, nats.url,
                      duplicate_window=1)
    ctx = load_config(path).context()
    a, _ = await bus_agents("node-a", ctx=ctx)
    b, bus_b = await bus_agents("node-b", ctx=ctx)
    rev = await streaming(coord, ctx)
    await wait_applied([a, b], rev)
    await async_wait_until(lambda: bus_b.bridge is not None, 10, interval=0.05)
    reader = await SseReader(b.http_address or "", "/v1/events", "ops").start()
    report = await generate(queue, workflows=10, rate=0, tasks_per_workflow=2, fail_rate=0, seed=2, prefix="dw")
    await async_wait_until(lambda: all_processed(guard, report), 20, interval=0.1)
    total = sum(report.workflows.values())
    await async_wait_until(lambda: len(reader.events) >= total, 15, interval=0.05)

    # Simulate "published, then crashed before deleting the rows" for node-a's outbox.
    await a.stop()
    import nats as nats_client

    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    stream = default_stream_name(ctx.cluster)
    info = await js.stream_info(stream)
    rows = []
    last_stored = 0.0
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(stream, seq)
        ev = json.loads(raw.data or b"{}")
        rows.append(OutboxMessage(raw.subject or "", msg_id(ev["event_id"], 1), ev["workflow_id"], raw.data or b""))
        stored_at = raw.time.timestamp() if hasattr(raw.time, "timestamp") else time.time()  # type: ignore[union-attr]
        last_stored = max(last_stored, stored_at)
    await nc.close()
    box = Outbox(tmp_path / "state-node-a" / "outbox.sqlite")
    box.append(rows)
    box.close()
    # The condition: the 1 s duplicate window has passed for the newest stored copy (server time).
    await async_wait_until(lambda: time.time() > last_stored + 1.2, 10, interval=0.05,
                           message="past the duplicate window")
    a2, _ = await bus_agents("node-a", ctx=ctx)
    await async_wait_until(lambda: metric(a2, "event_bus_outbox_depth") == 0 and metric(a2, "event_bus_degraded") == 0,
                           20, interval=0.1, message="outbox drained")
    stored = await stream_event_ids(nats.url, stream)
    assert len(stored) >= total + len(rows), "JetStream stored the copies (window passed)"
    # Once every copy is counted as suppressed, the bridge has handled all of them: none can
    # still be on its way to the subscriber.
    await async_wait_until(lambda: metric(b, "event_bus_bridge_duplicates_suppressed_total") >= len(rows), 15,
                           interval=0.1, message="bridge suppressed the copies")
    check_subscriber(reader, report)  # still exactly once each, in order
    assert metric(b, "event_bus_consumer_dedup_mismatch_total") == 0  # copies were outside the window
    await reader.stop()


async def test_sigkilled_agent_with_full_outbox_delivers_after_restart(
    config_path: Path, tmp_path: Path, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue,
    nats: NatsServer,
) -> None:
    state = tmp_path / "agent-state"
    proc = AgentProcess(config_path, "node-k", state, tmp_path, extra_args=["--lease-ttl", "3", "--keepalive", "0.5"])
    try:
        rev = await streaming(coord, ctx)
        await asyncio.to_thread(nats.stop)
        await async_wait_until(lambda: _record_applied(coord, ctx, "node-k", rev), 20, interval=0.1,
                               message="agent applied the flags")
        report = await generate(queue, workflows=6, rate=0, tasks_per_workflow=2, fail_rate=0, seed=5, prefix="sk")
        await async_wait_until(lambda: all_processed(guard, report), 20, interval=0.1, message="processed (degraded)")
        addr = await _record_http(coord, ctx, "node-k")
        _, text = await asyncio.to_thread(http_get, addr, "/metrics")
        depth = metric_value(text, "event_bus_outbox_depth")
        assert depth == sum(report.workflows.values()) and metric_value(text, "event_bus_degraded") == 1
        proc.signal(9)
        await asyncio.to_thread(proc.wait, 10)
    finally:
        await asyncio.to_thread(proc.stop)
    await asyncio.to_thread(nats.start)
    proc2 = AgentProcess(config_path, "node-k", state, tmp_path, extra_args=["--lease-ttl", "3", "--keepalive", "0.5"])
    try:
        total = sum(report.workflows.values())

        async def stored() -> bool:
            try:
                return len(await stream_event_ids(nats.url, default_stream_name(ctx.cluster))) >= total
            except Exception:  # noqa: BLE001  (test poll: the stream may not exist yet)
                return False

        await async_wait_until(stored, 30, interval=0.2, message="outbox delivered after restart")
        await check_stream_exactly_once(nats.url, guard, report)
    finally:
        await asyncio.to_thread(proc2.stop)


async def _record(coord: Coordinator, ctx: Context, node_id: str) -> dict[str, Any] | None:
    from cbctl.core.model import keys

    kv = await coord.get(keys.node(ctx.cluster, node_id))
    return None if kv is None else kv.json()


async def _record_applied(coord: Coordinator, ctx: Context, node_id: str, rev: int) -> bool:
    rec = await _record(coord, ctx, node_id)
    return rec is not None and (rec.get("applied_revision") or 0) >= rev


async def _record_http(coord: Coordinator, ctx: Context, node_id: str) -> str:
    rec = await _record(coord, ctx, node_id)
    assert rec is not None and rec.get("http")
    return str(rec["http"])


async def test_lane_moves_mid_stream_subscriber_on_third_node_in_order(
    bus_agents: Any, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue,
) -> None:
    a, _ = await bus_agents("node-a")
    b, _ = await bus_agents("node-b")
    rev = await streaming(coord, ctx)
    await wait_applied([a, b], rev)
    await wait_lanes_spread([a, b], len(ctx.lanes))
    c, bus_c = await bus_agents("node-c")  # joins: rendezvous moves some lanes to it mid-stream
    await async_wait_until(lambda: bus_c.bridge is not None, 10, interval=0.05)
    reader = await SseReader(c.http_address or "", "/v1/events", "watcher").start()
    # Each workflow's transitions are enqueued one round at a time, so workflows are mid-way
    # (some seqs applied by the old owner, the rest by the new one) when node-a stops.
    rng = random.Random(9)
    plan = {f"mv-{n:03d}": workflow_transitions(f"mv-{n:03d}", 2, rng, 0.3) for n in range(24)}
    report = WorkloadReport(workflows={wf: len(msgs) for wf, msgs in plan.items()})
    moved_from: dict[str, int] = {}

    async def round_applied(rnd: int) -> bool:
        for wf, msgs in plan.items():
            if rnd < len(msgs) and int((await guard.read_workflow(wf)).get("seq", 0)) < rnd + 1:
                return False
        return True

    for rnd in range(max(len(m) for m in plan.values())):
        for wf, msgs in plan.items():
            if rnd < len(msgs):
                await queue.enqueue(wf, msgs[rnd])
        await async_wait_until(lambda rnd=rnd: round_applied(rnd), 30, interval=0.05,
                               message=f"round {rnd} applied")
        if rnd == 1:
            moved_from = dict(a.owned_lanes)
            await a.stop()  # graceful: its lanes move to b and c while workflows are mid-way
    await async_wait_until(lambda: all_processed(guard, report), 30, interval=0.1)
    total = sum(report.workflows.values())
    await async_wait_until(lambda: len(reader.events) >= total, 20, interval=0.05)
    check_subscriber(reader, report)
    assert moved_from, "node-a owned no lane: nothing moved"
    nodes_per_wf: dict[str, set[str]] = {}
    for e in reader.events:
        nodes_per_wf.setdefault(e["workflow_id"], set()).add(e["node_id"])
    assert any(len(n) > 1 for n in nodes_per_wf.values()), "no workflow changed node mid-stream"
    await reader.stop()


def test_agent_process_wrong_credentials_exits_4_without_crash_loop(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, unique_cluster: str, shared_etcd: Any,
    shared_redis: Any,
) -> None:
    import subprocess

    server = NatsServer(tmp_path_factory.mktemp("nats-auth"), user="svc", password="right-pass")
    server.start()
    try:
        pw = tmp_path / "pw"
        pw.write_text("wrong-pass-456")
        pw.chmod(0o600)
        path = bus_config(tmp_path / "c.toml", unique_cluster, shared_etcd.client_url, shared_redis.url, server.url,
                          extra={"nats": {"user": "svc", "password-file": str(pw), "connect-timeout": 1.0}})
        t0 = time.monotonic()
        proc = subprocess.run([CBCTL, "--config", str(path), "agent", "run", "--handler", "demo", "--node-id", "node-w", "--state-dir",
                               str(tmp_path / "st")], capture_output=True, text=True, timeout=30, check=False)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 4, proc.stderr[-2000:]
        assert "refused the credentials" in proc.stderr and "wrong-pass-456" not in proc.stderr
        assert elapsed < 10
        # One attempt, one clear error: not a loop of reconnects.
        assert proc.stderr.count("refused the credentials") <= 2
    finally:
        server.stop()
