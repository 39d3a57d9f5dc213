"""End to end: task state change on one node -> SSE delivery on another node (canonical source).

Starts its own etcd, nats-server (JetStream, file storage) and redis-server (cbctl.sandbox) and
two real `cbctl agent run` processes (node-a, node-b; 8 lanes spread between them), sets the
stage-3 flags (publish on, bridge streaming, source canonical), subscribes to node-b's
``GET /v1/events`` with an SSE client in this process, and enqueues lifecycle transitions at a
fixed rate (default 1,000/s) for ``--seconds``.

Latency of one event = wall time the SSE client parsed it - its ``occurred_at`` (set by the
agent right after the fencing guard applied the state change, before the publish).  Reported
for events applied on node-a (the cross-node path: guard -> publisher -> JetStream -> node-b's
bridge -> SSE) and for all events; the first second is warm-up and not counted.  All clocks are
this machine's.  Also reported: the rate the agents actually applied and the subscriber received.

Run: .venv/bin/python bench/e2e.py [--rate 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import tomli_w

from cbctl.core.backends.redis.client import redis_client_for
from cbctl.core.model.config import load_config
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.model.events import parse_time
from cbctl.core.backends.redis.queue import LaneQueue
from cbctl.core.agent.registration import read_nodes

try:
    from bench.report import target
except ModuleNotFoundError:  # run as a script (python bench/<name>.py): bench/ is sys.path[0]
    from report import target  # type: ignore[no-redef]
from cbctl.core.operator.sse_client import SseParser
from cbctl.sandbox import EtcdServer, NatsServer, RedisServer

CBCTL = str(Path(sys.executable).parent / "cbctl")
FLAGS = {"cluster.enabled": True, "ownership.guard": "enforce", "eventbus.publish": "on",
         "eventbus.bridge": "streaming", "stream.source": "canonical"}
STATES = ("created", "started", "completed")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


async def main(rate: float, seconds: float) -> None:
    base = Path(tempfile.mkdtemp(prefix="cbctl-e2e-"))
    etcd = EtcdServer(base).start()
    nats = NatsServer(base).start()
    redis = RedisServer(base).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cfg = base / "cbctl.toml"
        cfg.write_text(tomli_w.dumps({"current-context": "bench", "contexts": {"bench": {
            "cluster": "e2e", "lane-count": 8,
            "coordination": {"endpoints": [etcd.client_url], "lease-ttl": 6.0, "keepalive-interval": 1.0},
            "redis": {"url": redis.url}, "nats": {"servers": [nats.url]},
        }}}))
        ctx = load_config(cfg).context()
        coord = make_coordinator(ctx)
        await coord.connect()
        cp = ControlPlane(ctx, coord)
        await cp.commit(await cp.plan_flags(FLAGS), reason="bench")
        env = {**os.environ, "CBCTL_CONFIG": str(cfg)}
        env.pop("CBCTL_CONTEXT", None)
        for node in ("node-a", "node-b"):
            log = (base / f"{node}.log").open("wb")
            procs.append(subprocess.Popen([CBCTL, "agent", "run", "--handler", "demo", "--node-id", node, "--state-dir", str(base / node),
                                           "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        addr = None
        for _ in range(200):
            views, _ = await read_nodes(coord, ctx.cluster)
            by = {v.node_id: v for v in views if v.live}
            if len(by) == 2 and all(v.lanes for v in by.values()) and sum(v.lanes for v in by.values()) == 8:
                addr = by["node-b"].http
                break
            await asyncio.sleep(0.1)
        assert addr, "agents did not come up"
        await asyncio.sleep(1.0)  # bridges bound

        lat_remote: list[float] = []
        lat_all: list[float] = []
        received = 0
        t_start = 0.0
        stop = asyncio.Event()

        async def subscriber() -> None:
            nonlocal received
            parser = SseParser()
            async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None), trust_env=False) as client:
                async with client.stream("GET", f"http://{addr}/v1/events", params={"subscriber": "bench"}) as resp:
                    assert resp.status_code == 200, resp.status_code
                    async for line in resp.aiter_lines():
                        msg = parser.feed(line)
                        if msg is None or msg.comment is not None or msg.event == "end":
                            continue
                        now = time.time()
                        ev = json.loads(msg.data)
                        received += 1
                        occurred = parse_time(ev["occurred_at"]).timestamp()
                        if occurred - t_start < 1.0:
                            continue  # warm-up
                        lat = (now - occurred) * 1000
                        lat_all.append(lat)
                        if ev["node_id"] != "node-b":
                            lat_remote.append(lat)

        sub = asyncio.create_task(subscriber())
        await asyncio.sleep(0.3)
        redis_c = redis_client_for(ctx)
        queue = LaneQueue(redis_c, ctx.cluster, ctx.lanes)
        loop = asyncio.get_running_loop()
        t_start = time.time()
        t0 = loop.time()
        n = 0
        total = int(rate * seconds)
        lag_max = 0.0
        # Paced in 10 ms slices; a pipeline per slice keeps the generator itself cheap.
        while n < total:
            due = int((loop.time() - t0) * rate) + 1
            batch = min(total, due) - n
            if batch > 0:
                pipe = redis_c.pipeline(transaction=False)
                for i in range(n, n + batch):
                    wf, step = divmod(i, 3)
                    pipe.xadd(queue.keys.tasks(queue.lane_of(f"e2e-{wf}")), {
                        "workflow_id": f"e2e-{wf}", "task_id": f"e2e-{wf}/t0/{step}", "type": STATES[step],
                        "payload": json.dumps({"task": "t0", "state": STATES[step], "attempt": 1}),
                    })
                await pipe.execute()
                n += batch
            lag_max = max(lag_max, loop.time() - t0 - n / rate)
            await asyncio.sleep(0.01)
        gen_elapsed = loop.time() - t0
        deadline = loop.time() + 30
        while received < total and loop.time() < deadline:
            await asyncio.sleep(0.1)
        recv_elapsed = time.time() - t_start
        sub.cancel()
        await redis_c.aclose()
        await coord.close()
        print(f"e2e: target {rate:.0f} events/s for {seconds:.0f}s; enqueued {total} in {gen_elapsed:.2f}s "
              f"({total / gen_elapsed:.0f}/s); subscriber on node-b received {received}/{total} "
              f"(last at +{recv_elapsed:.2f}s => {received / recv_elapsed:.0f}/s sustained)")
        for name, lat in (("cross-node (applied on node-a)", lat_remote), ("all events", lat_all)):
            if lat:
                print(f"  {name}: n={len(lat)} median {statistics.median(lat):.1f} ms  p90 {pct(lat, 90):.1f} ms  "
                      f"p99 {pct(lat, 99):.1f} ms  max {max(lat):.1f} ms")
        target("e2e", "received / enqueued", received / max(1, total), ">=", 1.0)
        target("e2e", "sustained / offered rate", received / recv_elapsed / rate, ">=", 0.95)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for s in (redis, nats, etcd):
            s.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    asyncio.run(main(args.rate, args.seconds))
