"""A root command group that imports each command module only when that command runs.

Tab completion runs cbctl on every key press, and ``cbctl --help`` is the first thing an
operator types: neither should pay for importing and building every command.  The root group
lists commands from a static table (name, module, attribute, one-line help); a command's module
is imported, and its Typer app converted to a click command, only when it is invoked, completed
or asked for its own help.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import typer
import typer.core
import typer.main


@dataclass(frozen=True)
class LazyCommand:
    module: str
    attr: str
    help: str
    hidden: bool = False


class LazyGroup(typer.core.TyperGroup):
    """TyperGroup whose subcommands come from ``LAZY`` (set on the subclass)."""

    lazy: dict[str, LazyCommand] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.lazy) + [n for n in super().list_commands(ctx) if n not in self.lazy]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        spec = self.lazy.get(cmd_name)
        if spec is None:
            return super().get_command(ctx, cmd_name)
        if cmd_name not in self.commands:
            obj = getattr(importlib.import_module(spec.module), spec.attr)
            cmd = typer.main.get_command(obj) if isinstance(obj, typer.Typer) else obj
            cmd.name = cmd_name
            self.commands[cmd_name] = cmd
        return self.commands[cmd_name]

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        # Static help: listing the commands must not import them.
        rows = [(name, spec.help) for name, spec in self.lazy.items() if not spec.hidden]
        rows += [(n, c.get_short_help_str(60)) for n, c in self.commands.items() if n not in self.lazy and not c.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def single(func: Any, **kwargs: Any) -> typer.Typer:
    """Wrap one command function in a Typer app (so it converts to a plain click command)."""
    app = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False, **kwargs)
    app.command()(func)
    return app
