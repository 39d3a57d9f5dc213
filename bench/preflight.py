"""Preflight wall time with 50 registered nodes (target <= 2 s), against real services.

Starts etcd, nats-server (JetStream, the event stream created), redis-server and prometheus
(scraping one real /metrics endpoint) on loopback; writes 50 node records attached to a lease,
each with fresh probe reports and a clock report, as agents would; then runs `cbctl preflight`
as a real process (what an operator waits for, interpreter start-up included) and in-process
(the checks alone).  Baseline measured in the same run: `cbctl stage status` (process start-up
plus one store round trip), so the ratio says what the checks add.

Run: .venv/bin/python bench/preflight.py
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import start_http_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbctl.core.model import keys  # noqa: E402
from cbctl.core.operator.preflight import run_preflight  # noqa: E402
from cbctl.core.operator.preflight_report import PreflightOptions  # noqa: E402
from cbctl.core.model.config import load_config  # noqa: E402
from cbctl.core.backends.coord import make_coordinator  # noqa: E402
from cbctl.core.model.metrics import AgentMetrics  # noqa: E402
from cbctl.sandbox import EtcdServer, NatsServer, PrometheusServer, RedisServer, free_port  # noqa: E402
from cbctl.sandbox.waiting import wait_until  # noqa: E402

try:
    from bench.report import target
except ModuleNotFoundError:  # run as a script (python bench/<name>.py): bench/ is sys.path[0]
    from report import target  # type: ignore[no-redef]

NODES = 50
RUNS = 7
CBCTL = str(Path(sys.executable).parent / "cbctl")
TARGET_S = 2.0


def write_config(path: Path, cluster: str, etcd: str, nats: str, redis: str, prom: str) -> None:
    import tomli_w

    ctx = {
        "cluster": cluster, "lane-count": 16,
        "coordination": {"endpoints": [etcd]}, "nats": {"servers": [nats]}, "redis": {"url": redis},
        "prometheus": {"url": prom}, "ntp-servers": ["127.0.0.1:123"],
        "expected-nodes": [f"node-{i:02d}" for i in range(NODES)],
    }
    path.write_bytes(tomli_w.dumps({"current-context": "bench", "contexts": {"bench": ctx}}).encode())


async def setup_store(cfg: Path, nats_url: str) -> None:
    from cbctl.core.backends.nats.connect import connect_nats
    from cbctl.core.backends.nats.stream import ensure_stream

    ctx = load_config(cfg).context()
    nc = await connect_nats(ctx.nats, name="bench")
    await ensure_stream(nc.jetstream(), ctx.nats.stream, cluster=ctx.cluster)
    await nc.close()
    coord = make_coordinator(ctx)
    await coord.connect()
    lease = await coord.grant_lease(600)
    now = time.time()
    probes = {b: {"ok": True, "detail": "ok", "at": now, "ms": 1.0} for b in ("etcd", "nats", "redis")}
    for i in range(NODES):
        node = f"node-{i:02d}"
        rec = {"node_id": node, "machine_id": f"m-{i}", "instance_id": f"i-{i}", "host": "bench", "pid": i,
               "applied_revision": 0, "heartbeat": now, "probes": probes,
               "clock": {"offset_ms": (i % 7) * 1.5, "source": "127.0.0.1:123", "at": now, "error": None}}
        await coord.put(keys.node(ctx.cluster, node), json.dumps(rec).encode(), lease=lease)
        await coord.put(keys.identity(ctx.cluster, node), json.dumps({"node_id": node, "machine_id": f"m-{i}"}).encode())
    await coord.close()


async def in_process(cfg: Path) -> float:
    ctx = load_config(cfg).context()
    coord = make_coordinator(ctx)
    t0 = time.perf_counter()
    report = await run_preflight(ctx, coord, PreflightOptions())
    elapsed = time.perf_counter() - t0
    await coord.close()
    bad = [c for c in report.checks if c.status == "fail"]
    if bad:
        raise SystemExit(f"preflight failed in the bench setup: {bad}")
    return elapsed


def wall(argv: list[str], cfg: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env={"CBCTL_CONFIG": str(cfg), "NO_COLOR": "1", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-preflight-"))
    services = [EtcdServer(base / "etcd"), NatsServer(base / "nats"), RedisServer(base / "redis"),
                PrometheusServer(base / "prom")]
    etcd, nats, redis, prom = services
    metrics = AgentMetrics("node-00")
    port = free_port()
    http, _ = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        for s in services:
            s.start()
        prom.set_targets([(f"127.0.0.1:{port}", {"node": "node-00"})])
        cfg = base / "config.toml"
        write_config(cfg, "bench", etcd.client_url, nats.url, redis.url, prom.url)
        asyncio.run(setup_store(cfg, nats.url))
        import httpx

        wait_until(lambda: "event_bus_degraded" in httpx.get(f"{prom.url}/api/v1/label/__name__/values").json()["data"],
                   20, interval=0.1, message="prometheus scraped the exporter")
        core = [asyncio.run(in_process(cfg)) for _ in range(RUNS)]
        proc, baseline = [], []
        for _ in range(RUNS):  # interleaved, so machine noise hits both alike
            proc.append(wall([CBCTL, "preflight", "-o", "json"], cfg))
            baseline.append(wall([CBCTL, "stage", "status", "-o", "json"], cfg))
        p, b, c = statistics.median(proc), statistics.median(baseline), statistics.median(core)
        print(f"nodes registered                 {NODES}")
        print(f"preflight checks only (in-proc)  median {c * 1000:7.1f} ms")
        print(f"cbctl preflight (process)        median {p * 1000:7.1f} ms   max {max(proc) * 1000:7.1f} ms")
        print(f"cbctl stage status (baseline)    median {b * 1000:7.1f} ms")
        print(f"ratio preflight / stage status   {p / b:5.2f}")
        target("preflight", f"cbctl preflight, {NODES} nodes (max)", max(proc), "<=", TARGET_S, unit=" s")
    finally:
        http.shutdown()
        for s in reversed(services):
            s.stop()


if __name__ == "__main__":
    main()
