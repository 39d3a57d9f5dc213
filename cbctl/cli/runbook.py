"""`cbctl runbook list|show|run|runs`: on-call procedures as data (runbooks/*.yaml).

The runbook model and executor live in :mod:`cbctl.core.operator.runbook`; this module gives the
executor a way to run ``cbctl`` in-process (:func:`in_process_runner`), to ask, to print
progress on stderr, to query Prometheus and to record the run in the coordination store.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from cbctl.cli.common import (
    COMMAND_OVERRIDE,
    AppState,
    DryRunOpt,
    OutputFormat,
    OutputOpt,
    YesOpt,
    emit_json,
    err,
    new_app,
    output_format,
    print_table,
    run,
    state,
    with_coordinator,
)

if TYPE_CHECKING:
    from cbctl.core.operator.runbook.model import Runbook

T = TypeVar("T")

app = new_app("On-call procedures as data: list, show and run runbooks (runbooks/*.yaml).")


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
    typer.Option("--dir", envvar="CBCTL_RUNBOOKS_DIR",
                 help="Runbooks directory (env CBCTL_RUNBOOKS_DIR; default: the project's runbooks/)."),
]
NameArg = Annotated[
    str, typer.Argument(help="Runbook name (or a path to a .yaml file).", autocompletion=_complete_names)
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


def _dir(directory: Path | None) -> Path:
    from cbctl.core.operator.runbook.parser import default_runbooks_dir

    return directory if directory is not None else default_runbooks_dir()


# -- interrupts ------------------------------------------------------------------------------


class Interrupts:
    """SIGINT and SIGTERM while ``runbook run`` runs, shared by nested runs in this process.

    The first signal is remembered (:meth:`reason`) and, while a step is running, raised as
    ``KeyboardInterrupt`` into it so the step stops (a command maps that to its own exit code;
    the executor asks :meth:`reason` and records the step as interrupted). Between steps —
    while the run record is being written — a signal is only remembered, so the record is never
    left half-written; the executor stops before the next step. A third signal raises anyway
    (an escape hatch when writing the record hangs).
    """

    def __init__(self) -> None:
        self._reason: str | None = None
        self._count = 0
        self.depth: list[bool] = []  # per nested run: is one of its steps running?

    def reason(self) -> str | None:
        return self._reason

    def handle(self, signum: int, frame: Any) -> None:
        import signal

        self._reason = self._reason or signal.Signals(signum).name
        self._count += 1
        if (self.depth and self.depth[-1]) or self._count >= 3:
            raise KeyboardInterrupt

    def step(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` wrapped so that a signal during it interrupts it."""
        def wrapped(*args: Any, **kwargs: Any) -> T:
            level = len(self.depth) - 1
            self.depth[level] = True
            try:
                # A signal that came after the executor's last look but before the line above was
                # only remembered: stop here, or the step would run to its end (a 2-minute
                # `sleep` step would ignore Ctrl-C).
                if self._reason is not None:
                    raise KeyboardInterrupt
                return fn(*args, **kwargs)
            finally:
                self.depth[level] = False

        return wrapped


_INTERRUPTS: Interrupts | None = None


@contextlib.contextmanager
def interrupt_guard() -> Iterator[Interrupts]:
    """Install the SIGINT/SIGTERM handlers for a run (the outermost run installs and restores
    them; a nested run in the same process shares them)."""
    import signal
    import threading

    global _INTERRUPTS
    outer = _INTERRUPTS is None
    if outer:
        _INTERRUPTS = Interrupts()
    guard = _INTERRUPTS
    assert guard is not None
    saved: dict[int, Any] = {}
    if outer and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, guard.handle)
    guard.depth.append(False)
    try:
        yield guard
    finally:
        guard.depth.pop()
        if outer:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            _INTERRUPTS = None


# -- running cbctl in-process ----------------------------------------------------------------


def _root_command() -> Any:
    from typer.main import get_command

    from cbctl.cli.main import app as root_app  # here, not at import: main imports us lazily

    return get_command(root_app)


