"""Shared CLI plumbing: global state, output, durations, logging, confirmation, error -> exit code.

Output contract (README "Output and JSON"): results go to stdout, messages to stderr. ``-o``
is ``table | wide | json | yaml``; ``wide`` adds the columns a command marks wide-only;
``--no-headers`` drops table titles and header rows. A table on a terminal is drawn by rich; off
a terminal it is plain aligned text, never truncated (and rich is not imported at all). JSON and
YAML carry the same data: snake_case keys, times as RFC 3339 UTC strings.

Kept light: only typer and cbctl.core's pure modules are imported at module level, so that
``cbctl --help`` and tab completion stay fast. rich, yaml and logging handlers are imported only
when they are used.
"""

from __future__ import annotations

import json
import os
import sys
from contextvars import ContextVar
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer
from typer._click import types as click_types

from cbctl.core.model.errors import BadInput, CbctlError

if TYPE_CHECKING:
    from cbctl.core.model.config import ConfigFile, Context
    from cbctl.core.backends.coord.base import Coordinator

T = TypeVar("T")


class OutputFormat(str, Enum):
    """``-o``: ``table`` and ``wide`` are for humans, ``json`` and ``yaml`` for scripts."""

    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"

    @property
    def structured(self) -> bool:
        """JSON or YAML: the command's data on stdout alone, no table."""
        return self in (OutputFormat.json, OutputFormat.yaml)


@dataclass
class AppState:
    """Built once in the root callback and handed to every command (hatch's pattern)."""

    config_path: str | None = None
    context_name: str | None = None
    output: OutputFormat = OutputFormat.table
    no_headers: bool = False

    def config(self, *, missing_ok: bool = False) -> ConfigFile:
        from cbctl.core.model.config import load_config

        return load_config(self.config_path, missing_ok=missing_ok)

    def context(self) -> Context:
        return self.config().context(self.context_name)


# Per-command override of the global -o, so `cbctl stage status -o json` works as typed.
OutputOpt = Annotated[
    OutputFormat | None,
    typer.Option("--output", "-o", help="Output format: table, wide (more columns), json or yaml (data on stdout alone)."),
]
NoHeadersOpt = Annotated[
    bool, typer.Option("--no-headers", help="table/wide: print rows only (no title, no header row).")
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Only show what would change; write nothing.")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why: recorded in the audit log.")]
WaitOpt = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Block until every live agent has applied the new revision.")
]



class Duration(click_types.ParamType):
    """A time option: ``30s``, ``500ms``, ``2m``, ``1h``, ``1h30m`` or a plain number of seconds
    (:func:`cbctl.core.model.durations.parse_duration`, the one parser). Converts to seconds
    (float). Zero or negative is a usage error (exit 2, naming the option) unless ``allow_zero``
    (then ``0``/``0s`` means "off").

    ``unit="ms"``: for options named in milliseconds (``--skew-warn-ms``), a plain number means
    milliseconds and the value converts to milliseconds (``50`` -> 50.0, ``0.1s`` -> 100.0)."""

    name = "duration"

    def __init__(self, *, allow_zero: bool = False, unit: Literal["s", "ms"] = "s") -> None:
        self.allow_zero = allow_zero
        self.unit = unit

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        from cbctl.core.model.durations import parse_duration

        if value is None:
            return value
        what = param.opts[0] if param is not None and param.opts else "duration"
        if self.allow_zero and (value == 0 or str(value).strip().lower() in ("0", "0s", "0ms", "0.0")):
            return 0.0
        try:
            seconds_or_number = parse_duration(value, what=what)
            if self.unit == "s" or _is_number(value):
                return seconds_or_number  # a plain number is already in the option's unit
            return seconds_or_number * 1000.0
        except BadInput as exc:
            message = str(exc)
            self.fail(message[len(what) + 2:] if message.startswith(what + ": ") else message, param, ctx)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def duration_option(*names: str, help: str, allow_zero: bool = False, unit: Literal["s", "ms"] = "s",
                    **kwargs: Any) -> Any:
    """``typer.Option`` for a time option (see :class:`Duration`); use with ``float`` defaults
    (in ``unit``)."""
    return typer.Option(*names, click_type=Duration(allow_zero=allow_zero, unit=unit), metavar="DURATION", help=help,
                        **kwargs)


TimeoutOpt = Annotated[
    float, duration_option("--timeout", help="How long to wait for agents with --wait, e.g. 30s, 2m (a number is seconds).")
]


def state(ctx: typer.Context) -> AppState:
    obj = ctx.find_root().obj
    if not isinstance(obj, AppState):  # invoked without the root callback (tests of sub-apps)
        obj = ctx.find_root().obj = AppState()
    return obj


# How the command being run renders tables (set by output_format; a runbook step runs commands
# in-process, and each sets its own).
_RENDER: ContextVar[tuple[OutputFormat, bool]] = ContextVar("cbctl_render", default=(OutputFormat.table, False))


def output_format(ctx: typer.Context, override: OutputFormat | None, no_headers: bool = False) -> OutputFormat:
    """The command's ``-o`` (else the global one); also records ``--no-headers`` for
    :func:`print_table`."""
    st = state(ctx)
    fmt = override or st.output
    _RENDER.set((fmt, no_headers or st.no_headers))
    return fmt


