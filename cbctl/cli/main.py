"""The cbctl command tree. Thin: parses, calls cbctl.core, renders.

Start-up matters (tab completion runs the program on every key press): only typer is imported
here; each command's module is imported when that command runs (see ``cbctl.cli.lazy``), and
each command imports what it needs (aetcd, nats, redis, rich) inside its body. Help is rendered
without rich (``rich_markup_mode=None``).  To add a command, add a row to ``COMMANDS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cbctl import __version__
from cbctl.cli.common import AppState, OutputFormat
from cbctl.cli import complete_values as cv
from cbctl.cli.lazy import LazyCommand, LazyGroup

# name -> where it lives and its one-line help (shown by `cbctl --help` without importing it).
COMMANDS: dict[str, LazyCommand] = {
    "stage": LazyCommand("cbctl.cli.stage", "app", "Show and move the rollout stage (status, advance, history)."),
    "flags": LazyCommand("cbctl.cli.flags", "app", "Read and set individual rollout flags (get, set, unset, diff)."),
    "rollback": LazyCommand("cbctl.cli.rollback", "app", "Roll one capability back (coordination, event-bus, consumers)."),
    "preflight": LazyCommand("cbctl.cli.preflight", "app", "Check backends, nodes, node ids, clocks and lease timing."),
    "watch": LazyCommand("cbctl.cli.watch", "app", "Live view of the current stage's metrics, thresholds and verdicts."),
    "wait": LazyCommand("cbctl.cli.wait", "app", "Wait until the cluster has converged (nodes applied, gates pass)."),
    "explain": LazyCommand("cbctl.cli.explain", "app", "What a flag, metric or gate means, its values and which stage sets it."),
    "exit-criteria": LazyCommand("cbctl.cli.exit_criteria", "app", "Are the rollout's exit criteria met? With evidence."),
    "config": LazyCommand("cbctl.cli.config_cmd", "app", "Contexts file: view, get-contexts, use-context, set-context."),
    "runbook": LazyCommand("cbctl.cli.runbook", "app", "On-call procedures as data: list, show, run (runbooks/*.yaml)."),
    "completion": LazyCommand("cbctl.cli.completion", "app", "Print the bash, zsh or fish completion script."),
    "agent": LazyCommand("cbctl.cli.agent", "app", "Run the node agent (run) or enqueue a demo workload (load)."),
    "nodes": LazyCommand("cbctl.cli.nodes", "nodes_app", "Live nodes: applied revision, lag, lanes, heartbeat, conflicts; describe ID."),
    "lanes": LazyCommand("cbctl.cli.nodes", "lanes_app", "Lane ownership: owner, fencing token, since."),
    "signal": LazyCommand("cbctl.cli.signal", "app", "Send a signal to a workflow (routed to its lane owner, or queued)."),
    "events": LazyCommand("cbctl.cli.events", "app", "Lifecycle events: tail a node's event stream (SSE) as a subscriber."),
    "sandbox": LazyCommand("cbctl.cli.sandbox", "app", "A local cluster on loopback (up, status, down) and real faults (chaos)."),
}


class RootGroup(LazyGroup):
    lazy = COMMANDS

    def _main_shell_completion(self, ctx_args: Any, prog_name: str, complete_var: str | None = None) -> None:
        # Tab completion (`_CBCTL_COMPLETE=bash_complete`): typer's vendored click has no shell
        # classes registered with add_completion=False; cbctl.cli.completion answers instead.
        from cbctl.cli.completion import complete_from_env

        complete_from_env(self, ctx_args, prog_name, complete_var)


app = typer.Typer(
    name="cbctl",
    cls=RootGroup,
    help="Staged rollout of cluster coordination, lane ownership fencing and the canonical event bus.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"cbctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    context: Annotated[str | None, typer.Option("--context", envvar="CBCTL_CONTEXT", shell_complete=cv.context_names, help="Context to use (env CBCTL_CONTEXT).")] = None,
    config: Annotated[Path | None, typer.Option("--config", envvar="CBCTL_CONFIG", shell_complete=cv.files, help="Contexts file (env CBCTL_CONFIG; default ~/.config/cbctl/config.toml).")] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", help="table, wide, json or yaml; JSON/YAML go to stdout alone.")] = OutputFormat.table,
    no_headers: Annotated[bool, typer.Option("--no-headers", help="table/wide: rows only, no title or header row.")] = False,
    debug: Annotated[bool, typer.Option("--debug", "-v", help="Log cbctl's debug records to stderr (never a secret).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Global options apply to every command."""
    ctx.obj = AppState(config_path=str(config) if config else None, context_name=context, output=output,
                       no_headers=no_headers)
    if debug:
        from cbctl.cli.common import setup_logging

        setup_logging(True)
        import logging

        logging.getLogger("cbctl.cli").debug("cbctl %s: config %s, context %s, output %s", __version__,
                                             config or "(default)", context or "(current)", output.value)


def run() -> None:
    """Console-script entry point."""
    app(prog_name="cbctl")


if __name__ == "__main__":
    run()
