"""Consumers move to schema v2 right after a v1+v2 dual-publish window opens (the `make demo`
bug): no ordering violation, and subscribers get every event in order, also the ones a workflow
published only in v1 before its v2 publishing began.

The cause: for a workflow already publishing v1, v2 publishing begins at a later seq (its first
apply after the window opened), or has not begun at all yet.  A bridge that had moved to v2
filled a gap (its v1 events held when the switch came) by asking the record only about v2: with
no v2 marker yet the missing seqs looked "not in the workflow's record" (skipped, counted as an
ordering violation); with a later v2 marker they looked "never published" and were skipped
silently, leaving the held event stuck.  The bridge now takes the earliest marker among the
versions it has consumed (``Bridge._begin``) and the filler returns every published event.
A second cause showed under load: v1 messages fetched by the old consumer but handled after the
flag changed were dropped ("the new consumer delivers it"), but a seq published only in v1 has
no v2 copy, and when it was a workflow's last event no later event revealed the gap: the
subscriber silently missed the workflow's tail.  Such a left-over now marks its seq as owed and
the gap filler brings it from the record (``Bridge._owe``).  A third: a v1-only event stored
after the old v1 consumer's last fetch (a node that had not applied the window yet published a
workflow's tail in v1 only) was never seen at all once the consumer was re-created on the v2
filter; about 2 of ~340 workflows lost their tail under load, nothing counted.  The bridge's
consumer now reads every version's subjects and keeps going at a switch; messages of a version
it delivered from before are owed like the left-overs (``Bridge._handle``).

Real services throughout: nats-server, redis-server (the fencing guard's record), etcd + agents
for the test under load."""

from __future__ import annotations

import asyncio
from typing import Any

import nats as nats_client
import pytest

from cbctl.core.agent.node import NodeAgent
from cbctl.core.agent.bus.attach import AgentBus
from cbctl.core.agent.bus.gap_fill import fill_from_record
from cbctl.core.agent.bus.bridge import Bridge
from cbctl.core.agent.bus.subscription import Subscription
from cbctl.core.backends.nats.stream import ensure_stream
from cbctl.core.model.config import Context
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model.events import Event, encode_event, msg_id, subject
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.model.metrics import AgentMetrics
from cbctl.core.agent.workload import generate
from cbctl.sandbox import NatsServer, async_wait_until
from tests.support.metrics import metric
from tests.support.rollout import STREAMING, set_flags, wait_applied, wait_lanes_spread
from tests.support.workload import all_processed
from tests.support.stack import StackOptions


pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def stack_options() -> StackOptions:
    """tests/integration/conftest.py's stack: 4 lanes, a nats-server of the test's own."""
    return StackOptions(lane_count=4, nats="own")


