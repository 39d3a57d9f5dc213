"""The one path every mutating command takes: show diff, confirm, CAS-commit, wait."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from cbctl.cli import complete_values as cv
from cbctl.cli.common import OutputFormat, confirm, emit, err, fmt_value, show_diff

if TYPE_CHECKING:
    from cbctl.core.model.rollout import RolloutDocument
    from cbctl.core.operator.controlplane import ControlPlane, Plan, WaitResult

#: ``--ignore-missing NODE`` of every mutating command that waits.
IgnoreMissingOpt = Annotated[
    list[str] | None,
    typer.Option("--ignore-missing", metavar="NODE", shell_complete=cv.node_ids,
                 help="Do not wait for this expected node while it is not live (repeatable; recorded in the audit log)."),
]


def noop_result(kind: str, doc: RolloutDocument, revision: int, *, dry_run: bool = False) -> dict[str, Any]:
    """The JSON of a mutating command that has nothing to do (``stage advance --to CURRENT``,
    ``flags set`` to the values already pinned): the same shape as a write, ``changed`` false,
    ``revision`` the current one (nothing written)."""
    return {"kind": kind, "from_stage": doc.stage, "to_stage": doc.stage, "from_revision": revision,
            "revision": revision, "diff": [], "dry_run": dry_run, "changed": False, "written": False}


def document_changes(old: RolloutDocument, new: RolloutDocument) -> list[str]:
    """What a plan changes in the document besides effective flag values (a pin to the value a
    flag already has, a rollback override of flags that are already so, canary sets): shown when
    the flag diff is empty, so "no flag changes" is never followed by an unexplained write."""
    out: list[str] = []
    if old.stage != new.stage:
        out.append(f"stage {old.stage} -> {new.stage}")
    for name in sorted(set(old.manual) | set(new.manual)):
        if name not in new.manual:
            out.append(f"manual pin of {name} dropped")
        elif old.manual.get(name, object()) != new.manual[name]:
            out.append(f"manual pin {name}={fmt_value(new.manual[name])} recorded (overrides the stage plan)")
    for cap in sorted(set(old.rollbacks) | set(new.rollbacks)):
        if cap not in new.rollbacks:
            out.append(f"rollback override {cap} lifted")
        elif old.rollbacks.get(cap) != new.rollbacks[cap]:
            out.append(f"rollback override {cap} recorded")
    if list(old.canary_lanes) != list(new.canary_lanes):
        out.append(f"canary lanes {fmt_value(list(new.canary_lanes))}")
    if list(old.canary_subscribers) != list(new.canary_subscribers):
        out.append(f"canary subscribers {fmt_value(list(new.canary_subscribers))}")
    return out


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
    ignore_missing: list[str] | None = None,
) -> int:
    """Show, ask, write by CAS on the revision shown, optionally wait. Returns the exit code.

    ``ignore_missing``: expected nodes not to wait for (checked against ``expected-nodes``,
    recorded in the audit entry).  A dry run writes nothing but reports what the wait would
    find: expected nodes that are not live now.
    """
    ignored = sorted(set(ignore_missing or ()))
    cp.check_ignore_missing(ignored)
    result: dict[str, Any] = {
        "kind": plan.kind,
        "from_stage": plan.old.stage,
        "to_stage": plan.new.stage,
        "from_revision": plan.base_revision,
        "revision": None,
        "diff": plan.diff_public(),
        "dry_run": dry_run,
        "changed": not plan.is_noop,
        "written": False,
    }
    err(f"{plan.command}: revision {plan.base_revision}, stage {plan.old.stage} -> {plan.new.stage}")
    if plan.is_noop:
        err("no changes: the document already says this; nothing written")
        result["revision"] = plan.base_revision
        if output.structured:
            emit(output, result)
        return 0
    if plan.changes:
        show_diff(plan.changes)
    else:
        # The document changes although no flag value does: say what is written, and why.
        err("  no flag value changes; the document records: " + "; ".join(document_changes(plan.old, plan.new)))
    if dry_run:
        if wait:
            live = await cp.live_nodes()
            absent = [n for n in cp.ctx.expected_nodes if n not in live and n not in ignored]
            if absent:
                err(f"dry run: expected node(s) not live: {', '.join(absent)}; the real command's --wait would "
                    f"fail on them (unless --ignore-missing {' --ignore-missing '.join(absent)})")
                result["missing"] = absent
        err("dry run: nothing written")
        if output.structured:
            emit(output, result)
        return 0
    confirm(question, yes)
    revision = await cp.commit(plan, reason=reason, forced=forced, gates=gates, ignore_missing=ignored)
    result["revision"] = revision
    result["written"] = True
    err(f"written: revision {revision}")
    code = 0
    if wait:
        res = await wait_for_agents(cp, revision, timeout, ignore_missing=ignored)
        result["wait"] = {"applied": res.applied, "pending": res.pending, "seconds": round(res.elapsed, 3),
                          "missing": res.missing, "ignored": res.ignored}
        if not res.ok:
            code = 1
    if output.structured:
        emit(output, result)
    return code


def _who(res: WaitResult) -> str:
    """``node-2, node-3 (expected, not live)``."""
    return ", ".join([*res.pending, *(f"{n} (expected, not live)" for n in res.missing)])


async def wait_for_agents(cp: ControlPlane, revision: int, timeout: float, *,
                          ignore_missing: list[str] | None = None) -> WaitResult:
    """Wait with a progress line on stderr; name the agents that did not apply in time,
    expected nodes that are not live included.

    Ctrl-C or SIGTERM during the wait: says that ``revision`` IS written (it stays) and who
    had not applied it yet, then ends the command (130 for Ctrl-C, 143 for SIGTERM).
    """
    import asyncio
    import contextlib
    import signal

    from cbctl.cli.progress import ProgressLine

    # "2/3 applied; waiting for node-3": a live line on a terminal, one line per change elsewhere.
    status: ProgressLine | None = ProgressLine()
    last: WaitResult | None = None

    def progress(res: WaitResult) -> None:
        nonlocal last
        last = res
        if status:
            status.update(res.progress_line())

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        if task is not None:
            task.cancel()

    # The handler in force before ours (a `runbook run` around this command installs one): the
    # loop's remove_signal_handler resets SIGTERM to the default action, so it is put back by
    # hand, and it is told about a SIGTERM that arrives while we wait.
    previous = signal.getsignal(signal.SIGTERM)
    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        handler = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / no signals here
        handler = False
    try:
        res = await cp.wait_applied(revision, timeout=timeout, progress=progress, ignore_missing=ignore_missing or ())
    except (asyncio.CancelledError, KeyboardInterrupt):
        if status:
            status.close()
            status = None
        why = "terminated (SIGTERM)" if terminated else "interrupted"
        if last is None:
            err(f"cbctl: {why} while waiting: revision {revision} IS written and stays; "
                "no agent state was read yet (see `cbctl nodes`)")
        elif last.ok:
            err(f"cbctl: {why} while waiting: revision {revision} IS written and stays; every agent had applied it")
        else:
            err(f"cbctl: {why} while waiting: revision {revision} IS written and stays; not yet applied by: "
                f"{_who(last)} (follow with `cbctl nodes`)")
        if terminated:
            if callable(previous):
                # An enclosing run's handler decides (it records the interruption and raises).
                previous(signal.SIGTERM, None)
            raise typer.Exit(143) from None
        raise
    finally:
        if status:
            status.close()
        if handler:
            loop.remove_signal_handler(signal.SIGTERM)
            with contextlib.suppress(ValueError, TypeError):  # not the main thread / None
                signal.signal(signal.SIGTERM, previous)
    total = len(res.applied) + len(res.pending) + len(res.missing)
    excused = f" ({', '.join(res.ignored)} not live, ignored by --ignore-missing)" if res.ignored else ""
    if res.ok:
        err(f"applied by {len(res.applied)}/{total} agents in {res.elapsed:.2f}s{excused}")
    else:
        err(
            f"cbctl: error: {len(res.pending) + len(res.missing)}/{total} agents did not apply revision {revision} "
            f"within {timeout:g}s: {_who(res)}{excused}"
            + (f"; to go on without a node that is down, pass --ignore-missing NODE" if res.missing else "")
        )
    return res
