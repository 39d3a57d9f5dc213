"""The one path every mutating command takes: show diff, confirm, CAS-commit, wait."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from cbctl.cli.common import OutputFormat, confirm, emit_json, err, show_diff

if TYPE_CHECKING:
    from cbctl.core.controlplane import ControlPlane, Plan, WaitResult


async def apply_plan(
    cp: ControlPlane,
    plan: Plan,
    *,
    output: OutputFormat,
    reason: str | None,
    yes: bool,
    dry_run: bool,
    wait: bool,
    timeout: float,
    question: str,
    forced: bool = False,
    gates: list[dict[str, Any]] | None = None,
) -> int:
    """Show, ask, write by CAS on the revision shown, optionally wait. Returns the exit code."""
    result: dict[str, Any] = {
        "kind": plan.kind,
        "from_stage": plan.old.stage,
        "to_stage": plan.new.stage,
        "from_revision": plan.base_revision,
        "revision": None,
        "diff": plan.diff_public(),
        "dry_run": dry_run,
        "changed": not plan.is_noop,
    }
    err(f"{plan.command}: revision {plan.base_revision}, stage {plan.old.stage} -> {plan.new.stage}")
    show_diff(plan.changes)
    if plan.is_noop:
        err("nothing to change; nothing written")
        if output is OutputFormat.json:
            emit_json(result)
        return 0
    if dry_run:
        err("dry run: nothing written")
        if output is OutputFormat.json:
            emit_json(result)
        return 0
    confirm(question, yes)
    revision = await cp.commit(plan, reason=reason, forced=forced, gates=gates)
    result["revision"] = revision
    err(f"written: revision {revision}")
    code = 0
    if wait:
        res = await wait_for_agents(cp, revision, timeout)
        result["wait"] = {"applied": res.applied, "pending": res.pending, "seconds": round(res.elapsed, 3)}
        if not res.ok:
            code = 1
    if output is OutputFormat.json:
        emit_json(result)
    return code


async def wait_for_agents(cp: ControlPlane, revision: int, timeout: float) -> WaitResult:
    """Wait with a progress line on stderr; name the agents that did not apply in time."""
    from rich.console import Console

    console = Console(stderr=True, markup=False, highlight=False)
    live = sys.stderr.isatty()
    status = console.status(f"waiting for agents to apply revision {revision}") if live else None
    if status:
        status.start()

    def progress(res: WaitResult) -> None:
        total = len(res.applied) + len(res.pending)
        if status:
            status.update(f"revision {revision}: {len(res.applied)}/{total} agents applied")

    try:
        res = await cp.wait_applied(revision, timeout=timeout, progress=progress)
    finally:
        if status:
            status.stop()
    total = len(res.applied) + len(res.pending)
    if res.ok:
        err(f"applied by {len(res.applied)}/{total} live agents in {res.elapsed:.2f}s")
    else:
        err(
            f"cbctl: error: {len(res.pending)}/{total} agents did not apply revision {revision} within "
            f"{timeout:g}s: {', '.join(res.pending)}"
        )
    return res
