"""Durable local outbox: where events wait while the event bus is unreachable (degraded mode).

One SQLite file in the agent's state dir, WAL journal, ``synchronous=FULL``: :meth:`Outbox.append`
returns only after its transaction is committed and fsync'd, so an event the publisher reported
as ``buffered`` survives a SIGKILL or power loss of the agent.

Rows are whole NATS messages (subject, ``Nats-Msg-Id``, payload bytes), not events: what is
drained is byte-for-byte what would have been published, with the same message ids, whatever
the flags are at drain time.  An event dual-published in two schema versions is two rows, and
``depth`` counts rows.  Row ids come from ``AUTOINCREMENT`` so they are never reused, which makes
"oldest first" a plain ``ORDER BY id`` even after the table was emptied.

Corruption: opening runs ``PRAGMA quick_check``.  A file that is not a database, is truncated, or
fails the check is moved aside (``<name>.corrupt-<unix ts>``, with its ``-wal``/``-shm``), every
row that can still be read *and whose CRC-32 matches* (a row on a damaged page can look like a row
while holding zeros) is copied into a fresh file at the original path, and
:class:`OutboxCorrupt` is raised naming both paths and the number of rows recovered.  The caller
(the agent) must not carry on as if nothing happened: it reports the error; a later open finds
the fresh file with the recovered rows and proceeds.

Size limit and backpressure: the outbox never refuses or drops a message.  ``max_depth`` is where
writers are asked to stop: :meth:`Outbox.wait_for_room` blocks while the outbox is full (depth
>= ``max_depth``) and, once blocked, until draining brings the depth down to ``resume_depth``
(90 % of the limit, so a drain at the edge does not flip it on and off); every waiter is then
released at once.  The publisher awaits it after each event it returned, so a lane worker, which
awaits its publish before acking, takes no new task while the outbox is full.  Messages already
handed over still go in, so the depth can pass ``max_depth`` by what is in flight (at most one
event per concurrent publisher plus the publisher's batches).  Entering and leaving the state
is logged (warning) and reported through the ``on_change`` callback (a gauge's ``set``).

Thread-safety: one connection, opened with ``check_same_thread=False``; callers serialise access
(the publisher runs every call on one dedicated thread).  :meth:`Outbox.wait_for_room` may be
awaited from any event loop while that thread deletes rows.  This module imports only the
stdlib so a crash-test subprocess can use it cheaply.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from cbctl.core.model.errors import CbctlError

SCHEMA_VERSION: Final = 1

#: Default ``max_depth``: rows (one per event and schema version, ~0.5 KB each on disk), about
#: four minutes of events at 100 workflows/s before publishers are held back.
DEFAULT_MAX_DEPTH: Final = 100_000

log = logging.getLogger(__name__)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    subject     TEXT    NOT NULL,
    msg_id      TEXT    NOT NULL,
    workflow_id TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    created_at  REAL    NOT NULL,
    crc         INTEGER NOT NULL  -- crc32 of the other text/blob columns: salvage drops damaged rows
)
"""


class OutboxCorrupt(CbctlError):
    """The outbox file was unreadable or damaged.

    ``path``: the outbox path (now a fresh file holding the recovered rows);
    ``moved_to``: where the damaged file was moved; ``recovered``: rows copied over;
    ``detail``: what SQLite said.
    """

    exit_code = 1

    def __init__(self, path: Path, moved_to: Path, recovered: int, detail: str) -> None:
        super().__init__(
            f"outbox {path} is corrupt ({detail}); moved it to {moved_to} and recovered {recovered} "
            f"event message(s) into a fresh {path.name}; events that could not be read are lost "
            f"unless recovered from {moved_to.name} by hand"
        )
        self.path = path
        self.moved_to = moved_to
        self.recovered = recovered
        self.detail = detail


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One NATS message to be published later, exactly as it would have been published now."""

    subject: str
    msg_id: str
    workflow_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An :class:`OutboxMessage` as stored, with its row id (the drain order)."""

    id: int
    subject: str
    msg_id: str
    workflow_id: str
    payload: bytes
    created_at: float


