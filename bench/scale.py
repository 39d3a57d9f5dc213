"""Scale: idle cost of agents and how fast lane ownership settles, with real agent processes.

Every agent is a real ``cbctl agent run --handler demo`` process (one process per agent, not
many ``NodeAgent``s in one process: the CPU of each agent is measured by its process), on its
own etcd + redis-server + nats-server started here on loopback (cbctl.sandbox; ``--no-nats``
leaves NATS out, and the agents' bus and signal router then retry connecting), at stage 1
(``cluster.enabled``, so the lanes are owned by rendezvous hashing and worked by their owners).
Agents are started ``--stagger`` s apart, and one that exits (``agent run`` gives up when the
store does not answer at start, which happens when 30 start at once on 2 cores) is started
again a second later, as a service manager would; the restarts are counted.

* ``idle``: N agents (default 5) over L lanes (default 256), no load.  Once the lanes are spread,
  the CPU time (user + system, psutil) of each agent process is measured over ``--seconds``
  (default 20 s) and reported as a percentage of one core.  Target: <= 0.5 % per agent.
* ``settle``: N agents (default 30) over L lanes, lease TTL 5 s, keep-alive 1 s.  Measured from
  the start of the processes: until every node is registered, until every lane has an owner key
  and every lane is listed in exactly one node record, that node being its key's owner
  ("owned exactly once"); the largest share against the fair share L/N; the same again 10 s
  later.  Then SIGKILL of ``--kill`` agents (default 5): the time until every lane they held
  has a live owner again.  Targets: max share <= 2x fair; re-owned <= TTL + 3 s.

Run: ``.venv/bin/python bench/scale.py idle`` / ``.venv/bin/python bench/scale.py settle --agents 30``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import tomli_w

from cbctl.core.agent.ownership import read_lanes
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model import keys
from cbctl.core.model.config import Context, load_config
from cbctl.core.model.errors import BackendUnavailable
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.sandbox import EtcdServer, NatsServer, RedisServer

try:
    from bench.report import target
except ModuleNotFoundError:  # run as a script (python bench/<name>.py): bench/ is sys.path[0]
    from report import target  # type: ignore[no-redef]

CBCTL = str(Path(sys.executable).parent / "cbctl")


def write_cfg(path: Path, cluster: str, etcd_url: str, redis_url: str, lanes: int, ttl: float,
              keepalive: float, nats_url: str | None = None) -> None:
    ctx: dict[str, object] = {
        "cluster": cluster, "lane-count": lanes,
        "coordination": {"endpoints": [etcd_url], "lease-ttl": ttl, "keepalive-interval": keepalive,
                         "timeout": 2.0},
        "redis": {"url": redis_url},
    }
    if nats_url:
        ctx["nats"] = {"servers": [nats_url]}
    path.write_text(tomli_w.dumps({"current-context": "bench", "contexts": {"bench": ctx}}))


class Fleet:
    """N ``cbctl agent run`` processes, each in its own process group, restarted when they exit
    (until killed or stopped here)."""

    def __init__(self, cfg: Path, base: Path) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts = 0
        self._base = base
        self._gone: set[str] = set()
        self._env = {**os.environ, "CBCTL_CONFIG": str(cfg), "NO_COLOR": "1"}
        self._env.pop("CBCTL_CONTEXT", None)

    def start(self, n: str) -> None:
        log = (self._base / f"agent-{n}.log").open("ab")
        self.procs[n] = subprocess.Popen(
            [CBCTL, "agent", "run", "--handler", "demo", "--node-id", n, "--state-dir", str(self._base / f"state-{n}"),
             "--log-level", "warning"],
            env=self._env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    async def start_all(self, names: list[str], stagger: float) -> None:
        for n in names:
            self.start(n)
            await asyncio.sleep(stagger)

    async def supervise(self) -> None:
        """Start again, a second later, every agent that exited without being killed here."""
        while True:
            await asyncio.sleep(1.0)
            for n, p in list(self.procs.items()):
                if n not in self._gone and p.poll() is not None:
                    self.restarts += 1
                    print(f"  (agent {n} exited with {p.returncode}; starting it again)", flush=True)
                    self.start(n)

    def kill(self, name: str) -> None:
        self._gone.add(name)
        try:
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[name].wait(timeout=10)

    def stop(self) -> None:
        self._gone.update(self.procs)
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)


async def snapshot(coord: Coordinator, ctx: Context) -> tuple[dict[str, str | None], dict[str, list[str]]]:
    """(lane -> owner from the owner keys, node -> lanes listed in its record)."""
    owners = {v.lane: v.owner for v in await read_lanes(coord, ctx.cluster, ctx.lanes)}
    prefix = keys.nodes_prefix(ctx.cluster)
    records: dict[str, list[str]] = {}
    for kv in await coord.list(prefix):
        try:
            records[kv.key[len(prefix):]] = list(json.loads(kv.value).get("lanes") or [])
        except ValueError:
            records[kv.key[len(prefix):]] = []
    return owners, records


async def retry_snapshot(coord: Coordinator, ctx: Context) -> tuple[dict[str, str | None], dict[str, list[str]]]:
    """:func:`snapshot`, retried while the store does not answer in time (a saturated machine)."""
    for _ in range(20):
        try:
            return await snapshot(coord, ctx)
        except BackendUnavailable as exc:
            print(f"  (poll failed: {exc}; retrying)", flush=True)
            await asyncio.sleep(0.5)
    return await snapshot(coord, ctx)


def owned_once(ctx: Context, owners: dict[str, str | None], records: dict[str, list[str]], live: set[str]) -> bool:
    """Every lane has a live owner key, and exactly one record (its owner's) lists it."""
    listed = Counter(lane for node in live for lane in records.get(node, ()))
    for lane in ctx.lanes:
        owner = owners.get(lane)
        if owner is None or owner not in live or listed[lane] != 1 or lane not in records.get(owner, ()):
            return False
    return True


async def wait_for(cond_desc: str, deadline: float, check) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - start
        except BackendUnavailable as exc:  # a saturated machine: our own poll may time out
            print(f"  (poll failed: {exc}; retrying)", flush=True)
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {cond_desc}")
        await asyncio.sleep(0.1)


async def run_idle(ctx: Context, cfg: Path, base: Path, agents: int, seconds: float, stagger: float) -> None:
    coord = make_coordinator(ctx)
    await coord.connect()
    names = [f"idle-{i:02d}" for i in range(agents)]
    fleet = Fleet(cfg, base)
    await fleet.start_all(names, stagger)
    try:
        live = set(names)

        async def settled() -> bool:
            owners, records = await snapshot(coord, ctx)
            return set(records) >= live and owned_once(ctx, owners, records, live)

        took = await wait_for("the lanes to spread", time.monotonic() + 120, settled)
        print(f"{agents} agents own every lane exactly once after {took:.1f} s; settling 3 s more", flush=True)
        await asyncio.sleep(3)
        await coord.close()  # our own polling must not be part of the measurement
        ps = {n: psutil.Process(p.pid) for n, p in fleet.procs.items()}
        before = {n: sum(p.cpu_times()[:2]) for n, p in ps.items()}
        threads0 = {t.id: t.user_time + t.system_time for t in ps[names[0]].threads()}
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        wall = time.monotonic() - t0
        used = {n: sum(p.cpu_times()[:2]) - before[n] for n, p in ps.items()}
        threads1 = {t.id: t.user_time + t.system_time for t in ps[names[0]].threads()}
        split = sorted(((threads1[t] - threads0.get(t, 0.0), t) for t in threads1), reverse=True)
        print(f"  {names[0]} by thread (CPU-s; the first is the event loop's): "
              + ", ".join(f"{tid}={cpu:.2f}" for cpu, tid in split[:6]))
        per = {n: 100 * u / wall for n, u in used.items()}
        for n in names:
            print(f"  {n}: {used[n]:.2f} CPU-s in {wall:.1f} s = {per[n]:.2f} % of a core")
        total = sum(used.values())
        print(f"total {total:.2f} CPU-s in {wall:.1f} s for {agents} idle agents over {len(ctx.lanes)} lanes")
        target("scale", f"idle agent CPU (max of {agents}, {len(ctx.lanes)} lanes)", max(per.values()), "<=", 0.5,
               unit=" %", detail=f"mean {sum(per.values()) / agents:.2f} %")
    finally:
        fleet.stop()


async def run_settle(ctx: Context, cfg: Path, base: Path, agents: int, kill: int, ttl: float,
                     stagger: float) -> None:
    coord = make_coordinator(ctx)
    await coord.connect()
    names = [f"n{i:03d}" for i in range(agents)]
    t0 = time.monotonic()
    fleet = Fleet(cfg, base)
    supervisor = asyncio.get_running_loop().create_task(fleet.supervise())
    fair = len(ctx.lanes) / agents
    try:
        await fleet.start_all(names, stagger)
        print(f"{agents} agents started in {time.monotonic() - t0:.1f} s ({stagger:g} s apart)", flush=True)
        live = set(names)

        async def registered() -> bool:
            _owners, records = await snapshot(coord, ctx)
            return set(records) >= live

        await wait_for("every agent to register", time.monotonic() + 180, registered)
        t_reg = time.monotonic() - t0
        print(f"all {agents} registered after {t_reg:.1f} s from the first start ({fleet.restarts} restarts)",
              flush=True)

        async def settled() -> bool:
            owners, records = await snapshot(coord, ctx)
            return owned_once(ctx, owners, records, live)

        await wait_for("every lane owned exactly once", time.monotonic() + 180, settled)
        t_set = time.monotonic() - t0
        owners, _ = await retry_snapshot(coord, ctx)
        share = Counter(o for o in owners.values() if o)
        print(f"every lane owned exactly once after {t_set:.1f} s from start "
              f"({t_set - t_reg:.1f} s after the last registration); max share {max(share.values())} "
              f"against fair {fair:.1f}", flush=True)
        await asyncio.sleep(10)
        owners, records = await retry_snapshot(coord, ctx)
        share = Counter(o for o in owners.values() if o)
        unowned = sum(1 for lane in ctx.lanes if owners.get(lane) is None)
        once = owned_once(ctx, owners, records, live)
        print(f"10 s later: owned exactly once {once}, unowned {unowned}, max share {max(share.values())} "
              f"(fair {fair:.1f})", flush=True)
        target("scale", f"{agents} agents: settled (every lane owned exactly once), from start", t_set, "<=", 60,
               unit=" s")
        target("scale", f"{agents} agents: max share / fair share, 10 s after settling",
               max(share.values()) / fair, "<=", 2.0, detail=f"unowned {unowned}, exactly once {once}")

        victims = names[:kill]
        held = [lane for lane, o in owners.items() if o in victims]
        for v in victims:
            fleet.kill(v)
        killed = time.monotonic()
        live -= set(victims)

        async def reowned() -> bool:
            owners, _records = await snapshot(coord, ctx)
            return all(owners.get(lane) in live for lane in held)

        took = await wait_for("the killed agents' lanes to be re-owned", killed + ttl + 60, reowned)
        print(f"SIGKILL of {kill} agents ({len(held)} lanes): re-owned after {took:.1f} s (TTL {ttl:g} s)", flush=True)
        settle_after = await wait_for("every lane owned exactly once after the kill", killed + ttl + 60, settled)
        print(f"  every lane owned exactly once again after {settle_after:.1f} s", flush=True)
        target("scale", f"{agents} agents, SIGKILL of {kill}: lanes re-owned", took, "<=", ttl + 3, unit=" s")
        print(f"agent restarts by the supervisor: {fleet.restarts}")
    finally:
        supervisor.cancel()
        await coord.close()
        fleet.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["idle", "settle"])
    ap.add_argument("--agents", type=int, default=None, help="idle: 5, settle: 30")
    ap.add_argument("--lanes", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=20.0, help="idle: measurement window")
    ap.add_argument("--kill", type=int, default=5, help="settle: agents SIGKILLed after settling")
    ap.add_argument("--ttl", type=float, default=5.0)
    ap.add_argument("--keepalive", type=float, default=1.0)
    ap.add_argument("--stagger", type=float, default=0.3, help="seconds between two agent starts")
    ap.add_argument("--no-nats", action="store_true", help="no nats-server (the agents' bus keeps retrying)")
    args = ap.parse_args()
    agents = args.agents or (5 if args.mode == "idle" else 30)
    with tempfile.TemporaryDirectory(prefix="cbctl-bench-scale-") as tmp:
        base = Path(tmp)
        etcd = EtcdServer(base).start()
        redis = RedisServer(base).start()
        nats = None if args.no_nats else NatsServer(base).start()
        try:
            cfg = base / "cbctl.toml"
            write_cfg(cfg, f"scale{os.getpid()}", etcd.client_url, redis.url, args.lanes, args.ttl, args.keepalive,
                      nats.url if nats else None)
            ctx = load_config(cfg).context()

            async def go() -> None:
                coord = make_coordinator(ctx)
                await coord.connect()
                try:
                    cp = ControlPlane(ctx, coord)
                    await cp.commit(await cp.plan_advance(1), reason="bench scale")
                finally:
                    await coord.close()
                if args.mode == "idle":
                    await run_idle(ctx, cfg, base, agents, args.seconds, args.stagger)
                else:
                    await run_settle(ctx, cfg, base, agents, args.kill, args.ttl, args.stagger)

            asyncio.run(go())
        finally:
            if nats is not None:
                nats.stop()
            redis.stop()
            etcd.stop()


if __name__ == "__main__":
    main()
