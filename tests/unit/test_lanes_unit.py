"""Pure logic of cbctl.core.backends.redis (queue, guard, keys): lane hashing, mode resolution, key layout, validation.

Nothing here talks to Redis: validation happens before any I/O, so a client pointed at a
closed port is enough to construct the guard.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import zlib

import pytest
import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cbctl.core.model.errors import BackendUnavailable
from cbctl.core.backends.redis.guard import GUARD_LUA, RESERVED_FIELDS, GuardResult, LaneGuard, resolve_mode
from cbctl.core.backends.redis.keys import LaneKeys
from cbctl.core.backends.redis.queue import LaneQueue, lane_for

LANES16 = [f"lane-{i:02d}" for i in range(16)]


# -- lane_for -------------------------------------------------------------------------------


def test_lane_for_is_crc32_mod_len() -> None:
    # The contract every node (and any non-Python tool) relies on.
    for wf in ("wf-1", "order:42", "ü-unicode", ""):
        assert lane_for(wf, LANES16) == LANES16[zlib.crc32(wf.encode("utf-8")) % 16]


def test_lane_for_known_values() -> None:
    # Pinned values: a change here re-shuffles every workflow to another lane in production.
    assert lane_for("wf-1", LANES16) == "lane-14"
    assert lane_for("order:42", LANES16) == "lane-11"
    assert lane_for("wf-1", ["a", "b", "c"]) == "b"


def test_lane_for_is_stable_across_processes_with_different_hash_seeds() -> None:
    code = "from cbctl.core.backends.redis.queue import lane_for; print(','.join(lane_for(f'wf-{i}', [f'l{j}' for j in range(7)]) for i in range(50)))"
    outputs = set()
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(out.stdout.strip())
    assert len(outputs) == 1
    assert outputs.pop().split(",") == [lane_for(f"wf-{i}", [f"l{j}" for j in range(7)]) for i in range(50)]


def test_lane_for_spreads_evenly() -> None:
    counts = collections.Counter(lane_for(f"wf-{i}", LANES16) for i in range(16_000))
    assert set(counts) == set(LANES16)
    mean = 16_000 / 16
    assert all(0.9 * mean <= c <= 1.1 * mean for c in counts.values()), counts


def test_lane_for_spreads_uuid_like_ids() -> None:
    import uuid

    ids = [str(uuid.UUID(int=i * 2654435761)) for i in range(8_000)]
    counts = collections.Counter(lane_for(wf, LANES16[:8]) for wf in ids)
    assert all(0.85 * 1000 <= c <= 1.15 * 1000 for c in counts.values()), counts


def test_lane_for_single_lane_and_empty() -> None:
    assert lane_for("anything", ["only"]) == "only"
    with pytest.raises(ValueError):
        lane_for("wf", [])


# -- resolve_mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "lane", "expected"),
    [
        ("off", "lane-1", "off"),
        ("observe", "lane-1", "observe"),
        ("enforce", "lane-1", "enforce"),
        ("canary", "lane-1", "enforce"),
        ("canary", "lane-2", "observe"),
    ],
)
def test_resolve_mode(flag, lane, expected) -> None:
    assert resolve_mode(flag, lane, {"lane-1"}) == expected


def test_resolve_mode_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="enforced"):
        resolve_mode("enforced", "lane-1")  # type: ignore[arg-type]


# -- keys -----------------------------------------------------------------------------------


def test_key_layout() -> None:
    k = LaneKeys("prod")
    assert k.tasks("lane-1") == "cb:prod:lane:lane-1:tasks"
    assert k.fence("lane-1") == "cb:prod:lane:lane-1:fence"
    assert k.workflow("wf-9") == "cb:prod:wf:wf-9"
    assert k.history("wf-9") == "cb:prod:wf:wf-9:history"
    assert k.applied("wf-9") == "cb:prod:wf:wf-9:applied"


@pytest.mark.parametrize("bad", ["", "a:b"])
def test_cluster_and_lane_names_cannot_alias_keys(bad: str) -> None:
    with pytest.raises(ValueError):
        LaneKeys(bad)
    with pytest.raises(ValueError):
        LaneQueue(aredis.Redis(port=1), "c", ["ok", bad])


# -- validation before I/O ------------------------------------------------------------------


@pytest.fixture
def offline_guard() -> LaneGuard:
    return LaneGuard(aredis.Redis(host="127.0.0.1", port=1), "c", None, "n1")


async def test_reserved_fields_are_rejected(offline_guard: LaneGuard) -> None:
    for name in RESERVED_FIELDS:
        with pytest.raises(ValueError, match="reserved"):
            await offline_guard.apply("lane-1", 1, "enforce", "wf", "t", {name: "x"})


@pytest.mark.parametrize("token", [-1, 1.5, "3", True])
async def test_bad_tokens_are_rejected(offline_guard: LaneGuard, token) -> None:
    with pytest.raises(ValueError, match="token"):
        await offline_guard.apply("lane-1", token, "enforce", "wf", "t", {})
    with pytest.raises(ValueError, match="token"):
        await offline_guard.raise_fence("lane-1", token)


@pytest.mark.parametrize("wf", ["", "x:history", "a:b:applied"])
async def test_workflow_ids_that_alias_other_keys_are_rejected(offline_guard: LaneGuard, wf: str) -> None:
    with pytest.raises(ValueError, match="workflow id"):
        await offline_guard.apply("lane-1", 1, "enforce", wf, "t", {})


async def test_workflow_ids_may_contain_colons() -> None:
    # validation passes; the call then fails only because nothing listens on port 1
    guard = LaneGuard(
        aredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)),
        "c", None, "n1",
    )
    with pytest.raises(BackendUnavailable):
        await guard.apply("lane-1", 1, "enforce", "order:42:history-item", "t", {})


async def test_unknown_mode_and_empty_task_id(offline_guard: LaneGuard) -> None:
    with pytest.raises(ValueError, match="mode"):
        await offline_guard.apply("lane-1", 1, "strict", "wf", "t", {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task id"):
        await offline_guard.apply("lane-1", 1, "enforce", "wf", "", {})


def test_already_applied_property() -> None:
    assert GuardResult("allow", 3, 1, applied=False).already_applied
    assert not GuardResult("allow", 3, 1, applied=True).already_applied
    assert not GuardResult("deny", 0, 5, applied=False).already_applied
    assert not GuardResult("allow", 0, 5, applied=False).already_applied  # ack-only


def test_one_script_does_fence_apply_and_ack() -> None:
    # The design's "one Lua script": every guarded operation goes through GUARD_LUA.
    for needle in ("'GET', KEYS[1]", "HINCRBY", "XADD", "XACK", "'deny ", "'would_deny'"):
        assert needle in GUARD_LUA
