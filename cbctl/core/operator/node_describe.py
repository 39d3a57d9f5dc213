"""``cbctl nodes describe ID``: everything the store holds about one node — its registration
record, its probes and clock report, the lanes it owns (with fencing tokens), its recorded
conflicts and refused duplicate starts, and its machine identity.

Contract: reads only (a handful of gets and prefix lists under ``/cbctl/<cluster>/``, key
layout in cbctl/core/model/keys.py), every record through its one parse in
cbctl/core/model/records.py. A node id the store knows nothing about and the context does not
expect raises ``NotFound`` (exit 2). Times in :meth:`NodeDescription.public` are RFC 3339 UTC.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cbctl.core.model import keys
from cbctl.core.model.errors import NotFound
from cbctl.core.model.records import (
    ConflictRecord,
    IdentityRecord,
    LaneOwnerRecord,
    NodeRecord,
    RefusalRecord,
)
from cbctl.core.model.times import rfc3339

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator
    from cbctl.core.model.config import Context

#: Record fields that hold Unix times (shown as RFC 3339).
_TIME_FIELDS = frozenset({"started_at", "heartbeat", "at", "since", "first_seen", "last_seen"})


@dataclass(frozen=True)
class OwnedLane:
    """A lane whose owner key names this node; ``token`` is the key's create revision."""

    lane: str
    token: int
    since: float | None
    instance_id: str | None


@dataclass
class NodeDescription:
    """One node. ``record`` None: not live (no record on a lease)."""

    node_id: str
    expected: bool
    rollout_revision: int
    record: NodeRecord | None = None
    lanes: list[OwnedLane] = field(default_factory=list)
    conflicts: list[ConflictRecord] = field(default_factory=list)
    refusals: list[RefusalRecord] = field(default_factory=list)
    identity: IdentityRecord | None = None

    @property
    def state(self) -> str:
        """``live``, ``missing`` (expected, not live) or ``gone`` (only evidence left)."""
        if self.record is not None:
            return "live"
        return "missing" if self.expected else "gone"

    @property
    def applied_current(self) -> bool | None:
        """Has the node applied the current rollout revision (None when not live)."""
        if self.record is None:
            return None
        return (self.record.applied_revision or 0) >= self.rollout_revision

    def public(self, time_text: Callable[[float], Any] = rfc3339) -> dict[str, Any]:
        """The ``nodes describe -o json`` shape; ``time_text`` spells Unix times (the CLI passes
        its one RFC 3339 spelling)."""
        rec = self.record

        def when(value: Any) -> Any:
            return time_text(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

        def times(data: dict[str, Any]) -> dict[str, Any]:
            # Unix-time fields as text, nested objects too (probes carry their own times).
            return {k: times(v) if isinstance(v, dict) else when(v) if k in _TIME_FIELDS else v
                    for k, v in data.items()}

        return {
            "node_id": self.node_id,
            "state": self.state,
            "expected": self.expected,
            "rollout_revision": self.rollout_revision,
            "applied_current": self.applied_current,
            "record": times(_without(rec.to_dict(), "probes", "clock")) if rec is not None else None,
            "probes": times(dict(rec.probes)) if rec is not None and rec.probes is not None else None,
            "clock": times(dict(rec.clock)) if rec is not None and rec.clock is not None else None,
            "lanes": [{"lane": ln.lane, "token": ln.token, "since": when(ln.since), "instance_id": ln.instance_id}
                      for ln in self.lanes],
            "conflicts": [times(c.to_dict()) for c in self.conflicts],
            "refusals": [times(r.to_dict()) for r in self.refusals],
            "identity": times(self.identity.to_dict()) if self.identity is not None else None,
        }


def _without(data: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in names}


async def describe_node(ctx: Context, coord: Coordinator, node_id: str) -> NodeDescription:
    """Read everything about ``node_id`` (see the module contract); ``NotFound`` when nothing."""
    cluster = ctx.cluster
    rollout_kv = await coord.get(keys.rollout(cluster))
    desc = NodeDescription(node_id, node_id in ctx.expected_nodes, rollout_kv.mod_revision if rollout_kv else 0)
    kv = await coord.get(keys.node(cluster, node_id))
    if kv is not None:
        try:
            desc.record = NodeRecord.from_json(kv.value, require_object=True)
        except ValueError:
            desc.record = None  # a half-written foreign key is not a node record
    lanes_prefix = keys.lanes_prefix(cluster)
    for lane_kv in await coord.list(lanes_prefix):
        try:
            owner = LaneOwnerRecord.from_json(lane_kv.value)
        except ValueError:
            continue
        if owner.owner == node_id:
            desc.lanes.append(OwnedLane(lane_kv.key[len(lanes_prefix):], lane_kv.create_revision,
                                        float(owner.since) if owner.since is not None else None, owner.instance_id))
    desc.lanes.sort(key=lambda ln: ln.lane)
    for ckv in await coord.list(keys.conflicts_prefix(cluster) + f"{node_id}/"):
        try:
            decoded = json.loads(ckv.value)
        except ValueError:
            decoded = {"kind": "unreadable"}  # as `cbctl nodes` counts it
        if isinstance(decoded, dict):
            desc.conflicts.append(ConflictRecord.from_dict(decoded))
    desc.conflicts.sort(key=lambda c: c.at or 0)
    for rkv in await coord.list(keys.refusals_prefix(cluster) + f"{node_id}/"):
        try:
            desc.refusals.append(RefusalRecord.from_json(rkv.value, require_object=True))
        except ValueError:
            continue
    desc.refusals.sort(key=lambda r: r.at or 0)
    ikv = await coord.get(keys.identity(cluster, node_id))
    if ikv is not None:
        try:
            desc.identity = IdentityRecord.from_json(ikv.value, require_object=True)
        except ValueError:
            desc.identity = None
    if desc.record is None and not desc.expected and not (desc.lanes or desc.conflicts or desc.refusals or desc.identity):
        raise NotFound(f"node {node_id!r}: no record, lanes, conflicts or identity in cluster {cluster}, "
                       f"and not an expected node of context {ctx.name!r} (see `cbctl nodes`)")
    return desc


__all__ = ["NodeDescription", "OwnedLane", "describe_node"]
