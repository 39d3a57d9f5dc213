"""``[agent] outbox-max`` reaches the agent's outbox: with NATS down, the agent stops taking tasks
at the configured depth (not the default), and the default is unchanged without the setting; a
bad value refuses before anything starts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.agent.node import NodeAgent
from cbctl.core.agent.bus.attach import attach_bus
from cbctl.core.agent.bus.outbox import DEFAULT_MAX_DEPTH
from cbctl.core.model.config import Context, load_config
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model.errors import ConfigError
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.agent.workload import generate, lifecycle_handler
from cbctl.sandbox import NatsServer, async_wait_until
from tests.helpers import bus_config
from tests.support.rollout import streaming, wait_applied, wait_lanes_spread
from tests.support.workload import all_processed, check_stream_exactly_once
from tests.support.stack import StackOptions


pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def stack_options() -> StackOptions:
    """tests/integration/conftest.py's stack: 4 lanes, a nats-server of the test's own."""
    return StackOptions(lane_count=4, nats="own")


LIMIT = 25


def gauge(g: Any) -> float:
    return float(g.collect()[0].samples[0].value)


def ctx_with(tmp_path: Path, cluster: str, etcd: Any, redis: Any, nats: NatsServer, agent: dict[str, Any]) -> Context:
    path = bus_config(tmp_path / "outbox-max.toml", cluster, etcd.client_url, redis.url, nats.url,
                      extra={"agent": agent})
    return load_config(path).context()


async def test_configured_outbox_max_is_the_backpressure_depth(
    bus_agents: Any, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue, nats: NatsServer,
    tmp_path: Path, shared_etcd: Any, shared_redis: Any,
) -> None:
    configured = ctx_with(tmp_path, ctx.cluster, shared_etcd, shared_redis, nats, {"outbox-max": LIMIT})
    a, bus = await bus_agents("node-a", configured)
    assert bus.outbox is not None and bus.outbox.max_depth == LIMIT  # the configured value, not the default
    rev = await streaming(coord, configured)
    await wait_applied([a], rev)
    await wait_lanes_spread([a], len(configured.lanes))

    # Behaviour, not just the attribute: with NATS down the agent stops taking tasks when the
    # outbox reaches the configured depth (the default, 100,000, would never be reached here).
    await asyncio.to_thread(nats.kill)
    load = asyncio.create_task(generate(queue, workflows=40, rate=500, tasks_per_workflow=3, seed=9, prefix="om"))
    await async_wait_until(lambda: gauge(a.metrics.outbox_backpressure) == 1, 60, interval=0.05,
                           message="backpressure at the configured outbox-max")
    report = await load
    depth = bus.outbox.depth
    # It may pass the limit by what was in flight (one event per lane), never much further.
    assert LIMIT <= depth <= LIMIT + len(configured.lanes) * 2, depth
    assert not await all_processed(guard, report)

    await asyncio.to_thread(nats.restart)
    await async_wait_until(lambda: all_processed(guard, report), 60, interval=0.1, message="every task processed")
    await async_wait_until(lambda: bus.outbox is not None and bus.outbox.depth == 0, 30, interval=0.1,
                           message="outbox drained")
    await check_stream_exactly_once(nats.url, guard, report)  # nothing dropped, nothing twice


async def test_outbox_max_default_unchanged(bus_agents: Any) -> None:
    _, bus = await bus_agents("node-d")
    assert bus.outbox is not None and bus.outbox.max_depth == DEFAULT_MAX_DEPTH


@pytest.mark.parametrize("bad", [0, -3, "1000", 2.5, True])
async def test_bad_outbox_max_refused_before_anything_starts(
    bad: Any, tmp_path: Path, unique_cluster: str, shared_etcd: Any, shared_redis: Any, nats: NatsServer,
) -> None:
    ctx = ctx_with(tmp_path, unique_cluster, shared_etcd, shared_redis, nats, {"outbox-max": bad})
    agent = NodeAgent(ctx, "node-bad", handler=lifecycle_handler, state_dir=tmp_path / "state", probes=False)
    with pytest.raises(ConfigError, match="outbox-max"):
        attach_bus(agent)
    assert not (tmp_path / "state" / "outbox.sqlite").exists()
