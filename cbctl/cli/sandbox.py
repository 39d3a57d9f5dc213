"""`cbctl sandbox up|status|down|chaos ...`: a whole cluster on loopback, and faults for drills.

Exit codes: 0 ok (also: `up` while one runs, `down` with none); 1 a process failed to start,
a chaos action could not be done, or `status` found an unhealthy process / no sandbox;
2 bad usage.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cbctl.cli import complete_values as cv
from cbctl.cli.common import (
    NoHeadersOpt,
    OutputOpt,
    duration_option,
    emit,
    err,
    new_app,
    output_format,
    print_table,
    state,
)

if TYPE_CHECKING:
    from cbctl.sandbox.state import Sandbox

app = new_app("A local cluster on loopback (etcd, NATS, Redis, Prometheus, NTP, agents, load) and real faults.")
chaos_app = new_app(
    "Real faults on the sandbox: kill/restore NATS, kill/pause/partition/skew a node.\n\n"
    "Every action prints what it did and exits 1 if it could not."
)
app.add_typer(chaos_app, name="chaos")

DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", envvar="CBCTL_SANDBOX_DIR", shell_complete=cv.dirs,
                 help="Sandbox directory (env CBCTL_SANDBOX_DIR; default: the sandbox context's, "
                      "else $XDG_STATE_HOME/cbctl/sandbox)."),
]
ForOpt = Annotated[
    float | None,
    duration_option("--for", help="Undo the fault after this long (e.g. 10s), blocking meanwhile; Ctrl-C undoes it at once."),
]


def _dir(ctx: typer.Context, given: Path | None) -> Path:
    """--dir, else the ``sandbox.dir`` of the config's sandbox context, else the default."""
    from cbctl.core.model.config import load_config
    from cbctl.core.model.errors import ConfigError
    from cbctl.sandbox.services.cbctl_procs import CONTEXT_NAME
    from cbctl.sandbox.state import default_sandbox_dir

    if given is not None:
        return given.expanduser()
    try:
        raw = load_config(state(ctx).config_path, missing_ok=True).raw
    except ConfigError:
        return default_sandbox_dir()
    recorded = (((raw.get("contexts") or {}).get(CONTEXT_NAME) or {}).get("sandbox") or {}).get("dir")
    return Path(recorded) if isinstance(recorded, str) and recorded else default_sandbox_dir()


def _fail(message: str, code: int = 1) -> typer.Exit:
    err(f"cbctl: error: {message}")
    return typer.Exit(code)


def _load(ctx: typer.Context, given: Path | None) -> Sandbox:
    from cbctl.sandbox.state import load_sandbox
    from cbctl.sandbox.services.base import HarnessError

    d = _dir(ctx, given)
    try:
        sb = load_sandbox(d)
    except HarnessError as exc:
        raise _fail(str(exc)) from None
    if sb is None:
        raise _fail(f"no sandbox in {d} (start one with `cbctl sandbox up`)")
    return sb


@app.command("up")
def up(
    ctx: typer.Context,
    nodes: Annotated[int, typer.Option("--nodes", help="Number of node agents (node-1 .. node-N).")] = 3,
    lanes: Annotated[int, typer.Option("--lanes", help="Lane inventory size (lane-00 ..).")] = 16,
    directory: DirOpt = None,
    rate: Annotated[float, typer.Option("--rate", help="Load generator: workflows per second.")] = 20.0,
    timeout: Annotated[float, duration_option("--timeout", help="How long to wait for everything to be ready, e.g. 60s, 2m.")] = 60.0,
    wait_scraped: Annotated[bool, typer.Option(
        "--wait-scraped/--no-wait-scraped",
        help="Return only once Prometheus scrapes every agent (~5 s more), so preflight can pass at once.")] = True,
) -> None:
    """Start etcd, nats-server (JetStream), redis-server, prometheus, chronyd, N agents and a load
    generator on free loopback ports; write the `sandbox` context into the config and make it
    current. A second `up` while one runs says so and exits 0."""
    from cbctl.sandbox import cluster
    from cbctl.sandbox.services.base import HarnessError

    d = directory.expanduser() if directory is not None else cluster.default_sandbox_dir()
    try:
        sb = cluster.up(directory=d, nodes=nodes, lanes=lanes, config_path=state(ctx).config_path,
                        load_rate=rate, wait_scraped=wait_scraped, timeout=timeout, progress=err)
    except cluster.AlreadyRunning as exc:
        err(f"a sandbox is already running in {exc.sandbox.dir} (nodes: {', '.join(exc.sandbox.nodes)}); "
            "nothing started. `cbctl sandbox status` shows it, `cbctl sandbox down` stops it.")
        return
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    except HarnessError as exc:
        raise _fail(f"sandbox up failed; everything it started was stopped.\n{exc}") from None
    except KeyboardInterrupt:
        raise _fail("interrupted; everything started was stopped", 130) from None
    err(f"context {sb.context!r} is current; canary lanes file for stage 2: {sb.canary_path}")
    err("next: cbctl preflight  |  cbctl sandbox status  |  cbctl sandbox down")