def global_args(st: AppState, argv: Sequence[str]) -> list[str]:
    """The parent's ``--config``/``--context`` for a step, unless the step sets its own."""
    out: list[str] = []
    for opt, value in (("--config", st.config_path), ("--context", st.context_name)):
        if value and not any(a == opt or a.startswith(opt + "=") for a in argv):
            out += [opt, value]
    return out


def in_process_runner(st: AppState, *, secrets: Sequence[str] = ()) -> Callable[[Sequence[str]], int]:
    """``run_cbctl(argv) -> exit code`` for the executor: ``argv`` is ``["cbctl", ...]``.

    The command runs in this process through the click command of the Typer app with
    ``standalone_mode=False``, so nothing calls ``sys.exit``; exit codes come back from
    ``typer.Exit``/``SystemExit``, usage errors are shown and give 2. The step's stdout goes to
    stderr: during a runbook it is progress, and ``runbook run -o json`` keeps stdout for the
    run record alone. ``secrets`` (values of secret variables) are replaced by ``<secret>`` in
    the command line the step's audit entry records.
    """
    from typer import Abort, Exit
    from typer._click.exceptions import ClickException

    cmd = _root_command()

    def run_cbctl(argv: Sequence[str]) -> int:
        args = list(argv[1:])
        # The step's audit entry names the step's command, not `cbctl runbook run ...`
        # (secret values masked).
        token = COMMAND_OVERRIDE.set(" ".join(["cbctl", *(_redact(a, secrets) for a in args)]))
        try:
            with contextlib.redirect_stdout(sys.stderr):
                rv = cmd.main(args=global_args(st, args) + args, prog_name="cbctl", standalone_mode=False)
        except ClickException as exc:
            exc.show()
            return exc.exit_code
        except Exit as exc:
            return exc.exit_code
        except Abort:
            return 1
        except SystemExit as exc:
            code = exc.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        finally:
            COMMAND_OVERRIDE.reset(token)
        return rv if isinstance(rv, int) else 0

    return run_cbctl


def _redact(text: str, secrets: Sequence[str]) -> str:
    from cbctl.core.operator.runbook.model import SECRET_PLACEHOLDER

    for value in secrets:
        if value:
            text = text.replace(value, SECRET_PLACEHOLDER)
    return text


def check_cbctl_argv(argv: Sequence[str], root: Any = None, *, shown: str | None = None) -> Any:
    """Parse ``argv`` (``["cbctl", ...]``) against the real command tree without running it;
    return the innermost click context (its ``params`` hold the converted values).

    Raises ``BadInput`` naming the problem: an unknown command or option, a bad choice, a
    missing argument, or a command line that only shows help. Nothing is invoked (click's
    ``make_context`` parses and converts parameters; command callbacks do not run). ``shown``
    is how messages spell the command line (default: ``argv`` quoted).
    """
    from typer import Exit
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer.core import TyperGroup

    from cbctl.core.model.errors import BadInput

    shown = shown if shown is not None else shlex.join(argv)
    root = root if root is not None else _root_command()
    try:
        # --help/--version callbacks print as they parse: keep that off our stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            ctx = root.make_context("cbctl", list(argv[1:]))
            while isinstance(ctx.command, TyperGroup):
                rest = [*ctx._protected_args, *ctx.args]
                if not rest:
                    raise BadInput(f"{shown}: {ctx.command_path} needs a command")
                name, sub, rest = ctx.command.resolve_command(ctx, rest)
                ctx = sub.make_context(name, rest, parent=ctx)
    except NoArgsIsHelpError as exc:
        raise BadInput(f"{shown}: {exc.ctx.command_path if exc.ctx else 'cbctl'} needs a command") from None
    except ClickException as exc:
        raise BadInput(f"{shown}: {exc.format_message()}") from None
    except Exit:
        raise BadInput(f"{shown}: only shows help or the version; not a runbook step") from None
    return ctx


