"""What the coordination store says about nodes and lanes, read (and the last preflight, written)
the way a test needs it."""

from __future__ import annotations

import json
import time
from typing import Any

from cbctl.core.agent.ownership import read_lanes
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model import keys
from cbctl.core.model.config import Context
from cbctl.sandbox.waiting import async_wait_until

__all__ = ["lane_owners", "read_record", "wait_record", "write_preflight"]


async def read_record(coord: Coordinator, cluster: str, node_id: str) -> dict[str, Any] | None:
    """The node's record as stored, or None."""
    kv = await coord.get(keys.node(cluster, node_id))
    return None if kv is None else kv.json()


async def wait_record(coord: Coordinator, cluster: str, node_id: str, timeout: float = 15.0,
                      check: Any = None) -> dict[str, Any]:
    """Until the node's record exists (and ``check(record)`` holds); raises TimeoutError after ``timeout``."""
    async def probe() -> dict[str, Any] | None:
        rec = await read_record(coord, cluster, node_id)
        if rec is None or (check is not None and not check(rec)):
            return None
        return rec

    return await async_wait_until(probe, timeout, interval=0.05, message=f"record of {node_id}")


async def lane_owners(coord: Coordinator, ctx: Context) -> dict[str, tuple[str | None, int | None]]:
    """lane -> (owner node id, fencing token), None for an unowned lane."""
    return {v.lane: (v.owner, v.token) for v in await read_lanes(coord, ctx.cluster, ctx.lanes)}


async def write_preflight(ctx: Context, *, ok: bool = True, age: float = 0.0) -> None:
    """Store a last-preflight record, ``age`` seconds old, passing or failing (nats)."""
    coord = make_coordinator(ctx)
    await coord.connect()
    try:
        record = {"time": time.time() - age, "ok": ok, "failed": [] if ok else ["nats"], "actor": "test"}
        await coord.put(keys.preflight_last(ctx.cluster), json.dumps(record).encode())
    finally:
        await coord.close()
