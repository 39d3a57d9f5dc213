"""Node agent under real faults: SIGKILL and SIGSTOP of `cbctl agent run` processes, a Redis
restart, and a network partition from etcd (network namespace + nft drop).

Short leases (TTL 3 s, keep-alive 0.5 s) so every fault resolves within seconds; every wait is a
condition with a deadline.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ResponseError

from cbctl.core.agent.node import NodeAgent
from cbctl.core.backends.redis.client import redis_client_for
from cbctl.core.model.assignment import assign
from cbctl.core.model.config import Context, load_config
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.keys import LaneKeys
from cbctl.core.backends.redis.queue import LaneQueue, lane_for
from cbctl.core.agent.ownership import read_lanes
from cbctl.core.agent.workload import WorkloadReport, lifecycle_handler, workflow_transitions
from cbctl.sandbox import EtcdServer, RedisServer
from cbctl.sandbox.netfaults import NetNs, netns_unusable
from cbctl.sandbox.waiting import async_wait_until
from tests.helpers import TTL, agent_config
from tests.support.agent_process import AgentProcess
from tests.support.metrics import http_get, metric_value
from tests.support.records import lane_owners, read_record, wait_record
from tests.support.rollout import advance, set_flags
from tests.support.workload import all_processed, check_exactly_once

pytestmark = pytest.mark.chaos


# -- helpers ----------------------------------------------------------------------------------


def workflows_on(lanes: Sequence[str], inventory: Sequence[str], per_lane: int, prefix: str) -> list[str]:
    """Workflow ids that hash to ``lanes`` (``per_lane`` each)."""
    want = {lane: per_lane for lane in lanes}
    out: list[str] = []
    i = 0
    while any(want.values()):
        wf = f"{prefix}-{i}"
        lane = lane_for(wf, inventory)
        if want.get(lane):
            want[lane] -= 1
            out.append(wf)
        i += 1
    return out


async def enqueue(queue: LaneQueue, workflow_ids: Sequence[str], tasks_per_workflow: int = 1) -> WorkloadReport:
    """Enqueue every workflow's transitions (pipelined by lane order is not needed: small)."""
    rng = random.Random(0)
    report = WorkloadReport()
    for wf in workflow_ids:
        msgs = workflow_transitions(wf, tasks_per_workflow, rng, fail_rate=0.0)
        for msg in msgs:
            await queue.enqueue(wf, msg)
        report.workflows[wf] = len(msgs)
    return report


async def pending_on(redis: Any, cluster: str, lanes: Sequence[str], consumer: str) -> int:
    """Entries read by ``consumer`` and not acked, over ``lanes``."""
    keys = LaneKeys(cluster)
    total = 0
    for lane in lanes:
        try:
            items = await redis.xpending_range(keys.tasks(lane), "workers", min="-", max="+", count=1000,
                                               consumername=consumer)
        except ResponseError as exc:  # a lane without a group yet has nothing pending
            if str(exc).startswith("NOGROUP"):
                continue
            raise
        total += len(items)
    return total


