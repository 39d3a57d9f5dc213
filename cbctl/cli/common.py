"""Shared CLI plumbing: global state, output, confirmation, error -> exit code.

Kept light: only typer and cbctl.core's pure modules are imported at module level, so that
``cbctl --help`` and tab completion stay fast. rich is imported only when a table or a
progress display is actually rendered.
"""

from __future__ import annotations

import json
import os
import sys
from contextvars import ContextVar
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from cbctl.core.model.errors import BadInput, CbctlError

if TYPE_CHECKING:
    from cbctl.core.model.config import ConfigFile, Context
    from cbctl.core.backends.coord.base import Coordinator

T = TypeVar("T")


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


@dataclass
class AppState:
    """Built once in the root callback and handed to every command (hatch's pattern)."""

    config_path: str | None = None
    context_name: str | None = None
    output: OutputFormat = OutputFormat.table

    def config(self, *, missing_ok: bool = False) -> ConfigFile:
        from cbctl.core.model.config import load_config

        return load_config(self.config_path, missing_ok=missing_ok)

    def context(self) -> Context:
        return self.config().context(self.context_name)


# Per-command override of the global -o, so `cbctl stage status -o json` works as typed.
OutputOpt = Annotated[
    OutputFormat | None,
    typer.Option("--output", "-o", help="Output format: table or json (JSON goes to stdout alone)."),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Only show what would change; write nothing.")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why: recorded in the audit log.")]
WaitOpt = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Block until every live agent has applied the new revision.")
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for agents with --wait.")]


def state(ctx: typer.Context) -> AppState:
    obj = ctx.find_root().obj
    if not isinstance(obj, AppState):  # invoked without the root callback (tests of sub-apps)
        obj = ctx.find_root().obj = AppState()
    return obj


def output_format(ctx: typer.Context, override: OutputFormat | None) -> OutputFormat:
    return override or state(ctx).output


def use_color() -> bool:
    return "NO_COLOR" not in os.environ and sys.stderr.isatty()


def err(message: str) -> None:
    """A message for the human: stderr, never mixed into JSON on stdout. URL userinfo is
    redacted (a second line of defence: the config loader refuses credentials in URLs)."""
    if "://" in message:
        from cbctl.core.model.redaction import redact_url

        message = redact_url(message)
    print(message, file=sys.stderr, flush=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, stderr: bool = False) -> None:
    """Render a table with rich (imported here, not at start-up). User data is not markup."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=stderr, markup=False, highlight=False, no_color=not use_color() if stderr else None)
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


def fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "[]"
    return "-" if value is None else str(value)


def show_diff(changes: Sequence[Any]) -> None:
    """The flag diff, on stderr (it precedes a question or a JSON result)."""
    if not changes:
        err("no flag changes")
        return
    width = max(len(c.name) for c in changes)
    for c in changes:
        err(f"  {c.name:<{width}}  {fmt_value(c.old)} -> {fmt_value(c.new)}")


def confirm(question: str, yes: bool) -> None:
    """Ask on the terminal; with no terminal and no --yes, refuse (exit 2, nothing written)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise BadInput(f"{question} — no terminal to ask on; pass --yes to confirm")
    if not typer.confirm(question, default=False, err=True):
        err("aborted; nothing written")
        raise typer.Exit(1)


def run(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an async command body; map cbctl errors to their exit codes with one message."""
    import asyncio  # not at module level: ~20 ms that --help and completion never need

    try:
        return asyncio.run(fn())
    except CbctlError as exc:
        if getattr(exc, "exit_code", 1) == 0:
            err(str(exc))
            raise typer.Exit(0) from None
        err(f"cbctl: error: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err("interrupted")
        raise typer.Exit(130) from None


def run_sync(fn: Callable[[], T]) -> T:
    """Same mapping for synchronous bodies."""
    async def wrapper() -> T:
        return fn()

    return run(wrapper)


async def with_coordinator(st: AppState, body: Callable[[Context, Coordinator], Awaitable[T]]) -> T:
    """Open the context's coordinator, run ``body``, close it."""
    from cbctl.core.backends.coord import make_coordinator

    ctx = st.context()
    coord = make_coordinator(ctx)
    await coord.connect()
    try:
        return await body(ctx, coord)
    finally:
        await coord.close()


# Set while a runbook step runs in-process, so the step's audit entry names the step's own
# command rather than `cbctl runbook run ...`.
COMMAND_OVERRIDE: ContextVar[str | None] = ContextVar("cbctl_command_override", default=None)


def command_line(ctx: typer.Context) -> str:
    """The command as typed, for the audit log (argv never holds a secret: we accept none)."""
    override = COMMAND_OVERRIDE.get()
    if override is not None:
        return override
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 == "cbctl" or argv0.startswith("cbctl."):
        return "cbctl " + " ".join(sys.argv[1:])
    return ctx.command_path


def command_app() -> typer.Typer:
    """An app holding one command (registered with ``@app.command(NAME)``), cbctl's defaults."""
    return typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False)


def new_app(help: str, **kwargs: Any) -> typer.Typer:
    """A command group with cbctl's defaults: plain help (no rich import), no pretty tracebacks."""
    kwargs.setdefault("no_args_is_help", True)
    return typer.Typer(help=help, rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False, **kwargs)
