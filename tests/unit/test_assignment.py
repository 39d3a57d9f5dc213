"""Rendezvous lane assignment: deterministic, balanced enough, stable under join and leave."""

from __future__ import annotations

import random

from cbctl.core.model.assignment import assign, lanes_of, moved_lanes, owner_of, weight
from cbctl.core.model.config import lane_names

LANES = lane_names(64)
NODES = [f"node-{i}" for i in range(8)]


def test_weight_is_stable_across_processes() -> None:
    # A fixed value: the weight must not depend on PYTHONHASHSEED or the platform.
    assert weight("lane-00", "node-0") == weight("lane-00", "node-0")
    assert weight("lane-00", "node-0") != weight("lane-00", "node-1")
    assert 0 <= weight("lane-00", "node-0") < 2**64


def test_every_lane_has_exactly_one_owner_and_order_does_not_matter() -> None:
    a = assign(LANES, NODES)
    shuffled = NODES[:]
    random.Random(7).shuffle(shuffled)
    assert a == assign(LANES, shuffled)
    assert set(a) == set(LANES)
    assert set(a.values()) <= set(NODES)
    per_node = [lanes_of(n, LANES, NODES) for n in NODES]
    assert sorted(lane for lanes in per_node for lane in lanes) == sorted(LANES)


def test_no_nodes_means_no_owner() -> None:
    assert assign(LANES, []) == {}
    assert owner_of("lane-00", []) is None


def test_lanes_of_counts_the_node_itself() -> None:
    assert lanes_of("solo", LANES, []) == list(LANES)


def test_balance_is_reasonable() -> None:
    counts = {n: len(lanes_of(n, LANES, NODES)) for n in NODES}
    # 64 lanes over 8 nodes: 8 each on average; rendezvous keeps every node well above zero.
    assert min(counts.values()) >= 2, counts
    assert max(counts.values()) <= 16, counts


def test_join_moves_only_lanes_to_the_new_node() -> None:
    before = assign(LANES, NODES)
    after = assign(LANES, [*NODES, "node-new"])
    moved = [lane for lane in LANES if before[lane] != after[lane]]
    assert moved, "a new node should take some lanes"
    assert all(after[lane] == "node-new" for lane in moved)
    assert len(moved) <= len(LANES) // 3


def test_leave_moves_only_the_leavers_lanes() -> None:
    before = assign(LANES, NODES)
    gone = "node-3"
    after = assign(LANES, [n for n in NODES if n != gone])
    moved = moved_lanes(LANES, NODES, [n for n in NODES if n != gone])
    assert sorted(moved) == sorted(lane for lane in LANES if before[lane] == gone)
    assert all(after[lane] != gone for lane in LANES)
