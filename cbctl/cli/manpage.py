"""The man page ``cbctl(1)``, generated from the click command tree (``make man``).

    python -m cbctl.cli.manpage          # write the shipped copy, cbctl/man/man1/cbctl.1
    python -m cbctl.cli.manpage --check  # write nothing; exit 1 when the shipped copy is stale
    python -m cbctl.cli.manpage FILE     # write FILE instead ("-" = stdout)

Contract: the page lists every visible command and subcommand (depth first, in the order of
``cbctl --help``) with its synopsis, its help text and every option and argument with its help,
plus the environment variables the options read. It is a pure function of the command tree and
the version (no date), so regenerating an unchanged tree gives the same bytes;
tests/unit/test_packaging.py fails when the shipped copy is stale. It is package data
(pyproject.toml): an installed wheel carries it (``man -l "$(python -c ...)"``, README.md).
"""

from __future__ import annotations

import argparse
import importlib.resources
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer.main

from cbctl import __version__

PROG = "cbctl"


def shipped_path() -> Path:
    """Where the package keeps the generated page (``cbctl/man/man1/cbctl.1`` in a checkout)."""
    shipped = importlib.resources.files("cbctl").joinpath("man", "man1", f"{PROG}.1")
    return shipped if isinstance(shipped, Path) else Path(str(shipped))


def _esc(text: str) -> str:
    """Text safe for roff: backslashes escaped, no line read as a request."""
    out = []
    for line in text.replace("\\", "\\e").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _opt(text: str) -> str:
    """An option spelling: ``-`` as a real minus, so it can be searched and copied."""
    return _esc(text).replace("-", "\\-")


def _paragraphs(help_text: str) -> list[str]:
    """Help text as roff: paragraphs filled, indented or ``\\b`` (click: keep as is) blocks kept."""
    text = inspect.cleandoc(help_text).split("\f", 1)[0]
    out: list[str] = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if not lines:
            continue
        if lines[0].strip() == "\b":
            out.append(".nf\n" + _esc("\n".join(lines[1:])) + "\n.fi")
        elif any(line.startswith((" ", "\t")) for line in lines[1:]):
            out.append(".nf\n" + _esc(block) + "\n.fi")
        else:
            out.append(_esc(" ".join(line.strip() for line in lines)))
    return out


def _walk(cmd: Any, ctx: Any, path: list[str]) -> Iterator[tuple[list[str], Any, Any]]:
    """Every visible command below ``cmd`` with its path and context, depth first."""
    if not hasattr(cmd, "list_commands"):
        return
    for name in cmd.list_commands(ctx):
        sub = cmd.get_command(ctx, name)
        if sub is None or getattr(sub, "hidden", False):
            continue
        sub_ctx = sub.context_class(sub, info_name=name, parent=ctx)
        yield [*path, name], sub, sub_ctx
        yield from _walk(sub, sub_ctx, [*path, name])


def _params(cmd: Any, ctx: Any) -> list[str]:
    """``.TP`` entries of the options and arguments (``--help`` left out: every command has it)."""
    out: list[str] = []
    for param in cmd.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(ctx)
        if record is None:  # an argument without help: its name
            record = (param.human_readable_name, "")
        names, help_ = record
        if names == "--help":
            continue
        out.append(".TP\n\\fB" + _opt(names) + "\\fR\n" + (_esc(" ".join(help_.split())) or "\\&"))
    return out


def _envvars(root: Any, ctx: Any) -> dict[str, str]:
    """Environment variable -> the options that read it."""
    found: dict[str, list[str]] = {}
    for path, cmd, cmd_ctx in [([], root, ctx), *_walk(root, ctx, [])]:
        for param in cmd.get_params(cmd_ctx):
            envs = param.envvar if isinstance(param.envvar, (list, tuple)) else [param.envvar]
            for env in envs:
                if env:
                    where = " ".join([PROG, *path, param.opts[0]])
                    found.setdefault(env, [])
                    if where not in found[env]:
                        found[env].append(where)
    return {env: ", ".join(found[env]) for env in sorted(found)}


def render() -> str:
    """The whole page (roff, man macros)."""
    from cbctl.cli.main import app

    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name=PROG)
    summary = (root.help or "").strip().splitlines()[0].rstrip(".")
    parts = [
        f'.\\" Generated from the command tree by `make man` (python -m cbctl.cli.manpage); do not edit.',
        f'.TH CBCTL 1 "" "{PROG} {__version__}" "cbctl manual"',
        ".SH NAME",
        f"{PROG} \\- {_esc(summary)}",
        ".SH SYNOPSIS",
        f".B {PROG}\n[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fISUBCOMMAND\\fR] [\\fIOPTIONS\\fR] [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        *(f".PP\n{p}" for p in _paragraphs(root.help or "")),
        ".PP\nEvery command takes \\fB\\-h\\fR, \\fB\\-\\-help\\fR. The README in the source tree is the operator guide.",
        ".SH GLOBAL OPTIONS",
        *_params(root, ctx),
        ".SH COMMANDS",
    ]
    for path, cmd, cmd_ctx in _walk(root, ctx, []):
        full = " ".join([PROG, *path])
        pieces = " ".join(cmd.collect_usage_pieces(cmd_ctx))
        parts.append(f'.SS "{_esc(full)}"')
        parts.append(f".B {_esc(full)}\n{_esc(pieces)}" if pieces else f".B {_esc(full)}")
        parts += [f".PP\n{p}" for p in _paragraphs(cmd.help or cmd.short_help or "")]
        parts += _params(cmd, cmd_ctx)
    envs = _envvars(root, ctx)
    if envs:
        parts.append(".SH ENVIRONMENT")
        parts += [f".TP\n\\fB{_esc(env)}\\fR\nread by {_opt(where)}" for env, where in envs.items()]
    parts += [
        ".SH FILES",
        ".TP\n\\fI~/.config/cbctl/config.toml\\fR\nthe contexts file (\\fB\\-\\-config\\fR, \\fBCBCTL_CONFIG\\fR)",
        ".SH SEE ALSO",
        "\\fBsystemd.exec\\fR(5) for the agent's unit file, shipped in the source tree as deploy/systemd/cbctl-agent.service.",
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbctl.cli.manpage", description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=None, help="where to write (default: cbctl/man/man1/cbctl.1; - = stdout)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is stale")
    args = parser.parse_args(argv)
    page = render()
    if args.file == "-":
        sys.stdout.write(page)
        return 0
    target = Path(args.file) if args.file else shipped_path()
    if args.check:
        current = target.read_text(encoding="utf-8") if target.is_file() else None
        if current != page:
            sys.stderr.write(f"{target}: stale; run make man\n")
            return 1
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    sys.stderr.write(f"wrote {target}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
