"""Lane assignment by rendezvous (highest-random-weight) hashing. Pure functions, no I/O.

Every live agent computes the same assignment from the same inputs — the lane inventory and
the set of live node ids — without talking to the others: for each lane, the node with the
highest ``weight(lane, node)`` owns it.  Rendezvous hashing is *stable*: when a node joins it
takes only the lanes for which it now has the highest weight (about ``lanes / nodes`` of them),
and when a node leaves only its own lanes move; no other lane changes hands.  (A ring with
virtual nodes gives the same property, but needs tuning of the virtual node count to be
balanced; rendezvous needs nothing and the lane inventory is small.)

The weight is a keyed BLAKE2b of ``lane \\0 node`` — stable across processes, hosts and Python
versions, unlike the salted built-in ``hash``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = ["weight", "owner_of", "assign", "lanes_of", "moved_lanes"]


def weight(lane: str, node: str) -> int:
    """The rendezvous weight of ``node`` for ``lane``: a 64-bit unsigned integer."""
    digest = hashlib.blake2b(f"{lane}\x00{node}".encode("utf-8"), digest_size=8, person=b"cbctl-lanes").digest()
    return int.from_bytes(digest, "big")


def owner_of(lane: str, nodes: Iterable[str]) -> str | None:
    """The node that should own ``lane`` among ``nodes`` (None when there are none).

    Ties (astronomically unlikely with 64-bit weights) go to the larger node id, so the result
    never depends on the iteration order of ``nodes``.
    """
    best: tuple[int, str] | None = None
    for node in nodes:
        cand = (weight(lane, node), node)
        if best is None or cand > best:
            best = cand
    return None if best is None else best[1]


def assign(lanes: Sequence[str], nodes: Iterable[str]) -> dict[str, str]:
    """``{lane: owner}`` for every lane; empty when there are no nodes."""
    members = sorted(set(nodes))
    if not members:
        return {}
    return {lane: owner_of(lane, members) for lane in lanes}  # type: ignore[misc]  # members non-empty


def lanes_of(node: str, lanes: Sequence[str], nodes: Iterable[str]) -> list[str]:
    """The lanes ``node`` should own, in inventory order. ``node`` counts as a member."""
    members = set(nodes) | {node}
    return [lane for lane in lanes if owner_of(lane, members) == node]


def moved_lanes(lanes: Sequence[str], before: Iterable[str], after: Iterable[str]) -> list[str]:
    """Lanes whose owner differs between the two memberships (for tests and diagnostics)."""
    a = assign(lanes, before)
    b = assign(lanes, after)
    return [lane for lane in lanes if a.get(lane) != b.get(lane)]
