"""Rollback drills: which recorded runbook runs prove that a capability's rollback works.

A run is a **drill** of capability C (``coordination``, ``event-bus``, ``consumers``) when, from
this cluster's run records and audit log only:

1. its runbook declares ``drill: C`` (a file merely *named* ``rollback-consumers.yaml`` does not
   count);
2. the runbook ran to its end: one ``completed`` run from step 1, or a ``--resumes`` chain of runs
   of the same runbook file (same sha256), each started at or before the step the one before
   stopped at, back to a run from step 1;
3. one of its steps wrote an audit entry (kind ``rollback``) that changed C's flags the way C's
   rollback does, and a later step wrote one putting every one of those flags back.

Steps are tied to audit entries through the store revisions recorded around each step (an entry
belongs to a step when its revision lies strictly between them). Pure functions over plain
records (:func:`judge_run`) plus async readers; no printing. More: docs/operator.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cbctl.core.model import keys
from cbctl.core.model.flags import CONSUMER_SCHEMA_VERSION
from cbctl.core.model.stages import ROLLBACKS
from cbctl.core.model.audit import AuditEntry
from cbctl.core.operator.runbook.store import STOPPED, list_runs, stopped_step

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator

# The shipped runbook of each capability's drill: the slot a capability's evidence is shown under.
SHIPPED: Mapping[str, str] = {
    "coordination": "rollback-coordination",
    "event-bus": "rollback-event-bus",
    "consumers": "rollback-consumers",
}


@dataclass
class Verdict:
    """Whether one run (with the runs it resumed) is a drill of ``capability``."""

    capability: str
    ok: bool
    reason: str
    runs: list[str] = field(default_factory=list)  # the chain, oldest first
    rollback: dict[str, Any] | None = None  # {"run", "step", "revision", "diff"}
    restore: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"drill": self.ok, "reason": self.reason, "runs": self.runs}
        if self.rollback is not None:
            out["rollback"] = self.rollback
        if self.restore is not None:
            out["restore"] = self.restore
        return out


def chain_of(record: Mapping[str, Any], by_id: Mapping[str, Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], str | None]:
    """The runs ``record`` continues, oldest first, ending with ``record``; or a reason why the
    chain does not reach step 1 through recorded stops (rule 2 of the module doc)."""
    chain = [record]
    seen = {record.get("run_id")}
    cur = record
    while cur.get("from_step", 1) != 1:
        rid = cur.get("resumes")
        if not rid:
            return chain, (f"run {cur.get('run_id')} started at step {cur.get('from_step')} without continuing a "
                           "stopped run (--from-step alone runs only the last steps: not a drill)")
        prev = by_id.get(rid)
        if prev is None or rid in seen:
            return chain, f"run {cur.get('run_id')} continues run {rid}, which is not recorded in this cluster"
        if prev.get("runbook") != cur.get("runbook") or prev.get("runbook_sha256") != cur.get("runbook_sha256"):
            return chain, f"run {cur.get('run_id')} continues run {rid} of another runbook (or another version of it)"
        stop = stopped_step(prev)
        if prev.get("status") not in STOPPED or stop is None:
            return chain, f"run {cur.get('run_id')} continues run {rid}, which did not stop part-way"
        start = cur.get("from_step", 1)
        if not isinstance(start, int) or start > stop:
            return chain, f"run {cur.get('run_id')} starts at step {start}, after run {rid} stopped at step {stop}"
        steps = {s.get("index"): s for s in prev.get("steps") or () if isinstance(s, Mapping)}
        first = prev.get("from_step", 1)
        gap = [i for i in range(first if isinstance(first, int) else 1, start) if steps.get(i, {}).get("status") != "ok"]
        if gap:
            return chain, f"run {rid} did not complete step {gap[0]} before run {cur.get('run_id')} resumed at {start}"
        chain.insert(0, prev)
        seen.add(rid)
        cur = prev
    return chain, None


def _changes(entry: AuditEntry, flags: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for d in entry.diff or ():
        if isinstance(d, Mapping) and d.get("flag") in flags and d.get("old") != d.get("new"):
            out[d["flag"]] = (d.get("old"), d.get("new"))
    return out


def _is_rollback(capability: str, changes: Mapping[str, tuple[Any, Any]]) -> bool:
    """The changes are what ``capability``'s rollback does (not a lift, not something else)."""
    spec = ROLLBACKS[capability]
    if not changes:
        return False
    if spec.takes_schema_version:
        pinned = changes.get(CONSUMER_SCHEMA_VERSION)
        return (pinned is not None and isinstance(pinned[0], int) and isinstance(pinned[1], int)
                and pinned[1] < pinned[0])
    return all(new == spec.fixed.get(flag) for flag, (_, new) in changes.items())


