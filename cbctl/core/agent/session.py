"""The lease session: one registration of the node (a lease, the node's record on it, and the
tasks that live as long as it), the refuse-first registration, lease loss and registering
again (see docs/agent.md).

Contract: the node's key is read before anything is written and a live holder that is not this
instance is refused without a write (``NodeIdConflict``, reported on an expiring lease of its
own); the record is created with create-if-absent and only ever rewritten by CAS on its
revision.  A lost lease stops every owned lane synchronously in the keeper's callback; the
agent then registers again with a **new** lease, never the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from cbctl.core.agent.registration import NodeIdConflict, holder_conflict, holder_is_dead_local, read_holder, record_refusal, register
from cbctl.core.agent.tasks import LOOP_BACKOFF, cancel_all
from cbctl.core.agent.worker import LaneRun
from cbctl.core.backends.coord.base import Lease, LeaseKeeper
from cbctl.core.backends.retry import Backoff, poll_until
from cbctl.core.model import keys
from cbctl.core.model.config import Context
from cbctl.core.model.errors import BackendUnavailable, BadInput, CbctlError, Conflict, LeaseLost
from cbctl.core.model.flags import GUARD_OFF, OWNERSHIP_GUARD
from cbctl.core.model.metrics import AgentMetrics
from cbctl.core.model.records import NodeRecord, RefusalRecord

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator

log = logging.getLogger(__name__)

__all__ = ["LeaseSession", "Session", "check_lease_settings", "lease_from_hex", "lease_hex"]


def check_lease_settings(lease_ttl: float, keepalive_interval: float) -> None:
    """Refuse lease settings under which a keep-alive hiccup would lose the lease (exit 2).

    The keeper must get at least three refresh attempts inside one TTL: it declares the lease
    lost one interval before the store can expire it, so with fewer the margin is gone.
    """
    if lease_ttl <= 0 or keepalive_interval <= 0:
        raise BadInput(f"lease TTL ({lease_ttl:g} s) and keep-alive interval ({keepalive_interval:g} s) must be positive")
    if keepalive_interval * 3 > lease_ttl:
        raise BadInput(
            f"keep-alive interval {keepalive_interval:g} s is too long for lease TTL {lease_ttl:g} s: "
            f"keep-alive * 3 must be <= TTL (use --keepalive <= {lease_ttl / 3:g} or a longer --lease-ttl)"
        )


@dataclass(eq=False)
class Session:
    """One registration: a lease, the record on it, and the tasks that live as long as it."""

    number: int
    lease: Lease
    record_rev: int = 0
    keeper: LeaseKeeper | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    members: dict[str, bool] = field(default_factory=dict)  # node id -> cluster_enabled
    lost: bool = False
    lost_event: asyncio.Event = field(default_factory=asyncio.Event)

class LeaseSession:
    """The registration part of :class:`~cbctl.core.agent.node.NodeAgent` (a mixin).

    Uses the attributes below, set by the agent, and the agent's ``_spawn`` and
    ``request_stop``; the session's tasks are the heartbeat (here) and the membership watch,
    lanes watch and reconciliation (:mod:`cbctl.core.agent.lanes`).
    """

    ctx: Context
    node_id: str
    instance_id: str
    machine_id: str | None
    host: str
    version: str
    metrics: AgentMetrics
    coordinator: Coordinator
    cluster_enabled: bool
    lease_ttl: float
    keepalive_interval: float
    heartbeat_interval: float
    http_address: str | None
    extra_record_fields: dict[str, Any]
    fatal_error: CbctlError | None
    _coord: Coordinator | None
    _session: Session | None
    _sessions: int
    _started_at: float
    _stopping: bool
    _stop_outcome: list[str]
    _owned: dict[str, LaneRun]
    _to_release: dict[str, Any]
    _lanes_lock: asyncio.Lock
    _record_lock: asyncio.Lock
    _wake: asyncio.Event
    _flags: dict[str, Any]
    _applied_revision: int

    async def _open_session(self, *, first: bool, start_tasks: bool = True) -> None:
        """Grant a new lease and create the record on it; start the session's tasks.

        The node's key is read first: a live holder that is not us is refused without a single
        write (:meth:`_refuse`).  The create-if-absent that follows is the atomic check (two
        starts racing both pass the read).  ``start_tasks=False`` leaves the session's tasks to
        :meth:`_start_session_tasks` (the first start creates the record before anything else).

        Raises ``NodeIdConflict`` if another instance holds the node id, ``BackendUnavailable``
        if the store cannot be reached.
        """
        coord = self.coordinator
        loop = asyncio.get_running_loop()
        waited_for_stale = False
        key = keys.node(self.ctx.cluster, self.node_id)
        while True:
            holder = await read_holder(coord, self.ctx.cluster, self.node_id)
            if holder is not None and holder.instance_id != self.instance_id:
                if first and not waited_for_stale and self._holder_is_stale(holder):
                    await self._wait_stale_holder(holder, key)
                    waited_for_stale = True
                    continue
                await self._refuse(holder_conflict(self.node_id, key, holder))
            requested = loop.time()
            lease = await coord.grant_lease(self.lease_ttl)
            if lease.granted_at is None:  # a backend that does not stamp it: our request time
                lease.granted_at = requested
            session = Session(number=self._sessions + 1, lease=lease)
            try:
                session.record_rev = await register(
                    coord, self.ctx.cluster, self.node_id, self._record(session), lease
                )
                break
            except NodeIdConflict as exc:
                await self._revoke(lease)
                holder = exc.holder
                if holder.instance_id == self.instance_id:
                    # Our own previous session's record: we declared that lease lost before the
                    # store expired it.  Revoke it (never reuse it) and register afresh.
                    old = lease_from_hex(holder.lease)
                    if old is not None:
                        await self._revoke(old)
                    await asyncio.sleep(0.1)
                    continue
                if first and not waited_for_stale and self._holder_is_stale(holder):
                    await self._wait_stale_holder(holder, key)
                    waited_for_stale = True
                    continue
                await self._refuse(exc)
            except BaseException:
                await self._revoke(lease)
                raise
        self._sessions = session.number
        self._session = session
        session.keeper = coord.keep_alive(
            lease, interval=self.keepalive_interval, on_lost=lambda exc, s=session: self._on_lease_lost(s, exc)
        )
        if start_tasks:
            self._start_session_tasks(session)
        if not first:
            log.info("agent %s registered again: session %d, lease %s", self.node_id, session.number, lease_hex(lease))

    def _start_session_tasks(self, session: Session) -> None:
        session.tasks = [
            self._spawn(self._heartbeat_loop(session), "heartbeat"),
            self._spawn(self._members_loop(session), "members-watch"),
            self._spawn(self._lanes_watch_loop(session), "lanes-watch"),
            self._spawn(self._reconcile_loop(session), "reconcile"),
        ]
        self._wake.set()

    def _holder_is_stale(self, holder: NodeRecord) -> bool:
        """A record left by a dead process of this machine (a crash, then a restart)."""
        return bool(self.machine_id) and holder_is_dead_local(holder, machine_id=self.machine_id or "", host=self.host)

    async def _wait_stale_holder(self, holder: NodeRecord, key: str) -> None:
        log.warning(
            "node id %s is still registered by a dead process of this machine (pid %s); "
            "waiting for its lease to expire", self.node_id, holder.pid,
        )
        await self._wait_key_gone(key, 2 * self.lease_ttl + 15)

    async def _refuse(self, exc: NodeIdConflict) -> NoReturn:
        """Refuse a duplicate start: report it on an expiring lease of its own, then raise.

        Nothing of the holder's is written (record, identity binding, conflicts), so its
        preflight rows and the exit criteria stay as they were (see cbctl/core/agent/registration.py).
        """
        holder = exc.holder
        log.error("agent %s: %s", self.node_id, exc)
        with contextlib.suppress(BackendUnavailable, TimeoutError):
            async with asyncio.timeout(max(1.0, self.keepalive_interval)):
                await record_refusal(
                    self.coordinator, self.ctx.cluster, self.node_id, self.instance_id,
                    RefusalRecord(kind="duplicate-node-id", host=self.host, pid=os.getpid(),
                                  holder_instance_id=holder.instance_id, holder_host=holder.host,
                                  holder_pid=holder.pid),
                )
        raise exc

    def _on_lease_lost(self, session: Session, exc: LeaseLost | BackendUnavailable) -> None:
        """Synchronous on purpose: every lane stops in this very callback, before any await."""
        if session.lost or self._stopping:
            return
        session.lost = True
        lanes = sorted(self._owned)
        for run in self._owned.values():
            run.active = False
            if run.task is not None:
                run.task.cancel()
        self.metrics.lease_lost.inc()
        log.error("agent %s lost its lease %s (%s): stopped work on %d lanes %s",
                  self.node_id, lease_hex(session.lease), exc, len(lanes), lanes)
        session.lost_event.set()

    async def _supervise(self) -> None:
        """Wait for a lost lease; then end that session and register again with a new lease."""
        while not self._stopping:
            session = self._session
            if session is None:
                return
            await session.lost_event.wait()
            await self._end_session(session, revoke=True)
            backoff = Backoff(LOOP_BACKOFF)
            while not self._stopping:
                try:
                    await self._open_session(first=False)
                    break
                except NodeIdConflict as exc:
                    log.error("agent %s cannot register again: %s", self.node_id, exc)
                    self.fatal_error = exc
                    self.request_stop()
                    return
                except (BackendUnavailable, LeaseLost) as exc:
                    delay = backoff.next_delay()
                    log.warning("agent %s: registering again failed (%s); retrying in %.1fs", self.node_id, exc, delay)
                    await asyncio.sleep(delay)

    async def _end_session(self, session: Session, *, revoke: bool) -> None:
        """Stop everything that belongs to ``session``; revoke its lease (best effort).

        Bounded: each wait has a limit, and the lanes lock is not waited for longer than a
        second (a step stuck on a frozen store may hold it; the workers' "still owner" flags
        are dropped either way), so a stuck task can never keep the revoke from happening.
        """
        session.lost = True
        await cancel_all(session.tasks, timeout=1.0)
        if session.keeper is not None:
            await session.keeper.stop(timeout=1.0)
        locked = False
        try:
            async with asyncio.timeout(1.0):
                await self._lanes_lock.acquire()
                locked = True
        except TimeoutError:
            log.warning("agent %s: lanes lock busy; ending session %d without it", self.node_id, session.number)
        try:
            runs = list(self._owned.values())
            self._owned.clear()
            self._to_release.clear()  # their keys die with the lease
            for run in runs:
                run.active = False
            await cancel_all([r.task for r in runs], timeout=1.0)
            for run in runs:
                self.metrics.ownership_changes.labels(lane=run.lane).inc()
            self.metrics.owned_lanes.set(0)
        finally:
            if locked:
                self._lanes_lock.release()
        if revoke:
            await self._revoke(session.lease)
        if self._session is session:
            self._session = None

    async def _revoke(self, lease: Lease) -> None:
        """Revoke ``lease``; never raises (a lease we cannot revoke expires on its own)."""
        if self._coord is None:
            return
        budget = max(1.0, self.keepalive_interval)
        try:
            async with asyncio.timeout(budget):
                await self._coord.revoke_lease(lease)
        except (BackendUnavailable, LeaseLost, TimeoutError) as exc:
            why = str(exc) or f"no answer within {budget:g}s"
            if self._stopping:
                self._stop_outcome.append(f"lease {lease_hex(lease)} not revoked ({why}); it expires on its own "
                                          f"within {self.lease_ttl:g}s")
            log.warning("gave up revoking lease %s (%s); it expires on its own within %gs",
                        lease_hex(lease), why, self.lease_ttl)

    async def _wait_key_gone(self, key: str, timeout: float) -> None:
        """Return once ``key`` is gone, or after ``timeout`` s (the caller's next read decides)."""

        async def gone() -> bool:
            return await self.coordinator.get(key) is None

        with contextlib.suppress(TimeoutError):
            await poll_until(gone, timeout=timeout, interval=0.2, message=f"{key} gone")

    def _record(self, session: Session) -> NodeRecord:
        """Our node record now (``extra_record_fields`` ride along; a field of the record wins)."""
        return NodeRecord(
            node_id=self.node_id,
            machine_id=self.machine_id,
            instance_id=self.instance_id,
            host=self.host,
            pid=os.getpid(),
            version=self.version,
            started_at=self._started_at,
            lease=lease_hex(session.lease),
            session=session.number,
            applied_revision=self._applied_revision,
            cluster_enabled=self.cluster_enabled,
            guard=self._flags.get(OWNERSHIP_GUARD, GUARD_OFF),
            lanes=tuple(sorted(lane for lane, run in self._owned.items() if run.active)) if self._session is session else (),
            heartbeat=time.time(),
            http=self.http_address,
            extra=dict(self.extra_record_fields),
        )

    async def _write_record(self, session: Session | None = None) -> None:
        """Rewrite our record by CAS on its revision (we only ever overwrite our own record).

        A conflict or a missing lease means the record is not ours any more: the session is
        declared lost.  Raises ``BackendUnavailable`` when the store cannot be reached.
        """
        session = session or self._session
        if session is None or session.lost:
            return
        async with self._record_lock:
            if session.lost:
                return
            body = self._record(session).to_json()
            try:
                session.record_rev = await self.coordinator.commit(
                    keys.node(self.ctx.cluster, self.node_id), body,
                    expected_revision=session.record_rev, lease=session.lease,
                )
            except (Conflict, LeaseLost) as exc:
                self._on_lease_lost(session, LeaseLost(f"our record changed under us or its lease is gone: {exc}"))

    async def _heartbeat_loop(self, session: Session) -> None:
        while not session.lost:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self._write_record(session)
            except BackendUnavailable as exc:
                log.warning("heartbeat of %s failed: %s", self.node_id, exc)


def lease_hex(lease: Lease | None) -> str | None:
    if lease is None:
        return None
    return format(lease.id, "x") if isinstance(lease.id, int) else str(lease.id)


def lease_from_hex(value: Any) -> Lease | None:
    if not isinstance(value, str):
        return None
    try:
        return Lease(id=int(value, 16), ttl=0)
    except ValueError:
        return None
