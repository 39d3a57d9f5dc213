"""What the node agent hands to the code plugged into it: the task handler type, the applied
update passed to ``on_applied`` hooks, and the flags listener type (see docs/agent.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cbctl.core.backends.redis.queue import Task

__all__ = ["AppliedHook", "AppliedUpdate", "FlagsListener", "TaskHandler"]

TaskHandler = Callable[[Task], Awaitable[Mapping[str, Any] | None]]
"""``async handler(task) -> update``: the workflow state fields to write for this task, or
``None`` to drop the task (it is acked without a state write).  An exception leaves the task
pending (it is retried after the worker restarts)."""

AppliedHook = Callable[["AppliedUpdate"], Awaitable[None]]
"""``async hook(update)``: awaited after the guard applied a task and before its ack; raising
leaves the task unacked (it is re-delivered; the re-apply is idempotent)."""

FlagsListener = Callable[[Mapping[str, Any], int], Awaitable[None]]
"""``async listener(flags, revision)``: awaited for every rollout revision before the agent
takes it; raising refuses the revision."""


@dataclass(frozen=True, slots=True)
class AppliedUpdate:
    """A task the guard applied (or had applied before: ``already_applied``), before its ack."""

    node_id: str
    lane: str
    token: int
    workflow_id: str
    task_id: str
    type: str
    seq: int
    update: Mapping[str, Any]
    payload: Mapping[str, Any]
    occurred_at: float
    already_applied: bool
    decision: str
    history_id: str | None = None
    publish_versions: tuple[int, ...] | None = None  # the guard's publish decision (lanes.py); None = unknown
