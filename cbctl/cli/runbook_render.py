"""How ``cbctl runbook`` shows things: the runbook list and one runbook, a dry run, the end of
a run (what failed, what was done, how to resume, rollbacks left in place), a drill's verdict
and the recorded runs. Text only; ``-o json`` shapes are built by the commands."""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cbctl.cli.common import err, print_table
from cbctl.core.model.records import RunRecord

if TYPE_CHECKING:
    from cbctl.core.operator.drills import Verdict
    from cbctl.core.operator.runbook.model import Runbook


def show_list(good: Sequence[Runbook]) -> None:
    """``runbook list`` as a table (or "no runbooks" on stderr); drill and file with -o wide."""
    if good:
        print_table(None, ["name", "kind", "steps", "summary", "drill", "file"],
                    [(r.name, r.kind, len(r.steps), r.summary, r.drill or "-", r.path) for r in good],
                    wide=("drill", "file"))
    else:
        err("no runbooks")


def show_runbook(rb: Runbook) -> None:
    """``runbook show``: summary, file, description, vars and steps with their lines."""
    print(f"{rb.name} ({rb.kind}) — {rb.summary}")
    print(f"file: {rb.path}")
    if rb.description:
        print(rb.description.rstrip())
    if rb.vars:
        print_table("vars", ["name", "required", "default", "secret", "description"],
                    [(v.name, "yes" if v.required else "no", "-" if v.secret or v.default is None else v.default,
                      "yes" if v.secret else "no", v.description) for v in rb.vars.values()])
    print_table("steps", ["#", "line", "kind", "step", "confirm"],
                [(s.index, s.line, s.kind, s.source, s.confirm or "") for s in rb.steps])


def dry_run_steps(rb: Runbook, shown: Mapping[str, str], from_step: int) -> list[dict[str, Any]]:
    """The steps of a dry run with (masked) variables substituted: the ``-o json`` rows."""
    return [{"index": s.index, "kind": s.kind, "text": s.render_text(shown), "confirm": s.render_confirm(shown),
             "skipped": s.index < from_step} for s in rb.steps]


def show_dry_run(steps: Sequence[Mapping[str, Any]]) -> None:
    for s in steps:
        mark = "skip" if s["skipped"] else f"{s['index']}/{len(steps)}"
        err(f"step {mark} [{s['kind']}] {s['text']}")
        if s["confirm"]:
            err(f"  asks: {s['confirm']}")


def report(result: RunRecord, prefix: Sequence[str] = ("cbctl",)) -> None:
    """What failed, what was already done, the exact command to resume, and any rollback
    override left in force (with the command that lifts it)."""
    if result.status == "completed":
        n = len(result.done_steps)
        err(f"runbook {result.runbook}: completed ({n} step{'' if n == 1 else 's'} run) — run {result.run_id}")
        if result.from_step > 1 and not result.resumes:
            err(f"note: started at step {result.from_step} without --resumes: recorded, but not a drill")
        return
    failed = result.failed_step
    assert failed is not None  # a run that did not complete stopped at a step
    if result.status == "interrupted":
        err(f"runbook {result.runbook}: interrupted by {result.interrupted_by} at step {failed.index}: {failed.text}")
    else:
        err(f"runbook {result.runbook}: {result.status} at step {failed.index}: {failed.text}")
    if failed.detail:
        err(f"  {failed.detail}")
    done = result.done_steps
    err("already done: " + (", ".join(f"{s.index}" for s in done) if done else "nothing"))
    for s in done:
        err(f"  {s.index}. {s.text}")
    for o in result.overrides or ():
        who = f"applied by this run (revision {o['revision']})" if o["by_this_run"] else "in force before this run"
        flags = ", ".join(f"{k}={v}" for k, v in sorted(o["flags"].items()))
        err(f"rollback left in place: {o['capability']} ({flags}), {who}")
        err(f"  lift it with: {shlex.join([*prefix, 'rollback', o['capability'], '--clear', '--reason', 'REASON'])}")
    if result.overrides == []:
        err("rollback overrides in force: none")
    err(f"resume with: {result.resume}")
    err(f"run {result.run_id}")


def report_drill(drill: str, verdict: Verdict) -> None:
    """Whether a completed run of a declared drill proves the rollback."""
    if verdict.ok:
        err(f"drill of {drill}: proven — {verdict.reason} (runs {', '.join(verdict.runs)})")
    else:
        err(f"drill of {drill}: NOT proven — {verdict.reason}")


def show_runs(recs: Sequence[Mapping[str, Any]]) -> None:
    """``runbook runs`` as a table (or "no recorded runs" on stderr)."""
    if not recs:
        err("no recorded runs")
        return

    def when(t: Any) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if isinstance(t, (int, float)) else "-"

    rows = []
    for r in map(RunRecord.from_dict, recs):
        stop = r.stopped_step
        rows.append((r.run_id, r.runbook, r.kind, r.status, r.actor,
                     when(r.started_at) if r.started_at else "-", f"step {stop}" if stop is not None else "-",
                     when(r.finished_at) if r.finished_at else "-", r.resumes or "-"))
    print_table("runbook runs", ["run", "runbook", "kind", "status", "actor", "started", "stopped at", "finished",
                                 "resumes"], rows, wide=("finished", "resumes"))
