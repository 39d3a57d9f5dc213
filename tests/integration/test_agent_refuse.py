"""Refuse first: a duplicate `cbctl agent run --node-id X` next to a live X changes nothing.

The live node is a real `cbctl agent run` process with the event bus, working through a
workload while the duplicate is started and refused.  Checked, before and after the refusal:
the live node's record (identity fields), its identity binding and the conflict records in the
store, its preflight rows (cbctl.core.operator.preflight) and the store part of the exit criteria
(cbctl.core.operator.criteria).  The refused process must exit 3 without starting its event bus or
writing its machine identity, and the refusal is reported on a lease of its own.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.model import keys
from cbctl.core.operator.preflight_nodes import check_node_ids, check_nodes, read_snapshot
from cbctl.core.model.config import Context
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.operator.criteria import criterion_ownership
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.agent.registration import MACHINE_ID_FILE, clear_conflicts, read_refusals
from cbctl.core.agent.workload import generate
from cbctl.sandbox.waiting import async_wait_until
from tests.helpers import CBCTL
from tests.support.agent_process import AgentProcess
from tests.support.records import wait_record
from tests.support.stack import StackOptions
from tests.support.workload import all_processed, check_exactly_once

pytestmark = pytest.mark.integration

IDENTITY_FIELDS = ("node_id", "machine_id", "instance_id", "host", "pid", "lease", "session", "started_at", "http")


async def _store_view(ctx: Any, coord: Any, node_id: str) -> dict[str, Any]:
    """What a refused duplicate must not change."""
    rec_kv = await coord.get(keys.node(ctx.cluster, node_id))
    ident_kv = await coord.get(keys.identity(ctx.cluster, node_id))
    snap = await read_snapshot(ctx, coord)
    crit = await criterion_ownership(ctx, coord, None, 60.0, time.time(), "not used")
    return {
        "record": {k: rec_kv.json().get(k) for k in IDENTITY_FIELDS} if rec_kv else None,
        "record_create_revision": rec_kv.create_revision if rec_kv else None,
        "identity": (ident_kv.json().get("machine_id"), ident_kv.create_revision) if ident_kv else None,
        "conflicts": [kv.key for kv in await coord.list(keys.conflicts_prefix(ctx.cluster))],
        "node_id_rows": [(r.name, r.target, r.node, r.status, r.detail) for r in check_node_ids(ctx, snap)],
        "node_rows": [(r.name, r.target, r.node, r.status) for r in check_nodes(ctx, snap) if r.node == node_id],
        "criterion_unresolved": crit.evidence["unresolved_conflicts"],
        "criterion_store_status": "fail" if crit.evidence["unresolved_conflicts"] else "pass",
    }


@pytest.fixture
def stack_options() -> StackOptions:
    """tests/integration/conftest.py's stack on the session's nats-server, 4 lanes, the default
    NATS connect timeout."""
    return StackOptions(lane_count=4, nats="shared", nats_connect_timeout=None)


async def test_duplicate_refused_first_live_node_unchanged_under_load(
    tmp_path: Path, config_path: Path, ctx: Context, coord: Coordinator, guard: LaneGuard, queue: LaneQueue,
) -> None:
    holder = AgentProcess(config_path, "node-1", tmp_path / "state-live", tmp_path)
    try:
        await wait_record(coord, ctx.cluster, "node-1", timeout=40,
                          check=lambda r: r.get("http") is not None and r.get("probes"))
        # Load: the live node works through a workload while the duplicate comes and goes.
        load = asyncio.create_task(generate(queue, workflows=150, rate=50, tasks_per_workflow=3,
                                            fail_rate=0.0, seed=7, prefix="refuse"))
        before = await _store_view(ctx, coord, "node-1")
        assert before["conflicts"] == [] and all(row[3] == "pass" for row in before["node_id_rows"]), before

        dup_state = tmp_path / "state-dup"
        started = time.monotonic()
        env = {**os.environ, "CBCTL_CONFIG": str(config_path), "NO_COLOR": "1"}
        env.pop("CBCTL_CONTEXT", None)
        dup = await asyncio.to_thread(
            subprocess.run,
            [CBCTL, "agent", "run", "--handler", "demo", "--node-id", "node-1", "--state-dir", str(dup_state), "--log-level", "debug"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        refused_in = time.monotonic() - started
        assert dup.returncode == 3, dup.stderr
        assert "already registered" in dup.stderr and before["record"]["instance_id"] in dup.stderr
        # Nothing started before the refusal: no bus, no HTTP, no machine identity written.
        # (The live holder's own log shows each of these lines, so their absence here means
        # the step did not run, not that the wording changed.)
        for never in ("event bus started", "bridge consuming", "HTTP serving on", "machine identity bound"):
            assert never not in dup.stderr, (never, dup.stderr)
            assert never in holder.log(), (never, holder.log())
        assert not (dup_state / MACHINE_ID_FILE).exists()

        report = await load
        after = await _store_view(ctx, coord, "node-1")
        assert after == before
        assert holder.proc.poll() is None, holder.log()

        # The refusal is reported, on a lease of its own (it expires; nothing to clear).
        refusals = await read_refusals(coord, ctx.cluster)
        assert [r["kind"] for r in refusals["node-1"]] == ["duplicate-node-id"]
        assert refusals["node-1"][0]["holder_instance_id"] == before["record"]["instance_id"]
        (kv,) = await coord.list(keys.refusals_prefix(ctx.cluster))
        assert kv.lease is not None
        assert await clear_conflicts(coord, ctx.cluster) == []

        await async_wait_until(lambda: all_processed(guard, report), 60, interval=0.2, message="workload applied")
        await check_exactly_once(guard, report)
        print(f"duplicate refused in {refused_in:.2f}s (process start included)")
    finally:
        await asyncio.to_thread(holder.stop)
