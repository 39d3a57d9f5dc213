"""What ``cbctl runbook run`` hands the executor: ``cbctl`` run in-process against the real
command tree, step commands checked before anything runs, other programs, the run recorder, the
Prometheus query of checks, and the stores' readers. The executor itself is
:mod:`cbctl.core.operator.runbook.executor`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbctl.cli.common import COMMAND_OVERRIDE, AppState, err, with_coordinator

if TYPE_CHECKING:
    from cbctl.core.operator.runbook.model import Runbook


def runbooks_dir(directory: Path | None) -> Path:
    """``directory``, else ``$CBCTL_RUNBOOKS_DIR``, else the runbooks shipped in the package
    (``cbctl/runbooks/``)."""
    from cbctl.core.operator.runbook.parser import default_runbooks_dir

    return directory if directory is not None else default_runbooks_dir()


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


def check_cbctl_argv(argv: Sequence[str], root: Any = None, *, shown: str | None = None,
                     lenient_values: bool = False) -> Any:
    """Parse ``argv`` (``["cbctl", ...]``) against the real command tree without running it;
    return the innermost click context (its ``params`` hold the converted values).

    Raises ``BadInput`` naming the problem: an unknown command or option, a bad choice, a
    missing argument, or a command line that only shows help. Nothing is invoked (click's
    ``make_context`` parses and converts parameters; command callbacks do not run). ``shown``
    is how messages spell the command line (default: ``argv`` quoted). ``lenient_values``: a
    value that does not convert is not an error (the line holds stand-ins for variables without
    a value; returns None then).
    """
    from typer import Exit
    from typer._click.exceptions import BadParameter, ClickException, NoArgsIsHelpError
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
    except BadParameter as exc:
        if lenient_values and type(exc) is BadParameter:  # not MissingParameter: that is structural
            return None
        raise BadInput(f"{shown}: {exc.format_message()}") from None
    except ClickException as exc:
        raise BadInput(f"{shown}: {exc.format_message()}") from None
    except Exit:
        raise BadInput(f"{shown}: only shows help or the version; not a runbook step") from None
    return ctx


def validate_commands(rb: Runbook, values: Mapping[str, str], *, directory: Path | None = None,
                      _stack: tuple[str, ...] = (), lenient: bool = False) -> None:
    """Every in-process step of ``rb`` must parse with ``values`` substituted, so a typo fails
    before step 1 runs. A step that runs another runbook (``cbctl runbook run NAME --var ...``)
    is followed: that runbook must exist (in its ``--dir``, else ``directory``, else the
    default), get its required variables and parse too. Every step is checked.
    ``lenient`` (``runbook show``: variables may have no value yet, ``values`` holds stand-ins):
    option values that do not convert and a nested runbook's missing variables are not errors.
    Raises ``RunbookError`` (``FILE:LINE: step N: ...``), ``RunbookErrors`` for several."""
    from cbctl.core.model.errors import BadInput, NotFound
    from cbctl.core.operator.runbook.model import (
        SECRET_PLACEHOLDER,
        RunbookError,
        masked,
        parse_var_assignments,
        raise_all,
        resolve_vars,
    )
    from cbctl.core.operator.runbook.parser import find_runbook

    root = _root_command()
    stack = (*_stack, rb.name)
    errors: list[RunbookError] = []
    for step in rb.steps:
        if not step.in_process:
            continue
        try:
            ctx = check_cbctl_argv(step.render_argv(values), root, shown=step.render_text(masked(rb, values)),
                                   lenient_values=lenient)
            if ctx is not None and ctx.command_path == "cbctl runbook run":
                params = ctx.params
                if params["name"] in stack:
                    raise BadInput(f"runbook {params['name']!r} would run itself ({' -> '.join(stack)})")
                nested_dir = runbooks_dir(params.get("directory") or directory)
                nested = find_runbook(nested_dir, params["name"])
                given = parse_var_assignments(params.get("var") or [])
                if lenient:
                    given = {**{n: stand_in(v) for n, v in nested.vars.items()}, **given}
                validate_commands(nested, resolve_vars(nested, given), directory=nested_dir, _stack=stack,
                                  lenient=lenient)
        except (BadInput, NotFound) as exc:  # a nested runbook's RunbookError too: prefixed with this step
            message = str(exc)
            for name, spec in rb.vars.items():  # click quotes bad values: never a secret one
                if spec.secret and values.get(name):
                    message = message.replace(values[name], SECRET_PLACEHOLDER)
            errors.append(RunbookError(rb.path, step.line, f"step {step.index}: {message}"))
    raise_all(errors)


def stand_in(spec: Any) -> str:
    """A value for a variable while only the shape of the steps is checked (``runbook show``):
    its default, else ``<NAME>``."""
    return spec.default if spec.default is not None else f"<{spec.name}>"


def show_values(rb: Runbook) -> dict[str, str]:
    """Every variable of ``rb`` with :func:`stand_in` values."""
    return {name: stand_in(spec) for name, spec in rb.vars.items()}


def run_external(argv: Sequence[str]) -> int:
    """An ``argv`` step's program, no shell; its stdout goes to our stderr (it is progress)."""
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


def recorder(st: AppState) -> Callable[[dict[str, Any]], None]:
    """Writes the run record to the coordination store (one short connection per write: each
    in-process step opens its own event loop, so no connection outlives a step)."""
    from cbctl.core.operator.runbook.store import save_run

    def record(data: dict[str, Any]) -> int:
        async def write() -> int:
            async def inner(c: Any, coord: Any) -> int:
                return await save_run(coord, c.cluster, data)

            return await with_coordinator(st, inner)

        return asyncio.run(write())

    return record


def prom_query(st: AppState) -> Callable[[str], list[float]]:
    """A runbook ``check:`` is judged like a gate: scoped to the context's cluster and evaluated
    at the settled instant (``cbctl.core.operator.instant.instant_values``), so a check and ``watch``
    agree on the same data."""
    from cbctl.core.operator.instant import instant_values

    ctx = st.context()

    def query(promql: str) -> list[float]:
        return asyncio.run(instant_values(ctx, promql))

    return query


def overrides_reader(st: AppState) -> Callable[[Any], list[dict[str, Any]]]:
    from cbctl.core.operator.drills import overrides_in_force

    def read(record: Any) -> list[dict[str, Any]]:
        async def inner(c: Any, coord: Any) -> list[dict[str, Any]]:
            return await overrides_in_force(coord, c.cluster, record.to_json())

        return asyncio.run(with_coordinator(st, inner))

    return read


def check_resumes(st: AppState, rb: Runbook, run_id: str, from_step: int) -> None:
    from cbctl.core.operator.runbook.store import check_resumable, get_run

    async def read() -> Any:
        async def inner(c: Any, coord: Any) -> Any:
            return await get_run(coord, c.cluster, run_id)

        return await with_coordinator(st, inner)

    check_resumable(asyncio.run(read()), rb, run_id, from_step)


def judge_drill(st: AppState, result: Any) -> Any:
    """The drill verdict of a completed run (``cbctl.core.operator.drills.judge_recorded_run``).
    Raises ``CbctlError`` when the store cannot be read."""
    from cbctl.core.operator.drills import judge_recorded_run

    async def inner(c: Any, coord: Any) -> Any:
        return await judge_recorded_run(coord, c.cluster, result.to_json(), result.drill)

    return asyncio.run(with_coordinator(st, inner))