def _evidence(run_id: str, step: int, entry: AuditEntry) -> dict[str, Any]:
    return {"run": run_id, "step": step, "revision": entry.to_revision, "command": entry.command,
            "diff": list(entry.diff or ())}


def judge_run(record: Mapping[str, Any], by_id: Mapping[str, Mapping[str, Any]], audit: Sequence[AuditEntry],
              capability: str) -> Verdict:
    """Is the completed run ``record`` (with the runs it resumed, from ``by_id``) a drill of
    ``capability``? ``audit`` is this cluster's audit log. Pure."""
    name = record.get("runbook")
    rid = str(record.get("run_id"))
    if record.get("drill") != capability:
        declared = record.get("drill")
        what = f"declares drill: {declared}" if declared else "does not declare itself a drill (drill: CAPABILITY)"
        return Verdict(capability, False, f"run {rid}: runbook {name!r} {what}", [rid])
    if record.get("status") != "completed":
        return Verdict(capability, False, f"run {rid} is {record.get('status')}, not completed", [rid])
    chain, problem = chain_of(record, by_id)
    ids = [str(r.get("run_id")) for r in chain]
    if problem:
        return Verdict(capability, False, problem, ids)

    # Who ran each step last (a resumed run re-runs the step its predecessor stopped at).
    executed: dict[int, tuple[str, list[int] | None]] = {}
    for run in chain:
        for s in run.get("steps") or ():
            if isinstance(s, Mapping) and s.get("status") == "ok" and isinstance(s.get("index"), int):
                executed[s["index"]] = (str(run.get("run_id")), s.get("revisions"))
    total = len(record.get("steps") or ())
    missing = [i for i in range(1, total + 1) if i not in executed]
    if missing:
        return Verdict(capability, False, f"step {missing[0]} never completed in runs {', '.join(ids)}", ids)

    flags = ROLLBACKS[capability].flags
    entries = sorted((e for e in audit if e.kind == "rollback" and e.to_revision is not None),
                     key=lambda e: e.to_revision or 0)

    def written_by(index: int) -> list[AuditEntry]:
        revisions = executed[index][1]
        if not isinstance(revisions, list) or len(revisions) != 2:
            return []
        lo, hi = revisions
        return [e for e in entries if lo < (e.to_revision or 0) < hi]

    unattributed = [i for i in range(1, total + 1) if not isinstance(executed[i][1], list)]
    unrestored: Verdict | None = None
    for index in range(1, total + 1):
        for entry in written_by(index):
            changed = _changes(entry, flags)
            if not _is_rollback(capability, changed):
                continue
            rollback = _evidence(executed[index][0], index, entry)
            for later in range(index + 1, total + 1):
                for back in written_by(later):
                    if (back.to_revision or 0) <= (entry.to_revision or 0):
                        continue
                    undone = _changes(back, flags)
                    if all(f in undone and undone[f][1] == old for f, (old, _) in changed.items()):
                        return Verdict(capability, True,
                                       f"step {index} rolled {capability} back (revision {entry.to_revision}), "
                                       f"step {later} restored it (revision {back.to_revision})",
                                       ids, rollback, _evidence(executed[later][0], later, back))
            unrestored = unrestored or Verdict(
                capability, False, f"step {index} rolled {capability} back (revision {entry.to_revision}) but no "
                "later step restored its flags", ids, rollback)
    if unrestored is not None:
        return unrestored
    why = f"no step changed the {capability} flags ({', '.join(flags)}) the way its rollback does"
    if unattributed:
        why += f"; steps {', '.join(map(str, unattributed))} have no recorded revisions (the run record was not written)"
    return Verdict(capability, False, why, ids)


