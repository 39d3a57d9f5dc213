"""Committing flags and stages as an operator does, and waiting for in-process agents to apply them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cbctl.core.agent.node import NodeAgent
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model.config import Context
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.sandbox.waiting import async_wait_until

__all__ = ["STREAMING", "advance", "set_flags", "streaming", "wait_applied", "wait_lanes_spread"]

#: The flags of a cluster running the event bus end to end (stream from the canonical source).
STREAMING = {
    "cluster.enabled": True, "ownership.guard": "enforce", "eventbus.publish": "on",
    "eventbus.bridge": "streaming", "stream.source": "canonical", "signals.routing": "off",
}


async def advance(cp: ControlPlane, to: int, canary: Sequence[str] | None = None) -> int:
    """Commit the advance to stage ``to``; returns the new revision."""
    plan = await cp.plan_advance(to, canary_lanes=canary)
    return await cp.commit(plan, reason="test")


async def set_flags(cp: ControlPlane, **flags: Any) -> int:
    """Commit flag values (``a__b=v`` or ``**{"a.b": v}``); returns the new revision."""
    assignments = {k.replace("__", "."): v for k, v in flags.items()}
    plan = await cp.plan_flags(assignments)
    return await cp.commit(plan, reason="test")


async def streaming(coord: Coordinator, ctx: Context, **more: Any) -> int:
    """Commit :data:`STREAMING` (with ``more`` on top); returns the new revision."""
    return await set_flags(ControlPlane(ctx, coord), **{**STREAMING, **more})


async def wait_applied(agents: Sequence[NodeAgent], rev: int) -> None:
    """Until every agent applied revision ``rev`` (10 s)."""
    await async_wait_until(lambda: all(a.applied_revision >= rev for a in agents), 10, interval=0.05,
                           message="flags applied")


async def wait_lanes_spread(agents: Sequence[NodeAgent], lanes: int) -> None:
    """Until the agents own ``lanes`` lanes between them (15 s)."""
    await async_wait_until(lambda: sum(len(a.owned_lanes) for a in agents) == lanes, 15, interval=0.05,
                           message="every lane owned")
