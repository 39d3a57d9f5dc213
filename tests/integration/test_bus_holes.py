"""Issue 9 regressions for the event bus, against real etcd, nats-server and redis-server.

* No holes: the fencing guard's publish marker (cbctl/core/backends/redis/guard.py) makes every node publish a
  workflow's events once its publishing began, so a flag transition applied at different times
  by different nodes (off -> shadow -> on, cluster.enabled false -> true, competing consumers)
  leaves no seq hole in the stream.  One test reproduces the issue's hole deterministically (a
  lagging node applies every other seq of a workflow); it fails with [3, 5] instead of
  [3, 4, 5, 6] when the agent publishes by its own flags instead of the guard's decision.
* No lossy skips: a late event is filled from the workflow's Redis history, in order, and its
  stream copy is suppressed; no ordering violation is counted.
* Bounded state: history capped at history-max, finished workflows' keys get the retention TTL,
  the local SSE replay is read page by page.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import nats as nats_client
import pytest

from cbctl.core.agent.node import NodeAgent
from cbctl.core.agent.bus.attach import AgentBus, attach_bus
from cbctl.core.agent.bus.bridge import Bridge
from cbctl.core.agent.bus.gap_fill import GapFill
from cbctl.core.backends.nats.stream import ensure_stream
from cbctl.core.model.config import Context, StreamConfig, default_stream_name
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model.events import encode_event, make_event, msg_id, subject
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.model.metrics import AgentMetrics
from cbctl.core.agent.workload import WorkloadReport, generate, lifecycle_handler, workflow_transitions
from cbctl.sandbox import NatsServer, async_wait_until
from tests.helpers import KEEPALIVE, TTL, bus_config
from tests.support.metrics import metric
from tests.support.rollout import set_flags, wait_applied
from tests.support.sse import SseReader
from tests.support.workload import all_processed, stream_event_ids
from tests.support.stack import StackOptions


pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def stack_options() -> StackOptions:
    """tests/integration/conftest.py's stack: 4 lanes, a nats-server of the test's own."""
    return StackOptions(lane_count=4, nats="own")


OFF = {"cluster.enabled": False, "ownership.guard": "off", "eventbus.publish": "off", "eventbus.bridge": "off",
       "stream.source": "local", "signals.routing": "off"}


def assert_no_hole(stored: list[tuple[str, int, str]], final: dict[str, int]) -> dict[str, list[int]]:
    """Per workflow: the stream holds seq first..last_seq contiguously (from the workflow's first
    published event), each once; returns the seqs per workflow."""
    ids = [eid for _, _, eid in stored]
    assert len(ids) == len(set(ids)), "duplicate event ids in the stream"
    per_wf: dict[str, list[int]] = {}
    for wf, seq, _ in stored:
        per_wf.setdefault(wf, []).append(seq)
    for wf, seqs in per_wf.items():
        s = sorted(seqs)
        assert s == list(range(s[0], final[wf] + 1)), f"{wf}: hole in the stream: {s} (final seq {final[wf]})"
    return per_wf


# -- the guard's publish marker -----------------------------------------------------------------


async def test_publish_marker_decides_for_every_node(redis_c: Any, ctx: Context) -> None:
    """A node still at `off` is told to publish a workflow whose publishing began; `on -> off`
    keeps a begun workflow publishing; a re-applied task below the marker is not published; a
    version added later begins at its own seq."""
    cluster = ctx.cluster
    shadow = LaneGuard(redis_c, cluster, None, "node-shadow")
    shadow.publish_versions = (1,)
    off = LaneGuard(redis_c, cluster, None, "node-off")
    assert off.publish_versions == ()

    async def apply(g: LaneGuard, wf: str, task: str) -> Any:
        return await g.apply("lane-0", 0, "off", wf, task, {"state": task})

    r1 = await apply(off, "wf-m", "t1")  # nobody publishes yet
    assert (r1.seq, r1.publish_versions) == (1, ())
    r2 = await apply(shadow, "wf-m", "t2")  # publishing begins here
    assert (r2.seq, r2.publish_versions) == (2, (1,))
    r3 = await apply(off, "wf-m", "t3")  # the lagging node publishes it too: no hole at 3
    assert (r3.seq, r3.publish_versions) == (3, (1,))
    again = await apply(shadow, "wf-m", "t1")  # re-delivered task below the marker: not published
    assert again.already_applied and again.seq == 1 and again.publish_versions == ()
    both = LaneGuard(redis_c, cluster, None, "node-dual")
    both.publish_versions = (1, 2)
    r4 = await apply(both, "wf-m", "t4")
    assert r4.publish_versions == (1, 2)
    r5 = await apply(off, "wf-m", "t5")  # rollback to off: the begun workflow keeps publishing both
    assert r5.publish_versions == (1, 2)
    assert (await apply(off, "wf-m", "t3")).publish_versions == (1,)  # seq 3: before v2 began
    state = await off.read_workflow("wf-m")
    assert state["pub"] == "1:2,2:4"
    # A workflow that never began under `off` stays unpublished.
    assert (await apply(off, "wf-n", "t1")).publish_versions == ()


async def test_history_capped_and_finished_workflow_expires(redis_c: Any, ctx: Context) -> None:
    g = LaneGuard(redis_c, ctx.cluster, None, "node-b", history_maxlen=5, retention=3600)
    for i in range(12):
        await g.apply("lane-0", 0, "off", "wf-cap", f"t{i}", {"state": "started"})
    assert await redis_c.xlen(g.keys.history("wf-cap")) == 5
    assert [e["seq"] for e in await g.history("wf-cap")] == [8, 9, 10, 11, 12]
    for k in (g.keys.workflow("wf-cap"), g.keys.history("wf-cap"), g.keys.applied("wf-cap")):
        assert await redis_c.ttl(k) == -1  # not finished: no expiry
    await g.apply("lane-0", 0, "off", "wf-cap", "t-end", {"state": "completed", "finished": True})
    for k in (g.keys.workflow("wf-cap"), g.keys.history("wf-cap"), g.keys.applied("wf-cap")):
        assert 3500 < await redis_c.ttl(k) <= 3600, k
    # Expiry is real: a 1 s retention is gone after it (Redis expires lazily on access).
    short = LaneGuard(redis_c, ctx.cluster, None, "node-b", retention=1)
    await short.apply("lane-0", 0, "off", "wf-short", "t0", {"finished": "true"})
    await async_wait_until(lambda: _gone(redis_c, short, "wf-short"), 10, interval=0.1, message="keys expired")
    # A record read finds the marker and pages through the capped history.
    rec = await g.record("wf-cap", 9, 11, page=2)
    assert [e["seq"] for e in rec.entries] == [9, 10, 11] and rec.oldest == 9 and rec.publish_from == {}


async def _gone(redis_c: Any, g: LaneGuard, wf: str) -> bool:
    return not await redis_c.exists(g.keys.workflow(wf), g.keys.history(wf), g.keys.applied(wf))


# -- a late event is filled, not dropped ----------------------------------------------------------


async def test_late_event_filled_from_redis_history_not_dropped(
    redis_c: Any, ctx: Context, nats: NatsServer,
) -> None:
    """Seq 2 and 3 reach the stream, seq 1 is late (its publisher is slow): the bridge fills 1
    from the Redis history, releases 1, 2, 3 in order, suppresses the late copy, counts nothing."""
    cluster = ctx.cluster
    g = LaneGuard(redis_c, cluster, None, "node-p")
    g.publish_versions = (1,)
    events = []
    for i in (1, 2, 3):
        r = await g.apply("lane-0", 0, "off", "wf-late", f"t{i}", {"state": f"s{i}"}, task_type="started")
        assert r.publish_versions == (1,)
        events.append(make_event(workflow_id="wf-late", seq=r.seq, type="started", lane="lane-0", node_id="node-p",
                                 task_id=f"t{i}", payload={"state": f"s{i}"}))
    fills: list[tuple[int, int]] = []

    class _AgentStub:  # AgentBus.fill_gap needs only the agent's guard
        guard = g

    async def filler(wf: str, version: int, lo: int, hi: int) -> GapFill:
        fills.append((lo, hi))
        return await AgentBus.fill_gap(bus, wf, version, lo, hi)

    bus = AgentBus.__new__(AgentBus)
    bus.agent = _AgentStub()  # type: ignore[assignment]
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    cfg = StreamConfig(name=default_stream_name(cluster), duplicate_window=60)
    await ensure_stream(js, cfg, cluster=cluster)
    m = AgentMetrics("node-r")
    bridge = Bridge(nc, cfg, m, "node-r", cluster=cluster, mode="streaming", deliver_new=False, gap_timeout=0.3,
                    filler=filler)
    await bridge.start()
    try:
        sub = bridge.subscribe(None, "ops")

        async def put(i: int) -> None:
            e = events[i - 1]
            await js.publish(subject(cluster, 1, "wf-late"), encode_event(e, 1),
                             headers={"Nats-Msg-Id": msg_id(e.event_id, 1)})

        await put(2)
        await put(3)
        got = [await sub.next(10) for _ in range(3)]
        assert [e.seq for e in got] == [1, 2, 3]
        assert got[0].event_id == events[0].event_id  # the filled one is the same event
        assert fills and fills[0][1] == 1
        await put(1)  # the late copy arrives after all: suppressed, never delivered twice
        await async_wait_until(lambda: metric_of(m, "event_bus_bridge_duplicates_suppressed_total") >= 1, 10,
                               interval=0.05, message="late copy suppressed")
        assert sub.pending() == 0
        assert metric_of(m, "event_bus_bridge_ordering_violations_total") == 0
        assert bridge.stats.filled == 1 and bridge.stats.late_dropped == 0
    finally:
        await bridge.close()
        await nc.close()


def metric_of(m: AgentMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


# -- flag transitions under load: no hole ---------------------------------------------------------


async def test_flag_transitions_under_load_leave_no_hole(
    bus_agents: Any, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue, nats: NatsServer,
    tmp_path: Path,
) -> None:
    """Three agents as competing consumers (cluster.enabled false) under load; the flags go
    off -> shadow with cluster.enabled false -> true (stage 0 -> 1), then publish on with the
    bridge streaming.  Every workflow's stream is gapless from its first published event, no
    event is stored twice, and no bridge counts an ordering violation."""
    cp = ControlPlane(ctx, coord)
    rev = await set_flags(cp, **OFF)
    agents = [await bus_agents(f"node-{i}") for i in range(2)]
    # node-lag applies every flag change 1.5 s after the others (a busy machine): its bus hears
    # of the change late while its lane workers keep applying tasks.
    lag = NodeAgent(ctx, "node-lag", handler=lifecycle_handler, state_dir=tmp_path / "state-lag", probes=False, lease_ttl=TTL,
                    keepalive_interval=KEEPALIVE)

    async def late(flags: Any, revision: int) -> None:
        await asyncio.sleep(1.5)  # the lag being simulated, not a synchronisation

    lag.add_flags_listener(late)
    agents.append((lag, attach_bus(lag, keepalive=2.0)))
    await lag.start()
    try:
        await _transitions(agents, cp, rev, coord, ctx, guard, queue, nats)
    finally:
        await lag.stop()


async def _transitions(agents: list[tuple[NodeAgent, AgentBus]], cp: ControlPlane, rev: int, coord: Coordinator,
                       ctx: Context, guard: LaneGuard, queue: LaneQueue, nats: NatsServer) -> None:
    await wait_applied([a for a, _ in agents], rev)
    # Every workflow is mid-life when the flags change: one transition of each workflow per
    # round, rounds enqueued back to back (competing consumers apply a workflow's consecutive
    # seqs on different nodes within milliseconds, as in the issue), the flags changed between
    # rounds without waiting for the agents to apply them.
    rng = random.Random(11)
    plan = {f"tr-{n:03d}": workflow_transitions(f"tr-{n:03d}", 3, rng, 0.2) for n in range(60)}
    report = WorkloadReport(workflows={wf: len(msgs) for wf, msgs in plan.items()})
    flips = {3: {"cluster.enabled": True, "ownership.guard": "observe", "eventbus.publish": "shadow",
                 "eventbus.bridge": "read-only"},
             6: {"eventbus.publish": "on", "eventbus.bridge": "streaming"}}
    revs = []
    for rnd in range(max(len(m) for m in plan.values())):
        for wf, msgs in plan.items():
            if rnd < len(msgs):
                await queue.enqueue(wf, msgs[rnd])
        if rnd in flips:
            revs.append(await set_flags(cp, **flips[rnd]))
    await wait_applied([a for a, _ in agents], revs[-1])
    await async_wait_until(lambda: all_processed(guard, report), 60, interval=0.1, message="all processed")
    await async_wait_until(lambda: all(b.publisher is not None and not b.publisher.degraded for _, b in agents), 30,
                           interval=0.1, message="nothing left in any outbox")
    stored = await stream_event_ids(nats.url, default_stream_name(ctx.cluster))
    per_wf = assert_no_hole(stored, report.workflows)
    # The transition was under way for some workflows (they began publishing mid-life) and
    # complete for the later ones (published from seq 1).
    assert any(min(s) > 1 for s in per_wf.values()), "no workflow straddled the transition"
    for wf, n in report.workflows.items():
        state = await guard.read_workflow(wf)
        if wf in per_wf:
            assert state["pub"] == f"1:{min(per_wf[wf])}", (wf, state.get("pub"))
    await async_wait_until(lambda: all(b.bridge is not None for _, b in agents), 10, interval=0.05)
    # Every bridge verifies the whole stream, the lagging node's too: its consumer is created only
    # when it applies eventbus.bridge != off (1.5 s after the others, typically after the last
    # event was stored), but it reads from when its bridge started (cbctl/core/agent/bus/bridge.py).
    try:
        await async_wait_until(
            lambda: all(b.bridge is not None and b.bridge.stats.released >= len(stored) for _, b in agents), 60,
            interval=0.1, message="every bridge verified the whole stream")
    except TimeoutError:
        pytest.fail("a bridge released fewer events than the stream holds: "
                    + "; ".join(f"{a.node_id}: {b.status()['bridge_stats']}/{len(stored)}" for a, b in agents))
    for a, b in agents:
        assert metric(a, "event_bus_bridge_ordering_violations_total") == 0, b.status()["bridge_stats"]


# -- the local SSE replay is paged ------------------------------------------------------------------


async def test_local_replay_is_read_page_by_page(
    bus_agents: Any, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue,
) -> None:
    a, bus_a = await bus_agents("node-a", bus_options={"replay_page": 3})
    rev = await set_flags(ControlPlane(ctx, coord), **{**OFF, "cluster.enabled": True})
    await wait_applied([a], rev)
    report = await generate(queue, workflows=1, rate=0, tasks_per_workflow=4, fail_rate=0, seed=1, prefix="pg")
    await async_wait_until(lambda: all_processed(guard, report), 20, interval=0.1)
    (wf, n), = report.workflows.items()
    assert a.guard is not None
    counts: list[int | None] = []
    real_history = a.guard.history

    async def observed(workflow_id: str, *, after: str = "-", count: int | None = None) -> list[dict[str, Any]]:
        counts.append(count)
        return await real_history(workflow_id, after=after, count=count)

    a.guard.history = observed  # type: ignore[method-assign]  # observe the reads; Redis still answers
    reader = await SseReader(a.http_address or "", f"/v1/workflows/{wf}/events", "ops", after=1).start()
    await async_wait_until(lambda: len(reader.events) >= n - 1, 10, interval=0.05, message="replayed")
    assert [e["seq"] for e in reader.events] == list(range(2, n + 1))
    assert counts and all(c == 3 for c in counts), counts  # never the whole history in one read
    assert len(counts) >= n // 3
    await reader.stop()
    assert json.loads(json.dumps(bus_a.status()))["source"] == "local"


# -- a deterministic flag-transition hole (the issue's sbx-000000167) ------------------------------


class _Hold:
    """An ``on_applied`` hook (after the bus's: the event is published or buffered first) that
    holds the agent's only lane worker after every apply until :meth:`release`: a held agent
    reads nothing, so the next task enqueued goes to the other agent."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.gate: asyncio.Event | None = None
        self.applied: list[tuple[str, int]] = []
        agent.on_applied(self._hook)

    async def _hook(self, u: Any) -> None:
        gate = self.gate = asyncio.Event()
        self.applied.append((u.workflow_id, u.seq))
        await gate.wait()

    @property
    def held(self) -> bool:
        return self.gate is not None and not self.gate.is_set()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()


async def test_flag_transition_hole_reproduced_deterministically(
    tmp_path: Path, unique_cluster: str, shared_etcd: Any, shared_redis: Any, nats: NatsServer,
) -> None:
    """The issue's hole, made deterministic.  Two agents are competing consumers of one lane
    (cluster.enabled false); node-b's flags listener is held, so it stays at publish=off while
    node-a is at shadow.  One workflow's consecutive tasks are applied alternately by a and b
    (each agent's lane worker is held after every apply, so the next task can only go to the
    other one): seq 1 (a) and 2 (b) before the change, then 3 (a, publishing begins), 4 (b,
    still off), 5 (a), 6 (b).  The stream must hold 3, 4, 5, 6: seq 4 and 6 are published by
    the lagging node because the guard's publish marker says the workflow's publishing began.
    Deciding from each node's own flags drops 4 and 6 (the hole seen in the issue)."""
    from cbctl.core.backends.redis.client import redis_client_for
    from cbctl.core.model.config import load_config
    from cbctl.core.backends.coord import make_coordinator
    config = bus_config(tmp_path / "cbctl.toml", unique_cluster, shared_etcd.client_url, shared_redis.url, nats.url,
                        lane_count=1)
    ctx = load_config(config).context()
    coord = make_coordinator(ctx)
    await coord.connect()
    redis = redis_client_for(ctx)
    guard = LaneGuard(redis, ctx.cluster, None, "test-reader")
    queue = LaneQueue(redis, ctx.cluster, ctx.lanes)
    cp = ControlPlane(ctx, coord)
    agents: list[NodeAgent] = []
    b_flags = asyncio.Event()  # node-b hears of publish != off only once this is set

    async def lagging(flags: Any, revision: int) -> None:
        if flags.get("eventbus.publish", "off") != "off":
            await b_flags.wait()  # the lag being simulated: released at the end of the test

    try:
        rev = await set_flags(cp, **OFF)
        buses: dict[str, AgentBus] = {}
        holds: dict[str, _Hold] = {}
        for name in ("node-a", "node-b"):
            # reclaim_idle: no claim of a held (unacked) task by the other agent during the test.
            agent = NodeAgent(ctx, name, handler=lifecycle_handler, state_dir=tmp_path / f"state-{name}", probes=False, lease_ttl=TTL,
                              keepalive_interval=KEEPALIVE, reclaim_idle=120)
            if name == "node-b":
                agent.add_flags_listener(lagging)  # before the bus's listener: the bus hears late
            buses[name] = attach_bus(agent, keepalive=2.0)
            holds[name] = _Hold(agent)
            await agent.start()
            agents.append(agent)
        await wait_applied(agents, rev)
        a, b = holds["node-a"], holds["node-b"]

        plugs = 0

        async def plug() -> None:
            """Hold the one free agent with a task of another workflow."""
            nonlocal plugs
            plugs += 1
            wf = f"plug-{plugs}"
            await queue.enqueue(wf, {"task_id": f"{wf}/0", "type": "created", "payload": {}})
            await async_wait_until(lambda: any(w == wf for h in (a, b) for w, _ in h.applied), 20, interval=0.01,
                                   message=f"{wf} applied")

        await plug()
        await plug()
        assert a.held and b.held  # both held: from here on we choose who takes each task

        wf = "hole-wf"
        msgs = workflow_transitions(wf, 2, random.Random(1), 0.0)
        assert len(msgs) == 6

        async def apply_on(h: _Hold, msg: dict[str, Any], seq: int) -> None:
            h.release()
            await queue.enqueue(wf, msg)
            await async_wait_until(lambda: (wf, seq) in h.applied, 20, interval=0.01,
                                   message=f"{wf} seq {seq} on {h.agent.node_id}")

        await apply_on(a, msgs[0], 1)
        await apply_on(b, msgs[1], 2)
        rev = await set_flags(cp, **{"eventbus.publish": "shadow"})
        await async_wait_until(lambda: agents[0].applied_revision >= rev and buses["node-a"].status()["publish"]
                               == "shadow", 20, interval=0.02, message="node-a at shadow")
        assert buses["node-b"].status()["publish"] == "off"  # node-b lags
        for i, h in zip(range(2, 6), (a, b, a, b), strict=True):
            await apply_on(h, msgs[i], i + 1)
            if h is b:
                assert buses["node-b"].status()["publish"] == "off"  # still lagging when it applied
        hist = await guard.history(wf)
        assert [(e["seq"], e["node"]) for e in hist] == [
            (1, "node-a"), (2, "node-b"), (3, "node-a"), (4, "node-b"), (5, "node-a"), (6, "node-b")]
        assert (await guard.read_workflow(wf))["pub"] == "1:3"

        # Each publish was acked or buffered before its hook held the worker; let both drain.
        await async_wait_until(lambda: all(bus.publisher is not None and bus.publisher.outbox_depth == 0
                                           for bus in buses.values()), 30, interval=0.1, message="outboxes empty")
        stored = await stream_event_ids(nats.url, default_stream_name(ctx.cluster))
        seqs = sorted(s for w, s, _ in stored if w == wf)
        assert seqs == [3, 4, 5, 6], f"hole in {wf}'s stream: {seqs} (seq 4 and 6 were applied by the lagging node)"
    finally:
        b_flags.set()
        for h in holds.values() if "holds" in locals() else ():
            if h.gate is not None:
                h.gate.set()
        for agent in agents:
            await agent.stop()
        await redis.aclose()
        await coord.close()
