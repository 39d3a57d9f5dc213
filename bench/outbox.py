"""Outbox: append rate (fsync'd), degraded-mode publish rate, and drain rate into JetStream.

  append x1          Outbox.append of one message per transaction (one fsync each)
  append x100        100 messages per transaction
  buffered publish   Publisher.publish_many with the bus unreachable: everything goes to the
                     outbox (group commit per batch), the rate a degraded agent keeps accepting
  64 callers         64 tasks awaiting Publisher.publish each, bus unreachable
  drain              a full outbox drained by a starting Publisher (read N rows, publish_async,
                     wait for acks, delete acked rows in one transaction), against raw
                     publish_async of the same messages in the same run

Target: drain >= 5,000 events/s (issue 4).
Run: .venv/bin/python bench/outbox.py [--events N] [--url nats://...]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats

from cbctl.core.backends.nats.connect import connect_nats
from cbctl.core.agent.bus.outbox import Outbox, OutboxMessage
from cbctl.core.agent.bus.publisher import Publisher
from cbctl.core.backends.nats.stream import ensure_stream
from cbctl.core.model.config import NatsConfig, StreamConfig
from cbctl.core.model.events import Event, encode_event, make_event, msg_id, subject
from cbctl.core.model.metrics import AgentMetrics
from cbctl.sandbox import free_port

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


def messages(events: list[Event]) -> list[OutboxMessage]:
    return [OutboxMessage(subject(CLUSTER, 1, e.workflow_id), msg_id(e.event_id, 1), e.workflow_id, encode_event(e, 1))
            for e in events]


def bench_append(state: Path, n: int) -> None:
    msgs = messages(make_events(n, "append"))
    with Outbox(state / "append1.db") as ob:
        k = min(n, 2000)
        start = time.perf_counter()
        for m in msgs[:k]:
            ob.append([m])
        rate1 = k / (time.perf_counter() - start)
    with Outbox(state / "append100.db") as ob:
        start = time.perf_counter()
        for i in range(0, n, 100):
            ob.append(msgs[i : i + 100])
        rate100 = n / (time.perf_counter() - start)
    print(f"{'append x1 (fsync each)':<34} {rate1:9.0f} msgs/s")
    print(f"{'append x100 per transaction':<34} {rate100:9.0f} msgs/s")


async def bench_buffered(state: Path, n: int) -> None:
    down = NatsConfig(servers=(f"nats://127.0.0.1:{free_port()}",), stream=STREAM)  # nothing listens
    ob = Outbox(state / "buffered.db")
    pub = Publisher(lambda: connect_nats(down, name="bench"), STREAM, ob, AgentMetrics("bench"), "bench", cluster=CLUSTER,
                    publish_mode="on")
    await pub.start()
    events = make_events(n, "buf")
    start = time.perf_counter()
    statuses = await pub.publish_many(events)
    rate_many = n / (time.perf_counter() - start)
    assert set(statuses) == {"buffered"}, set(statuses)
    events = make_events(n // 4, "buf64")

    async def worker(chunk: list[Event]) -> None:
        for e in chunk:
            assert await pub.publish(e) == "buffered"

    start = time.perf_counter()
    await asyncio.gather(*(worker(events[i::64]) for i in range(64)))
    rate_64 = len(events) / (time.perf_counter() - start)
    await pub.close()
    ob.close()
    print(f"{'buffered publish_many (bus down)':<34} {rate_many:9.0f} events/s")
    print(f"{'buffered, 64 callers (bus down)':<34} {rate_64:9.0f} events/s")


async def bench_drain(url: str, state: Path, n: int) -> float:
    cfg = NatsConfig(servers=(url,), stream=STREAM)
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=n + 10)
    await ensure_stream(js, STREAM, cluster=CLUSTER)
    # Raw baseline: the same kind of messages, publish_async + publish_async_completed.
    raw_msgs = messages(make_events(n, f"raw-{uuid.uuid4().hex[:6]}"))
    start = time.perf_counter()
    for m in raw_msgs:
        await js.publish_async(m.subject, m.payload, headers={"Nats-Msg-Id": m.msg_id})
    await js.publish_async_completed()
    raw_rate = n / (time.perf_counter() - start)

    ob = Outbox(state / "drain.db")
    ob.append(messages(make_events(n, f"drain-{uuid.uuid4().hex[:6]}")))
    m = AgentMetrics("bench")
    pub = Publisher(lambda: connect_nats(cfg, name="bench"), STREAM, ob, m, "bench", cluster=CLUSTER, publish_mode="on")
    start = time.perf_counter()
    await pub.start()  # starts degraded: the outbox is not empty
    while pub.degraded:
        await asyncio.sleep(0.005)  # benchmark timing loop, not test synchronisation
    rate = n / (time.perf_counter() - start)
    ok = m.registry.get_sample_value("event_bus_publish_total", {"status": "ok"})
    assert ok == n and ob.depth == 0, (ok, ob.depth)
    await pub.close()
    ob.close()
    await nc.close()
    print(f"{'raw publish_async (baseline)':<34} {raw_rate:9.0f} msgs/s")
    print(f"{'drain (outbox -> JetStream)':<34} {rate:9.0f} msgs/s   ratio to raw {rate / raw_rate:.2f}")
    return rate


async def run(url: str, state: Path, n: int) -> None:
    bench_append(state, n)
    await bench_buffered(state, n)
    rate = await bench_drain(url, state, n)
    target("outbox", "drain events/s", rate, ">=", 5000, unit="/s")


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # the degraded-mode warnings are expected here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--url", help="use this nats-server instead of starting one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cbctl-bench-") as tmp:
        if args.url:
            asyncio.run(run(args.url, Path(tmp), args.events))
            return
        from cbctl.sandbox import NatsServer

        with NatsServer(tmp) as server:
            asyncio.run(run(server.url, Path(tmp), args.events))


if __name__ == "__main__":
    sys.exit(main())
