"""Lane ownership in the coordination store: owner keys, fencing tokens, reading the table.

A lane is owned by whoever holds ``keys.lane(cluster, lane)``.  The key is created with
create-if-absent and attached to the owner's lease, so it disappears when the owner's lease
expires or is revoked.  Its ``create_revision`` is the lane's **fencing token**: store-wide
revisions strictly increase and are never reused, so every acquisition — by any node, after any
number of releases and expiries — gets a token greater than every earlier one.  The agent hands
that token to :meth:`cbctl.core.backends.redis.guard.LaneGuard.raise_fence` right after acquiring, so Redis
rejects the previous owner's writes from that moment on.

Owner record: :class:`cbctl.core.model.records.LaneOwnerRecord`.

Which lanes a node *should* own is decided by :mod:`cbctl.core.model.assignment`; this module only
takes, releases and reads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cbctl.core.model import keys
from cbctl.core.backends.coord.base import Coordinator, Lease
from cbctl.core.model.errors import Conflict
from cbctl.core.model.records import LaneOwnerRecord, lane_owner_in

__all__ = ["LaneClaim", "LaneView", "acquire_lane", "lane_owner", "release_lane", "read_lanes"]


@dataclass(frozen=True, slots=True)
class LaneClaim:
    """A lane this node acquired. ``token`` is the key's create_revision (= its revision)."""

    lane: str
    token: int
    since: float


async def acquire_lane(
    coord: Coordinator, cluster: str, lane: str, *, node_id: str, instance_id: str, lease: Lease
) -> LaneClaim | None:
    """Create the lane's owner key on ``lease``; None if someone else already holds it.

    A create that timed out may still have been applied (``BackendUnavailable`` says "maybe").
    The retry then finds the key present: if it is on OUR ``lease`` and names our
    ``instance_id``, it is ours — the claim is returned with the key's create_revision as the
    token.  (Returning None there would leave the lane stuck: nobody else can take a key on our
    live lease, and we would wait for a delete that never comes.)

    Raises ``BackendUnavailable`` when the store cannot be reached (the key may or may not have
    been created; the next attempt finds out as above, or the key dies with the lease).
    """
    since = time.time()
    key = keys.lane(cluster, lane)
    body = LaneOwnerRecord(lane=lane, owner=node_id, instance_id=instance_id, since=since).to_json()
    try:
        token = await coord.create(key, body, lease=lease)
    except Conflict:
        kv = await coord.get(key)
        if kv is None or not _on_lease(kv.lease, lease):
            return None  # someone else's (or gone since: its delete event wakes the caller)
        try:
            held = LaneOwnerRecord.from_json(kv.value)
        except ValueError:
            return None
        if held.instance_id != instance_id:
            return None
        return LaneClaim(lane=lane, token=kv.create_revision,
                         since=float(held.since) if held.since is not None else since)
    return LaneClaim(lane=lane, token=token, since=since)


def _on_lease(key_lease: int | str | None, lease: Lease) -> bool:
    """Whether a key's lease (as the backend reports it) is ``lease``."""
    if key_lease is None:
        return False
    return str(key_lease) == str(lease.id)


async def release_lane(coord: Coordinator, cluster: str, claim: LaneClaim) -> bool:
    """Delete the owner key if it is still the one we created (expected revision = token).

    Returns False when the key was already gone or re-created by someone else (nothing deleted).
    """
    return await coord.delete(keys.lane(cluster, claim.lane), expected_revision=claim.token)


@dataclass(frozen=True)
class LaneView:
    """One row of ``cbctl lanes``. ``owner``/``token``/``since`` are None for a free lane."""

    lane: str
    owner: str | None
    token: int | None
    since: float | None
    instance_id: str | None = None

    def public(self) -> dict[str, Any]:
        return {"lane": self.lane, "owner": self.owner, "token": self.token, "since": self.since}


async def read_lanes(coord: Coordinator, cluster: str, lanes: Sequence[str]) -> list[LaneView]:
    """The owner table for the lane inventory ``lanes`` (in inventory order).

    Owner keys for lanes not in the inventory (a lane removed from the config while owned) are
    appended at the end, so nothing held is hidden.
    """
    prefix = keys.lanes_prefix(cluster)
    held: dict[str, LaneView] = {}
    for kv in await coord.list(prefix):
        lane = kv.key[len(prefix):]
        try:
            rec = LaneOwnerRecord.from_json(kv.value)
        except ValueError:
            rec = LaneOwnerRecord()
        held[lane] = LaneView(
            lane=lane,
            owner=rec.owner,
            token=kv.create_revision,
            since=float(rec.since) if rec.since is not None else None,
            instance_id=rec.instance_id,
        )
    out = [held.pop(lane, LaneView(lane, None, None, None)) for lane in lanes]
    out.extend(held[lane] for lane in sorted(held))
    return out


async def lane_owner(coord: Coordinator, cluster: str, lane: str) -> str | None:
    """The node id in ``lane``'s owner key (:func:`cbctl.core.model.records.lane_owner_in`).

    Raises ``BackendUnavailable`` when the store cannot be reached.
    """
    kv = await coord.get(keys.lane(cluster, lane))
    return lane_owner_in(kv.value if kv is not None else None)