@app.command("status")
def status_cmd(ctx: typer.Context, directory: DirOpt = None, output: OutputOpt = None,
               no_headers: NoHeadersOpt = False) -> None:
    """Every process of the sandbox: pid, port, state and health. Exit 1 if one is unhealthy."""
    from cbctl.sandbox.cluster import status

    sb = _load(ctx, directory)
    rows = status(sb)
    fmt = output_format(ctx, output, no_headers)
    if fmt.structured:
        emit(fmt, {"dir": str(sb.dir), "context": sb.context, "config": sb.config_path, "nodes": sb.nodes,
                   "processes": rows})
    else:
        print_table(f"sandbox {sb.dir}", ["name", "kind", "pid", "port", "state", "healthy"],
                    [(r["name"], r["kind"], r["pid"] or "-", r["port"] or "-", r["state"],
                      "yes" if r["healthy"] else "NO") for r in rows])
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


@app.command("down")
def down_cmd(ctx: typer.Context, directory: DirOpt = None) -> None:
    """Stop every process the sandbox started (and nothing else); remove its partition rules and
    state file. Logs stay in the directory; the `sandbox` context stays in the config."""
    from cbctl.sandbox.cluster import down
    from cbctl.sandbox.services.base import HarnessError

    d = _dir(ctx, directory)
    try:
        stopped = down(d, progress=err)
    except HarnessError as exc:
        raise _fail(str(exc)) from None
    if stopped is None:
        err(f"no sandbox in {d}; nothing to stop")
        return
    err(f"sandbox down: {len(stopped)} processes stopped; logs kept in {d}")


# -- chaos ------------------------------------------------------------------------------------

def _act(ctx: typer.Context, directory: Path | None, action: Any, *args: Any) -> Sandbox:
    from cbctl.sandbox.chaos import ChaosError
    from cbctl.sandbox.state import locked

    sb = _load(ctx, directory)
    try:
        with locked(sb.dir):
            err(action(sb, *args))
    except ChaosError as exc:
        raise _fail(str(exc)) from None
    return sb


def _duration(text: str, what: str) -> float:
    from cbctl.core.model.durations import parse_duration
    from cbctl.core.model.errors import BadInput

    try:
        return parse_duration(text, what=what)
    except BadInput as exc:
        raise _fail(str(exc), 2) from None


def _hold(seconds: float, what: str, undo: Any) -> None:
    """Keep a fault for ``seconds`` (Ctrl-C ends it early), then undo it."""
    from cbctl.sandbox.chaos import wait_paused_for

    err(f"{what} for {seconds:g}s (Ctrl-C ends it now)")
    try:
        wait_paused_for(seconds)
    except KeyboardInterrupt:
        err("interrupted")
    finally:
        undo()


@chaos_app.command("kill-nats")
def kill_nats(ctx: typer.Context, directory: DirOpt = None) -> None:
    """SIGKILL nats-server. `restore-nats` starts it again."""
    from cbctl.sandbox.chaos import kill_service

    _act(ctx, directory, kill_service, "nats")
    err("restore with: cbctl sandbox chaos restore-nats")


