"""Operator-side operations on one cluster's rollout document.

Every mutation is two steps so the CLI can show the diff and ask before writing:

1. ``plan_*`` reads the document and returns a :class:`Plan` (old and new document, the
   revision that was read, the flag diff) — nothing is written;
2. :meth:`ControlPlane.commit` writes the new document with compare-and-swap on *that*
   revision, together with its audit entry, in one transaction.  If anyone changed the
   document in between, ``Conflict`` is raised and nothing is written (exit 3).

Two operators racing therefore record exactly one transition.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cbctl.core.model import keys, rollout
from cbctl.core.model.audit import AuditEntry, current_actor
from cbctl.core.model.config import Context
from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.model.errors import BadInput, Conflict
from cbctl.core.model.flags import CANARY_LANES
from cbctl.core.model.records import NodeRecord
from cbctl.core.model.rollout import RolloutDocument
from cbctl.core.model.stages import effective_flags, parse_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """A proposed mutation. ``base_revision`` is the document revision it was computed from."""

    kind: str
    command: str
    old: RolloutDocument
    new: RolloutDocument
    base_revision: int
    changes: list[rollout.FlagChange]

    @property
    def is_noop(self) -> bool:
        return self.old == self.new

    def diff_public(self) -> list[dict[str, Any]]:
        return [{"flag": c.name, "old": c.old, "new": c.new} for c in self.changes]


@dataclass
class WaitResult:
    """Outcome of waiting for agents to apply a revision.

    ``pending``: live agents that have not applied it; ``missing``: expected nodes
    (``expected-nodes``) that are not live, so have not applied it either; ``ignored``: expected
    nodes the operator explicitly excused (``--ignore-missing``) while they are not live.
    """

    revision: int
    applied: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.pending and not self.missing

    @property
    def not_applied(self) -> list[str]:
        """Every node that has not applied the revision and is not excused."""
        return sorted(self.pending + self.missing)

    @property
    def total(self) -> int:
        """Nodes waited for: live agents plus expected nodes that are not live (excused ones not counted)."""
        return len(self.applied) + len(self.pending) + len(self.missing)

    def progress_line(self) -> str:
        """One progress line: ``2/3 applied; waiting for node-3`` (an expected node that is not
        live is named ``node-3 (expected, not live)``). Equal states give equal lines, so a
        caller that prints only changed lines prints one line per change."""
        head = f"revision {self.revision}: {len(self.applied)}/{self.total} applied"
        waiting = [*self.pending, *(f"{n} (expected, not live)" for n in self.missing)]
        return f"{head}; waiting for {', '.join(waiting)}" if waiting else head


class ControlPlane:
    """Reads and writes one cluster's rollout document through a connected Coordinator."""

    def __init__(self, ctx: Context, coord: Coordinator) -> None:
        self.ctx = ctx
        self.coord = coord
        self.cluster = ctx.cluster

    # -- reads ---------------------------------------------------------------------------
    async def read(self) -> tuple[RolloutDocument, int]:
        """The current document and its revision; stage 0 and revision 0 when none exists."""
        kv = await self.coord.get(keys.rollout(self.cluster))
        if kv is None:
            return rollout.initial_document(), 0
        try:
            return RolloutDocument.from_json(kv.value), kv.mod_revision
        except BadInput as exc:
            raise BadInput(f"{keys.rollout(self.cluster)} (revision {kv.mod_revision}): {exc}") from None

    async def history(self) -> list[AuditEntry]:
        """Every audited mutation, oldest first."""
        entries = []
        for kv in await self.coord.list(keys.audit_prefix(self.cluster)):
            try:
                entries.append(AuditEntry.from_kv(kv.value, kv.mod_revision))
            except (ValueError, TypeError, KeyError) as exc:
                # One damaged entry must not hide the rest of the history: show it as such.
                log.warning("%s: unreadable audit entry: %s", kv.key, exc)
                entries.append(AuditEntry(time=0.0, actor="?", command=f"<unreadable entry {kv.key}>", reason=None,
                                          kind="unknown", from_revision=0, to_revision=kv.mod_revision, diff=[]))
        # Key order is base-revision order; the new revision orders entries of a re-created document.
        entries.sort(key=lambda e: e.to_revision or 0)
        return entries

    # -- plans ---------------------------------------------------------------------------
    async def _plan(self, kind: str, command: str, change: Callable[[RolloutDocument], RolloutDocument]) -> Plan:
        old, revision = await self.read()
        new = change(old)
        return Plan(kind, command, old, new, revision, rollout.diff(old.flags, new.flags))

    async def plan_advance(
        self,
        to: int | None,
        *,
        canary_lanes: Sequence[str] | None = None,
        canary_subscribers: Sequence[str] | None = None,
        command: str = "stage advance",
    ) -> Plan:
        """Raises ``rollout.AlreadyAtStage`` (exit 0) when ``to`` is the current stage."""
        return await self._plan(
            "stage",
            command,
            lambda doc: rollout.plan_advance(
                doc, to, canary_lanes=canary_lanes, canary_subscribers=canary_subscribers
            ),
        )

    async def plan_flags(self, assignments: Mapping[str, Any], *, command: str = "flags set") -> Plan:
        """Explicit flag overrides; ``canary.lanes`` values are checked against the lane inventory."""
        lanes = assignments.get(CANARY_LANES)
        if lanes is not None:
            unknown = [lane for lane in lanes if lane not in self.ctx.lanes]
            if unknown:
                raise BadInput(f"canary.lanes: unknown lane(s) {', '.join(map(repr, unknown))} (context {self.ctx.name})")
        return await self._plan("flags", command, lambda doc: rollout.set_flags(doc, assignments))

    async def plan_unset(self, names: Sequence[str], *, command: str = "flags unset") -> Plan:
        """Drop the manual overrides of ``names`` (back to the stage plan; kind ``flags``, audited
        like ``flags set``). An unknown flag is ``BadInput``; a flag without a manual override
        changes nothing, so unsetting only such flags is a no-op plan (nothing to write)."""
        if not names:
            raise BadInput("no flags to unset (give NAME ...)")
        return await self._plan("flags", command, lambda doc: rollout.unset_flags(doc, names))

    async def plan_rollback(
        self, capability: str, *, schema_version: int | None = None, clear: bool = False, command: str = "rollback"
    ) -> Plan:
        if clear:
            return await self._plan("rollback", command, lambda doc: rollout.clear_rollback(doc, capability))
        return await self._plan(
            "rollback", command, lambda doc: rollout.apply_rollback(doc, capability, schema_version=schema_version)
        )

    async def stage_diff(
        self,
        stage: int,
        *,
        canary_lanes: Sequence[str] | None = None,
        canary_subscribers: Sequence[str] | None = None,
    ) -> tuple[RolloutDocument, int, list[rollout.FlagChange]]:
        """What the flags would be at ``stage`` (``flags diff --stage N``), keeping the current
        rollback overrides and canary sets unless new ones are given; any stage 0-3 may be asked
        for. Writes nothing. Stage 2 needs canary lanes (given, or already in the document)."""
        doc, revision = await self.read()
        number = parse_stage(stage)
        lanes: Sequence[str] = ()
        subs: Sequence[str] = ()
        if number >= 2:
            lanes = canary_lanes if canary_lanes is not None else doc.canary_lanes
            subs = canary_subscribers if canary_subscribers is not None else doc.canary_subscribers
            if not lanes:
                raise BadInput(f"stage {number} needs canary lanes: pass --canary FILE")
        target = effective_flags(number, lanes, subs, rollbacks=doc.rollbacks)
        return doc, revision, rollout.diff(doc.flags, target)

    # -- writes --------------------------------------------------------------------------
    async def commit(
        self,
        plan: Plan,
        *,
        reason: str | None,
        actor: str | None = None,
        forced: bool = False,
        gates: list[dict[str, Any]] | None = None,
        ignore_missing: Sequence[str] = (),
    ) -> int:
        """Write ``plan.new`` by CAS on ``plan.base_revision`` with its audit entry.

        Returns the new revision.  Raises ``Conflict`` if the document changed since the plan
        was made (nothing written).
        """
        entry = AuditEntry(
            time=time.time(),
            actor=actor or current_actor(),
            command=plan.command,
            reason=reason,
            kind=plan.kind,
            from_revision=plan.base_revision,
            to_revision=None,
            diff=plan.diff_public(),
            from_stage=plan.old.stage,
            to_stage=plan.new.stage,
            forced=forced,
            gates=gates or [],
            ignore_missing=sorted(set(ignore_missing)),
        )
        try:
            return await self.coord.commit(
                keys.rollout(self.cluster),
                plan.new.to_json().encode("utf-8"),
                expected_revision=plan.base_revision,
                also_put={keys.audit(self.cluster, plan.base_revision, uuid.uuid4().hex[:12]): entry.to_bytes()},
            )
        except Conflict as exc:
            raise Conflict(
                f"the rollout document changed (revision {plan.base_revision} -> {exc.current_revision}) "
                "since it was read; nothing was written — re-run to see the new state",
                key=exc.key,
                current_revision=exc.current_revision,
            ) from None

    # -- agents --------------------------------------------------------------------------
    async def live_nodes(self) -> dict[str, NodeRecord]:
        """Registration records of every live node (records vanish with their lease)."""
        out: dict[str, NodeRecord] = {}
        for kv in await self.coord.list(keys.nodes_prefix(self.cluster)):
            try:
                out[kv.key.rsplit("/", 1)[-1]] = NodeRecord.from_json(kv.value)
            except ValueError:
                continue  # a half-written foreign key is not a node; preflight reports those
        return out

    def check_ignore_missing(self, names: Sequence[str]) -> None:
        """``--ignore-missing`` may name only expected nodes (``BadInput`` otherwise, exit 2)."""
        unknown = sorted(set(names) - set(self.ctx.expected_nodes))
        if unknown:
            expected = ", ".join(self.ctx.expected_nodes) or "none configured"
            raise BadInput(f"--ignore-missing: {', '.join(map(repr, unknown))} is not an expected node of context "
                           f"{self.ctx.name!r} (expected-nodes: {expected})")

    async def wait_applied(
        self,
        revision: int,
        *,
        timeout: float,
        progress: Callable[[WaitResult], None] | None = None,
        ignore_missing: Sequence[str] = (),
    ) -> WaitResult:
        """Block until every live agent AND every expected node reports ``applied_revision >=
        revision``, or timeout.

        Watches the nodes prefix (no polling).  A live node that leaves (its lease expires)
        stops being waited for unless it is expected; an expected node that is not live has
        not applied the revision (``missing``) unless named in ``ignore_missing``.  Returns who
        applied and who did not; ``progress`` sees every intermediate state.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        prefix = keys.nodes_prefix(self.cluster)
        start_rev = await self.coord.current_revision()
        nodes = await self.live_nodes()

        expected = set(self.ctx.expected_nodes)
        excused = set(ignore_missing)

        def result() -> WaitResult:
            return applied_state(revision, nodes, expected, excused, elapsed=loop.time() - start)

        current = result()
        if progress:
            progress(current)
        if current.ok:
            return current

        async def follow() -> None:
            nonlocal current
            async for ev in self.coord.watch(prefix, prefix=True, start_revision=start_rev + 1):
                node_id = ev.key.rsplit("/", 1)[-1]
                if ev.kind == "delete":
                    nodes.pop(node_id, None)
                else:
                    try:
                        nodes[node_id] = NodeRecord.from_json(ev.value)
                    except ValueError:
                        continue
                current = result()
                if progress:
                    progress(current)
                if current.ok:
                    return

        try:
            await asyncio.wait_for(follow(), timeout=max(0.0, timeout - (loop.time() - start)))
        except asyncio.TimeoutError:
            pass
        current = result()
        return current


def _applied(record: NodeRecord) -> int:
    return record.applied_revision or 0


def applied_state(
    revision: int, nodes: Mapping[str, NodeRecord], expected: Collection[str], excused: Collection[str] = (),
    *, elapsed: float = 0.0,
) -> WaitResult:
    """Who of ``nodes`` (live records by node id) and ``expected`` has applied ``revision``:
    the one judgement of ``--wait`` and of ``cbctl wait converged``. Pure."""
    applied = sorted(n for n, r in nodes.items() if _applied(r) >= revision)
    pending = sorted(n for n in nodes if n not in applied)
    absent = sorted(set(expected) - set(nodes))
    return WaitResult(revision, applied, pending, elapsed,
                      missing=[n for n in absent if n not in excused],
                      ignored=[n for n in absent if n in excused])
