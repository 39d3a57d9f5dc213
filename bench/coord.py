"""Coordinator overhead: EtcdCoordinator against raw aetcd, in the same run, on the same etcd.

Measured (each case interleaved ours/raw over several rounds, so machine noise hits both alike;
the best round of each is compared):

* CAS writes/s, sequential: ``commit(key, expected_revision=rev)`` chained on one key, vs an aetcd
  transaction of the same shape (compare mod_revision, put, failure get).
* CAS writes/s, 64 concurrent: 64 tasks, each chaining CAS on its own key.
* put -> watch latency (median, p99): a put, timed until the watcher task receives the event;
  through ``put`` + ``watch`` vs aetcd ``put`` + ``watch``.

Targets: throughput ratio ours/raw >= 0.8; p99 overhead <= 1 ms.
Starts its own etcd (cbctl.sandbox). Run: .venv/bin/python bench/coord.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import aetcd
from aetcd import transactions

from cbctl.core.backends.coord.etcd import EtcdCoordinator
from cbctl.sandbox import EtcdServer

try:
    from bench.report import target
except ModuleNotFoundError:  # run as a script (python bench/<name>.py): bench/ is sys.path[0]
    from report import target  # type: ignore[no-redef]

ROUNDS = 3
SEQ_OPS = 1500
CONCURRENCY = 64
CONC_OPS_PER_TASK = 40
LATENCY_SAMPLES = 1000


# -- CAS throughput --------------------------------------------------------------------------

async def cas_ours(coord: EtcdCoordinator, key: str, n: int) -> None:
    rev = await coord.put(key, b"0")
    for i in range(n):
        rev = await coord.commit(key, b"%d" % i, expected_revision=rev)


async def cas_raw(client: aetcd.Client, key: str, n: int) -> None:
    k = key.encode()
    rev = (await client.put(k, b"0")).header.revision
    for i in range(n):
        ok, responses = await client.transaction(
            [transactions.Mod(k) == rev], [transactions.Put(k, b"%d" % i)], [transactions.Get(k)]
        )
        assert ok
        rev = responses[0].response_put.header.revision


async def rate(run: Callable[[str, int], Awaitable[None]], prefix: str, tasks: int, per_task: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(run(f"{prefix}/{t}", per_task) for t in range(tasks)))
    return tasks * per_task / (time.perf_counter() - start)


# -- put -> watch latency --------------------------------------------------------------------

async def latency_ours(coord: EtcdCoordinator, key: str, n: int) -> list[float]:
    got: asyncio.Queue[float] = asyncio.Queue()
    start = await coord.current_revision() + 1

    async def consume() -> None:
        async for _ in coord.watch(key, start_revision=start):
            got.put_nowait(time.perf_counter())

    task = asyncio.get_running_loop().create_task(consume())
    try:
        return await _timed_puts(lambda: coord.put(key, b"x"), got, n)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def latency_raw(client: aetcd.Client, key: str, n: int) -> list[float]:
    got: asyncio.Queue[float] = asyncio.Queue()
    k = key.encode()
    watch = await client.watch(k)

    async def consume() -> None:
        async for _ in watch:
            got.put_nowait(time.perf_counter())

    task = asyncio.get_running_loop().create_task(consume())
    try:
        return await _timed_puts(lambda: client.put(k, b"x"), got, n)
    finally:
        await watch.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _timed_puts(put: Callable[[], Awaitable[object]], got: asyncio.Queue[float], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await put()
        t1 = await asyncio.wait_for(got.get(), 5)
        samples.append(t1 - t0)
    return samples


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


# -- main ------------------------------------------------------------------------------------

async def bench(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    coord = EtcdCoordinator([url], timeout=5.0)
    raw = aetcd.Client(host=host, port=int(port), timeout=5)
    await coord.connect()
    await raw.connect()
    ok = True
    try:
        # Warm both paths (channels, first-call costs).
        await cas_ours(coord, "/bench/warm-ours", 50)
        await cas_raw(raw, "/bench/warm-raw", 50)

        seq = {"ours": [], "raw": []}
        conc = {"ours": [], "raw": []}
        for r in range(ROUNDS):
            seq["raw"].append(await rate(lambda k, n: cas_raw(raw, k, n), f"/bench/seq-raw{r}", 1, SEQ_OPS))
            seq["ours"].append(await rate(lambda k, n: cas_ours(coord, k, n), f"/bench/seq-ours{r}", 1, SEQ_OPS))
            conc["raw"].append(await rate(lambda k, n: cas_raw(raw, k, n), f"/bench/c-raw{r}", CONCURRENCY,
                                          CONC_OPS_PER_TASK))
            conc["ours"].append(await rate(lambda k, n: cas_ours(coord, k, n), f"/bench/c-ours{r}", CONCURRENCY,
                                           CONC_OPS_PER_TASK))
        for name, d in (("CAS sequential", seq), (f"CAS {CONCURRENCY} concurrent", conc)):
            ours, base = max(d["ours"]), max(d["raw"])
            ratio = ours / base
            print(f"{name:<22} ours {ours:8.0f}/s   raw aetcd {base:8.0f}/s   ratio {ratio:5.2f}")
            ok &= target("coord", f"{name} ours/raw", ratio, ">=", 0.8)

        lat: dict[str, list[list[float]]] = {"ours": [], "raw": []}
        for r in range(ROUNDS):
            lat["raw"].append(await latency_raw(raw, f"/bench/lat-raw{r}", LATENCY_SAMPLES))
            lat["ours"].append(await latency_ours(coord, f"/bench/lat-ours{r}", LATENCY_SAMPLES))
        best = {k: min(v, key=p99) for k, v in lat.items()}
        med = {k: statistics.median(v) * 1000 for k, v in best.items()}
        tail = {k: p99(v) * 1000 for k, v in best.items()}
        overhead = tail["ours"] - tail["raw"]
        print(f"{'put->watch latency':<22} ours median {med['ours']:.2f} ms p99 {tail['ours']:.2f} ms   "
              f"raw median {med['raw']:.2f} ms p99 {tail['raw']:.2f} ms")
        print(f"{'':<22} median ratio {med['ours'] / med['raw']:.2f}")
        ok &= target("coord", "put->watch p99 overhead", overhead, "<=", 1.0, unit=" ms")
    finally:
        await coord.close()
        await raw.close()
    return ok


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="cbctl-bench-coord-") as tmp:
        server = EtcdServer(tmp, name="bench-etcd")
        server.start()
        try:
            ok = asyncio.run(bench(server.client_url))
        finally:
            server.stop()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
