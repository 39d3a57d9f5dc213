"""The Redis key layout of lanes and workflows, and the name rules that keep keys apart.

Layout (one Redis, no cluster hash tags) with ``P = cb:<cluster>:``: ``P lane:<lane>:tasks``
(task stream, consumer group :data:`GROUP`), ``P lane:<lane>:fence`` (highest fencing token),
``P wf:<id>`` (state hash), ``P wf:<id>:applied`` (``task_id -> seq``), ``P wf:<id>:history``
(one entry per applied update).  Field lists: docs/backends.md.
"""

from __future__ import annotations

__all__ = ["GROUP", "LaneKeys", "check_name", "check_workflow_id"]

GROUP = "workers"
"""Consumer group of every lane stream."""

_RESERVED_SUFFIXES = frozenset({"history", "applied"})


def check_name(kind: str, name: str) -> None:
    """``ValueError`` unless ``name`` (a cluster or lane) is non-empty without ``:``."""
    # ':' separates key segments; a cluster or lane name containing one could alias another key.
    if not name or ":" in name:
        raise ValueError(f"invalid {kind} name {name!r}: must be non-empty and contain no ':'")


def check_workflow_id(workflow_id: str) -> None:
    """``ValueError`` for an empty id or one ending in ``:history``/``:applied``."""
    # Workflow ids may contain ':', but one ending in ':history' or ':applied' would alias the
    # history/applied keys of another workflow.
    if not workflow_id:
        raise ValueError("empty workflow id")
    if ":" in workflow_id and workflow_id.rsplit(":", 1)[1] in _RESERVED_SUFFIXES:
        raise ValueError(f"invalid workflow id {workflow_id!r}: must not end in ':history' or ':applied'")


class LaneKeys:
    """The key layout of one cluster (module docstring)."""

    def __init__(self, cluster: str) -> None:
        check_name("cluster", cluster)
        self.cluster = cluster
        self.prefix = f"cb:{cluster}:"

    def tasks(self, lane: str) -> str:
        """The lane's task stream."""
        return f"{self.prefix}lane:{lane}:tasks"

    def fence(self, lane: str) -> str:
        """The lane's highest fencing token."""
        return f"{self.prefix}lane:{lane}:fence"

    def workflow(self, workflow_id: str) -> str:
        """The workflow's state hash."""
        return f"{self.prefix}wf:{workflow_id}"

    def history(self, workflow_id: str) -> str:
        """The workflow's append-only history stream."""
        return f"{self.prefix}wf:{workflow_id}:history"

    def applied(self, workflow_id: str) -> str:
        """The workflow's applied-task markers (``task_id -> seq``)."""
        return f"{self.prefix}wf:{workflow_id}:applied"
