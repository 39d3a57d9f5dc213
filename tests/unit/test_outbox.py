"""Durable outbox: order, durability across a real SIGKILL, and corrupt/truncated files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cbctl.core.agent.bus.outbox import Outbox, OutboxCorrupt, OutboxMessage


def msgs(start: int, n: int, size: int = 100) -> list[OutboxMessage]:
    return [
        OutboxMessage(f"cb.events.v1.wf-{i % 5}", f"id-{i}.v1", f"wf-{i % 5}", (f"{i}:".encode() * size)[:size])
        for i in range(start, start + n)
    ]


def test_append_peek_delete_in_order(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"
    with Outbox(path) as ob:
        assert ob.depth == 0 and ob.peek(10) == []
        ob.append(msgs(0, 3))
        ob.append(msgs(3, 4))
        ob.append([])
        assert ob.depth == 7
        rows = ob.peek(5)
        assert [r.msg_id for r in rows] == [f"id-{i}.v1" for i in range(5)]
        assert rows[0].payload == msgs(0, 1)[0].payload and rows[0].subject == "cb.events.v1.wf-0"
        ob.delete(r.id for r in rows[:2])
        assert ob.depth == 5
        assert [r.msg_id for r in ob.peek(100)] == [f"id-{i}.v1" for i in range(2, 7)]
        last_id = ob.peek(100)[-1].id
        ob.delete(r.id for r in ob.peek(100))
        assert ob.depth == 0
        ob.append(msgs(7, 1))
        # AUTOINCREMENT: ids are never reused, so "oldest first" holds across an emptied table.
        assert ob.peek(1)[0].id > last_id
    with Outbox(path) as ob:
        assert ob.depth == 1 and ob.peek(1)[0].msg_id == "id-7.v1"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


_CHILD = textwrap.dedent(
    """
    import os, sys
    from cbctl.core.agent.bus.outbox import Outbox, OutboxMessage
    path, mode, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ob = Outbox(path)
    i = 0
    while True:
        ob.append([OutboxMessage("cb.events.v1.wf", f"id-{j}.v1", "wf", b"x" * 200) for j in range(i, i + batch)])
        i += batch
        # Printed only after append returned: every number printed is an acknowledged event.
        sys.stdout.write(f"{i}\\n"); sys.stdout.flush()
        if mode == "exit" and i >= 50:
            os._exit(0)  # no close, no checkpoint, no atexit
    """
)


def _run_child(path: Path, mode: str, batch: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode, str(batch)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)


def test_acknowledged_appends_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    batch = 7
    child = _run_child(path, "forever", batch)
    acked = 0
    deadline = time.monotonic() + 20
    assert child.stdout is not None
    try:
        while acked < 200:  # read acknowledgements until well into the run
            line = child.stdout.readline()
            assert line, "child died early"
            acked = int(line)
            assert time.monotonic() < deadline
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # mid-append, most likely
        child.wait(10)
    with Outbox(path) as ob:
        rows = ob.peek(1_000_000)
    assert len(rows) >= acked
    # A transaction is all or nothing: never half a batch.
    assert len(rows) % batch == 0
    assert [r.msg_id for r in rows] == [f"id-{j}.v1" for j in range(len(rows))]
    assert all(r.payload == b"x" * 200 for r in rows)


def test_appends_survive_exit_without_close(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    child = _run_child(path, "exit", 10)
    out, _ = child.communicate(timeout=20)
    assert child.returncode == 0
    acked = int(out.split()[-1])
    assert (tmp_path / "outbox.db-wal").exists()  # nothing was checkpointed: the rows live in the WAL
    with Outbox(path) as ob:
        assert ob.depth == acked == 50


def _filled(tmp_path: Path, n: int) -> tuple[Path, int]:
    path = tmp_path / "outbox.db"
    with Outbox(path) as ob:
        for i in range(0, n, 100):
            ob.append(msgs(i, 100, size=300))
    return path, path.stat().st_size


def _corrupt_copies(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm")))


def test_garbage_file_is_reported_moved_aside_and_not_silently_empty(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    garbage = os.urandom(20_000)
    path.write_bytes(garbage)
    with pytest.raises(OutboxCorrupt) as info:
        Outbox(path)
    err = info.value
    assert err.path == path and err.recovered == 0
    assert str(path) in str(err) and "recovered 0" in str(err)
    assert _corrupt_copies(path) == [err.moved_to]
    assert err.moved_to.read_bytes() == garbage  # the evidence is kept untouched
    with Outbox(path) as ob:  # the fresh file opens; the operator has been told
        assert ob.depth == 0


def test_truncated_file_keeps_the_readable_rows(tmp_path: Path) -> None:
    path, size = _filled(tmp_path, 2000)
    with path.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(OutboxCorrupt) as info:
        Outbox(path)
    err = info.value
    assert 0 < err.recovered < 2000
    assert err.moved_to.stat().st_size == size // 2
    with Outbox(path) as ob:
        rows = ob.peek(10_000)
        assert ob.depth == err.recovered == len(rows)
    expected = {m.msg_id: m for m in msgs(0, 2000, size=300)}
    for r in rows:  # every recovered row is intact and in order
        m = expected[r.msg_id]
        assert (r.subject, r.workflow_id, r.payload) == (m.subject, m.workflow_id, m.payload)
    assert [r.id for r in rows] == sorted(r.id for r in rows)


def test_damaged_page_in_the_middle(tmp_path: Path) -> None:
    path, size = _filled(tmp_path, 2000)
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096 * 2))
    with pytest.raises(OutboxCorrupt) as info:
        Outbox(path)
    # Rows before and after the damaged pages are recovered.
    assert 1000 < info.value.recovered < 2000
    with Outbox(path) as ob:
        ids = [r.msg_id for r in ob.peek(10_000)]
    assert ids[0] == "id-0.v1" and ids[-1] == "id-1999.v1"


def test_zero_length_file_is_a_truncation(tmp_path: Path) -> None:
    path, _ = _filled(tmp_path, 100)
    path.write_bytes(b"")
    with pytest.raises(OutboxCorrupt) as info:
        Outbox(path)
    assert info.value.recovered == 0 and "empty" in str(info.value)


# -- size limit and backpressure ----------------------------------------------------------------


@pytest.mark.timeout(20)
async def test_wait_for_room_blocks_while_full_and_releases_on_drain(tmp_path: Path) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    changes: list[bool] = []
    db = ThreadPoolExecutor(max_workers=1)  # as the publisher: every SQLite call on one thread
    loop = asyncio.get_running_loop()
    with Outbox(tmp_path / "o.db", max_depth=10) as ob:
        assert ob.resume_depth == 9
        await loop.run_in_executor(db, ob.append, msgs(0, 9))
        await asyncio.wait_for(ob.wait_for_room(changes.append), 1)  # room: returns at once
        await loop.run_in_executor(db, ob.append, msgs(9, 3))  # 12 > 10: nothing refused or dropped
        assert ob.depth == 12 and ob.full and not ob.backpressure
        waiters = [asyncio.create_task(ob.wait_for_room(changes.append)) for _ in range(3)]
        async with asyncio.timeout(5):
            while len(ob._waiters) < 3:  # every writer registered as waiting
                await asyncio.sleep(0.001)
        assert ob.backpressure and changes == [True]  # said once, not per waiter
        assert not any(w.done() for w in waiters)
        rows = await loop.run_in_executor(db, ob.peek, 2)
        await loop.run_in_executor(db, ob.delete, [r.id for r in rows])  # 10: still full
        done, _ = await asyncio.wait(waiters, timeout=0.1)  # none may be released
        assert not done and ob.backpressure
        rows = await loop.run_in_executor(db, ob.peek, 1)
        await loop.run_in_executor(db, ob.delete, [r.id for r in rows])  # 9 = resume depth
        await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert changes == [True, False] and not ob.backpressure and not ob.full
        assert [r.msg_id for r in await loop.run_in_executor(db, ob.peek, 100)] == [f"id-{i}.v1" for i in range(3, 12)]
    db.shutdown()


@pytest.mark.timeout(20)
async def test_wait_for_room_cancel_and_close(tmp_path: Path) -> None:
    import asyncio

    ob = Outbox(tmp_path / "o.db", max_depth=2)
    ob.append(msgs(0, 2))
    cancelled = asyncio.create_task(ob.wait_for_room())
    kept = asyncio.create_task(ob.wait_for_room())
    async with asyncio.timeout(5):
        while len(ob._waiters) < 2:
            await asyncio.sleep(0.001)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not kept.done() and ob.backpressure
    ob.close()  # stopping: waiters are released, what was written stays
    await asyncio.wait_for(kept, 5)
    with Outbox(tmp_path / "o.db", max_depth=2) as again:
        assert again.depth == 2


def test_max_depth_must_be_positive(tmp_path: Path) -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_depth"):
            Outbox(tmp_path / "o.db", max_depth=bad)  # type: ignore[arg-type]
