"""Lane ownership settles: an owner key that an acquire created without knowing (the create timed
out on the client but etcd applied it) does not stay on our lease, unworked, for a lane that is not
ours (docs/agent.md, Lane workers).  Seen with 30 agents starting at once on 2 cores: one node held
109 keys and worked 10 of them.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model import keys
from cbctl.core.model.config import Context
from cbctl.core.model.records import LaneOwnerRecord
from tests.support.stack import StackOptions

LANES = 8
TTL = 5.0


@pytest.fixture
def stack_options() -> StackOptions:
    return StackOptions(lane_count=LANES, ttl=TTL, keepalive=1.0)


async def test_an_owner_key_created_by_a_timed_out_acquire_is_released_when_the_lane_is_not_ours(
    ctx: Context, coord: Coordinator, agents: Any
) -> None:
    """A create that timed out may have been applied: the key sits on our live lease and nobody
    works the lane.  The reconciler remembers such lanes and deletes the key once the lane is
    not ours (a lane still ours is adopted by the next acquire instead)."""
    agent = await agents("stray", probes=False, http_port=None)  # stage 0: no lane keys at all
    session = agent._session
    assert session is not None
    ours, theirs = ctx.lanes[0], ctx.lanes[1]
    await coord.create(keys.lane(ctx.cluster, ours), LaneOwnerRecord(
        lane=ours, owner="stray", instance_id=agent.instance_id, since=time.time()).to_json(), lease=session.lease)
    await coord.create(keys.lane(ctx.cluster, theirs), LaneOwnerRecord(
        lane=theirs, owner="stray", instance_id="another-instance", since=time.time()).to_json(), lease=session.lease)
    agent._strays(session).update({ours, theirs})
    async with agent._lanes_lock:
        await agent._settle_strays(session, set())
    assert await coord.get(keys.lane(ctx.cluster, ours)) is None  # ours, not wanted: released
    assert await coord.get(keys.lane(ctx.cluster, theirs)) is not None  # not this instance's: left alone
    assert not agent._strays(session)