class Env:
    """A test's context, coordinator, Redis client, queue and guard reader."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.ctx: Context = load_config(config).context()
        self.coord: Coordinator = make_coordinator(self.ctx)
        self.redis = redis_client_for(self.ctx)
        self.queue = LaneQueue(self.redis, self.ctx.cluster, self.ctx.lanes)
        self.guard = LaneGuard(self.redis, self.ctx.cluster, None, "test-reader")
        self.cp = ControlPlane(self.ctx, self.coord)

    async def __aenter__(self) -> Env:
        await self.coord.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.redis.aclose()
        await self.coord.close()

    async def enable(self, guard: str) -> int:
        """Stage 1 (cluster.enabled) and the guard mode; returns the revision."""
        await advance(self.cp, 1)
        return await set_flags(self.cp, **{"ownership__guard": guard})

    async def wait_spread(self, node_ids: Sequence[str], revision: int, timeout: float = 20.0) -> dict[str, str]:
        """Until every node applied ``revision`` and the lanes follow the rendezvous assignment."""
        for node in node_ids:
            await wait_record(self.coord, self.ctx.cluster, node, timeout=timeout,
                              check=lambda r: r["applied_revision"] >= revision)
        expected = assign(self.ctx.lanes, node_ids)

        async def spread() -> bool:
            owners = await lane_owners(self.coord, self.ctx)
            return all(owners[lane][0] == expected[lane] for lane in self.ctx.lanes)

        await async_wait_until(spread, timeout, interval=0.05, message="lanes spread")
        return expected


    async def wait_reading(self, lanes: Sequence[str], node: str, timeout: float = 10.0) -> None:
        """Until ``node``'s workers run on each of ``lanes``: one probe task per lane is applied
        by it (XINFO CONSUMERS cannot tell: Redis 7.0 creates no consumer for an empty read)."""
        probes = await enqueue(self.queue, workflows_on(lanes, self.ctx.lanes, 1, f"probe-{node}"))

        async def applied() -> bool:
            for wf in probes.workflows:
                state = await self.guard.read_workflow(wf)
                if state.get("seq") != probes.workflows[wf] or state.get("node") != node:
                    return False
            return True

        await async_wait_until(applied, timeout, interval=0.02, message=f"{node} working its lanes")


@pytest.fixture
def procs() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for p in started:
        p.stop()


# -- SIGKILL ----------------------------------------------------------------------------------


def test_sigkill_owner_lanes_reowned_within_ttl_no_task_lost(
    tmp_path: Path, unique_cluster: str, shared_etcd: Any, shared_redis: Any, procs: list[AgentProcess]
) -> None:
    config = agent_config(tmp_path / "cbctl.toml", unique_cluster, shared_etcd.client_url, shared_redis.url)

    async def body() -> None:
        async with Env(config) as env:
            rev = await env.enable("enforce")
            names = ["k0", "k1", "k2"]
            for n in names:
                procs.append(AgentProcess(config, n, tmp_path / "state", tmp_path))
            expected = await env.wait_spread(names, rev)
            victim = procs[0]
            victim_lanes = [lane for lane, o in expected.items() if o == "k0"]
            assert victim_lanes, "rendezvous gave k0 no lane; pick other names"

            # Stop it first so that its blocked reads receive tasks it will never ack, then kill it.
            await env.wait_reading(victim_lanes, "k0")
            victim.signal(signal.SIGSTOP)
            report = await enqueue(env.queue, workflows_on(victim_lanes, env.ctx.lanes, 3, "kill"))
            await async_wait_until(lambda: pending_on(env.redis, env.ctx.cluster, victim_lanes, "k0"), 3,
                                   interval=0.02, message="tasks delivered to the victim")
            victim.signal(signal.SIGKILL)
            killed = time.monotonic()

            async def reowned() -> bool:
                owners = await lane_owners(env.coord, env.ctx)
                return all(owners[lane][0] in ("k1", "k2") for lane in victim_lanes)

            await async_wait_until(reowned, TTL + 5, interval=0.02, message="victim's lanes re-owned")
            took = time.monotonic() - killed
            assert took <= TTL + 1.0, f"re-owned after {took:.2f}s (TTL {TTL}s)"

            # No task lost: what the victim read but never acked is re-delivered and applied once.
            await async_wait_until(lambda: all_processed(env.guard, report), 10, interval=0.05,
                                   message="all tasks applied")
            await check_exactly_once(env.guard, report)
            assert await pending_on(env.redis, env.ctx.cluster, victim_lanes, "k0") == 0
            assert await read_record(env.coord, env.ctx.cluster, "k0") is None

    asyncio.run(body())


# -- SIGSTOP past the TTL --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["enforce", "observe"])
def test_sigstopped_owner_is_fenced_at_redis(
    mode: str, tmp_path: Path, unique_cluster: str, etcd: EtcdServer, shared_redis: Any, procs: list[AgentProcess]
) -> None:
    """A paused owner wakes up after another node took its lanes.

    On waking, the agent would normally learn within milliseconds that its lease is gone (a
    heartbeat or keep-alive answer) and stop before writing — that is the first line of defence
    and it races with the worker.  To test the second line (the fence at Redis) every time, etcd
    is paused for the first moments after the wake-up: the agent cannot learn anything, its
    worker processes the tasks its blocked reads received, and Redis must refuse them.
    """
    config = agent_config(tmp_path / "cbctl.toml", unique_cluster, etcd.client_url, shared_redis.url)

    async def body() -> None:
        async with Env(config) as env:
            rev = await env.enable(mode)
            names = ["s0", "s1"]
            for n in names:
                procs.append(AgentProcess(config, n, tmp_path / "state", tmp_path))
            expected = await env.wait_spread(names, rev)
            victim = procs[0]
            victim_rec = await read_record(env.coord, env.ctx.cluster, "s0")
            assert victim_rec is not None
            victim_lanes = [lane for lane, o in expected.items() if o == "s0"]
            old_tokens = {lane: tok for lane, (_o, tok) in (await lane_owners(env.coord, env.ctx)).items()
                          if lane in victim_lanes}

            await env.wait_reading(victim_lanes, "s0")
            victim.signal(signal.SIGSTOP)
            report = await enqueue(env.queue, workflows_on(victim_lanes, env.ctx.lanes, 3, "stop"))
            await async_wait_until(lambda: pending_on(env.redis, env.ctx.cluster, victim_lanes, "s0"), 3,
                                   interval=0.02, message="tasks delivered to the paused owner")

            # Its lease expires; s1 takes the lanes, fences s0 off and applies the tasks s0 holds.
            async def taken() -> bool:
                owners = await lane_owners(env.coord, env.ctx)
                return all(owners[lane][0] == "s1" for lane in victim_lanes)

            await async_wait_until(taken, TTL + 5, interval=0.02, message="lanes taken by s1")
            new_tokens = {lane: tok for lane, (_o, tok) in (await lane_owners(env.coord, env.ctx)).items()
                          if lane in victim_lanes}
            assert all(new_tokens[lane] > old_tokens[lane] for lane in victim_lanes)  # type: ignore[operator]

            async def fenced() -> bool:
                return all([await env.guard.current_fence(lane) == new_tokens[lane] for lane in victim_lanes])

            await async_wait_until(fenced, 5, interval=0.02, message="s1 raised the fences")

            # Wake it (soon, so its pending reads are not timed out) while etcd cannot answer: the
            # replies of its blocked reads are processed with the OLD token.
            decision = "deny" if mode == "enforce" else "would_deny"

            def counted() -> float:
                status, text = http_get(victim_rec["http"], "/metrics")
                return status == 200 and metric_value(text, "redis_lane_ownership_decision_total",
                                                      f'decision="{decision}"')

            etcd.pause()
            try:
                victim.signal(signal.SIGCONT)
                await async_wait_until(lambda: asyncio.to_thread(counted), 1.5, interval=0.05,
                                       message=f"the woken agent's stale writes counted as {decision}",
                                       ignore=(OSError,))
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\n{victim.log()[-4000:]}") from None
            finally:
                etcd.resume()
            await async_wait_until(lambda: all_processed(env.guard, report), 10, interval=0.05,
                                   message="every task applied")
            # The woken keeper declares the loss once its keep-alive fails or the TTL is past (under
            # load that can come after the tasks were applied): wait for it, then count exactly one.
            def lease_loss_counted() -> bool:
                status, text = http_get(victim_rec["http"], "/metrics")
                return status == 200 and metric_value(text, "cluster_lease_lost_total") >= 1

            await async_wait_until(lambda: asyncio.to_thread(lease_loss_counted), TTL + 5, interval=0.05,
                                   message="the woken agent counted its lost lease", ignore=(OSError,))
            _status, text = await asyncio.to_thread(http_get, victim_rec["http"], "/metrics")
            if mode == "enforce":
                assert metric_value(text, "redis_lane_stale_fencing_total") >= 1
            assert metric_value(text, "cluster_lease_lost_total") == 1

            # It registers again with a new lease instead of resuming with the old one.
            rec = await wait_record(env.coord, env.ctx.cluster, "s0", timeout=10, check=lambda r: r["session"] >= 2)
            assert rec["lease"] != victim_rec["lease"] and rec["instance_id"] == victim_rec["instance_id"]

            # No workflow state written twice, none lost; nothing of s0's old tokens after takeover.
            await check_exactly_once(env.guard, report, ordered=False)
            for wf in report.workflows:
                for entry in await env.guard.history(wf):
                    assert entry["node"] == "s1" or entry["token"] not in old_tokens.values() or mode == "observe"
            assert "lost its lease" in victim.log() and "registered again" in victim.log()

    asyncio.run(body())


# -- Redis restart ------------------------------------------------------------------------------


async def test_redis_restart_mid_run(tmp_path: Path, unique_cluster: str, shared_etcd: Any,
                                     redis_server: RedisServer) -> None:
    config = agent_config(tmp_path / "cbctl.toml", unique_cluster, shared_etcd.client_url, redis_server.url)
    async with Env(config) as env:
        rev = await env.enable("enforce")
        agents = [NodeAgent(env.ctx, f"r{i}", handler=lifecycle_handler, state_dir=tmp_path / "state", http_port=None) for i in range(2)]
        try:
            for a in agents:
                await a.start()
            await env.wait_spread(["r0", "r1"], rev)
            report = await enqueue(env.queue, [f"before-{i}" for i in range(20)])
            await async_wait_until(lambda: all_processed(env.guard, report), 10, interval=0.05, message="before")
            await check_exactly_once(env.guard, report)

            await asyncio.to_thread(redis_server.restart)  # no persistence: streams, fences, script cache gone
            report2 = await enqueue(env.queue, [f"after-{i}" for i in range(20)])
            await async_wait_until(lambda: all_processed(env.guard, report2), 15, interval=0.05, message="after")
            await check_exactly_once(env.guard, report2)

            # The owners re-raised their fences in the new Redis.
            owners = await lane_owners(env.coord, env.ctx)

            async def fenced() -> bool:
                return all([await env.guard.current_fence(lane) == tok for lane, (_o, tok) in owners.items()])

            await async_wait_until(fenced, 10, interval=0.1, message="fences re-raised after the restart")
            assert all(a.registered for a in agents)
        finally:
            for a in agents:
                await a.stop()


# -- partition from etcd ------------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[NetNs]:
    reason = netns_unusable()
    if reason:
        pytest.skip(reason)
    ns = NetNs()
    yield ns
    ns.close()


@pytest.mark.netns
def test_partitioned_owner_stops_before_anyone_else_owns_and_does_not_resume(
    tmp_path: Path, unique_cluster: str, netns: NetNs, procs: list[AgentProcess]
) -> None:
    etcd = EtcdServer(tmp_path / "etcd", extra_listen_hosts=[netns.host_ip]).start()
    redis = RedisServer(tmp_path / "redis", extra_bind_hosts=[netns.host_ip]).start()
    try:
        root_cfg = agent_config(tmp_path / "root.toml", unique_cluster, etcd.client_url, redis.url)
        ns_cfg = agent_config(tmp_path / "ns.toml", unique_cluster, f"http://{netns.host_ip}:{etcd.port}",
                              f"redis://{netns.host_ip}:{redis.port}/0")

        async def body() -> None:
            async with Env(root_cfg) as env:
                rev = await env.enable("enforce")
                procs.append(AgentProcess(ns_cfg, "p0", tmp_path / "state-p", tmp_path, netns=netns.name,
                                          extra_args=["--http-host", netns.ns_ip]))
                procs.append(AgentProcess(root_cfg, "q0", tmp_path / "state-q", tmp_path))
                expected = await env.wait_spread(["p0", "q0"], rev)
                p_rec = await read_record(env.coord, env.ctx.cluster, "p0")
                assert p_rec is not None
                p_lanes = [lane for lane, o in expected.items() if o == "p0"]
                assert p_lanes

                # Traffic on p0's lanes before, during and after the partition.
                stop = asyncio.Event()
                enqueued = WorkloadReport()

                async def feed() -> None:
                    i = 0
                    while not stop.is_set():
                        wfs = workflows_on(p_lanes, env.ctx.lanes, 1, f"part{i}")
                        enqueued.workflows.update((await enqueue(env.queue, wfs)).workflows)
                        i += 1
                        await asyncio.sleep(0.05)

                old_tokens = {lane: tok for lane, (_o, tok) in (await lane_owners(env.coord, env.ctx)).items()}
                feeder = asyncio.create_task(feed())

                async def applied_by(node: str, at_least: int) -> bool:
                    n = 0
                    for wf in list(enqueued.workflows):
                        n += sum(1 for e in await env.guard.history(wf) if e["node"] == node)
                    return n >= at_least

                # p0 is working its lanes before the cut (a condition, not a fixed pause).
                await async_wait_until(lambda: applied_by("p0", 3), 20, interval=0.05,
                                       message="p0 applied work before the partition")
                netns.drop_tcp_to(netns.host_ip, etcd.port)

                async def taken() -> bool:
                    owners = await lane_owners(env.coord, env.ctx)
                    return all(owners[lane][0] == "q0" for lane in p_lanes)

                await async_wait_until(taken, TTL + 5, interval=0.05, message="q0 owns p0's lanes")
                views = {v.lane: v for v in await read_lanes(env.coord, env.ctx.cluster, env.ctx.lanes)}
                # q0 really works the taken lanes while p0 is still cut off, then the link heals.
                await async_wait_until(lambda: applied_by("q0", 1), 20, interval=0.05,
                                       message="q0 applied work on p0's old lanes during the partition")
                netns.heal()

                # It notices its lease is gone and registers with a new one (never the old).
                rec = await wait_record(env.coord, env.ctx.cluster, "p0", timeout=15, check=lambda r: r["session"] >= 2)
                assert rec["lease"] != p_rec["lease"]
                stop.set()
                await feeder
                await async_wait_until(lambda: all_processed(env.guard, enqueued), 15, interval=0.1,
                                       message="every task applied")
                await check_exactly_once(env.guard, enqueued)

                # p0 wrote nothing on a lane after q0 acquired it (Redis clock vs. the wall clock of
                # the same machine): it stopped on its own, before anyone else could own the lane.
                old_token_writes = 0
                for wf in enqueued.workflows:
                    for e in await env.guard.history(wf):
                        lane = e["lane"]
                        if e["node"] == "p0" and e["token"] == old_tokens[lane]:
                            old_token_writes += 1
                            assert views[lane].since is not None and e["at"] / 1000 < views[lane].since, (
                                f"p0 wrote on {lane} at {e['at'] / 1000:.3f}, after q0 took it at {views[lane].since:.3f}"
                            )
                assert old_token_writes > 0, "p0 worked its lanes before the partition"
                _status, text = await asyncio.to_thread(http_get, rec["http"], "/metrics")
                assert metric_value(text, "cluster_lease_lost_total") == 1
                assert metric_value(text, "redis_lane_ownership_decision_total", 'decision="deny"') == 0, \
                    "p0 stopped on its own: Redis never had to deny it"

        asyncio.run(body())
    finally:
        etcd.stop()
        redis.stop()
