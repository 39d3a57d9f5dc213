"""The event bus inside node agents, against real etcd, nats-server and redis-server.

Several in-process NodeAgents with :func:`cbctl.core.agent.bus.attach.attach_bus`; subscribers are real
HTTP SSE clients (httpx).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats as nats_client
import pytest

from cbctl.core.agent.node import NodeAgent
from cbctl.core.agent.bus.attach import attach_bus
from cbctl.core.model.config import Context, load_config
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model.events import subject
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.agent.workload import generate, lifecycle_handler
from cbctl.sandbox import NatsServer, async_wait_until
from tests.helpers import KEEPALIVE, TTL, bus_config, cbctl_proc
from tests.support.metrics import metric
from tests.support.rollout import set_flags, streaming, wait_applied, wait_lanes_spread
from tests.support.sse import SseReader
from tests.support.stack import StackOptions
from tests.support.workload import all_processed, check_stream_exactly_once, check_subscriber

pytestmark = pytest.mark.integration


# -- fixtures: the stack of tests/integration/conftest.py, 4 lanes, a nats-server of the test's own -----


@pytest.fixture
def stack_options() -> StackOptions:
    return StackOptions(lane_count=4, nats="own")


# -- tests ------------------------------------------------------------------------------------


async def test_canonical_stream_reaches_subscriber_on_any_node(
    bus_agents: Any, config_path: Path, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue, nats: NatsServer,
) -> None:
    a, _ = await bus_agents("node-a")
    b, _ = await bus_agents("node-b")
    c, bus_c = await bus_agents("node-c")
    rev = await streaming(coord, ctx)
    await wait_applied([a, b, c], rev)
    await wait_lanes_spread([a, b, c], len(ctx.lanes))
    await async_wait_until(lambda: bus_c.bridge is not None, 10, interval=0.05, message="bridge")
    all_reader = await SseReader(c.http_address or "", "/v1/events", "ops").start()
    one_reader = await SseReader(c.http_address or "", "/v1/workflows/bus-000000/events", "ops", after=0).start()
    assert all_reader.status == 200 and one_reader.status == 200

    report = await generate(queue, workflows=20, rate=0, tasks_per_workflow=2, fail_rate=0.3, seed=3, prefix="bus")
    await async_wait_until(lambda: all_processed(guard, report), 20, interval=0.1, message="processed")
    total = sum(report.workflows.values())
    await async_wait_until(lambda: len(all_reader.events) >= total, 15, interval=0.05,
                           message=f"subscriber got {total} events")
    check_subscriber(all_reader, report)
    assert {e["node_id"] for e in all_reader.events} - {"node-c"}  # updates made on other nodes too
    await async_wait_until(lambda: len(one_reader.events) >= report.workflows["bus-000000"], 5, interval=0.05)
    assert [e["seq"] for e in one_reader.events] == list(range(1, report.workflows["bus-000000"] + 1))
    assert one_reader.ids == [str(s) for s in range(1, report.workflows["bus-000000"] + 1)]
    await check_stream_exactly_once(nats.url, guard, report)

    # A late subscriber with after=SEQ gets the rest, replayed from the stream.
    late = await SseReader(a.http_address or "", "/v1/workflows/bus-000001/events", "late", after=2).start()
    n1 = report.workflows["bus-000001"]
    await async_wait_until(lambda: len(late.events) >= n1 - 2, 5, interval=0.05, message="late replay")
    assert [e["seq"] for e in late.events] == list(range(3, n1 + 1))
    assert metric(c, "event_bus_publish_total", status="ok") + metric(a, "event_bus_publish_total", status="ok") > 0
    for r in (all_reader, one_reader, late):
        await r.stop()

    # `cbctl events tail` is a subscriber too: the backlog after --after, then exit on 1 s idle.
    res = await asyncio.to_thread(cbctl_proc, config_path, "-o", "json", "events", "tail", "--workflow", "bus-000001",
                                  "--node", "node-b", "--after", "0")
    assert res.exit_code == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["seq"] for x in lines] == list(range(1, n1 + 1))
    res = await asyncio.to_thread(cbctl_proc, config_path, "events", "tail", "--for", "1.5s", "--follow")
    assert res.exit_code == 0, res.stderr
    res = await asyncio.to_thread(cbctl_proc, config_path, "events", "tail", "--node", "node-zz")
    assert res.exit_code == 2 and "node-zz" in res.stderr


async def test_bridge_modes_and_local_source(
    bus_agents: Any, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue,
) -> None:
    a, bus_a = await bus_agents("node-a")
    cp = ControlPlane(ctx, coord)
    rev = await streaming(coord, ctx, **{"eventbus.bridge": "read-only"})
    await wait_applied([a], rev)
    addr = a.http_address or ""
    r = await SseReader(addr, "/v1/events", "ops").start()
    assert r.status == 403 and "read-only" in r.error_body["reason"]

    rev = await set_flags(cp, **{"eventbus.bridge": "canary", "canary.subscribers": ["blue"]})
    await wait_applied([a], rev)
    r = await SseReader(addr, "/v1/events", "ops").start()
    assert r.status == 403 and "canary.subscribers" in r.error_body["reason"]
    blue = await SseReader(addr, "/v1/events", "blue").start()
    assert blue.status == 200

    # Rollback of the event bus: bridge off + source local.  The open canonical stream ends
    # with a reason; a new subscriber gets this node's local updates.
    rev = await set_flags(cp, **{"eventbus.bridge": "off", "stream.source": "local"})
    await wait_applied([a], rev)
    await blue.wait_done(5)
    assert blue.ends and "stream.source" in blue.ends[0]["reason"]
    local = await SseReader(addr, "/v1/events", "ops").start()
    assert local.status == 200
    report = await generate(queue, workflows=5, rate=0, tasks_per_workflow=2, fail_rate=0, seed=1, prefix="loc")
    await async_wait_until(lambda: all_processed(guard, report), 20, interval=0.1, message="processed")
    await async_wait_until(lambda: len(local.events) >= sum(report.workflows.values()), 5, interval=0.05)
    check_subscriber(local, report)
    # Local replay with after= comes from the Redis history.
    replay = await SseReader(addr, "/v1/workflows/loc-000000/events", "ops", after=1).start()
    await async_wait_until(lambda: len(replay.events) >= report.workflows["loc-000000"] - 1, 5, interval=0.05)
    assert [e["seq"] for e in replay.events] == list(range(2, report.workflows["loc-000000"] + 1))
    assert bus_a.status()["source"] == "local"
    for x in (local, replay):
        await x.stop()


async def test_bad_events_counted_and_skipped(
    bus_agents: Any, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue, nats: NatsServer,
) -> None:
    a, bus_a = await bus_agents("node-a")
    rev = await streaming(coord, ctx)
    await wait_applied([a], rev)
    await async_wait_until(lambda: bus_a.bridge is not None, 10, interval=0.05)
    reader = await SseReader(a.http_address or "", "/v1/events", "ops").start()
    # The bridge's consumer exists (deliver-new) before the garbage goes in.
    await async_wait_until(lambda: bus_a.bridge is not None and bus_a.bridge._psub is not None, 10, interval=0.02,
                           message="bridge consumer bound")
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    junk = subject(ctx.cluster, 1, "junk")
    await js.publish(junk, b"\xff\xfe garbage")
    await js.publish(junk, b'{"schema_version": 99, "event_id": "x"}')
    await js.publish(junk, b"[1,2,3]")
    await nc.close()
    report = await generate(queue, workflows=3, rate=0, tasks_per_workflow=1, fail_rate=0, seed=1, prefix="ok")
    await async_wait_until(lambda: len(reader.events) >= sum(report.workflows.values()), 15, interval=0.05)
    check_subscriber(reader, report)
    await async_wait_until(lambda: sum(metric(a, "event_bus_bad_events_total", reason=r) for r in
                                       ("not_utf8", "unknown_version", "not_object")) >= 3, 5, interval=0.05)
    assert metric(a, "event_bus_bad_events_total", reason="unknown_version") == 1
    assert metric(a, "event_bus_bad_events_total", reason="not_utf8") == 1
    assert metric(a, "event_bus_bad_events_total", reason="not_object") == 1
    await reader.stop()


async def test_degraded_start_buffers_then_drains(
    tmp_path: Path, unique_cluster: str, shared_etcd: Any, shared_redis: Any, nats: NatsServer,
    coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue, bus_agents: Any,
) -> None:
    """NATS unreachable at start: the agent starts, executes tasks, buffers; then drains."""
    nats.stop()
    a, bus_a = await bus_agents("node-a")
    assert bus_a.publisher is not None and not bus_a.publisher.connected  # started anyway
    rev = await streaming(coord, ctx)
    await wait_applied([a], rev)
    report = await generate(queue, workflows=4, rate=0, tasks_per_workflow=1, fail_rate=0, seed=1, prefix="deg")
    await async_wait_until(lambda: all_processed(guard, report), 20, interval=0.1, message="processed degraded")
    assert metric(a, "event_bus_degraded") == 1 and metric(a, "event_bus_outbox_depth") > 0
    nats.start()
    await async_wait_until(lambda: metric(a, "event_bus_degraded") == 0, 20, interval=0.1, message="drained")
    assert metric(a, "event_bus_outbox_depth") == 0
    await check_stream_exactly_once(nats.url, guard, report)


async def test_wrong_credentials_fail_at_start(
    tmp_path: Path, unique_cluster: str, shared_etcd: Any, shared_redis: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A clear AuthFailed (exit 4) from the agent's start; nothing left running; no secret shown."""
    from cbctl.core.model.errors import AuthFailed

    server = NatsServer(tmp_path_factory.mktemp("nats-auth"), user="svc", password="right-pass")
    server.start()
    try:
        secret = tmp_path / "pw"
        secret.write_text("wrong-pass-123")
        secret.chmod(0o600)
        path = bus_config(tmp_path / "c.toml", unique_cluster, shared_etcd.client_url, shared_redis.url, server.url,
                          extra={"nats": {"user": "svc", "password-file": str(secret), "connect-timeout": 1.0}})
        ctx = load_config(path).context()
        agent = NodeAgent(ctx, "node-x", handler=lifecycle_handler, state_dir=tmp_path / "st", probes=False, lease_ttl=TTL,
                          keepalive_interval=KEEPALIVE)
        attach_bus(agent)
        t0 = time.monotonic()
        with pytest.raises(AuthFailed) as info:
            await agent.start()
        assert time.monotonic() - t0 < 5
        assert info.value.exit_code == 4
        assert "refused the credentials" in str(info.value) and "wrong-pass-123" not in str(info.value)
    finally:
        server.stop()