def validate_commands(rb: Runbook, values: Mapping[str, str], *, directory: Path | None = None,
                      _stack: tuple[str, ...] = ()) -> None:
    """Every in-process step of ``rb`` must parse with ``values`` substituted, so a typo fails
    before step 1 runs. A step that runs another runbook (``cbctl runbook run NAME --var ...``)
    is followed: that runbook must exist (in its ``--dir``, else ``directory``, else the
    default), get its required variables and parse too.
    Raises ``RunbookError`` (``FILE:LINE: step N: ...``)."""
    from cbctl.core.model.errors import BadInput, NotFound
    from cbctl.core.operator.runbook.model import (
        SECRET_PLACEHOLDER,
        RunbookError,
        masked,
        parse_var_assignments,
        resolve_vars,
    )
    from cbctl.core.operator.runbook.parser import find_runbook

    root = _root_command()
    stack = (*_stack, rb.name)
    for step in rb.steps:
        if not step.in_process:
            continue
        try:
            ctx = check_cbctl_argv(step.render_argv(values), root, shown=step.render_text(masked(rb, values)))
            if ctx.command_path == "cbctl runbook run":
                params = ctx.params
                if params["name"] in stack:
                    raise BadInput(f"runbook {params['name']!r} would run itself ({' -> '.join(stack)})")
                nested_dir = _dir(params.get("directory") or directory)
                nested = find_runbook(nested_dir, params["name"])
                validate_commands(nested, resolve_vars(nested, parse_var_assignments(params.get("var") or [])),
                                  directory=nested_dir, _stack=stack)
        except (BadInput, NotFound) as exc:  # a nested runbook's RunbookError too: prefixed with this step
            message = str(exc)
            for name, spec in rb.vars.items():  # click quotes bad values: never a secret one
                if spec.secret and values.get(name):
                    message = message.replace(values[name], SECRET_PLACEHOLDER)
            raise RunbookError(rb.path, step.line, f"step {step.index}: {message}") from None


# -- commands --------------------------------------------------------------------------------


@app.command("list")
def list_(ctx: typer.Context, directory: DirOpt = None, output: OutputOpt = None) -> None:
    """Every runbook: name, kind (rollback drills vs procedures), steps, summary.

    Invalid runbook files are reported on stderr with FILE:LINE and make the exit code 2.
    """
    from cbctl.core.operator.runbook.parser import load_all

    fmt = output_format(ctx, output)

    def body() -> int:
        good, bad = load_all(_dir(directory))
        if fmt is OutputFormat.json:
            emit_json({"runbooks": [{"name": r.name, "kind": r.kind, "steps": len(r.steps), "summary": r.summary,
                                     "path": r.path} for r in good],
                       "errors": [str(e) for e in bad]})
        elif good:
            print_table(None, ["name", "kind", "steps", "summary"], [(r.name, r.kind, len(r.steps), r.summary) for r in good])
        else:
            err("no runbooks")
        for e in bad:
            err(f"cbctl: error: {e}")
        return 2 if bad else 0

    raise typer.Exit(_call(body))


