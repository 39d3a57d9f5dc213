"""The fixture stack the agent, bus and signal tests share (built on the session's shared
servers from tests/conftest.py).

``config_path`` -> ``ctx`` -> ``coord`` / ``redis_c`` -> ``guard`` / ``queue``, and two factories
of started in-process agents (``agents``; ``bus_agents`` with the event bus attached), every
one closed or stopped at teardown. A module picks its variant by overriding ``stack_options``
with a :class:`tests.support.stack.StackOptions` (e.g. ``StackOptions(lane_count=4, nats="own")``);
a module that defines a fixture of the same name keeps its own (module fixtures win over this
conftest).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.agent.bus.attach import AgentBus, attach_bus
from cbctl.core.agent.node import NodeAgent
from cbctl.core.agent.workload import lifecycle_handler
from cbctl.core.backends.redis.client import redis_client_for
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.model.config import Context, load_config
from tests.helpers import write_config
from tests.support.stack import StackOptions


@pytest.fixture
def stack_options() -> StackOptions:
    """Override in a module to change the stack (default: etcd + Redis, 8 lanes, no NATS)."""
    return StackOptions()


@pytest.fixture
def config_path(request: pytest.FixtureRequest, tmp_path: Path, unique_cluster: str, shared_etcd: Any,
                shared_redis: Any, stack_options: StackOptions) -> Path:
    """A contexts file for this test's own cluster name on the shared servers."""
    opts = stack_options
    nats_url = None
    nats_table: dict[str, Any] = {}
    if opts.nats != "none":
        # Looked up only when asked for: a stack without NATS starts no nats-server.
        nats_url = request.getfixturevalue("nats" if opts.nats == "own" else "shared_nats").url
        if opts.nats_connect_timeout is not None:
            nats_table = {"nats": {"connect-timeout": opts.nats_connect_timeout}}
    extra: dict[str, Any] = {
        "coordination": {"lease-ttl": opts.ttl, "keepalive-interval": opts.keepalive, "timeout": 2.0},
        **nats_table,
    }
    for key, value in opts.extra.items():  # one level deep: extra tables add to ours
        extra[key] = {**extra[key], **value} if isinstance(value, dict) and key in extra else value
    return write_config(tmp_path / "cbctl.toml", cluster=unique_cluster, etcd=shared_etcd.client_url,
                        redis=shared_redis.url, nats=nats_url, lane_count=opts.lane_count, extra=extra)


@pytest.fixture
def ctx(config_path: Path) -> Context:
    return load_config(config_path).context()


@pytest.fixture
async def coord(ctx: Context) -> AsyncIterator[Coordinator]:
    c = make_coordinator(ctx)
    await c.connect()
    yield c
    await c.close()


@pytest.fixture
async def redis_c(ctx: Context) -> AsyncIterator[Any]:
    r = redis_client_for(ctx)
    yield r
    await r.aclose()


@pytest.fixture
def guard(redis_c: Any, ctx: Context) -> LaneGuard:
    return LaneGuard(redis_c, ctx.cluster, None, "test-reader")


@pytest.fixture
def queue(redis_c: Any, ctx: Context) -> LaneQueue:
    return LaneQueue(redis_c, ctx.cluster, ctx.lanes)


@pytest.fixture
async def agents(ctx: Context, tmp_path: Path) -> AsyncIterator[Any]:
    """A factory of started in-process agents (state dir ``tmp_path/state`` unless given); all
    stopped at teardown."""
    started: list[NodeAgent] = []

    async def make(node_id: str, **kwargs: Any) -> NodeAgent:
        kwargs.setdefault("state_dir", tmp_path / "state")
        kwargs.setdefault("handler", lifecycle_handler)
        agent = NodeAgent(ctx, node_id, **kwargs)
        await agent.start()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        await agent.stop()


@pytest.fixture
async def bus_agents(ctx: Context, tmp_path: Path, stack_options: StackOptions) -> AsyncIterator[Any]:
    """A factory of started in-process agents with the bus attached (own state dir each, no
    probes unless asked); returns (agent, bus); all stopped at teardown."""
    started: list[NodeAgent] = []
    stack_ctx = ctx

    async def make(node_id: str, ctx: Context | None = None, **kwargs: Any) -> tuple[NodeAgent, AgentBus]:
        kwargs.setdefault("state_dir", tmp_path / f"state-{node_id}")
        kwargs.setdefault("probes", False)
        kwargs.setdefault("handler", lifecycle_handler)
        bus_opts = kwargs.pop("bus_options", {})
        agent = NodeAgent(ctx or stack_ctx, node_id, lease_ttl=stack_options.ttl,
                          keepalive_interval=stack_options.keepalive, **kwargs)
        bus = attach_bus(agent, keepalive=2.0, **bus_opts)
        await agent.start()
        started.append(agent)
        return agent, bus

    yield make
    for agent in started:
        await agent.stop()
