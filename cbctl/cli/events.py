"""`cbctl events tail`: subscribe to a node's lifecycle event stream (Server-Sent Events)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cbctl.cli import complete_values as cv
from cbctl.cli.common import OutputFormat, OutputOpt, duration_option, emit_line, err, new_app, output_format, run, state

if TYPE_CHECKING:
    from cbctl.core.operator.sse_client import StreamNotice

app = new_app("Lifecycle events: tail a node's event stream (SSE) as a subscriber.")

@app.callback()
def _group() -> None:
    """Lifecycle events: tail a node's event stream (SSE) as a subscriber."""
    # A callback keeps `events` a group (Typer collapses a one-command app into the command).


IDLE_SECONDS = 1.0
"""Without --follow, tail exits after this long with no event; with -n, the replay is taken as
complete (and its last N printed) after this long with no event."""


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
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="Only the last N events that exist when tail starts (with --workflow: of its whole history); then stop, or go on with --follow.")] = None,
    for_: Annotated[float | None, duration_option("--for", help="Stop after this long (e.g. 30s, 5m).")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print no events, only a count at the end (a standing subscriber).")
    ] = False,
    output: OutputOpt = None,
) -> None:
    """Print a node's event stream, one line per event (JSON lines with -o json, a YAML
    document each with -o yaml).

    The node's stream is its bridge of the canonical stream (stream.source = canonical: every
    node's updates, in order per workflow) or its own updates (local).  Without --follow, tail
    prints what exists up to the moment it started and exits 0: it stops at the first event that
    occurred after that moment (not printed), or after 1 s with no event, so a busy cluster
    cannot keep it running.  With --follow it keeps going (and reconnects after the node ends
    the stream, e.g. on a flag change, and keeps asking every second while the node refuses the
    subscriber, e.g. before stage 3) until --for elapses or ^C.  -n N prints only the last N of
    the events that exist at the start (--workflow replays its history for that, unless --after
    says where to begin), then stops or, with --follow, goes on live.

    Exit codes: 0 ok; 1 the node refused the subscriber (bridge off/read-only, not a canary
    subscriber); 2 unknown node or bad option; 4 the node or the coordination store is unreachable,
    or (without --follow) the stream broke after it had started, so events may be missing.
    """
    from cbctl.core.model.errors import BadInput

    st = state(ctx)
    fmt = output_format(ctx, output)
    if after is not None and workflow is None:
        err("cbctl: error: --after needs --workflow (seqs are per workflow)")
        raise typer.Exit(2)
    duration = for_
    if count is not None and workflow is not None and after is None:
        after = 0  # the last N of the workflow's whole history
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
                             fmt, quiet, count=count)

    code = run(body)
    if code:
        raise typer.Exit(code)


def _occurred(ev: dict[str, Any]) -> datetime | None:
    """The event's ``occurred_at`` (RFC 3339), or None when absent or unreadable."""
    raw = ev.get("occurred_at")
    if not isinstance(raw, str):
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


async def _stream(node_id: str, address: str, workflow: str | None, subscriber: str, after: int | None,
                  follow: bool, duration: float | None, fmt: OutputFormat | bool, quiet: bool = False, *,
                  count: int | None = None) -> int:
    """Render :func:`cbctl.core.operator.sse_client.subscribe_events`: events on stdout, notices on stderr.
    Returns the exit code; cbctl errors propagate (``run`` maps them: refused 1/2, lost 4).

    The moment this starts is the boundary between "what exists" and "what comes": without
    ``follow`` the first event that occurred after it ends the tail (unprinted); with ``count``
    only the last ``count`` events before it are printed (buffered until that event arrives or
    the stream is idle for :data:`IDLE_SECONDS`), then, with ``follow``, everything after it."""
    import asyncio
    from collections import deque
    from contextlib import aclosing

    from cbctl.core.model.errors import CbctlError
    from cbctl.core.operator.sse_client import StreamNotice, subscribe_events

    if isinstance(fmt, bool):  # older callers passed as_json
        fmt = OutputFormat.json if fmt else OutputFormat.table
    out = sys.stdout
    received = 0
    started = datetime.now(timezone.utc)
    buffer: deque[dict[str, Any]] | None = deque(maxlen=count) if count is not None else None

    def show(ev: dict[str, Any]) -> None:
        nonlocal received
        received += 1
        if quiet:
            return
        if fmt.structured:
            emit_line(fmt, ev)
        else:
            out.write(_line(ev) + "\n")
            out.flush()

    def flush() -> None:
        nonlocal buffer
        if buffer is not None:
            for ev in buffer:
                show(ev)
            buffer = None

    events = subscribe_events(node_id, address, subscriber=subscriber, workflow=workflow, after=after,
                              follow=follow, duration=duration, idle=IDLE_SECONDS)
    nxt: asyncio.Future[Any] | None = None
    try:
        async with aclosing(events):
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(anext(events))
                # While the replay is buffered (-n with --follow), idleness ends it; the pending
                # read is not cancelled, so the generator never sees a cancellation.
                done, _ = await asyncio.wait({nxt}, timeout=IDLE_SECONDS if buffer is not None and follow else None)
                if not done:
                    flush()
                    continue
                try:
                    item = nxt.result()
                except StopAsyncIteration:
                    break
                finally:
                    if done:
                        nxt = None
                if isinstance(item, StreamNotice):
                    err(_notice(node_id, item))
                    continue
                ev = item.event
                when = _occurred(ev)
                if when is not None and when > started:
                    if not follow:
                        break  # what existed at the start is printed: done
                    flush()
                if buffer is not None:
                    buffer.append(ev)
                else:
                    show(ev)
    except CbctlError:
        if quiet:  # a standing subscriber's count still matters when the stream is lost
            err(f"received {received} events")
        raise
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
    flush()
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
