"""`cbctl runbook list|show|run|runs`: on-call procedures as data (cbctl/runbooks/*.yaml, shipped in the package).

Commands and options only. The runbook model, parser, executor and run records are
:mod:`cbctl.core.operator.runbook`; what a run is handed (in-process ``cbctl``, recorder, queries)
is :mod:`cbctl.cli.runbook_steps`; text output is :mod:`cbctl.cli.runbook_render`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from cbctl.cli import complete_values as cv
from cbctl.cli import runbook_render as render
from cbctl.cli.common import (
    DryRunOpt,
    NoHeadersOpt,
    OutputOpt,
    YesOpt,
    emit,
    err,
    new_app,
    output_format,
    run,
    state,
    with_coordinator,
)
from cbctl.core.model.times import rfc3339
from cbctl.cli.runbook_steps import runbooks_dir

if TYPE_CHECKING:
    from cbctl.core.operator.runbook.model import Runbook

T = TypeVar("T")

app = new_app("On-call procedures as data: list, show and run runbooks (YAML; shipped in cbctl/runbooks/).")


def _complete_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """Runbook names for tab completion: file names only, nothing parsed (it runs per key press)."""
    from cbctl.core.operator.runbook.parser import default_runbooks_dir

    directory = ctx.params.get("directory") or default_runbooks_dir()
    try:
        names = sorted(p.stem for p in Path(directory).glob("*.yaml"))
    except OSError:
        return []
    return [n for n in names if n.startswith(incomplete)]


DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", envvar="CBCTL_RUNBOOKS_DIR", shell_complete=cv.dirs,
                 help="Runbooks directory (env CBCTL_RUNBOOKS_DIR; default: the runbooks shipped in the package, cbctl/runbooks/)."),
]
NameArg = Annotated[
    str, typer.Argument(help="Runbook name (or a path to a .yaml file).", shell_complete=cv.runbook_names)
]


def _call(fn: Callable[[], T]) -> T:
    """Run a synchronous body, mapping cbctl errors to their exit codes with one message.

    Not ``common.run_sync``: that runs the body inside an event loop, and the steps of a
    runbook start their own (``asyncio.run`` cannot nest).
    """
    from cbctl.core.model.errors import CbctlError

    try:
        return fn()
    except CbctlError as exc:
        err(f"cbctl: error: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err("interrupted")
        raise typer.Exit(130) from None


@app.command("list")
def list_(ctx: typer.Context, directory: DirOpt = None, output: OutputOpt = None,
          no_headers: NoHeadersOpt = False) -> None:
    """Every runbook: name, kind (rollback drills vs procedures), steps, summary (-o wide: the
    drill and the file).

    Invalid runbook files are reported on stderr with FILE:LINE (every problem of each) and make
    the exit code 2.
    """
    from cbctl.core.operator.runbook.parser import load_all

    fmt = output_format(ctx, output, no_headers)

    def body() -> int:
        good, bad = load_all(runbooks_dir(directory))
        problems = [str(one) for e in bad for one in getattr(e, "errors", [e])]
        if fmt.structured:
            emit(fmt, {"runbooks": [{"name": r.name, "kind": r.kind, "steps": len(r.steps), "summary": r.summary,
                                     "path": r.path} for r in good],
                       "errors": problems})
        else:
            render.show_list(good)
        for problem in problems:
            err(f"cbctl: error: {problem}")
        return 2 if bad else 0

    raise typer.Exit(_call(body))


@app.command("show")
def show(ctx: typer.Context, name: NameArg, directory: DirOpt = None, output: OutputOpt = None,
         no_headers: NoHeadersOpt = False) -> None:
    """A runbook's summary, variables and steps (with their line numbers).

    The command lines are checked against the command tree too (variables without a value
    stand in as <NAME>): a runbook that `runbook run` would refuse is shown, and its problems
    are reported on stderr with FILE:LINE, exit 2.
    """
    from cbctl.cli import runbook_steps as steps
    from cbctl.core.model.errors import BadInput
    from cbctl.core.operator.runbook.parser import find_runbook

    fmt = output_format(ctx, output, no_headers)

    def body() -> int:
        rb = find_runbook(runbooks_dir(directory), name)
        try:
            steps.validate_commands(rb, steps.show_values(rb), directory=directory, lenient=True)
            problems: list[str] = []
        except BadInput as exc:
            problems = [str(one) for one in getattr(exc, "errors", [exc])]
        if fmt.structured:
            emit(fmt, {**rb.public(), "errors": problems})
        else:
            render.show_runbook(rb)
        for problem in problems:
            err(f"cbctl: error: {problem}")
        return 2 if problems else 0

    raise typer.Exit(_call(body))


@app.command("run")
def run_(
    ctx: typer.Context,
    name: NameArg,
    var: Annotated[list[str] | None, typer.Option("--var", help="NAME=VALUE for a runbook variable (repeatable). Passed as one literal argument: never parsed by a shell.")] = None,
    from_step: Annotated[int, typer.Option("--from-step", min=1, help="Resume at step N (steps before it are not run).")] = 1,
    resumes: Annotated[str | None, typer.Option("--resumes", metavar="RUN", help="The stopped run this one continues (printed in its resume line); links the runs into one chain, as a drill needs.")] = None,
    yes: YesOpt = False,
    dry_run: DryRunOpt = False,
    directory: DirOpt = None,
    output: OutputOpt = None,
) -> None:
    """Run a runbook step by step; stop at the first failing step and say how to resume.

    Each step is shown (stderr) before it runs and asked about unless --yes (a step's own
    `confirm:` question is asked instead). Every command line is checked against the command
    tree before anything runs. The run is recorded in the coordination store (runbooks/<run-id>),
    with the store revisions around each step, so `cbctl exit-criteria` can check a drill
    (`drill: CAPABILITY`) against the audit log. Ctrl-C or SIGTERM ends the run as interrupted:
    recorded, with the step reached, the resume line and any rollback left in place. --dry-run
    shows the steps with variables substituted and runs and records nothing.
    """
    from cbctl.cli import runbook_steps as steps
    from cbctl.core.model.errors import BadInput, CbctlError
    from cbctl.core.operator.runbook.executor import RunbookExecutor
    from cbctl.core.operator.runbook.interrupts import interrupt_guard
    from cbctl.core.operator.runbook.model import masked, parse_var_assignments, resolve_vars
    from cbctl.core.operator.runbook.parser import ENV_DIR, find_runbook

    st = state(ctx)
    fmt = output_format(ctx, output)

    def prepare() -> tuple[Runbook, dict[str, str]]:
        rb = find_runbook(runbooks_dir(directory), name)
        values = resolve_vars(rb, parse_var_assignments(var or []))
        if not 1 <= from_step <= len(rb.steps):
            raise BadInput(f"--from-step {from_step}: runbook {rb.name!r} has steps 1..{len(rb.steps)}")
        steps.validate_commands(rb, values, directory=directory)
        return rb, values

    rb, values = _call(prepare)

    if dry_run:
        shown = masked(rb, values)
        rows = render.dry_run_steps(rb, shown, from_step)
        if fmt.structured:
            emit(fmt, {"runbook": rb.name, "kind": rb.kind, "dry_run": True, "from_step": from_step, "vars": shown,
                       "steps": rows})
        else:
            render.show_dry_run(rows)
        err("dry run: nothing run, nothing recorded")
        raise typer.Exit(0)

    def ask(question: str) -> bool:
        try:
            return bool(typer.confirm(question, default=False, err=True))
        except typer.Abort:  # Ctrl-C or end of input at the prompt: the executor records "aborted"
            raise KeyboardInterrupt from None

    if not yes and not sys.stdin.isatty():
        err("cbctl: error: runbook run asks before each step — no terminal to ask on; pass --yes")
        raise typer.Exit(BadInput.exit_code)

    if resumes is not None:
        _call(lambda: steps.check_resumes(st, rb, resumes, from_step))

    record = steps.recorder(st)
    prefix = ["cbctl", *steps.global_args(st, [])]
    extra = ["--dir", str(directory)] if directory is not None else []
    # Given by path: the resume line names that file (absolute: it may be run from elsewhere).
    by_path = name.endswith(".yaml") or os.sep in name or "/" in name
    target = str(Path(name).resolve()) if by_path else None
    from cbctl.cli.progress import ProgressLine

    # A check's polls: a live countdown on a terminal, one line per new observation elsewhere.
    checks = ProgressLine()

    def announce(message: str) -> None:
        checks.close()
        err(message)

    with interrupt_guard() as guard, checks:
        executor = RunbookExecutor(
            rb,
            values,
            run_cbctl=guard.step(steps.in_process_runner(st, secrets=[values[n] for n, v in rb.vars.items() if v.secret])),
            query=guard.step(_call(lambda: steps.prom_query(st))) if any(s.check for s in rb.steps) else None,
            run_external=guard.step(steps.run_external),
            confirm=None if yes else guard.step(ask),
            announce=announce,
            check_progress=lambda poll: checks.update(poll.line(), key=(poll.step, poll.state)),
            record=record,
            interrupted=guard.reason,
            overrides=steps.overrides_reader(st),
            from_step=from_step,
            cluster=_call(lambda: st.context().cluster),
            resumes=resumes,
            resume_prefix=prefix,
            resume_extra=extra,
            resume_target=target,
            sleep=guard.step(time.sleep),
        )
        # A step may run another runbook (`cbctl runbook run X`): it must look in the same directory.
        saved_dir = os.environ.get(ENV_DIR)
        if directory is not None:
            os.environ[ENV_DIR] = str(directory.resolve())
        try:
            result = _call(executor.execute)
        finally:
            if directory is not None:
                if saved_dir is None:
                    os.environ.pop(ENV_DIR, None)
                else:
                    os.environ[ENV_DIR] = saved_dir

    data = public_run(result.to_json())
    if fmt.structured:
        emit(fmt, data)
    render.report(result, prefix)
    if result.status == "completed" and rb.drill:
        # A completed run of a declared drill: say at once whether it proves the rollback.
        try:
            render.report_drill(rb.drill, steps.judge_drill(st, result))
        except CbctlError as exc:
            err(f"warning: could not check the drill evidence: {exc}")
    if result.record_error is not None:
        err(f"cbctl: error: the run record could not be written: {result.record_error}")
        raise typer.Exit(4 if result.status == "completed" else 1)
    if result.status == "interrupted":
        raise typer.Exit(143 if result.interrupted_by == "SIGTERM" else 130)
    raise typer.Exit(0 if result.status == "completed" else 1)


@app.command("runs")
def runs(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this runbook's runs.", autocompletion=_complete_names)] = None,
    output: OutputOpt = None,
    no_headers: NoHeadersOpt = False,
) -> None:
    """Recorded runs (newest last): status, who, when, where a failed run stopped (-o wide:
    finished, the run it resumes)."""
    from cbctl.core.operator.runbook.store import list_runs

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    async def body() -> None:
        async def inner(c: Any, coord: Any) -> list[dict[str, Any]]:
            return await list_runs(coord, c.cluster)

        recs = [r for r in await with_coordinator(st, inner) if name is None or r.get("runbook") == name]
        if fmt.structured:
            emit(fmt, {"runs": [public_run(r) for r in recs]})
        else:
            render.show_runs(recs)

    run(body)


def public_run(rec: dict[str, Any]) -> dict[str, Any]:
    """A run record as ``-o json`` shows it: the stored record (Unix seconds, which drills and
    exit-criteria read) with ``started_at``/``finished_at`` as RFC 3339 UTC."""
    out = dict(rec)
    for key in ("started_at", "finished_at"):
        if key in out:
            out[key] = rfc3339(out[key]) if isinstance(out[key], (int, float)) and out[key] else None
    return out
