"""The bridge's de-duplication state is bounded by configuration, not by uptime, and still
de-duplicates when a copy comes after both JetStream's duplicate window and the bridge's own
event-id window (an outbox drained long after an outage), also for a workflow whose ordering
state was evicted meanwhile.

The first tests measure the compact structures directly (tracemalloc: bytes per entry); the last
runs a real bridge on a real nats-server."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import nats as nats_client
import pytest

from cbctl.core.agent.bus.bridge import Bridge
from cbctl.core.agent.bus.dedup import Forgotten as _Forgotten, IdWindow as _IdWindow, MsgWindow as _MsgWindow
from cbctl.core.backends.nats.stream import ensure_stream
from cbctl.core.model.config import StreamConfig
from cbctl.core.model.events import deterministic_event_id, encode_event, msg_id, subject
from cbctl.core.model.metrics import AgentMetrics
from cbctl.sandbox import NatsServer, async_wait_until
from tests.support.events import collect, ev
from tests.support.metrics import sample

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CLUSTER = "bm"
NODE = "node-m"


def allocated(build: Any) -> tuple[Any, int]:
    """``build()``'s result and the bytes it still holds (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        obj = build()
        gc.collect()
        return obj, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_event_id_window_is_compact_and_bounded_by_count_and_age() -> None:
    n = 100_000
    ids = [deterministic_event_id(f"wf-{i // 5}", i % 5 + 1) for i in range(n)]

    def fill() -> _IdWindow:
        w = _IdWindow(max_ids=1_000_000, max_age=3600)
        for i, e in enumerate(ids):
            w.add(e, i / 1000)
        return w

    w, size = allocated(fill)
    assert len(w) == n and ids[0] in w and ids[-1] in w
    per_id = size / n
    print(f"event-id window: {per_id:.0f} bytes per id")
    assert per_id < 120  # was about 300 as str keys of an OrderedDict
    # Count bound: never more than max_ids (+ one generation being filled).
    w = _IdWindow(max_ids=8_000, max_age=3600)
    for i, e in enumerate(ids):
        w.add(e, i / 1000)
        assert len(w) <= 8_000 + 1_000
    assert ids[-1] in w and ids[0] not in w
    # Age bound: ids older than max_age (+ one generation span) are forgotten.
    w = _IdWindow(max_ids=1_000_000, max_age=10)
    for i, e in enumerate(ids[:5000]):
        w.add(e, float(i))  # one id per second
    assert ids[4999] in w and ids[4990] in w and ids[100] not in w
    assert len(w) <= 10 + 10 // 8 + 2
    # A non-hex id (not made by deterministic_event_id) is digested, not kept as a string.
    w.add("some-other-id", 5000.0)
    assert "some-other-id" in w and "some-other-jd" not in w


def test_message_id_window_keeps_only_the_duplicate_window() -> None:
    w = _MsgWindow(window=120.0, max_n=1_000_000)
    for i in range(100_000):  # 400 messages/s of stored time for 250 s
        w.put(f"{deterministic_event_id('wf', i)}.v1", i + 1, 1_700_000_000 + i / 400)
    assert w.get(f"{deterministic_event_id('wf', 99_999)}.v1") == (100_000, pytest.approx(1_700_000_000 + 99_999 / 400, abs=0.002))
    assert w.get(f"{deterministic_event_id('wf', 0)}.v1") is None
    # 120 s at 400/s = 48,000, plus at most two generations (30 s each): one being filled and
    # one whose expiry is checked at the next rotation.  Older entries cannot show a mismatch.
    assert 48_000 <= len(w) <= 48_000 + 2 * 12_000

    def fill() -> _MsgWindow:
        m = _MsgWindow(window=1e9, max_n=1_000_000)
        for i in range(50_000):
            m.put(f"{deterministic_event_id('wf', i)}.v1", i + 1, 1_700_000_000 + i / 400)
        return m

    _, size = allocated(fill)
    print(f"message-id window: {size / 50_000:.0f} bytes per message")
    assert size / 50_000 < 130  # was about 280 (str key, tuple of int and float, ordered dict)