@app.command("show")
def show(ctx: typer.Context, name: NameArg, directory: DirOpt = None, output: OutputOpt = None) -> None:
    """A runbook's summary, variables and steps (with their line numbers)."""
    from cbctl.core.operator.runbook.parser import find_runbook

    fmt = output_format(ctx, output)

    def body() -> None:
        rb = find_runbook(_dir(directory), name)
        if fmt is OutputFormat.json:
            emit_json(rb.public())
            return
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

    _call(body)


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
    from cbctl.core.model.errors import BadInput
    from cbctl.core.operator.runbook.executor import RunbookExecutor
    from cbctl.core.operator.runbook.model import masked, parse_var_assignments, resolve_vars
    from cbctl.core.operator.runbook.parser import ENV_DIR, find_runbook

    st = state(ctx)
    fmt = output_format(ctx, output)

    def prepare() -> tuple[Runbook, dict[str, str]]:
        rb = find_runbook(_dir(directory), name)
        values = resolve_vars(rb, parse_var_assignments(var or []))
        if not 1 <= from_step <= len(rb.steps):
            raise BadInput(f"--from-step {from_step}: runbook {rb.name!r} has steps 1..{len(rb.steps)}")
        validate_commands(rb, values, directory=directory)
        return rb, values

    rb, values = _call(prepare)

    if dry_run:
        shown = masked(rb, values)
        steps = [{"index": s.index, "kind": s.kind, "text": s.render_text(shown), "confirm": s.render_confirm(shown),
                  "skipped": s.index < from_step} for s in rb.steps]
        if fmt is OutputFormat.json:
            emit_json({"runbook": rb.name, "kind": rb.kind, "dry_run": True, "from_step": from_step, "vars": shown,
                       "steps": steps})
        else:
            for s in steps:
                mark = "skip" if s["skipped"] else f"{s['index']}/{len(steps)}"
                err(f"step {mark} [{s['kind']}] {s['text']}")
                if s["confirm"]:
                    err(f"  asks: {s['confirm']}")
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
        _call(lambda: _check_resumes(st, rb, resumes, from_step))

    record = _recorder(st)
    prefix = ["cbctl", *global_args(st, [])]
    extra = ["--dir", str(directory)] if directory is not None else []
    with interrupt_guard() as guard:
        executor = RunbookExecutor(
            rb,
            values,
            run_cbctl=guard.step(in_process_runner(st, secrets=[values[n] for n, v in rb.vars.items() if v.secret])),
            query=guard.step(_call(lambda: _prom_query(st))) if any(s.check for s in rb.steps) else None,
            run_external=guard.step(_run_external),
            confirm=None if yes else guard.step(ask),
            announce=err,
            record=record,
            interrupted=guard.reason,
            overrides=_overrides_reader(st),
            from_step=from_step,
            cluster=_call(lambda: st.context().cluster),
            resumes=resumes,
            resume_prefix=prefix,
            resume_extra=extra,
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

    data = result.to_json()
    if fmt is OutputFormat.json:
        emit_json(data)
    _report(result, prefix)
    if result.status == "completed" and rb.drill:
        _report_drill(st, result)
    if result.record_error is not None:
        err(f"cbctl: error: the run record could not be written: {result.record_error}")
        raise typer.Exit(4 if result.status == "completed" else 1)
    if result.status == "interrupted":
        raise typer.Exit(143 if result.interrupted_by == "SIGTERM" else 130)
    raise typer.Exit(0 if result.status == "completed" else 1)


def _report(result: Any, prefix: Sequence[str] = ("cbctl",)) -> None:
    """What failed, what was already done, the exact command to resume, and any rollback
    override left in force (with the command that lifts it)."""
    if result.status == "completed":
        err(f"runbook {result.runbook}: completed ({len(result.done_steps)} steps run) — run {result.run_id}")
        if result.from_step > 1 and not result.resumes:
            err(f"note: started at step {result.from_step} without --resumes: recorded, but not a drill")
        return
    failed = result.failed_step
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


def _report_drill(st: AppState, result: Any) -> None:
    """A completed run of a declared drill: say at once whether it proves the rollback."""
    import asyncio

    from cbctl.core.operator.drills import judge_run, read_audit
    from cbctl.core.model.errors import CbctlError
    from cbctl.core.operator.runbook.store import list_runs

    async def judge() -> Any:
        async def inner(c: Any, coord: Any) -> Any:
            runs = await list_runs(coord, c.cluster)
            by_id = {str(r.get("run_id")): r for r in runs}
            data = by_id.get(result.run_id, result.to_json())
            return judge_run(data, by_id, await read_audit(coord, c.cluster), result.drill)

        return await with_coordinator(st, inner)

    try:
        verdict = asyncio.run(judge())
    except CbctlError as exc:
        err(f"warning: could not check the drill evidence: {exc}")
        return
    if verdict.ok:
        err(f"drill of {result.drill}: proven — {verdict.reason} (runs {', '.join(verdict.runs)})")
    else:
        err(f"drill of {result.drill}: NOT proven — {verdict.reason}")


def _check_resumes(st: AppState, rb: Runbook, run_id: str, from_step: int) -> None:
    import asyncio

    from cbctl.core.operator.runbook.store import check_resumable, get_run

    async def read() -> Any:
        async def inner(c: Any, coord: Any) -> Any:
            return await get_run(coord, c.cluster, run_id)

        return await with_coordinator(st, inner)

    check_resumable(asyncio.run(read()), rb, run_id, from_step)


def _overrides_reader(st: AppState) -> Callable[[Any], list[dict[str, Any]]]:
    import asyncio

    from cbctl.core.operator.drills import overrides_in_force

    def read(record: Any) -> list[dict[str, Any]]:
        async def inner(c: Any, coord: Any) -> list[dict[str, Any]]:
            return await overrides_in_force(coord, c.cluster, record.to_json())

        return asyncio.run(with_coordinator(st, inner))

    return read


def _run_external(argv: Sequence[str]) -> int:
    """An ``argv`` step's program, no shell; its stdout goes to our stderr (it is progress)."""
    import subprocess

    try:
        sys.stderr.fileno()
    except (OSError, ValueError):  # stderr is not a file (embedded, tests): relay the output
        try:
            done = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        except OSError as exc:
            err(f"cannot run {argv[0]}: {exc.strerror}")
            return 127
        sys.stderr.write(done.stdout.decode("utf-8", "replace"))
        return done.returncode
    try:
        return subprocess.run(list(argv), stdout=sys.stderr, check=False).returncode
    except OSError as exc:
        err(f"cannot run {argv[0]}: {exc.strerror}")
        return 127


def _recorder(st: AppState) -> Callable[[dict[str, Any]], None]:
    """Writes the run record to the coordination store (one short connection per write: each
    in-process step opens its own event loop, so no connection outlives a step)."""
    import asyncio

    from cbctl.core.operator.runbook.store import save_run

    def record(data: dict[str, Any]) -> int:
        async def write() -> int:
            async def inner(c: Any, coord: Any) -> int:
                return await save_run(coord, c.cluster, data)

            return await with_coordinator(st, inner)

        return asyncio.run(write())

    return record


def _prom_query(st: AppState) -> Callable[[str], list[float]]:
    """A runbook ``check:`` is judged like a gate: scoped to the context's cluster and evaluated
    at the settled instant (``cbctl.core.operator.gates.instant_values``), so a check and ``watch``
    agree on the same data."""
    import asyncio

    from cbctl.core.operator.gates import instant_values

    ctx = st.context()

    def query(promql: str) -> list[float]:
        return asyncio.run(instant_values(ctx, promql))

    return query


@app.command("runs")
def runs(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this runbook's runs.", autocompletion=_complete_names)] = None,
    output: OutputOpt = None,
) -> None:
    """Recorded runs (newest last): status, who, when, where a failed run stopped."""
    from cbctl.core.operator.runbook.store import list_runs

    st = state(ctx)
    fmt = output_format(ctx, output)

    async def body() -> None:
        async def inner(c: Any, coord: Any) -> list[dict[str, Any]]:
            return await list_runs(coord, c.cluster)

        recs = [r for r in await with_coordinator(st, inner) if name is None or r.get("runbook") == name]
        if fmt is OutputFormat.json:
            emit_json({"runs": recs})
            return
        if not recs:
            err("no recorded runs")
            return
        import time

        def when(t: Any) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if isinstance(t, (int, float)) else "-"

        rows = []
        for r in recs:
            stop = next((s for s in r.get("steps", []) if s.get("status") in ("failed", "declined", "interrupted")), None)
            rows.append((r.get("run_id"), r.get("runbook"), r.get("kind"), r.get("status"), r.get("actor"),
                         when(r.get("started_at")), f"step {stop['index']}" if stop else "-"))
        print_table("runbook runs", ["run", "runbook", "kind", "status", "actor", "started", "stopped at"], rows)

    run(body)
