"""Checks on a demo workload's outcome: applied (the Redis history), exactly once, in order, and
the same in the JetStream stream and at a subscriber."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import nats as nats_client

from cbctl.core.agent.workload import WorkloadReport
from cbctl.core.backends.redis.guard import LaneGuard
from cbctl.core.model.config import default_stream_name

if TYPE_CHECKING:
    from tests.support.sse import SseReader

__all__ = ["all_processed", "check_exactly_once", "check_stream_exactly_once", "check_subscriber",
           "stream_event_ids"]


async def all_processed(guard: LaneGuard, report: WorkloadReport) -> bool:
    """Every workflow of ``report`` reached its last seq in the Redis record."""
    for wf, n in report.workflows.items():
        state = await guard.read_workflow(wf)
        if state.get("seq", 0) < n:
            return False
    return True


async def check_exactly_once(guard: LaneGuard, report: WorkloadReport, *, ordered: bool = True) -> None:
    """Every enqueued transition applied once: seq 1..N without gaps, task ids unique; with
    ``ordered`` (one owner per lane) also in enqueue order, so every workflow ends completed.
    Competing consumers (cluster disabled) give no order across a workflow's messages."""
    for wf, n in report.workflows.items():
        hist = await guard.history(wf)
        assert [e["seq"] for e in hist] == list(range(1, n + 1)), (wf, [(e["seq"], e["task_id"]) for e in hist])
        assert len({e["task_id"] for e in hist}) == n
        state = await guard.read_workflow(wf)
        assert state["seq"] == n
        if ordered:
            assert state["state"] == "completed", (wf, state)
            steps = [e["task_id"] for e in hist]
            assert steps == sorted(steps, key=lambda t: (int(t.split("/")[1][1:]), int(t.split("/")[2]))), steps


async def stream_event_ids(nats_url: str, stream: str) -> list[tuple[str, int, str]]:
    """Every message in ``stream`` (a cluster's: ``default_stream_name(cluster)``) as
    (workflow_id, seq, event_id), in stream order."""
    nc = await nats_client.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            raw = await js.get_msg(stream, seq)
            obj = json.loads(raw.data or b"{}")
            out.append((obj["workflow_id"], obj["seq"], obj["event_id"]))
        return out
    finally:
        await nc.close()


async def check_stream_exactly_once(nats_url: str, guard: LaneGuard, report: WorkloadReport) -> None:
    """The stream holds each executed update (Redis history) exactly once, seq 1..N, no gap."""
    stored = await stream_event_ids(nats_url, default_stream_name(guard.keys.cluster))
    ids = [eid for _, _, eid in stored]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate event ids in the stream"
    per_wf: dict[str, list[int]] = {}
    for wf, seq, _ in stored:
        per_wf.setdefault(wf, []).append(seq)
    for wf, n in report.workflows.items():
        hist = await guard.history(wf)
        assert [e["seq"] for e in hist] == list(range(1, n + 1)), wf
        assert sorted(per_wf.get(wf, [])) == list(range(1, n + 1)), (wf, sorted(per_wf.get(wf, [])))


def check_subscriber(reader: SseReader, report: WorkloadReport) -> None:
    """Every update of every workflow, in order, no duplicate."""
    got = reader.by_workflow()
    for wf, n in report.workflows.items():
        assert got.get(wf) == list(range(1, n + 1)), (wf, got.get(wf))
