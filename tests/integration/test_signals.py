"""Signal routing against real etcd, redis-server and nats-server.

Agents run in-process (NodeAgent + attach_signals), one unique cluster per test on the shared
servers.  Covered: a routed signal applied once by the owner with a seq in the history (and
idempotent per signal id), canary routing vs the local queue path, ``off`` -> local path (no
NATS needed), a lane moving while the signal is in flight (the sender re-reads the owner and
retries; applied exactly once), ``signals_routed_total``, the router coming up after NATS does,
and the CLI's exit codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cbctl.core.agent.hooks import AppliedUpdate
from cbctl.core.agent.node import NodeAgent
from cbctl.core.agent.workload import lifecycle_handler
from cbctl.core.model.config import Context
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.keys import LaneKeys
from cbctl.core.backends.redis.queue import lane_for
from cbctl.core.agent.signals import SignalRouter, attach_signals
from cbctl.core.model.signals import signal_update
from cbctl.core.operator import signal_sender
from cbctl.core.operator.signal_sender import send_signal
from cbctl.sandbox import NatsServer
from cbctl.sandbox.waiting import async_wait_until
from tests.helpers import cbctl_proc, cbctl_run, write_config
from tests.support.records import lane_owners
from tests.support.rollout import set_flags
from tests.support.stack import StackOptions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LANE_COUNT = 4


def signals_config(path: Path, cluster: str, etcd_url: str, redis_url: str, nats_url: str) -> Path:
    return write_config(
        path, cluster=cluster, etcd=etcd_url, redis=redis_url, nats=nats_url, lane_count=LANE_COUNT,
        extra={"coordination": {"lease-ttl": 3.0, "keepalive-interval": 0.5, "timeout": 2.0}},
    )


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def workflow_on(lane: str, lanes: tuple[str, ...], prefix: str) -> str:
    """A workflow id whose lane is ``lane``."""
    for i in range(10_000):
        wf = f"{prefix}-{i}"
        if lane_for(wf, lanes) == lane:
            return wf
    raise AssertionError(f"no workflow id found for {lane}")


def routed(agent: NodeAgent, result: str) -> float:
    return float(agent.metrics.signals_routed.labels(result=result)._value.get())  # type: ignore[attr-defined]


async def signal_entries(guard: LaneGuard, workflow_id: str) -> list[dict[str, Any]]:
    return [e for e in await guard.history(workflow_id) if e["type"] == "signal"]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def stack_options() -> StackOptions:
    """tests/integration/conftest.py's stack on the session's nats-server, 4 lanes, the default
    NATS connect timeout."""
    return StackOptions(lane_count=LANE_COUNT, nats="shared", nats_connect_timeout=None)


class Cluster:
    """In-process agents with signal routers; routers closed before their agents stop."""

    def __init__(self, ctx: Context, state_dir: Path) -> None:
        self.ctx = ctx
        self.state_dir = state_dir
        self.agents: dict[str, NodeAgent] = {}
        self.routers: dict[str, SignalRouter] = {}

    async def add(self, node_id: str, ctx: Context | None = None, *, wait: bool = True) -> NodeAgent:
        agent = NodeAgent(ctx or self.ctx, node_id, handler=lifecycle_handler, state_dir=self.state_dir, http_port=None, probes=False)
        # Attached before start, as `cbctl agent run` does (agent.run() starts the agent).
        self.routers[node_id] = attach_signals(agent)
        await agent.start()
        self.agents[node_id] = agent
        if wait:
            await self.routers[node_id].wait_subscribed(10)
        return agent

    async def settled(self, coord: Coordinator) -> None:
        """Every lane owned by a running agent that knows it owns it."""
        async def check() -> bool:
            owners = await lane_owners(coord, self.ctx)
            return all(
                owner in self.agents and not self.agents[owner]._stopping and lane in self.agents[owner].owned_lanes
                for lane, (owner, _token) in owners.items()
            )

        await async_wait_until(check, 15, interval=0.05, message="lanes owned by running agents")

    async def close(self) -> None:
        for router in self.routers.values():
            await router.close()
        for agent in self.agents.values():
            await agent.stop()


@pytest.fixture
async def cluster(ctx: Context, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(ctx, tmp_path / "state")
    yield c
    await c.close()


# -- tests ------------------------------------------------------------------------------------


async def test_routed_signal_applied_once_by_the_owner(cluster: Cluster, coord: Coordinator, ctx: Context,
                                                       guard: LaneGuard, config_path: Path) -> None:
    await set_flags(ControlPlane(ctx, coord), cluster__enabled=True, ownership__guard="enforce",
                    signals__routing="all")
    a, b = await cluster.add("node-a"), await cluster.add("node-b")
    seen: list[AppliedUpdate] = []

    async def hook(update: AppliedUpdate) -> None:
        seen.append(update)

    a.on_applied(hook)
    b.on_applied(hook)
    await cluster.settled(coord)

    wf = "order-17"
    owner = (await lane_owners(coord, ctx))[lane_for(wf, ctx.lanes)][0]
    res = await send_signal(ctx, wf, "approve", {"by": "alice"}, coord=coord)
    assert (res.route, res.result, res.node, res.seq, res.attempts) == ("routed", "applied", owner, 1, 1)
    hist = await signal_entries(guard, wf)
    assert [(e["seq"], e["task_id"], e["node"]) for e in hist] == [(1, res.signal_id, owner)]
    assert hist[0]["data"] == signal_update("approve", res.signal_id, {"by": "alice"})
    state = await guard.read_workflow(wf)
    assert state["signal"] == "approve" and state["seq"] == 1 and state["node"] == owner
    # The applied hooks (the event bus) saw the seq, exactly like a worker-applied task.
    assert [(u.type, u.seq, u.task_id, u.already_applied) for u in seen] == [("signal", 1, res.signal_id, False)]

    # Same signal id again (a retry after a lost reply): nothing written twice, same seq.
    again = await send_signal(ctx, wf, "approve", {"by": "alice"}, coord=coord, signal_id=res.signal_id)
    assert (again.result, again.seq) == ("duplicate", 1)
    assert len(await signal_entries(guard, wf)) == 1
    owner_agent = cluster.agents[owner]
    assert routed(owner_agent, "applied") == 1 and routed(owner_agent, "duplicate") == 1

    # The CLI, as a real process: JSON on stdout, the next seq.
    out = await asyncio.to_thread(cbctl_proc, config_path, "signal", "send", wf, "go", "--payload", '{"n": 2}',
                                  "-o", "json")
    assert out.exit_code == 0, out.stderr
    body = out.json()
    assert (body["route"], body["node"], body["seq"], body["result"]) == ("routed", owner, 2, "applied")
    assert [e["data"]["signal"] for e in await signal_entries(guard, wf)] == ["approve", "go"]
    assert routed(owner_agent, "applied") == 2
    table = await asyncio.to_thread(cbctl_proc, config_path, "signal", "send", wf, "go", "--signal-id",
                                    body["signal_id"])
    assert table.exit_code == 0 and f"routed to {owner}: already applied" in table.stdout, table


async def test_canary_routes_canary_lanes_and_queues_the_rest(cluster: Cluster, coord: Coordinator, ctx: Context,
                                                              guard: LaneGuard) -> None:
    canary_lane, other_lane = ctx.lanes[0], ctx.lanes[1]
    cp = ControlPlane(ctx, coord)
    await set_flags(cp, cluster__enabled=True, ownership__guard="canary", canary__lanes=[canary_lane],
                    signals__routing="canary")
    await cluster.add("node-a")
    await cluster.add("node-b")
    await cluster.settled(coord)
    owners = await lane_owners(coord, ctx)
    wf_canary = workflow_on(canary_lane, ctx.lanes, "c")
    wf_other = workflow_on(other_lane, ctx.lanes, "n")

    res = await send_signal(ctx, wf_canary, "pause", None, coord=coord)
    assert (res.route, res.node, res.seq) == ("routed", owners[canary_lane][0], 1)

    queued = await send_signal(ctx, wf_other, "pause", {"why": "x"}, coord=coord)
    assert (queued.route, queued.result, queued.node, queued.seq) == ("local", "queued", None, None)
    assert queued.entry_id
    # The owner's lane worker applies it later, through the guard, with the same update.
    hist = await async_wait_until(lambda: signal_entries(guard, wf_other), 10, message="queued signal applied")
    assert [(e["task_id"], e["node"], e["data"]) for e in hist] == [
        (queued.signal_id, owners[other_lane][0], signal_update("pause", queued.signal_id, {"why": "x"}))]

    # off: the canary workflow takes the local path too, and NATS is not even needed.
    await set_flags(cp, signals__routing="off")
    no_nats = dataclasses.replace(ctx, nats=dataclasses.replace(ctx.nats, servers=(f"nats://127.0.0.1:{dead_port()}",)))
    local = await send_signal(no_nats, wf_canary, "resume", {}, coord=coord)
    assert (local.route, local.routing) == ("local", "off")

    async def applied_twice() -> list[dict[str, Any]] | None:
        entries = await signal_entries(guard, wf_canary)
        return entries if len(entries) == 2 else None

    hist = await async_wait_until(applied_twice, 10, message="second canary signal applied")
    assert [(e["seq"], e["data"]["signal"]) for e in hist] == [(1, "pause"), (2, "resume")]
    total = sum(routed(a, "applied") for a in cluster.agents.values())
    assert total == 1, "only the routed signal goes through a router"


async def test_fenced_owner_and_bad_requests_are_refused(cluster: Cluster, coord: Coordinator, ctx: Context,
                                                        guard: LaneGuard) -> None:
    await set_flags(ControlPlane(ctx, coord), cluster__enabled=True, ownership__guard="enforce",
                    signals__routing="all")
    a = await cluster.add("node-a")
    await cluster.settled(coord)
    router = cluster.routers["node-a"]
    wf = "fenced-1"
    lane = lane_for(wf, ctx.lanes)
    request = {"v": 1, "workflow_id": wf, "name": "x", "payload": {}, "signal_id": "sig-1", "lane": lane}

    for bad in (None, {"v": 2}, {**request, "name": ""}, {**request, "signal_id": ""},
                {**request, "lane": "lane-elsewhere"}, {**request, "workflow_id": "w:history", "lane": None}):
        reply = await router.handle(bad)
        assert reply["ok"] is False and reply["error"] == "invalid", (bad, reply)
    assert routed(a, "invalid") == 6

    # A node that still believes it owns the lane, but Redis has seen a newer token (a paused
    # owner waking up late): the guard denies, the router answers not_owner, nothing written.
    # (Its lane worker may notice the fence too and give the lane up: the owner hint is racy.)
    token = a.owned_lanes[lane]
    await guard.raise_fence(lane, token + 10**6)
    try:
        reply = await router.handle(request)
    finally:
        await guard.redis.delete(guard.keys.fence(lane))  # give the lane back
    assert reply["ok"] is False and reply["error"] == "not_owner", reply
    assert reply.get("owner") in (None, "node-a")
    assert await signal_entries(guard, wf) == []
    assert routed(a, "not_owner") == 1

    async def applied() -> dict[str, Any] | None:
        r = await router.handle(request)
        return r if r["ok"] else None

    ok = await async_wait_until(applied, 15, interval=0.1, message="applied once the lane is back")
    assert ok["seq"] == 1 and ok["node"] == "node-a"
    assert [e["task_id"] for e in await signal_entries(guard, wf)] == ["sig-1"]


@pytest.mark.parametrize("router_open", [True, False], ids=["owner-replies-not-owner", "owner-gone"])
async def test_lane_moves_mid_flight(cluster: Cluster, coord: Coordinator, ctx: Context, guard: LaneGuard,
                                     monkeypatch: pytest.MonkeyPatch, router_open: bool) -> None:
    await set_flags(ControlPlane(ctx, coord), cluster__enabled=True, ownership__guard="enforce",
                    signals__routing="all")
    await cluster.add("node-a")
    await cluster.add("node-b")
    await cluster.settled(coord)
    wf = "moving-1"
    real = signal_sender.lane_owner
    victims: list[str] = []

    async def racing(c: Coordinator, cl: str, lane: str) -> str | None:
        owner = await real(c, cl, lane)
        if not victims and owner is not None:
            # Right after the sender read the owner: it stops gracefully (lease revoked, lanes
            # freed). With router_open a router still answers for it, as a node that lost the lane.
            victims.append(owner)
            agent = cluster.agents[owner]
            await agent.stop()  # closes its router too (attach_signals' stop hook)
            assert not cluster.routers[owner].connected
            if router_open:
                stale = cluster.routers[owner] = SignalRouter(agent)
                stale.start()
                await stale.wait_subscribed(5)
        return owner

    monkeypatch.setattr(signal_sender, "lane_owner", racing)
    res = await send_signal(ctx, wf, "move", {"k": 1}, coord=coord, timeout=20)
    victim = victims[0]
    assert res.route == "routed" and res.node != victim and res.attempts >= 2, res
    hist = await signal_entries(guard, wf)
    assert [(e["task_id"], e["node"], e["seq"]) for e in hist] == [(res.signal_id, res.node, res.seq)]
    survivor = cluster.agents[res.node]
    assert routed(survivor, "applied") == 1
    if router_open:
        assert routed(cluster.agents[victim], "not_owner") >= 1
    assert routed(cluster.agents[victim], "applied") == 0


async def test_router_waits_for_nats_and_the_agent_keeps_running(
    ctx: Context, coord: Coordinator, tmp_path: Path, guard: LaneGuard
) -> None:
    server = NatsServer(tmp_path / "late-nats")  # port chosen, not started yet
    late = dataclasses.replace(ctx, nats=dataclasses.replace(ctx.nats, servers=(server.url,)))
    c = Cluster(late, tmp_path / "state")
    try:
        await set_flags(ControlPlane(ctx, coord), cluster__enabled=True, signals__routing="all")
        agent = await c.add("node-a", wait=False)
        router = c.routers["node-a"]
        await async_wait_until(lambda: bool(router.last_error), 15, interval=0.05,
                               message="the router reports that it cannot reach NATS")
        assert not router.connected and router.last_error and "cannot reach NATS" in router.last_error
        await c.settled(coord)
        assert agent.registered and len(agent.owned_lanes) == LANE_COUNT
        server.start()
        await router.wait_subscribed(15)
        res = await send_signal(late, "wf-late", "hello", {}, coord=coord)
        assert (res.route, res.node, res.seq) == ("routed", "node-a", 1)
    finally:
        await c.close()
        server.stop()


def test_cli_exit_codes(config_path: Path, tmp_path: Path, unique_cluster: str, shared_etcd: Any,
                        shared_redis: Any) -> None:
    bad = cbctl_run(config_path, "signal", "send", "wf-1", "go", "--payload", "{not json")
    assert bad.exit_code == 2 and "--payload" in bad.stderr, bad.stderr

    # A workflow that does not exist: refused, nothing sent.
    missing = cbctl_run(config_path, "signal", "send", "wf-1", "go", "-o", "json")
    assert missing.exit_code == 2 and "wf-1" in missing.stderr, missing.stderr
    keys = LaneKeys(unique_cluster)
    client = redis.Redis.from_url(shared_redis.url)
    try:
        assert client.exists(keys.workflow("wf-1")) == 0
        client.hset(keys.workflow("wf-1"), mapping={"seq": 1, "workflow_id": "wf-1"})
    finally:
        client.close()

    # off (the initial document): queued locally, exit 0.
    local = cbctl_run(config_path, "signal", "send", "wf-1", "go", "-o", "json")
    assert local.exit_code == 0, local.stderr
    assert local.json()["route"] == "local" and local.json()["result"] == "queued"
    table = cbctl_run(config_path, "signal", "send", "wf-1", "go")
    assert table.exit_code == 0 and "queued on lane" in table.stdout and "signals.routing=off" in table.stdout

    # all, but no agent owns the lane: exit 1 after --timeout.
    flags = cbctl_run(config_path, "flags", "set", "cluster.enabled=true", "signals.routing=all", "--yes", "--no-wait")
    assert flags.exit_code == 0, flags.stderr
    none = cbctl_run(config_path, "signal", "send", "wf-1", "go", "--timeout", "1")
    assert none.exit_code == 1 and "has no owner" in none.stderr, none.stderr

    # NATS unreachable (routed) and etcd unreachable: exit 4.
    no_nats = signals_config(tmp_path / "no-nats.toml", unique_cluster, shared_etcd.client_url, shared_redis.url,
                             f"nats://127.0.0.1:{dead_port()}")
    res = cbctl_run(no_nats, "signal", "send", "wf-1", "go")
    assert res.exit_code == 4 and "NATS" in res.stderr, res.stderr
    no_etcd = signals_config(tmp_path / "no-etcd.toml", unique_cluster, f"http://127.0.0.1:{dead_port()}",
                             shared_redis.url, f"nats://127.0.0.1:{dead_port()}")
    res = cbctl_run(no_etcd, "signal", "send", "wf-1", "go")
    assert res.exit_code == 4, res.stderr