def use_color() -> bool:
    return "NO_COLOR" not in os.environ and sys.stderr.isatty()


def err(message: str) -> None:
    """A message for the human: stderr, never mixed into JSON on stdout. URL userinfo is
    redacted (a second line of defence: the config loader refuses credentials in URLs)."""
    if "://" in message:
        from cbctl.core.model.redaction import redact_url

        message = redact_url(message)
    print(message, file=sys.stderr, flush=True)


def setup_logging(debug: bool) -> None:
    """``-v/--debug``: every log record of ``cbctl.*`` at DEBUG and above goes to stderr, one
    line each, URL userinfo redacted (cbctl.core.model.redaction; no record carries a secret, this
    is the second line of defence). Off by default: then only Python's last-resort handler
    shows warnings, as before."""
    if not debug:
        return
    import logging

    from cbctl.core.model.redaction import redact_url

    class _Redacting(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return redact_url(super().format(record))

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Redacting("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("cbctl")
    if not any(getattr(h, "_cbctl_debug", False) for h in logger.handlers):
        handler._cbctl_debug = True  # type: ignore[attr-defined]  # once per process (runbook steps re-enter)
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def emit(fmt: OutputFormat, data: Any) -> None:
    """The command's result as JSON or YAML on stdout (``fmt`` must be structured)."""
    if fmt is OutputFormat.yaml:
        import yaml  # lazily: ~10 ms that table output never needs

        # Through JSON first, so YAML holds exactly what JSON would (dates, paths as strings).
        plain = json.loads(json.dumps(data, default=str))
        sys.stdout.write(yaml.safe_dump(plain, sort_keys=False, default_flow_style=False, allow_unicode=True))
        sys.stdout.flush()
    else:
        emit_json(data)


def emit_line(fmt: OutputFormat, data: Any) -> None:
    """One item of a stream: a JSON object per line, or a YAML document (``---``) per item."""
    if fmt is OutputFormat.yaml:
        sys.stdout.write("---\n")
        emit(fmt, data)
    else:
        sys.stdout.write(json.dumps(data, separators=(",", ":"), default=str) + "\n")
        sys.stdout.flush()


def snake_keys(data: Any) -> Any:
    """Mapping keys ``kebab-case`` -> ``snake_case``, recursively (JSON keys are snake_case)."""
    if isinstance(data, dict):
        return {(k.replace("-", "_") if isinstance(k, str) else k): snake_keys(v) for k, v in data.items()}
    if isinstance(data, list):
        return [snake_keys(v) for v in data]
    return data


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, stderr: bool = False,
                wide: Sequence[str] = ()) -> None:
    """A table for a human. ``wide``: names of columns shown only with ``-o wide``.

    On a terminal: rich (imported here, not at start-up; user data is not markup). Off a
    terminal: plain columns separated by two spaces, never truncated, and the title on stderr
    (stdout holds the rows alone). ``--no-headers`` drops the title and the header row.
    """
    fmt, no_headers = _RENDER.get()
    if wide and fmt is not OutputFormat.wide:
        keep = [i for i, c in enumerate(columns) if c not in wide]
        columns = [columns[i] for i in keep]
        rows = [[row[i] for i in keep] for row in rows]
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    stream = sys.stderr if stderr else sys.stdout
    if not stream.isatty():
        if title and not no_headers:
            err(title)
        lines = cells if no_headers else [list(columns), *cells]
        lines = [[c.replace("\n", " ") for c in line] for line in lines]
        widths = [max((len(line[i]) for line in lines), default=0) for i in range(len(columns))]
        for line in lines:
            stream.write("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n")
        stream.flush()
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=stderr, markup=False, highlight=False, no_color=not use_color() if stderr else None)
    table = Table(title=None if no_headers else title, title_justify="left", show_header=not no_headers)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in cells:
        table.add_row(*row)
    console.print(table)


def fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "[]"
    return "-" if value is None else str(value)


def show_diff(changes: Sequence[Any], *, stream: Any = None) -> None:
    """The flag diff: on stderr by default (it precedes a question or a JSON result); ``stream``
    = stdout where the diff IS the result (``flags diff``)."""
    if not changes:
        err("no flag changes")
        return
    width = max(len(c.name) for c in changes)
    for c in changes:
        line = f"  {c.name:<{width}}  {fmt_value(c.old)} -> {fmt_value(c.new)}"
        if stream is None:
            err(line)
        else:
            print(line, file=stream, flush=True)


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
        import logging

        # With -v/--debug: where it came from (the message below is the same either way).
        logging.getLogger("cbctl.cli").debug("%s: %s", type(exc).__name__, exc, exc_info=True)
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


async def with_coordinator(st: AppState, body: Callable[[Context, Coordinator], Awaitable[T]], *,
                           read_only: bool = False) -> T:
    """Open the context's coordinator, run ``body``, close it.

    ``read_only``: ``body`` only reads (``get``/``list``/``current_revision``) and runs alone on
    the loop; etcd is then read through its JSON gateway, without loading gRPC
    (``make_coordinator(ctx, read_only=True)``).
    """
    from cbctl.core.backends.coord import make_coordinator

    ctx = st.context()
    coord = make_coordinator(ctx, read_only=read_only)
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
