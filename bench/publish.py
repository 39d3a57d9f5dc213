"""Publisher throughput against raw nats-py ``publish_async`` of the same payloads, same run.

Both sides send the same number of messages with a ``Nats-Msg-Id`` header to the same stream on a
fresh nats-server (file storage), interleaved over several rounds so machine noise hits both
alike; the median of each is compared.  The publisher side includes everything a caller pays:
encoding the event, the queue, retries armed (3), per-event futures, metrics.

Cases:
  raw            publish_async for every pre-encoded message, then publish_async_completed()
  publish_many   Publisher.publish_many(events): one caller handing over a batch
  concurrent     64 caller tasks, each awaiting Publisher.publish(event) one at a time
                 (the agent's shape: many lane workers, each waiting for its own ack)
  sequential     one caller awaiting each publish (latency bound; for reference)

Target: publish_many / raw >= 0.70 (issue 4).
Run: .venv/bin/python bench/publish.py [--events N] [--rounds R] [--url nats://...]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats

from cbctl.core.backends.nats.connect import connect_nats
from cbctl.core.agent.bus.outbox import Outbox
from cbctl.core.agent.bus.publisher import Publisher
from cbctl.core.backends.nats.stream import ensure_stream
from cbctl.core.model.config import NatsConfig, StreamConfig
from cbctl.core.model.events import Event, encode_event, make_event, msg_id, subject
from cbctl.core.model.metrics import AgentMetrics

try:
    from bench.report import target
except ModuleNotFoundError:  # run as a script (python bench/<name>.py): bench/ is sys.path[0]
    from report import target  # type: ignore[no-redef]

STREAM = StreamConfig(name="CB_BENCH")
CLUSTER = "bench"  # subjects cb.bench.events.v<N>.<workflow>


def make_events(n: int, run: str) -> list[Event]:
    payload = {"result": "ok", "duration_ms": 1234, "detail": "x" * 120}
    return [
        make_event(workflow_id=f"wf-{run}-{i % 100}", seq=i // 100 + 1, type="task.completed", lane="lane-07",
                   node_id="bench", task_id=f"task-{i}", payload=payload)
        for i in range(n)
    ]


async def raw(js, events: list[Event]) -> float:  # type: ignore[no-untyped-def]
    msgs = [(subject(CLUSTER, 1, e.workflow_id), encode_event(e, 1), msg_id(e.event_id, 1)) for e in events]
    start = time.perf_counter()
    for subject, data, mid in msgs:
        await js.publish_async(subject, data, headers={"Nats-Msg-Id": mid})
    await js.publish_async_completed()
    return len(msgs) / (time.perf_counter() - start)


async def publish_many(pub: Publisher, events: list[Event]) -> float:
    start = time.perf_counter()
    statuses = await pub.publish_many(events)
    elapsed = time.perf_counter() - start
    assert set(statuses) == {"ok"}, set(statuses)
    return len(events) * len(pub.schema_versions) / elapsed


async def concurrent(pub: Publisher, events: list[Event], callers: int = 64) -> float:
    async def worker(chunk: list[Event]) -> None:
        for e in chunk:
            assert await pub.publish(e) == "ok"

    start = time.perf_counter()
    await asyncio.gather(*(worker(events[i::callers]) for i in range(callers)))
    return len(events) / (time.perf_counter() - start)


async def sequential(pub: Publisher, events: list[Event]) -> float:
    start = time.perf_counter()
    for e in events:
        assert await pub.publish(e) == "ok"
    return len(events) / (time.perf_counter() - start)


async def bench(url: str, n: int, rounds: int, state: Path) -> None:
    cfg = NatsConfig(servers=(url,), stream=STREAM)
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=max(4096, n * 2))
    await ensure_stream(js, STREAM, cluster=CLUSTER)
    outbox = Outbox(state / "outbox.db")
    pub = Publisher(lambda: connect_nats(cfg, name="bench"), STREAM, outbox, AgentMetrics("bench"), "bench", cluster=CLUSTER,
                    publish_mode="on", schema_versions=[1])
    await pub.start()
    results: dict[str, list[float]] = {"raw": [], "publish_many": [], "concurrent": [], "sequential": [],
                                       "dual publish_many (msgs/s)": []}
    # Warm-up: connection buffers, JIT-less but cache-warm code paths.
    await raw(js, make_events(2000, "warm-raw"))
    await publish_many(pub, make_events(2000, "warm-pub"))
    paired: list[float] = []  # publish_many / raw measured back to back, per round
    for r in range(rounds):
        tag = f"{r}-{uuid.uuid4().hex[:6]}"
        # Alternate which side goes first so a drift in machine load favours neither.
        if r % 2 == 0:
            raw_rate = await raw(js, make_events(n, f"raw{tag}"))
            pm_rate = await publish_many(pub, make_events(n, f"pm{tag}"))
        else:
            pm_rate = await publish_many(pub, make_events(n, f"pm{tag}"))
            raw_rate = await raw(js, make_events(n, f"raw{tag}"))
        results["raw"].append(raw_rate)
        results["publish_many"].append(pm_rate)
        paired.append(pm_rate / raw_rate)
        results["concurrent"].append(await concurrent(pub, make_events(n, f"cc{tag}")))
        results["sequential"].append(await sequential(pub, make_events(min(n, 2000), f"sq{tag}")))
        pub.apply_flags("on", [1, 2])
        results["dual publish_many (msgs/s)"].append(await publish_many(pub, make_events(n // 2, f"dp{tag}")))
        pub.apply_flags("on", [1])
    await pub.close()
    outbox.close()
    await nc.close()

    base = statistics.median(results["raw"])
    print(f"events per round: {n}, rounds: {rounds}, server: {url}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:<28} median {med:9.0f} /s   ratio to raw {med / base:5.2f}   "
              f"(min {min(values):.0f}, max {max(values):.0f})")
    ratio = statistics.median(paired)
    print(f"paired ratios publish_many/raw per round: {', '.join(f'{x:.2f}' for x in paired)}")
    target("publish", "publish_many / raw (median of paired ratios)", ratio, ">=", 0.7)


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # the degraded-mode warnings are expected here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--url", help="use this nats-server instead of starting one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cbctl-bench-") as tmp:
        if args.url:
            asyncio.run(bench(args.url, args.events, args.rounds, Path(tmp)))
            return
        from cbctl.sandbox import NatsServer

        with NatsServer(tmp) as server:
            asyncio.run(bench(server.url, args.events, args.rounds, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