def test_forgotten_workflows_cost_about_16_bytes_each_once_frozen() -> None:
    def fill() -> _Forgotten:
        f = _Forgotten(max_n=1_000_000, max_age=3600, generations=12)
        for i in range(120_000):
            f.put(f"sbx-{i:09d}", i % 7 + 1, i / 100)  # 100 workflows/s for 20 minutes
        return f

    f, size = allocated(fill)
    assert len(f) == 120_000
    print(f"forgotten workflows: {size / 120_000:.0f} bytes per workflow")
    assert size / 120_000 < 40  # mostly frozen into sorted arrays; the live generation is a dict
    assert f.pop("sbx-000000000") == 1 and f.pop("sbx-000119999") == 119_999 % 7 + 1 and f.pop("nope") is None
    # Age and count bounds.
    f = _Forgotten(max_n=10_000, max_age=60, generations=6)
    for i in range(50_000):
        f.put(f"w{i}", 3, float(i))
        assert len(f) <= 10_000 + 1
    assert f.pop("w0") is None and f.pop("w49999") == 3


@pytest.fixture
async def js(nats: NatsServer) -> AsyncIterator[Any]:
    nc = await nats_client.connect(nats.url)
    yield nc
    await nc.close()


async def test_copies_after_both_windows_of_an_evicted_workflow_are_not_delivered_again(js: Any) -> None:
    """wf-old is released, then evicted from the ordering state (``max_workflows`` 3) and its ids
    leave the event-id window (1.5 s); copies of its events stored again after JetStream's 1 s
    window (what an outbox drained after an outage does) are suppressed, and its next event is
    delivered in order.  Before the compact record of evicted workflows the copies would have
    started the workflow afresh."""
    cfg = StreamConfig(name="CB_EVENTS", duplicate_window=1)
    jsc = js.jetstream()
    await ensure_stream(jsc, cfg, cluster=CLUSTER)
    m = AgentMetrics(NODE)
    bridge = Bridge(js, cfg, m, NODE, cluster=CLUSTER, mode="streaming", deliver_new=False, gap_timeout=0.3,
                    give_up_after=0.6, dedup_max_age=1.5, max_workflows=3)
    await bridge.start()

    async def put(e: Any) -> None:
        await jsc.publish(subject(CLUSTER, 1, e.workflow_id), encode_event(e, 1),
                          headers={"Nats-Msg-Id": msg_id(e.event_id, 1)})

    try:
        sub = bridge.subscribe(None, "sse")
        old = [ev("wf-old", s) for s in (1, 2, 3)]
        for e in old:
            await put(e)
        assert [e.seq for e in await collect(sub, 3)] == [1, 2, 3]
        k = 0

        async def old_forgotten() -> bool:
            # Other workflows keep the bridge busy (this also evicts wf-old and ages the window).
            nonlocal k
            k += 1
            await put(ev(f"wf-other-{k}", 1))
            await collect(sub, 1)
            return "wf-old" not in bridge._workflows and old[0].event_id not in bridge._seen_ids

        await async_wait_until(old_forgotten, 20, interval=0.1, message="wf-old evicted and its ids expired")
        assert len(bridge._forgotten) >= 1
        dup_before = sample(m, "event_bus_bridge_duplicates_suppressed_total")
        for e in old:  # stored again: JetStream's 1 s window has long passed
            await put(e)
        await put(ev("wf-old", 4))
        got = await sub.next(5)
        assert (got.workflow_id, got.seq) == ("wf-old", 4), got
        assert sample(m, "event_bus_bridge_duplicates_suppressed_total") - dup_before == 3
        assert sample(m, "event_bus_bridge_ordering_violations_total") == 0
        assert sub.pending() == 0
    finally:
        await bridge.close()
