"""Idle cost of the node agent: real `cbctl agent run` processes over 256 lanes, no load.

Each agent reads all its lanes with ONE blocking XREADGROUP (cbctl/core/agent/worker.py,
docs/agent.md "Lane workers"), so an idle agent makes a handful of Redis calls a second and holds
a few connections, whatever the number of lanes it owns (before: one blocking read per lane every
500 ms, ~2 calls per owned lane per second and a connection each).

Margins: the target of an idle agent is <= 0.5 % of a core, measured by bench/scale.py on a quiet
machine (~1 % measured with TTL 5 s / keep-alive 1 s, which the bench and this test use). This
machine is shared (2 cores, other test runs), and a process's CPU time grows with the scheduler
contention it meets, so the CPU bound here is 2 % of a core per agent over 10 s: 4x the
target, still well below the ~4-5 % every agent used before the change.  The Redis call count is
not sensitive to load, so its bound is tight: <= 3 calls a second per agent (measured ~0.6: a
read and a sweep every 5 s, a probe PING; before: ~100, two per owned lane).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from cbctl.core.agent.ownership import read_lanes
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.backends.redis.client import redis_client_for
from cbctl.core.model.config import load_config
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.sandbox.waiting import async_wait_until
from tests.helpers import write_config
from tests.support.agent_process import AgentProcess
from tests.support.rollout import advance

AGENTS = 5
LANES = 256
WINDOW = 10.0
CPU_BOUND = 2.0  # % of a core per agent (module docstring: why 4x the 0.5 % target)
CALLS_PER_S = 3.0  # Redis calls a second per idle agent (measured ~0.6)


#: Redis counts the commands a script runs in commandstats too.  Idle, the only script the agents
#: run is the lane sweep (GET, EXISTS, XPENDING per lane, cbctl/core/backends/redis/queue.py), so
#: these are left out: what remains is what the agents sent (the EVALSHA of the sweep counts).
_IN_SCRIPTS = {"get", "exists", "xpending"}


def _calls(info: dict[str, Any]) -> Counter[str]:
    """Commands the agents sent, by name (INFO commandstats), minus our own INFO/CLIENT calls."""
    return Counter({k[len("cmdstat_"):]: int(v["calls"]) for k, v in info.items()
                    if k not in ("cmdstat_info", "cmdstat_client|list") and k[len("cmdstat_"):] not in _IN_SCRIPTS})


@pytest.mark.timeout(240)
async def test_idle_agents_cost_little_cpu_and_few_redis_calls(
    tmp_path: Path, unique_cluster: str, shared_etcd: Any, redis_server: Any
) -> None:
    # NATS on a port where nothing listens: the agents' event bus and signal router keep retrying
    # (their own idle cost, not this test's subject), and never reach another run's server.
    config = write_config(tmp_path / "cbctl.toml", cluster=unique_cluster, etcd=shared_etcd.client_url,
                          redis=redis_server.url, nats="nats://127.0.0.1:1", lane_count=LANES,
                          extra={"coordination": {"lease-ttl": 5.0, "keepalive-interval": 1.0, "timeout": 2.0}})
    ctx = load_config(config).context()
    coord = make_coordinator(ctx)
    await coord.connect()
    redis = redis_client_for(ctx)
    names = [f"idle-{i}" for i in range(AGENTS)]
    procs: list[AgentProcess] = []
    try:
        await advance(ControlPlane(ctx, coord), 1)
        procs.extend(AgentProcess(config, n, tmp_path / f"state-{n}", tmp_path) for n in names)

        async def spread() -> bool:
            owners = Counter(v.owner for v in await read_lanes(coord, ctx.cluster, ctx.lanes))
            return None not in owners and set(owners) == set(names)

        await async_wait_until(spread, 90, interval=0.2, message="every lane owned by one of the agents")
        # Let the takeovers finish (each lane's set-up and the first reads) before measuring.
        await asyncio.sleep(3)
        ps = [psutil.Process(p.proc.pid) for p in procs]
        cpu0 = [sum(p.cpu_times()[:2]) for p in ps]
        calls0 = _calls(await redis.info("commandstats"))
        t0 = time.monotonic()
        await asyncio.sleep(WINDOW)
        wall = time.monotonic() - t0
        calls = _calls(await redis.info("commandstats")) - calls0
        cpu = [100 * (sum(p.cpu_times()[:2]) - c) / wall for p, c in zip(ps, cpu0)]
        clients = await redis.client_list()
        assert all(p.proc.poll() is None for p in procs), "an agent exited"

        per_agent_calls = calls.total() / wall / AGENTS
        print(f"idle over {wall:.1f} s: CPU {[round(c, 2) for c in cpu]} % of a core, "
              f"{per_agent_calls:.2f} Redis calls/s per agent {dict(calls)}, {len(clients)} connections")
        assert per_agent_calls <= CALLS_PER_S, f"{per_agent_calls:.1f} Redis calls/s per idle agent: {calls}"
        # One blocking read connection each, plus the pool's few left from the lanes' set-up (4 at
        # a time, cbctl/core/agent/worker.py SETUP_SLOTS) and the probes; not one per lane (each
        # agent owns ~51 lanes).  The one extra is ours.
        assert len(clients) <= AGENTS * 7 + 1, f"{len(clients)} Redis connections for {AGENTS} idle agents"
        assert max(cpu) <= CPU_BOUND, f"idle agents used {[round(c, 2) for c in cpu]} % of a core over {wall:.0f} s"
    finally:
        for p in procs:
            p.stop()
        await redis.aclose()
        await coord.close()