@chaos_app.command("restore-nats")
def restore_nats(ctx: typer.Context, directory: DirOpt = None) -> None:
    """Start nats-server again on the same port and JetStream store dir."""
    from cbctl.sandbox.chaos import restore_service

    _act(ctx, directory, restore_service, "nats")


@chaos_app.command("kill-node")
def kill_node_cmd(ctx: typer.Context, node: Annotated[str, typer.Argument(help="Node id, e.g. node-2.")],
                  directory: DirOpt = None) -> None:
    """SIGKILL a node's agent (no graceful stop: its lease expires after the TTL)."""
    from cbctl.sandbox.chaos import kill_node

    _act(ctx, directory, kill_node, node)
    err(f"start it again with: cbctl sandbox chaos start-node {node}")


@chaos_app.command("start-node")
def start_node_cmd(ctx: typer.Context, node: Annotated[str, typer.Argument(help="Node id.")],
                   directory: DirOpt = None) -> None:
    """Start a killed node's agent again (same node id, port and state dir)."""
    from cbctl.sandbox.chaos import start_node

    _act(ctx, directory, start_node, node)


@chaos_app.command("pause-node")
def pause_node_cmd(ctx: typer.Context, node: Annotated[str, typer.Argument(help="Node id.")],
                   for_: ForOpt = None, directory: DirOpt = None) -> None:
    """SIGSTOP a node's agent; with --for, SIGCONT it after that long."""
    from cbctl.sandbox.chaos import ChaosError, pause_node, resume_node

    seconds = for_
    sb = _act(ctx, directory, pause_node, node)
    if seconds is None:
        err(f"{node} stays paused; resume with: cbctl sandbox chaos resume-node {node}")
        return

    def undo() -> None:
        try:
            err(resume_node(sb, node))
        except ChaosError as exc:
            raise _fail(str(exc)) from None

    _hold(seconds, f"{node} paused", undo)


@chaos_app.command("resume-node")
def resume_node_cmd(ctx: typer.Context, node: Annotated[str, typer.Argument(help="Node id.")],
                    directory: DirOpt = None) -> None:
    """SIGCONT a paused node's agent."""
    from cbctl.sandbox.chaos import resume_node

    _act(ctx, directory, resume_node, node)


@chaos_app.command("partition-node")
def partition_node_cmd(ctx: typer.Context, node: Annotated[str, typer.Argument(help="Node id.")],
                       for_: ForOpt = None, directory: DirOpt = None) -> None:
    """Cut a node's agent off etcd, NATS and Redis (nftables; root only); with --for, heal after."""
    from cbctl.sandbox.chaos import ChaosError, heal_node, partition_node

    seconds = for_
    sb = _act(ctx, directory, partition_node, node)
    if seconds is None:
        err(f"{node} stays partitioned; heal with: cbctl sandbox chaos heal-node {node}")
        return

    def undo() -> None:
        try:
            err(heal_node(sb, node))
        except ChaosError as exc:
            raise _fail(str(exc)) from None

    _hold(seconds, f"{node} partitioned", undo)


@chaos_app.command("heal-node")
def heal_node_cmd(ctx: typer.Context, node: Annotated[str, typer.Argument(help="Node id.")],
                  directory: DirOpt = None) -> None:
    """Remove a node's partition."""
    from cbctl.sandbox.chaos import heal_node

    _act(ctx, directory, heal_node, node)


@chaos_app.command("skew-node")
def skew_node_cmd(ctx: typer.Context, node: Annotated[str, typer.Argument(help="Node id.")],
                  offset: Annotated[str, typer.Option("--offset", help="Clock offset, e.g. 2s, -500ms; 0 removes the skew.")],
                  directory: DirOpt = None) -> None:
    """Restart a node's agent with its wall clock shifted (faketime), so preflight's clock check sees it."""
    from cbctl.sandbox.chaos import skew_node

    text = offset.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    seconds = 0.0 if body in ("0", "0s", "0ms") else sign * _duration(body, "--offset")
    _act(ctx, directory, skew_node, node, seconds)
