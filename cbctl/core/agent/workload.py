"""Demo workload: workflows whose tasks walk through the lifecycle states, and their handler.

Each workflow ``<prefix>-<n>`` has ``tasks_per_workflow`` tasks; each task is a sequence of
lifecycle *transitions*, each enqueued as one lane message (task id ``<wf>/t<k>/<step>``, the
guard's idempotency key)::

    created -> started -> completed
    created -> started -> failed -> retried -> started -> completed      (a failing attempt)

All messages of a workflow go to the workflow's lane (:func:`cbctl.core.backends.redis.queue.lane_for`), in
order, so the lane owner applies them in order and the guard numbers them ``seq`` 1..N with no
gap.  The workflow's last message carries ``final: true``; the handler turns it into the update
field ``finished: true``, on which the guard starts the retention TTL of the workflow's Redis
keys (``[contexts.X.redis] retention``).  Which tasks fail is drawn from a seeded RNG: a run is reproducible.

The demo task handler (:func:`lifecycle_handler`, ``cbctl agent run --handler demo``) turns a
message into the workflow state update that the guard writes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cbctl.core.backends.redis.queue import LaneQueue, Task

__all__ = ["LIFECYCLE_STATES", "WorkloadReport", "workflow_transitions", "generate", "lifecycle_handler"]

LIFECYCLE_STATES = ("created", "started", "completed", "failed", "retried")


def workflow_transitions(workflow_id: str, tasks_per_workflow: int, rng: random.Random, fail_rate: float) -> list[dict[str, Any]]:
    """The messages of one workflow, in the order they must be applied."""
    out: list[dict[str, Any]] = []
    for k in range(tasks_per_workflow):
        steps = ["created", "started"]
        if rng.random() < fail_rate:
            steps += ["failed", "retried", "started"]
        steps.append("completed")
        attempt = 1
        for i, state in enumerate(steps):
            if state == "retried":
                attempt += 1
            out.append(
                {
                    "task_id": f"{workflow_id}/t{k}/{i}",
                    "type": state,
                    "payload": {"task": f"t{k}", "state": state, "attempt": attempt},
                }
            )
    if out:
        out[-1]["payload"]["final"] = True  # the workflow ends here: its keys may expire
    return out


@dataclass
class WorkloadReport:
    """What :func:`generate` enqueued: per workflow, the number of messages (= final seq)."""

    workflows: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def messages(self) -> int:
        return sum(self.workflows.values())

    def public(self) -> dict[str, Any]:
        return {"workflows": len(self.workflows), "messages": self.messages, "elapsed": round(self.elapsed, 3)}


async def generate(
    queue: LaneQueue,
    *,
    workflows: int,
    rate: float = 0.0,
    tasks_per_workflow: int = 3,
    fail_rate: float = 0.2,
    seed: int = 1,
    prefix: str = "wf",
) -> WorkloadReport:
    """Enqueue ``workflows`` workflows at ``rate`` workflows per second (0 = as fast as possible).

    Raises ``BackendUnavailable`` if Redis cannot be reached (what was enqueued stays enqueued).
    """
    if workflows < 0 or tasks_per_workflow < 1 or rate < 0 or not 0 <= fail_rate <= 1:
        raise ValueError("workflows >= 0, tasks_per_workflow >= 1, rate >= 0, 0 <= fail_rate <= 1")
    rng = random.Random(seed)
    report = WorkloadReport()
    loop = asyncio.get_running_loop()
    start = loop.time()
    width = max(6, len(str(workflows)))
    for n in range(workflows):
        if rate > 0:
            due = start + n / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        wf = f"{prefix}-{n:0{width}d}"
        msgs = workflow_transitions(wf, tasks_per_workflow, rng, fail_rate)
        for msg in msgs:
            await queue.enqueue(wf, msg)
        report.workflows[wf] = len(msgs)
    report.elapsed = loop.time() - start
    return report


async def lifecycle_handler(task: Task) -> Mapping[str, Any] | None:
    """The demo task handler (``--handler demo``): the workflow state update for one lifecycle
    transition.

    Unknown message types are still applied (as ``state = <type>``): the agent's job is to apply
    what the service enqueued, not to second-guess it.
    """
    payload = task.payload
    update: dict[str, Any] = {
        "state": task.type or str(payload.get("state", "")),
        "task": str(payload.get("task", "")),
        "attempt": payload.get("attempt", 1),
        "handled_at": round(time.time(), 6),
    }
    if payload.get("final") is True:
        update["finished"] = True  # the guard starts the retention TTL of the workflow's keys
    return update
