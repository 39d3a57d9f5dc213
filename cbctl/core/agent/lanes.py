"""Which lanes this agent works on: the lane mode (coordinated ownership or local competing
consumers), the membership watch and the rendezvous reconciliation (see docs/agent.md).

Contract: with ``cluster.enabled`` the agent owns exactly the lanes the rendezvous assignment
(:mod:`cbctl.core.model.assignment`) gives it among the live enabled members, each as an owner
key on its lease (:mod:`cbctl.core.agent.ownership`); a lane's workers stop before its owner
key is deleted, so no write with a token happens after its key is gone.  Without it, every
agent consumes every lane with guard off and token 0.  Callers of ``_release`` and
``_reconcile`` hold (or take) ``_lanes_lock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from cbctl.core.agent.ownership import LaneClaim, acquire_lane, release_lane
from cbctl.core.agent.session import Session
from cbctl.core.agent.tasks import LOOP_BACKOFF, cancel_all
from cbctl.core.agent.worker import LaneRun
from cbctl.core.backends.retry import Backoff
from cbctl.core.model import keys
from cbctl.core.model.assignment import lanes_of
from cbctl.core.model.config import Context
from cbctl.core.model.errors import BackendUnavailable, CbctlError
from cbctl.core.model.metrics import AgentMetrics
from cbctl.core.model.records import LaneOwnerRecord, NodeRecord

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator

log = logging.getLogger(__name__)

__all__ = ["LaneReconciler"]


class LaneReconciler:
    """The lane-assignment part of :class:`~cbctl.core.agent.node.NodeAgent` (a mixin).

    Uses the attributes below, set by the agent, the agent's ``_start_worker`` (a lane worker
    per worked lane) and ``_write_record`` (report the owned lanes).
    """

    ctx: Context
    node_id: str
    instance_id: str
    metrics: AgentMetrics
    coordinator: Coordinator
    cluster_enabled: bool
    keepalive_interval: float
    _owned: dict[str, LaneRun]
    _local: dict[str, LaneRun]
    _to_release: dict[str, LaneClaim]
    _lanes_lock: asyncio.Lock
    _wake: asyncio.Event
    _session: Session | None
    _assignment: tuple[frozenset[str], list[str]] | None = None  # (members, my lanes), see _my_lanes

    async def _enter_mode(self, enabled: bool) -> None:
        """Switch between coordinated ownership and local competing consumers."""
        async with self._lanes_lock:
            if enabled:
                runs = list(self._local.values())
                self._local.clear()
                await self._stop_runs(runs)
                log.info("agent %s: cluster.enabled — taking part in lane ownership", self.node_id)
            else:
                await self._release(list(self._owned.values()))
                for lane in self.ctx.lanes:
                    if lane not in self._local:
                        run = LaneRun(lane=lane, token=0, local=True)
                        self._local[lane] = run
                        self._start_worker(run)
                log.info("agent %s: cluster disabled — consuming all %d lanes locally", self.node_id, len(self.ctx.lanes))
        self._wake.set()

    async def _members_loop(self, session: Session) -> None:
        """Keep ``session.members`` (live node ids and their cluster_enabled) current."""
        prefix = keys.nodes_prefix(self.ctx.cluster)
        backoff = Backoff(LOOP_BACKOFF)
        while not session.lost:
            try:
                rev = await self.coordinator.current_revision()
                members: dict[str, bool] = {}
                for kv in await self.coordinator.list(prefix):
                    members[kv.key[len(prefix):]] = _enabled(kv.value)
                if members != session.members:
                    session.members = members
                    self._wake.set()
                async for ev in self.coordinator.watch(prefix, prefix=True, start_revision=rev + 1):
                    node = ev.key[len(prefix):]
                    before = session.members.get(node)
                    if ev.kind == "delete":
                        session.members.pop(node, None)
                    else:
                        session.members[node] = _enabled(ev.value)
                    if session.members.get(node) != before:
                        log.debug("agent %s: member %s %s", self.node_id, node, session.members.get(node))
                        self._wake.set()
                    backoff.reset()
            except CbctlError as exc:
                log.warning("membership watch of %s interrupted: %s", self.node_id, exc)
                await backoff.pause()

    async def _lanes_watch_loop(self, session: Session) -> None:
        """Wake the reconciler whenever a lane owner key disappears (released or expired)."""
        prefix = keys.lanes_prefix(self.ctx.cluster)
        backoff = Backoff(LOOP_BACKOFF)
        while not session.lost:
            try:
                async for ev in self.coordinator.watch(prefix, prefix=True):
                    if ev.kind == "delete":
                        self._wake.set()
                    backoff.reset()
            except CbctlError as exc:
                log.warning("lanes watch of %s interrupted: %s", self.node_id, exc)
                self._wake.set()
                await backoff.pause()

    async def _reconcile_loop(self, session: Session) -> None:
        period = max(0.5, self.keepalive_interval)
        while not session.lost:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._reconcile(session)
            except BackendUnavailable as exc:
                log.warning("lane reconciliation of %s failed (%s); retrying", self.node_id, exc)

    async def _reconcile(self, session: Session) -> None:
        """Make the owned lanes match the rendezvous assignment (release first, then take)."""
        async with self._lanes_lock:
            if session.lost or self._session is not session:
                return
            changed = False
            for lane, claim in list(self._to_release.items()):
                await release_lane(self.coordinator, self.ctx.cluster, claim)
                del self._to_release[lane]
            if not self.cluster_enabled:
                changed = bool(self._owned)
                await self._release(list(self._owned.values()))
            else:
                members = {n for n, enabled in session.members.items() if enabled} | {self.node_id}
                mine = self._my_lanes(members)
                mine_set = set(mine)
                log.debug("agent %s reconcile: members %s, mine %s, owned %s", self.node_id, sorted(members), mine,
                          sorted(self._owned))
                leaving = [run for lane, run in self._owned.items() if lane not in mine_set or not run.active]
                changed = bool(leaving)
                await self._release(leaving)
                await self._settle_strays(session, mine_set)
                wanted = [lane for lane in mine if lane not in self._owned]
                if wanted:
                    results = await asyncio.gather(
                        *(acquire_lane(self.coordinator, self.ctx.cluster, lane, node_id=self.node_id,
                                       instance_id=self.instance_id, lease=session.lease) for lane in wanted),
                        return_exceptions=True,
                    )
                    failure: BaseException | None = None
                    strays = self._strays(session)
                    for lane, result in zip(wanted, results):
                        if isinstance(result, BaseException):
                            if isinstance(result, BackendUnavailable):
                                strays.add(lane)  # the create may have been applied all the same
                            failure = failure or result
                            continue
                        strays.discard(lane)  # the retry found out (acquire_lane adopts our own key)
                        if result is None:
                            continue  # held by someone else: its delete event wakes us
                        if session.lost:
                            break  # the key dies with the lease; never work with a lost lease
                        run = LaneRun(lane=lane, token=result.token, local=False, claim=result)
                        self._owned[lane] = run
                        self.metrics.ownership_changes.labels(lane=lane).inc()
                        self._start_worker(run)
                        changed = True
                        log.info("agent %s took lane %s (token %d)", self.node_id, lane, result.token)
                    if failure is not None and not isinstance(failure, BackendUnavailable):
                        raise failure
            self.metrics.owned_lanes.set(sum(1 for r in self._owned.values() if r.active))
        if changed:
            await self._write_record(session)

    def _strays(self, session: Session) -> set[str]:
        """Lanes whose owner key an acquire of ``session`` may have created without knowing
        (the create timed out): kept until the key is known to be gone, someone else's, ours
        and released, or ours and adopted by a later acquire."""
        holder = self.__dict__.setdefault("_stray_lanes", {})  # per agent, set on first use
        if holder.get("session") is not session:
            holder.clear()
            holder["session"] = session
            holder["lanes"] = set()
        lanes: set[str] = holder["lanes"]
        return lanes

    async def _settle_strays(self, session: Session, mine: set[str]) -> None:
        """Delete owner keys our lease may hold for lanes no longer ours (caller holds the lock).

        Without this, a create that timed out but was applied leaves a key on our live lease that
        nobody works: the lane's rightful owner waits for a delete that never comes until our
        lease ends (seen with 30 agents starting at once on 2 cores: one node held 109 keys and
        worked 10 of them).  Lanes still ours are left to the next acquire, which adopts the key.
        """
        strays = self._strays(session)
        for lane in [lane for lane in strays if lane not in mine and lane not in self._owned]:
            key = keys.lane(self.ctx.cluster, lane)
            try:
                kv = await self.coordinator.get(key)
                rec = LaneOwnerRecord.from_json(kv.value) if kv is not None else None
                if (kv is not None and rec is not None and rec.instance_id == self.instance_id
                        and str(kv.lease) == str(session.lease.id)):
                    await release_lane(self.coordinator, self.ctx.cluster,
                                       LaneClaim(lane=lane, token=kv.create_revision, since=float(rec.since or 0.0)))
                    log.warning("agent %s released lane %s: its owner key was created by an acquire that "
                                "timed out, and the lane is not ours any more", self.node_id, lane)
            except BackendUnavailable as exc:
                log.warning("agent %s: cannot check the owner key of lane %s yet: %s", self.node_id, lane, exc)
                continue
            except ValueError:
                pass  # not a record of ours
            strays.discard(lane)

    def _my_lanes(self, members: set[str]) -> list[str]:
        """``lanes_of`` this node among ``members``, computed again only when they change: the
        reconciler runs every keep-alive interval and on every wake-up, and with 30 members and
        256 lanes one computation is ~7,700 BLAKE2b hashes."""
        key = frozenset(members)
        if self._assignment is None or self._assignment[0] != key:
            self._assignment = (key, lanes_of(self.node_id, self.ctx.lanes, key))
        return self._assignment[1]

    async def _release(self, runs: list[LaneRun]) -> None:
        """Stop the lanes' workers, then delete their owner keys (caller holds the lanes lock).

        Workers stop first, so no write with a token happens after its key is gone.
        """
        if not runs:
            return
        await self._stop_runs(runs)
        for run in runs:
            self._owned.pop(run.lane, None)
        claimed = [run for run in runs if run.claim is not None]
        results = await asyncio.gather(
            *(release_lane(self.coordinator, self.ctx.cluster, run.claim) for run in claimed if run.claim),
            return_exceptions=True,
        )
        for run, result in zip(claimed, results):
            assert run.claim is not None
            self.metrics.ownership_changes.labels(lane=run.lane).inc()
            log.info("agent %s released lane %s (token %d%s)", self.node_id, run.lane, run.token,
                     ", fenced off by a newer owner" if run.stale else "")
            if isinstance(result, BackendUnavailable):
                # Retried by the next reconciliation (or the key dies with the lease).
                log.warning("agent %s could not delete the owner key of lane %s yet: %s", self.node_id, run.lane, result)
                self._to_release[run.lane] = run.claim
            elif isinstance(result, BaseException):
                raise result

    async def _stop_runs(self, runs: list[LaneRun]) -> None:
        for run in runs:
            run.active = False
        await cancel_all([r.task for r in runs])


def _enabled(value: bytes) -> bool:
    try:
        return NodeRecord.from_json(value).cluster_enabled is True
    except ValueError:
        return False
