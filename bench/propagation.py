"""Flag propagation: `stage advance --wait`-equivalent until 10 agents confirm, vs raw etcd.

Measured in the same run, on the same etcd:

* **agents**: ControlPlane ``plan_flags`` + ``commit`` (CAS + audit entry) + ``wait_applied``
  until all 10 live ``cbctl agent run`` processes have written the new revision into their
  records; 50 transitions flipping ``signals.routing`` between ``off`` and ``all``.
* **raw**: one etcd put, timed until a watcher in this process receives it (aetcd-free: through
  the same coordinator), 200 samples.

Target: agents p99 <= 150 ms.  The ratio to raw put->watch shows what the chain (CAS with audit,
10 watchers, 10 apply + record writes, the wait's watch) costs on top of one store round trip.
Starts its own etcd and redis (cbctl.sandbox). Run: .venv/bin/python bench/propagation.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from cbctl.core.model.config import load_config
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.backends.coord.base import Coordinator
from cbctl.sandbox import EtcdServer, RedisServer

try:
    from bench.report import target
except ModuleNotFoundError:  # run as a script (python bench/<name>.py): bench/ is sys.path[0]
    from report import target  # type: ignore[no-redef]

AGENTS = 10
TRANSITIONS = 50
RAW_SAMPLES = 200
CBCTL = str(Path(sys.executable).parent / "cbctl")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def raw_put_watch(coord: Coordinator, key: str, n: int) -> list[float]:
    got: asyncio.Queue[float] = asyncio.Queue()
    rev = await coord.current_revision()

    async def watcher() -> None:
        async for _ev in coord.watch(key, start_revision=rev + 1):
            got.put_nowait(time.perf_counter())

    task = asyncio.create_task(watcher())
    await asyncio.sleep(0.2)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await coord.put(key, b"%d" % i)
        t1 = await got.get()
        out.append(t1 - t0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return out


async def transitions(cp: ControlPlane, n: int, agents: int) -> list[float]:
    out = []
    for i in range(n):
        value = "all" if i % 2 == 0 else "off"
        t0 = time.perf_counter()
        plan = await cp.plan_flags({"signals.routing": value})
        rev = await cp.commit(plan, reason="bench")
        res = await cp.wait_applied(rev, timeout=10)
        out.append(time.perf_counter() - t0)
        if not res.ok or len(res.applied) != agents:
            raise SystemExit(f"transition {i}: not applied by all ({res})")
    return out


async def wait_agents(cp: ControlPlane, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(await cp.live_nodes()) >= n:
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"only {len(await cp.live_nodes())} of {n} agents registered")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="cbctl-bench-prop-") as tmp:
        base = Path(tmp)
        etcd = EtcdServer(base).start()
        redis = RedisServer(base).start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            cfg = base / "cbctl.toml"
            cfg.write_text(tomli_w.dumps({
                "current-context": "bench",
                "contexts": {"bench": {
                    "cluster": "bench", "lane-count": 16,
                    "coordination": {"endpoints": [etcd.client_url], "lease-ttl": 10, "keepalive-interval": 2},
                    "redis": {"url": redis.url},
                }},
            }))
            env = {**os.environ, "CBCTL_CONFIG": str(cfg)}
            for i in range(AGENTS):
                log = (base / f"agent-{i}.log").open("wb")
                procs.append(subprocess.Popen(
                    [CBCTL, "agent", "run", "--handler", "demo", "--node-id", f"a{i:02d}", "--state-dir", str(base / "state"),
                     "--log-level", "warning"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                ))
            ctx = load_config(cfg).context()

            async def run() -> tuple[list[float], list[float]]:
                coord = make_coordinator(ctx)
                await coord.connect()
                try:
                    cp = ControlPlane(ctx, coord)
                    await wait_agents(cp, AGENTS)
                    await transitions(cp, 4, AGENTS)  # warm-up
                    agents = await transitions(cp, TRANSITIONS, AGENTS)
                    raw = await raw_put_watch(coord, "/bench-raw/key", RAW_SAMPLES)
                    return agents, raw
                finally:
                    await coord.close()

            agents, raw = asyncio.run(run())
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for p in procs:
                p.wait(timeout=15)
            redis.stop()
            etcd.stop()

    am, ap = statistics.median(agents) * 1000, pct(agents, 99) * 1000
    rm, rp = statistics.median(raw) * 1000, pct(raw, 99) * 1000
    print(f"raw etcd put->watch        median {rm:7.2f} ms   p99 {rp:7.2f} ms   ({RAW_SAMPLES} samples)")
    print(f"commit + {AGENTS} agents applied   median {am:7.2f} ms   p99 {ap:7.2f} ms   ({TRANSITIONS} transitions)")
    print(f"ratio agents/raw           median {am / rm:7.1f}x     p99 {ap / rp:7.1f}x")
    target("propagation", f"commit + {AGENTS} agents applied p99", ap, "<=", 150, unit=" ms")


if __name__ == "__main__":
    main()