# -- review fixes: local ordering, replay failure, bridge task restart, the tail client ---------


def _ev(seq: int, workflow_id: str = "wf-1") -> Any:
    from cbctl.core.model.events import make_event

    return make_event(workflow_id=workflow_id, seq=seq, type="task", lane="lane-0", node_id="node-a")


def _drain(sub: Any) -> list[int]:
    seqs = []
    while not sub._queue.empty():
        item = sub._queue.get_nowait()
        if item is not None:
            seqs.append(item.seq)
    return seqs


async def test_local_stream_orders_concurrent_publishers() -> None:
    """Lane worker and signal router publish one workflow concurrently: seq N+1 finishing first
    waits for N (not dropped); legit gaps delay nothing; a stuck seq is given up on (only when a
    time limit is configured) and counted once."""
    from cbctl.core.agent.bus.local_stream import LocalStream

    ls = LocalStream(gap_timeout=0.2)
    one, every = ls.subscribe("wf-1"), ls.subscribe(None)
    ls.reserve("wf-1", 1)
    ls.reserve("wf-1", 2)
    ls.publish(_ev(2))  # finished first: held behind 1
    assert _drain(one) == [] and ls.stats.held == 1
    ls.publish(_ev(1))
    assert _drain(one) == [1, 2]
    ls.publish(_ev(2))  # a re-applied (re-delivered) task: same seq, not offered twice
    assert _drain(one) == [] and ls.stats.duplicates == 1
    ls.publish(_ev(7))  # 3..6 applied on another node: a legitimate gap, no wait
    assert _drain(one) == [7]
    ls.reserve("wf-1", 8)
    ls.reserve("wf-1", 9)
    ls.publish(_ev(9))
    # seq 8 never comes within gap_timeout: 9 goes out, counted
    await async_wait_until(lambda: ls.stats.ordering_violations == 1, 5, interval=0.02, message="gave up on 8")
    assert _drain(one) == [9] and ls.stats.ordering_violations == 1
    ls.publish(_ev(8))  # too late now: dropped (never out of order), its loss not counted twice
    assert _drain(one) == [] and ls.stats.ordering_violations == 1
    ls.reserve("wf-1", 10)
    ls.reserve("wf-1", 11)
    ls.publish(_ev(11))
    ls.abandon("wf-1", 10)  # its hook failed: nothing waits for it any more
    assert _drain(one) == [11]
    assert _drain(every) == [1, 2, 7, 9, 11]
    ls.close_all()


