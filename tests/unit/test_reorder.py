"""The shared per-workflow reorder buffer (cbctl/core/agent/bus/reorder.py) and its two users'
release rules: the bridge's sequencer (contiguous) and the local stream (below the lowest seq in
flight)."""

from __future__ import annotations

from cbctl.core.agent.bus.local_stream import LocalStream
from cbctl.core.agent.bus.reorder import MAX_SKIPPED, ReorderBuffer, SeqOrder
from cbctl.core.agent.bus.sequencer import Sequencer
from cbctl.core.model.events import Event, make_event
from cbctl.core.model.metrics import AgentMetrics


def ev(seq: int, workflow_id: str = "wf-1") -> Event:
    return make_event(workflow_id=workflow_id, seq=seq, type="task", lane="lane-1", node_id="n1", task_id=None,
                      payload={"seq": seq})


def test_contiguous_release_waits_for_the_next_seq() -> None:
    o = SeqOrder()
    assert o.hold(ev(2)) and o.hold(ev(3))
    assert not o.hold(ev(2))  # held already
    assert [e.seq for e in o.pop_contiguous()] == [] and o.last == 0
    assert o.hold(ev(1))
    assert [e.seq for e in o.pop_contiguous()] == [1, 2, 3]
    assert o.last == 3 and not o.held
    assert o.released(3) and o.released(1) and not o.released(4)


def test_release_below_the_lowest_in_flight_skips_legitimate_gaps() -> None:
    o = SeqOrder()
    for s in (2, 5, 9):
        o.hold(ev(s))
    assert [e.seq for e in o.pop_before(1)] == []  # seq 1 in flight: 2 waits
    assert [e.seq for e in o.pop_before(5)] == [2, 5]  # 3, 4 never reserved: no wait; 5 itself goes
    assert [e.seq for e in o.pop_before(None)] == [9]
    assert o.last == 9


def test_skipped_seqs_are_reported_once_and_bounded() -> None:
    o = SeqOrder()
    assert not o.late_skipped(4)
    o.skip([4, 5])
    assert o.late_skipped(4) and not o.late_skipped(4)  # once: its loss is not counted twice
    o.skip(range(10, 10 + 2 * MAX_SKIPPED))
    assert o.skipped is not None and len(o.skipped) == MAX_SKIPPED
    assert min(o.skipped) == 10 + MAX_SKIPPED  # the most recent kept
    assert not o.late_skipped(5)


def test_start_at_and_drop_held_released() -> None:
    o = SeqOrder()
    for s in (3, 4, 8):
        o.hold(ev(s))
    o.start_at(5)
    assert o.last == 4
    assert o.drop_held_released() == 2 and list(o.held) == [8]


def test_buffer_evicts_least_recently_active_idle_workflows_only() -> None:
    evicted: list[str] = []
    buf: ReorderBuffer[SeqOrder] = ReorderBuffer(2, lambda st: not st.held, lambda wid, _st: evicted.append(wid))
    busy = buf.state("a", SeqOrder)
    busy.hold(ev(5, "a"))
    buf.state("b", SeqOrder)
    buf.state("c", SeqOrder)  # over the bound: "a" is oldest but busy, "b" goes
    assert evicted == ["b"] and "a" in buf and "c" in buf and "b" not in buf
    assert buf.state("a", SeqOrder) is busy  # kept, not re-created
    busy.held.clear()
    buf.state("c", SeqOrder)  # touched: "a" is now the least recently active
    buf.state("d", SeqOrder)
    assert evicted == ["b", "a"] and list(buf) == ["c", "d"] and len(buf) == 2
    assert buf.get("a") is None


def test_local_stream_holds_behind_a_reserved_seq_only() -> None:
    ls = LocalStream()
    sub = ls.subscribe("wf-1")
    ls.reserve("wf-1", 1)
    ls.publish(ev(2))
    assert sub._queue.empty() and ls.stats.held == 1
    ls.publish(ev(1))
    got = [sub._queue.get_nowait().seq for _ in range(sub._queue.qsize())]  # type: ignore[union-attr]
    assert got == [1, 2]
    ls.publish(ev(1))
    assert sub._queue.empty() and ls.stats.duplicates == 1
    ls.close_all()


class _Collect(Sequencer):
    def __init__(self, **kw: object) -> None:
        opts: dict = dict(gap_timeout=0.5, give_up_after=60.0, filler=None, dedup_max_ids=1000, dedup_max_age=60.0,
                          max_workflows=100, forget_max=100, forget_max_age=60.0, max_held=100, history=4,
                          history_workflows=10, deliver_new=True)
        opts.update(kw)
        super().__init__(AgentMetrics("n1"), **opts)  # type: ignore[arg-type]
        self.out: list[tuple[str, int]] = []

    def _deliver(self, e: Event) -> None:
        self.out.append((e.workflow_id, e.seq))


def test_sequencer_releases_in_order_and_suppresses_copies() -> None:
    s = _Collect()
    for seq in (1, 3, 2, 3, 1, 4):
        s._accept(ev(seq), now=0.0)
    assert s.out == [("wf-1", 1), ("wf-1", 2), ("wf-1", 3), ("wf-1", 4)]
    assert s.stats.duplicates == 2 and s.stats.released == 4 and not s._gapped


def test_sequencer_without_filler_skips_a_gap_after_give_up_and_drops_its_late_copy() -> None:
    s = _Collect(give_up_after=1.0)
    s._accept(ev(1), now=0.0)
    s._accept(ev(3), now=0.0)
    s.tick(now=0.6)  # past gap_timeout, not past give_up_after: still waiting for 2
    assert s.out == [("wf-1", 1)]
    s.tick(now=1.5)
    assert s.out == [("wf-1", 1), ("wf-1", 3)] and s.stats.ordering_violations == 1
    s._accept(ev(2), now=2.0)  # too late: dropped, not delivered out of order, not counted again
    assert s.out == [("wf-1", 1), ("wf-1", 3)] and s.stats.ordering_violations == 1 and s.stats.late_dropped == 1