class Outbox:
    """The durable FIFO of undelivered event messages. See the module docstring for contracts."""

    def __init__(self, path: str | os.PathLike[str], *, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        """Open (creating if missing) the outbox at ``path``; ``max_depth``: rows at which
        :meth:`wait_for_room` starts holding writers back (>= 1).

        Raises :class:`OutboxCorrupt` after recovering what it can (see the module docstring),
        ``ValueError`` for a bad ``max_depth``.
        """
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"outbox max_depth must be a positive integer, got {max_depth!r}")
        self.max_depth = max_depth
        self.resume_depth = max_depth - max(1, max_depth // 10)
        # Backpressure state, shared between the event loop(s) and the database thread.
        self._room = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._blocked = False
        self._closed = False
        self._on_change: Callable[[bool], object] | None = None
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._create(self.path)
        elif self.path.stat().st_size == 0:
            # We create the file atomically with its header (see _create), so an empty file is a
            # truncated one: starting empty here is exactly the silent loss we must not allow.
            self._recover("file is empty (truncated to 0 bytes)")
        try:
            self._conn = self._open(self.path)
        except sqlite3.DatabaseError as exc:
            self._recover(str(exc))  # always raises OutboxCorrupt
        self._depth = self._count()

    # ------------------------------------------------------------------ opening & recovery

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one append is one transaction.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        return conn

    @classmethod
    def _open(cls, path: Path) -> sqlite3.Connection:
        conn = cls._connect(path)
        try:
            # Any of these raises sqlite3.DatabaseError on a file that is not a (sound) database.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.DatabaseError(f"cannot switch to WAL journal (got {mode})")
            # FULL: the WAL is fsync'd at every commit, so a returned append survives power loss.
            conn.execute("PRAGMA synchronous=FULL")
            check = [r[0] for r in conn.execute("PRAGMA quick_check(3)").fetchall()]
            if check != ["ok"]:
                lines = "\n".join(check).splitlines()
                raise sqlite3.DatabaseError("quick_check: " + "; ".join(lines[:3])[:300])
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"unknown outbox schema version {version}")
            conn.execute(_SCHEMA)
            if version == 0:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # Reading the table proves its pages are readable, beyond what quick_check covers.
            conn.execute("SELECT count(*) FROM outbox").fetchone()
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    @classmethod
    def _create(cls, path: Path) -> None:
        """Create a fresh outbox atomically: set up under a temp name, fsync, rename."""
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        cls._open(tmp).close()  # closing the last connection checkpoints and removes the -wal
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def _recover(self, detail: str) -> NoReturn:
        """Move the damaged file aside, salvage readable rows into a fresh file, raise."""
        rows = _salvage(self.path)
        stamp = int(time.time())
        moved_to = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while moved_to.exists():  # two corruptions within one second
            n += 1
            moved_to = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        # The -wal/-shm belong to the damaged file: applied to the new file they would corrupt it.
        for suffix in ("", "-wal", "-shm", "-journal"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{moved_to}{suffix}"))
        self._create(self.path)
        conn = self._open(self.path)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO outbox (id, subject, msg_id, workflow_id, payload, created_at, crc)"
                " VALUES (?,?,?,?,?,?,?)",
                rows,
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        _fsync_dir(self.path.parent)
        raise OutboxCorrupt(self.path, moved_to, len(rows), detail)

    # ------------------------------------------------------------------ operations

    @property
    def depth(self) -> int:
        """Rows waiting (kept in memory; exact as long as this object is the only writer)."""
        return self._depth

    def _count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def append(self, messages: Sequence[OutboxMessage]) -> None:
        """Append ``messages`` in order, in one transaction; returns once committed and fsync'd."""
        if not messages:
            return
        now = time.time()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany(
                "INSERT INTO outbox (subject, msg_id, workflow_id, payload, created_at, crc) VALUES (?,?,?,?,?,?)",
                [(m.subject, m.msg_id, m.workflow_id, m.payload, now,
                  _crc(m.subject, m.msg_id, m.workflow_id, m.payload)) for m in messages],
            )
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            self._rollback()
            raise
        self._depth += len(messages)

    def peek(self, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` oldest rows, oldest first (not removed)."""
        cur = self._conn.execute(
            "SELECT id, subject, msg_id, workflow_id, payload, created_at FROM outbox ORDER BY id LIMIT ?", (limit,)
        )
        return [OutboxRow(r[0], r[1], r[2], r[3], bytes(r[4]), r[5]) for r in cur]

    def delete(self, ids: Iterable[int]) -> None:
        """Remove rows (published and acked) in one transaction."""
        id_list = [(i,) for i in ids]
        if not id_list:
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            cur = self._conn.executemany("DELETE FROM outbox WHERE id = ?", id_list)
            removed = cur.rowcount
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            self._rollback()
            raise
        self._depth = max(0, self._depth - removed)
        if self._blocked and self._depth <= self.resume_depth:
            self._release("drained to %d of %d")

    # ------------------------------------------------------------------ backpressure

    @property
    def full(self) -> bool:
        """True while writers are held back: at or over ``max_depth``, or blocked and not yet
        drained to ``resume_depth``."""
        return self._blocked or self._depth >= self.max_depth

    @property
    def backpressure(self) -> bool:
        """True from the first writer held back until the drain releases them."""
        return self._blocked

    async def wait_for_room(self, on_change: Callable[[bool], object] | None = None) -> None:
        """Return at once while the outbox has room; otherwise wait until draining releases it
        (see the module docstring).  Never drops anything: it only delays the caller.

        ``on_change(True)`` is called when the outbox starts holding writers back and
        ``on_change(False)`` when it releases them (on the loop of the waiter that noticed),
        each transition once.  Cancelling the wait is safe.  A closed outbox releases every
        waiter (the agent is stopping; what was written is kept).
        """
        if not self.full or self._closed:
            return
        loop = asyncio.get_running_loop()
        while self.full and not self._closed:
            fut: asyncio.Future[None] = loop.create_future()
            with self._room:
                if self._closed or not self.full:
                    break
                self._waiters.append((loop, fut))
                if on_change is not None:
                    self._on_change = on_change
                first = not self._blocked
                self._blocked = True
            if first:
                log.warning("event outbox %s is full (%d message(s), limit %d): holding publishers back, no new "
                            "tasks are taken until it drains to %d", self.path, self._depth, self.max_depth,
                            self.resume_depth)
                if on_change is not None:
                    on_change(True)
            try:
                await fut
            finally:
                with self._room:
                    if (loop, fut) in self._waiters:
                        self._waiters.remove((loop, fut))

    def _release(self, why: str) -> None:
        """Wake every waiter (called on the database thread or at close)."""
        with self._room:
            if not self._blocked:
                return
            self._blocked = False
            waiters, self._waiters = self._waiters, []
            notify = self._on_change
        log.warning("event outbox %s: " + why + "; publishers released", self.path, self._depth, self.max_depth)
        loops = {loop for loop, _ in waiters}
        for loop, fut in waiters:
            _call_soon(loop, _wake, fut)
        if notify is not None:
            # On a waiter's loop when there is one: the callback (a gauge) sees the same
            # ordering as the waiters.  Else (nobody waiting any more) right here.
            if loops:
                _call_soon(next(iter(loops)), notify, False)
            else:
                notify(False)

    def close(self) -> None:
        """Close the file (checkpoints the WAL into the main file); releases any waiter."""
        self._closed = True
        self._release("closed with %d of %d message(s) kept")
        self._conn.close()

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction open any more: the failed statement already ended it

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # that loop is closed: its waiter is gone with it


def _salvage(path: Path) -> list[tuple[object, ...]]:
    """Every outbox row still readable from a damaged file, in id order (best effort).

    Reads id ranges and bisects a range that hits a damaged page down to single ids, so a bad
    page loses only the rows stored on it.  ``writable_schema`` makes SQLite read a file that is
    shorter than its header says (a truncated file) instead of refusing it outright.
    """
    rows: list[tuple[object, ...]] = []
    try:
        # Read-only: never let SQLite "repair" (rewrite) the damaged file or its WAL.
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        conn.execute("PRAGMA writable_schema=1")
    except sqlite3.Error:
        return rows
    cols = "SELECT id, subject, msg_id, workflow_id, payload, created_at, crc FROM outbox"
    try:
        max_id = _first_int(conn, "SELECT max(id) FROM outbox", "SELECT seq FROM sqlite_sequence WHERE name='outbox'")
        if max_id is None:
            # No upper bound known: one scan, keeping whatever comes out before the damage.
            try:
                rows.extend(r for r in conn.execute(f"{cols} ORDER BY id") if _row_ok(r))
            except sqlite3.DatabaseError:
                pass
            return rows
        # Explicit stack instead of recursion: (low, high] ranges still to read, lowest first.
        todo = [(lo, min(lo + 1024, max_id)) for lo in range(0, max_id, 1024)]
        todo.reverse()
        while todo:
            lo, hi = todo.pop()
            try:
                batch = conn.execute(f"{cols} WHERE id > ? AND id <= ? ORDER BY id", (lo, hi)).fetchall()
            except sqlite3.DatabaseError:
                if hi - lo > 1:
                    mid = (lo + hi) // 2
                    todo.append((mid, hi))
                    todo.append((lo, mid))
                continue  # a single unreadable id: lost
            rows.extend(r for r in batch if _row_ok(r))
    except sqlite3.Error:
        pass
    finally:
        conn.close()
    return rows


def _first_int(conn: sqlite3.Connection, *queries: str) -> int | None:
    for q in queries:
        try:
            row = conn.execute(q).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row and isinstance(row[0], int):
            return row[0]
    return None


def _crc(subject: str, msg_id: str, workflow_id: str, payload: bytes) -> int:
    c = zlib.crc32(subject.encode("utf-8"))
    c = zlib.crc32(b"\x00" + msg_id.encode("utf-8"), c)
    c = zlib.crc32(b"\x00" + workflow_id.encode("utf-8"), c)
    return zlib.crc32(b"\x00" + payload, c)


def _row_ok(r: tuple[object, ...]) -> bool:
    """Types right and checksum matching: a row read from a damaged page can be zero-filled or
    half-overwritten while still looking like a row."""
    if not (isinstance(r[0], int) and isinstance(r[1], str) and isinstance(r[2], str) and isinstance(r[3], str)
            and isinstance(r[4], bytes) and isinstance(r[5], int | float) and isinstance(r[6], int)):
        return False
    return _crc(r[1], r[2], r[3], r[4]) == r[6]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["DEFAULT_MAX_DEPTH", "Outbox", "OutboxCorrupt", "OutboxMessage", "OutboxRow"]