async def test_replay_failure_ends_the_stream_with_a_reason(
    bus_agents: Any, coord: Coordinator, ctx: Context, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A NATS error part-way through an after= replay read from the stream: `event: end` with a
    reason (the client resumes with after), never a silent seq hole."""
    import nats.errors

    a, bus_a = await bus_agents("node-a")
    rev = await streaming(coord, ctx)
    await wait_applied([a], rev)
    await async_wait_until(lambda: bus_a.bridge is not None, 10, interval=0.05, message="bridge")
    assert bus_a.bridge is not None

    async def broken_get_msg(*args: Any, **kwargs: Any) -> Any:
        raise nats.errors.TimeoutError

    monkeypatch.setattr(bus_a.bridge.js, "get_msg", broken_get_msg)
    reader = await SseReader(a.http_address or "", "/v1/workflows/never-seen/events", "ops", after=3).start()
    assert reader.status == 200
    await reader.wait_done(10)
    assert reader.events == []
    assert len(reader.ends) == 1 and "replay" in reader.ends[0]["reason"], reader.ends
    assert reader.ends[0]["last_seq"] == 3


async def test_bridge_connection_task_restarts_after_a_crash(
    bus_agents: Any, coord: Coordinator, ctx: Context, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected error in the bridge's connection task closes its connection, is logged,
    and the task comes back (with backoff) instead of dying silently."""
    from cbctl.core.agent.bus import attach as agent_bus

    real_start = agent_bus.Bridge.start
    crashed: list[Any] = []

    async def flaky_start(self: Any) -> None:
        if not crashed:
            crashed.append(self.nc)
            raise RuntimeError("boom")
        await real_start(self)

    monkeypatch.setattr(agent_bus.Bridge, "start", flaky_start)
    a, bus_a = await bus_agents("node-a")
    await async_wait_until(lambda: bus_a.bridge is not None and bus_a.bridge._tasks, 10, interval=0.05,
                           message="bridge restarted")
    assert crashed and crashed[0].is_closed  # the failed attempt's connection did not leak
    assert bus_a._bridge_task is not None and not bus_a._bridge_task.done()


async def _sse_server(handler: Any) -> AsyncIterator[str]:
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/v1/events", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_subscribe_events_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core client behind `events tail`: refusals while following (reported once per reason),
    a stream broken after connecting (exit 4 without --follow), a clean `event: end`."""
    from aiohttp import web

    from cbctl.core.operator import sse_client as sse
    from cbctl.core.model.errors import BackendUnavailable
    from cbctl.core.operator.sse_client import StreamEvent, StreamNotice, SubscriptionRefused, subscribe_events

    monkeypatch.setattr(sse, "RETRY_SECONDS", 0.05)
    calls: list[int] = []
    event = json.dumps({"workflow_id": "wf-1", "seq": 1, "type": "task"})

    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        mode = request.query["subscriber"]
        if mode == "refuse-then-ok" and len(calls) <= 3:
            return web.json_response({"error": "not allowed", "reason": "not a canary"}, status=403)
        if mode == "refuse":
            return web.json_response({"error": "not allowed", "reason": "bridge is read-only"}, status=403)
        if mode == "bad":
            return web.json_response({"error": "bad request", "reason": "nope"}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"id: 1\nevent: task\ndata: {event}\n\n".encode())
        if mode != "break":
            await resp.write(b'event: end\ndata: {"reason": "flags changed"}\n\n')
        return resp  # "break": the connection closes with no `event: end`

    async def collect(address: str, **kw: Any) -> list[Any]:
        return [x async for x in subscribe_events("node-t", address, **kw)]

    async for address in _sse_server(handler):
        items = await collect(address, subscriber="refuse-then-ok", follow=True, duration=1.0)
        refused = [x for x in items if isinstance(x, StreamNotice) and x.kind == "refused"]
        assert len(refused) == 1 and refused[0].status == 403 and refused[0].reason == "not a canary"
        assert any(isinstance(x, StreamEvent) and x.event["seq"] == 1 for x in items)
        assert any(isinstance(x, StreamNotice) and x.kind == "ended" and x.reconnecting for x in items)

        items = await collect(address, subscriber="ok")
        assert [type(x) for x in items] == [StreamEvent, StreamNotice] and not items[1].reconnecting

        got: list[Any] = []
        with pytest.raises(BackendUnavailable) as info:
            async for x in subscribe_events("node-t", address, subscriber="break"):
                got.append(x)
        assert info.value.exit_code == 4 and "broke" in str(info.value)
        assert len(got) == 1 and isinstance(got[0], StreamEvent)

        items = await collect(address, subscriber="break", follow=True, duration=0.5)
        assert any(isinstance(x, StreamNotice) and x.kind == "broken" for x in items)

        with pytest.raises(SubscriptionRefused) as refused_info:
            await collect(address, subscriber="bad", follow=True)
        assert refused_info.value.exit_code == 2
        with pytest.raises(SubscriptionRefused) as refused_info:
            await collect(address, subscriber="refuse")  # 403 without --follow: exit 1
        assert refused_info.value.exit_code == 1
    with pytest.raises(BackendUnavailable):  # nothing listens there any more
        await collect(address, subscriber="ok")


async def test_events_tail_rejects_an_empty_subscriber(config_path: Path) -> None:
    res = await asyncio.to_thread(cbctl_proc, config_path, "events", "tail", "--subscriber", " ")
    assert res.exit_code == 2 and "--subscriber must not be empty" in res.stderr
