"""`cbctl events tail`: subscribe to a node's lifecycle event stream (Server-Sent Events)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cbctl.cli import complete_values as cv
from cbctl.cli.common import OutputFormat, OutputOpt, err, new_app, output_format, run, state

if TYPE_CHECKING:
    from cbctl.core.operator.sse_client import StreamNotice

app = new_app("Lifecycle events: tail a node's event stream (SSE) as a subscriber.")

@app.callback()
def _group() -> None:
    """Lifecycle events: tail a node's event stream (SSE) as a subscriber."""
    # A callback keeps `events` a group (Typer collapses a one-command app into the command).


IDLE_SECONDS = 1.0
"""Without --follow, tail prints what is available and exits after this long with no event."""


def _line(ev: dict[str, Any]) -> str:
    task = ev.get("task_id") or "-"
    return (f"{ev.get('occurred_at', '-')}  {ev.get('workflow_id')}  seq={ev.get('seq')}  {ev.get('type')}  "
            f"task={task}  node={ev.get('node_id')}  lane={ev.get('lane')}")


@app.command("tail")
def tail(
    ctx: typer.Context,
    workflow: Annotated[str | None, typer.Option("--workflow", "-w", help="Only this workflow (default: all).")] = None,
    node: Annotated[str | None, typer.Option("--node", help="Node to subscribe on (default: the first live node).", shell_complete=cv.node_ids)] = None,
    subscriber: Annotated[
        str, typer.Option("--subscriber", help="Subscriber name (what canary.subscribers lists).")
    ] = "cbctl-tail",
    after: Annotated[
        int | None, typer.Option("--after", help="With --workflow: replay events after this seq first.", min=0)
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new events until interrupted.")] = False,
    for_: Annotated[str | None, typer.Option("--for", help="Stop after this long (e.g. 30s, 5m).")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print no events, only a count at the end (a standing subscriber).")
    ] = False,
    output: OutputOpt = None,
) -> None:
    """Print a node's event stream, one line per event (JSON lines with -o json).

    The node's stream is its bridge of the canonical stream (stream.source = canonical: every
    node's updates, in order per workflow) or its own updates (local).  Without --follow, prints
    what arrives until 1 s passes with no event, then exits; with --follow it keeps going (and
    reconnects after the node ends the stream, e.g. on a flag change, and keeps asking every
    second while the node refuses the subscriber, e.g. before stage 3) until --for elapses or ^C.

    Exit codes: 0 ok; 1 the node refused the subscriber (bridge off/read-only, not a canary
    subscriber); 2 unknown node or bad option; 4 the node or the coordination store is unreachable,
    or (without --follow) the stream broke after it had started, so events may be missing.
    """
    from cbctl.core.model.errors import BadInput
    from cbctl.core.backends.prometheus import parse_duration

    st = state(ctx)
    fmt = output_format(ctx, output)
    if after is not None and workflow is None:
        err("cbctl: error: --after needs --workflow (seqs are per workflow)")
        raise typer.Exit(2)
    try:
        duration = parse_duration(for_, what="--for") if for_ is not None else None
    except BadInput as exc:  # outside run(): map it here, not as a traceback
        err(f"cbctl: error: {exc}")
        raise typer.Exit(2) from None
    if not subscriber.strip():
        err("cbctl: error: --subscriber must not be empty")
        raise typer.Exit(2)

    async def body() -> int:
        from cbctl.cli.common import with_coordinator
        from cbctl.core.agent.registration import read_nodes

        async def resolve(c: Any, coord: Any) -> tuple[str, str]:
            views, _ = await read_nodes(coord, c.cluster)
            live = [v for v in views if v.live]
            if node is not None:
                match = [v for v in live if v.node_id == node]
                if not match:
                    known = ", ".join(v.node_id for v in live) or "none"
                    raise BadInput(f"--node {node!r}: no such live node in cluster {c.cluster} (live: {known})")
                chosen = match[0]
            else:
                with_http = [v for v in live if v.http]
                if not with_http:
                    from cbctl.core.model.errors import BackendUnavailable

                    raise BackendUnavailable(f"no live node with an HTTP address in cluster {c.cluster}")
                chosen = with_http[0]
            if not chosen.http:
                from cbctl.core.model.errors import BackendUnavailable

                raise BackendUnavailable(f"node {chosen.node_id} has no HTTP address in its record")
            return chosen.node_id, chosen.http

        node_id, address = await with_coordinator(st, resolve)
        return await _stream(node_id, address, workflow, subscriber, after, follow, duration,
                             fmt is OutputFormat.json, quiet)

    code = run(body)
    if code:
        raise typer.Exit(code)


async def _stream(node_id: str, address: str, workflow: str | None, subscriber: str, after: int | None,
                  follow: bool, duration: float | None, as_json: bool, quiet: bool = False) -> int:
    """Render :func:`cbctl.core.operator.sse_client.subscribe_events`: events on stdout, notices on stderr.
    Returns the exit code; cbctl errors propagate (``run`` maps them: refused 1/2, lost 4)."""
    from contextlib import aclosing

    from cbctl.core.model.errors import CbctlError
    from cbctl.core.operator.sse_client import StreamNotice, subscribe_events

    out = sys.stdout
    received = 0
    events = subscribe_events(node_id, address, subscriber=subscriber, workflow=workflow, after=after,
                              follow=follow, duration=duration, idle=IDLE_SECONDS)
    try:
        async with aclosing(events):
            async for item in events:
                if isinstance(item, StreamNotice):
                    err(_notice(node_id, item))
                    continue
                received += 1
                if not quiet:
                    ev = item.event
                    out.write((json.dumps(ev, separators=(",", ":")) if as_json else _line(ev)) + "\n")
                    out.flush()
    except CbctlError:
        if quiet:  # a standing subscriber's count still matters when the stream is lost
            err(f"received {received} events")
        raise
    return _done(received, quiet)


def _notice(node_id: str, n: StreamNotice) -> str:
    """The stderr line for a :class:`~cbctl.core.operator.sse_client.StreamNotice`."""
    if n.kind == "refused":
        return (f"cbctl: node {node_id} refuses the subscription for now (HTTP {n.status}): {n.reason}; "
                "asking again every second")
    if n.kind == "ended":
        return f"cbctl: node {node_id} ended the stream ({n.reason}){'; reconnecting' if n.reconnecting else ''}"
    return f"cbctl: stream from {node_id} broke ({n.reason}); reconnecting"


def _done(received: int, quiet: bool) -> int:
    if quiet:
        err(f"received {received} events")
    return 0