async def read_audit(coord: Coordinator, cluster: str) -> list[AuditEntry]:
    """This cluster's audit entries; unreadable ones are skipped (they prove nothing)."""
    out: list[AuditEntry] = []
    for kv in await coord.list(keys.audit_prefix(cluster)):
        try:
            out.append(AuditEntry.from_kv(kv.value, kv.mod_revision))
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, json.JSONDecodeError):
            continue
    return out


async def judge_recorded_run(coord: Coordinator, cluster: str, record: Mapping[str, Any],
                             capability: str) -> Verdict:
    """Whether the run ``record`` (as stored under its ``run_id``, else as given) is a drill of
    ``capability``, judged against this cluster's run records and audit log. Raises
    ``BackendUnavailable``."""
    by_id = {str(r.get("run_id")): r for r in await list_runs(coord, cluster)}
    data = by_id.get(str(record.get("run_id")), record)
    return judge_run(data, by_id, await read_audit(coord, cluster), capability)


async def drill_verdicts(coord: Coordinator, cluster: str) -> dict[str, Verdict | None]:
    """Capability -> the verdict of its most recent drill; when none qualifies, the verdict of
    the most recent candidate (a completed run that declared the capability, else a completed
    run of its shipped runbook's name) saying why not; None when there is no candidate at all.
    Raises ``BackendUnavailable``."""
    runs = await list_runs(coord, cluster)
    audit = await read_audit(coord, cluster)
    by_id = {str(r.get("run_id")): r for r in runs}
    newest_first = sorted(runs, key=lambda r: (r.get("finished_at") or 0, str(r.get("run_id"))), reverse=True)
    out: dict[str, Verdict | None] = {}
    for capability, shipped in SHIPPED.items():
        first_failure: Verdict | None = None
        for rec in newest_first:
            if rec.get("status") != "completed":
                continue
            if rec.get("drill") != capability and rec.get("runbook") != shipped:
                continue
            verdict = judge_run(rec, by_id, audit, capability)
            if verdict.ok:
                first_failure = verdict
                break
            first_failure = first_failure or verdict
        out[capability] = first_failure
    return out


async def overrides_in_force(coord: Coordinator, cluster: str, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rollback overrides recorded in the rollout document now, each with ``by_this_run``
    (an audit entry written during one of ``record``'s steps applied it) and that entry's
    revision. For a run that stopped: what it leaves in place. Raises ``BackendUnavailable``."""
    from cbctl.core.model.rollout import RolloutDocument

    kv = await coord.get(keys.rollout(cluster))
    if kv is None:
        return []
    doc = RolloutDocument.from_json(kv.value)
    if not doc.rollbacks:
        return []
    windows = [s.get("revisions") for s in record.get("steps") or ()
               if isinstance(s, Mapping) and isinstance(s.get("revisions"), list) and len(s["revisions"]) == 2]
    audit = [e for e in await read_audit(coord, cluster) if e.kind == "rollback" and e.to_revision is not None]
    out: list[dict[str, Any]] = []
    for capability, flags in sorted(doc.rollbacks.items()):
        applied = [e for e in audit
                   if any(lo < (e.to_revision or 0) < hi for lo, hi in windows)
                   and _is_rollback(capability, _changes(e, ROLLBACKS[capability].flags))]
        out.append({"capability": capability, "flags": dict(flags), "by_this_run": bool(applied),
                    "revision": applied[-1].to_revision if applied else None})
    return out


__all__ = ["SHIPPED", "Verdict", "chain_of", "drill_verdicts", "judge_recorded_run", "judge_run", "overrides_in_force",
           "read_audit"]
