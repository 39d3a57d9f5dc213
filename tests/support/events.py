"""Events for the bus tests and reading them from a bridge subscription."""

from __future__ import annotations

from typing import Any

from cbctl.core.model.events import Event, make_event

__all__ = ["collect", "ev"]


def ev(workflow_id: str, seq: int, *, node_id: str = "node-a", **kw: Any) -> Event:
    """A ``task.completed`` event of ``workflow_id`` at ``seq`` on lane-00."""
    return make_event(workflow_id=workflow_id, seq=seq, type="task.completed", lane="lane-00", node_id=node_id,
                      task_id=f"t{seq}", payload={"seq": seq}, **kw)


async def collect(sub: Any, n: int, timeout: float = 5.0) -> list[Event]:
    """The next ``n`` events of a bridge ``Subscription`` (each within ``timeout`` s)."""
    return [await sub.next(timeout) for _ in range(n)]