class Collector:
    """Drains a bridge subscription in the background: seqs per workflow, in arrival order."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.seqs: dict[str, list[int]] = {}
        self.count = 0
        self.error: BaseException | None = None
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for ev in self.sub:
                self.seqs.setdefault(ev.workflow_id, []).append(ev.seq)
                self.count += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            raise

    async def stop(self) -> None:
        self.sub.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_held_v1_events_are_filled_after_consumers_move_to_v2(
    redis_c: Any, ctx: Context, nats: NatsServer,
) -> None:
    """Deterministic: two workflows each have seq 3 held (seq 2 late) in a v1 bridge when the
    bridge moves to v2.  wf-a then begins v2 at seq 4, wf-b has not begun v2 at all.  Both are
    filled from the record in order: wf-a 1, 2, 3, 4 and wf-b 1, 2, 3, no violation.  Before the
    fix: wf-a got 1, 4 (2 and 3 skipped silently) and wf-b 1, 3 with a violation ("seq 2..2
    missing ... not in the workflow's record")."""
    cluster = ctx.cluster
    v1 = LaneGuard(redis_c, cluster, None, "node-v1")
    v1.publish_versions = (1,)
    dual = LaneGuard(redis_c, cluster, None, "node-dual")  # a node that has applied schema_versions [1, 2]
    dual.publish_versions = (1, 2)
    for wf in ("wf-a", "wf-b"):
        for t in (1, 2, 3):
            await v1.apply("lane-0", 0, "off", wf, f"{wf}/t{t}", {"state": f"s{t}"})

    async def events(wf: str) -> dict[int, Event]:
        return dict((await fill_from_record(v1, wf, 1, 1, 100)).events)  # the canonical events, as published

    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    cfg = ctx.nats.stream
    await ensure_stream(js, cfg, cluster=cluster)

    async def put(e: Event, version: int) -> None:
        await js.publish(subject(cluster, version, e.workflow_id), encode_event(e, version),
                         headers={"Nats-Msg-Id": msg_id(e.event_id, version)})

    m = AgentMetrics("node-x")

    async def filler(workflow_id: str, version: int, lo: int, hi: int) -> Any:
        return await fill_from_record(v1, workflow_id, version, lo, hi)

    # A long gap timeout: the switch comes while seq 3 is held, before any fill.
    bridge = Bridge(nc, cfg, m, "node-x", cluster=cluster, mode="streaming", schema_version=1, deliver_new=False,
                    gap_timeout=3.0, give_up_after=60.0, filler=filler)
    await bridge.start()
    col = Collector(bridge.subscribe(None, "ops"))
    try:
        ea, eb = await events("wf-a"), await events("wf-b")
        for e in (ea[1], eb[1]):
            await put(e, 1)
        await async_wait_until(lambda: col.count == 2, 20, interval=0.02, message="seq 1 of both delivered")
        for e in (ea[3], eb[3]):
            await put(e, 1)  # seq 2 is late
        await async_wait_until(lambda: bridge.stats.held >= 2, 20, interval=0.02, message="seq 3 held")
        bridge.apply_flags("streaming", 2)  # consumers.schema_version = 2, at once
        # wf-a's next apply is by a node at [1, 2]: v2 publishing begins at seq 4.
        r4 = await dual.apply("lane-0", 0, "off", "wf-a", "wf-a/t4", {"state": "s4"})
        assert (r4.seq, r4.publish_versions) == (4, (1, 2))
        e4 = (await events("wf-a"))[4]
        await put(e4, 1)
        await put(e4, 2)
        await async_wait_until(lambda: col.seqs.get("wf-a", [])[-1:] == [4] and col.seqs.get("wf-b", [])[-1:] == [3],
                               30, interval=0.05, message=f"both workflows delivered to the end ({col.seqs})")
        assert col.seqs == {"wf-a": [1, 2, 3, 4], "wf-b": [1, 2, 3]}, col.seqs
        assert metric_of(m, "event_bus_bridge_ordering_violations_total") == 0
        assert bridge.stats.filled == 2  # seq 2 of each, from the record
        assert not bridge._gapped, "a workflow left gapped (a held event stuck below its start)"
    finally:
        await col.stop()
        await bridge.close()
        await nc.close()


def metric_of(m: AgentMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


async def test_v1_only_tail_stored_after_the_switch_is_delivered(
    redis_c: Any, ctx: Context, nats: NatsServer,
) -> None:
    """Deterministic form of the defect seen under load.  A bridge delivers wf-t 1, 2 in v1 and
    moves to v2; it is provably reading v2 (a v2-only probe event is delivered).  Then a node
    still at schema_versions [1] applies wf-t's last task: seq 3 exists only in v1 (wf-t's v2
    publishing never began).  The subscriber gets wf-t 1, 2, 3 (seq 3 filled from the record),
    with no ordering violation.  When the bridge re-created its consumer on the v2 filter at the
    switch, seq 3 was stored after the v1 consumer's last fetch: neither consumer ever saw it, no
    later event revealed the gap, and wf-t stayed at [1, 2] with nothing counted.  A bridge
    pinned to v2 from the start delivers none of wf-t (never published in a version it reads)
    and counts nothing either."""
    cluster = ctx.cluster
    v1 = LaneGuard(redis_c, cluster, None, "node-v1")  # a node that has not applied [1, 2] yet
    v1.publish_versions = (1,)
    v2only = LaneGuard(redis_c, cluster, None, "node-v2")
    v2only.publish_versions = (2,)
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    cfg = ctx.nats.stream
    await ensure_stream(js, cfg, cluster=cluster)

    async def apply_and_put(g: LaneGuard, wf: str, task: str) -> int:
        r = await g.apply("lane-0", 0, "off", wf, task, {"state": task})
        ev = (await fill_from_record(g, wf, 1, r.seq, r.seq)).events[r.seq]  # the event as published
        for version in r.publish_versions:
            await js.publish(subject(cluster, version, wf), encode_event(ev, version),
                             headers={"Nats-Msg-Id": msg_id(ev.event_id, version)})
        return r.seq

    async def filler(workflow_id: str, version: int, lo: int, hi: int) -> Any:
        return await fill_from_record(v1, workflow_id, version, lo, hi)

    m, m_fresh = AgentMetrics("node-x"), AgentMetrics("node-y")
    bridge = Bridge(nc, cfg, m, "node-x", cluster=cluster, mode="streaming", schema_version=1, deliver_new=False,
                    gap_timeout=0.3, give_up_after=60.0, filler=filler, fetch_timeout=0.1)
    fresh = Bridge(nc, cfg, m_fresh, "node-y", cluster=cluster, mode="streaming", schema_version=2,
                   deliver_new=False, gap_timeout=0.3, give_up_after=60.0, filler=filler, fetch_timeout=0.1)
    await bridge.start()
    await fresh.start()
    col, col_fresh = Collector(bridge.subscribe(None, "ops")), Collector(fresh.subscribe(None, "ops"))
    try:
        for t in ("t1", "t2"):
            await apply_and_put(v1, "wf-t", t)
        await async_wait_until(lambda: col.seqs.get("wf-t") == [1, 2], 20, interval=0.02,
                               message=f"wf-t 1, 2 delivered in v1 ({col.seqs})")
        bridge.apply_flags("streaming", 2)  # consumers.schema_version = 2
        assert await apply_and_put(v2only, "wf-probe", "p1") == 1  # published in v2 only
        await async_wait_until(lambda: col.seqs.get("wf-probe") == [1], 20, interval=0.02,
                               message=f"the bridge reads v2 ({col.seqs})")
        assert await apply_and_put(v1, "wf-t", "t3") == 3  # v1 only: wf-t never began v2
        assert (await v1.read_workflow("wf-t"))["pub"] == "1:1"
        try:
            await async_wait_until(lambda: col.seqs.get("wf-t") == [1, 2, 3], 20, interval=0.05,
                                   message="wf-t's v1-only tail delivered")
        except TimeoutError:
            pytest.fail(f"wf-t's v1-only seq 3 never delivered: {col.seqs}; {bridge.stats}")
        assert metric_of(m, "event_bus_bridge_ordering_violations_total") == 0
        assert bridge.stats.filled == 1 and bridge.stats.bad == 0
        # The bridge that only ever read v2: the probe, nothing of wf-t, nothing counted.
        await async_wait_until(lambda: col_fresh.seqs.get("wf-probe") == [1], 20, interval=0.02,
                               message=f"fresh v2 bridge got the probe ({col_fresh.seqs})")
        last = (await js.stream_info(cfg.name)).state.last_seq
        await async_wait_until(lambda: fresh._last_stream_seq >= last, 20, interval=0.02,
                               message="fresh v2 bridge read the whole stream")
        # Every message is handled synchronously as it is read: wf-t's v1 messages were skipped
        # unread (no ordering state, nothing owed, so no gap that could later be counted).
        assert "wf-t" not in fresh._workflows and "wf-t" not in col_fresh.seqs
        assert fresh.stats.ordering_violations == 0 and fresh.stats.bad == 0
    finally:
        await col.stop()
        await col_fresh.stop()
        await bridge.close()
        await fresh.close()
        await nc.close()


async def test_consumers_move_to_v2_right_after_the_window_opens_under_load(
    bus_agents: Any, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue,
) -> None:
    """Three agents at stage 3 (v1) under load; the v1+v2 window opens and, in the very next
    revision, consumers move to v2 (no wait).  Every bridge counts zero ordering violations, and
    every subscriber (one per node, subscribed before the load) gets every event of every
    workflow exactly once in seq order: 1..N, the v2 part from where v2 publishing began."""
    cp = ControlPlane(ctx, coord)
    agents: list[tuple[NodeAgent, AgentBus]] = [await bus_agents(f"node-{i}") for i in range(3)]
    rev = await set_flags(cp, **STREAMING, **{"eventbus.schema_versions": [1], "consumers.schema_version": 1})
    await wait_applied([a for a, _ in agents], rev)
    await wait_lanes_spread([a for a, _ in agents], len(ctx.lanes))
    await async_wait_until(lambda: all(b.bridge is not None for _, b in agents), 20, interval=0.05,
                           message="bridges running")
    cols = [Collector(b.bridge.subscribe(None, f"sub-{a.node_id}")) for a, b in agents]  # type: ignore[union-attr]
    bridges = [b.bridge for _, b in agents]
    try:
        load = asyncio.ensure_future(generate(queue, workflows=240, rate=60, tasks_per_workflow=3, fail_rate=0.3,
                                              seed=21, prefix="sw"))
        # Mid-load: workflows are mid-life (some events published in v1 only) when the window opens.
        await async_wait_until(lambda: sum(a.tasks_processed for a, _ in agents) >= 300, 60, interval=0.02,
                               message="load under way")
        await set_flags(cp, **{"eventbus.schema_versions": [1, 2]})
        rev2 = await set_flags(cp, **{"consumers.schema_version": 2})  # at once: the demo's sequence
        report = await load
        await wait_applied([a for a, _ in agents], rev2)
        assert all(b.bridge is br for (_, b), br in zip(agents, bridges, strict=True)), "a bridge was re-created"
        await async_wait_until(lambda: all_processed(guard, report), 90, interval=0.1, message="all processed")
        total = sum(report.workflows.values())
        try:
            await async_wait_until(lambda: all(c.count >= total for c in cols), 90, interval=0.1,
                                   message="every subscriber got every event")
        except TimeoutError:
            short = {a.node_id: {wf: c.seqs.get(wf) for wf, n in report.workflows.items()
                                 if c.seqs.get(wf) != list(range(1, n + 1))}
                     for c, (a, _) in zip(cols, agents, strict=True)}
            stats = {a.node_id: b.status()["bridge_stats"] for a, b in agents}
            pytest.fail(f"subscribers short of {total} events: {[c.count for c in cols]}; "
                        f"wrong workflows {str(short)[:3000]}; bridges {stats}")
        straddled = 0
        for wf, n in report.workflows.items():
            pub = (await guard.read_workflow(wf)).get("pub", "")
            marks = dict(part.split(":") for part in pub.split(",") if part)
            assert marks.get("1") == "1", (wf, pub)  # v1 from the first event (publish on throughout)
            if "2" in marks and int(marks["2"]) > 1:
                straddled += 1
            for c, (a, _) in zip(cols, agents, strict=True):
                assert c.seqs.get(wf) == list(range(1, n + 1)), (a.node_id, wf, pub, c.seqs.get(wf))
        assert straddled > 0, "no workflow was mid-life when v2 publishing began (the case under test)"
        for a, b in agents:
            assert metric(a, "event_bus_bridge_ordering_violations_total") == 0, b.status()["bridge_stats"]
            assert b.bridge is not None and b.bridge.schema_version == 2
        assert all(c.error is None for c in cols), [c.error for c in cols]
    finally:
        for c in cols:
            await c.stop()
