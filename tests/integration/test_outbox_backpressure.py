"""Outbox backpressure against real services: with NATS down, a full outbox stops the agent
taking tasks (gauge at 1, said in the log), nothing is dropped, and it all drains once NATS is
back (every applied event in the stream exactly once)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from cbctl.core.model.config import Context
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.agent.workload import generate
from cbctl.sandbox import NatsServer, async_wait_until
from tests.support.rollout import streaming, wait_applied, wait_lanes_spread
from tests.support.workload import all_processed, check_stream_exactly_once
from tests.support.stack import StackOptions


pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def stack_options() -> StackOptions:
    """tests/integration/conftest.py's stack: 4 lanes, a nats-server of the test's own."""
    return StackOptions(lane_count=4, nats="own")


LIMIT = 30


def gauge(g: Any) -> float:
    return float(g.collect()[0].samples[0].value)


async def test_full_outbox_stops_taking_tasks_drops_nothing_then_drains(
    bus_agents: Any, coord: Coordinator, ctx: Context, guard: LaneGuard, queue: LaneQueue, nats: NatsServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="cbctl.core.agent.bus.outbox")
    a, bus = await bus_agents("node-a")
    rev = await streaming(coord, ctx)
    await wait_applied([a], rev)
    await wait_lanes_spread([a], len(ctx.lanes))
    assert bus.outbox is not None
    # A small limit, so the test fills it in seconds (the default is DEFAULT_MAX_DEPTH).
    bus.outbox.max_depth, bus.outbox.resume_depth = LIMIT, LIMIT - 5
    backpressure = a.metrics.outbox_backpressure

    await asyncio.to_thread(nats.kill)
    load = asyncio.create_task(generate(queue, workflows=60, rate=500, tasks_per_workflow=3, seed=3, prefix="bp"))
    await async_wait_until(lambda: gauge(backpressure) == 1, 60, interval=0.05, message="backpressure on")
    report = await load
    assert not await all_processed(guard, report)
    # Held back: the lane workers take no new task while the outbox is full.  Observed for a
    # window in which the agent, running free, processes hundreds of tasks.
    held_at = a.tasks_processed
    loop = asyncio.get_running_loop()
    until = loop.time() + 2.0
    while loop.time() < until:
        assert a.tasks_processed == held_at, "the agent kept taking tasks with a full outbox"
        await asyncio.sleep(0.05)
    assert gauge(backpressure) == 1
    depth = bus.outbox.depth
    # Nothing refused: the outbox may pass its limit by what was in flight (one event per lane).
    assert LIMIT <= depth <= LIMIT + len(ctx.lanes) * 2
    assert gauge(a.metrics.outbox_depth) == depth and gauge(a.metrics.degraded) == 1
    assert any("is full" in r.getMessage() for r in caplog.records)

    await asyncio.to_thread(nats.restart)
    await async_wait_until(lambda: all_processed(guard, report), 60, interval=0.1, message="every task processed")
    await async_wait_until(lambda: gauge(backpressure) == 0 and bus.outbox.depth == 0, 30, interval=0.1,
                           message="drained and released")
    assert any("publishers released" in r.getMessage() for r in caplog.records)
    await check_stream_exactly_once(nats.url, guard, report)  # nothing dropped, nothing twice
