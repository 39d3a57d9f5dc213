"""`cbctl events tail`: subscribe to a node's lifecycle event stream (Server-Sent Events)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from cbctl.cli.common import OutputFormat, OutputOpt, err, new_app, output_format, run, state

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
    node: Annotated[str | None, typer.Option("--node", help="Node to subscribe on (default: the first live node).")] = None,
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
    subscriber); 2 unknown node or bad option; 4 the node or the coordination store is unreachable.
    """
    from cbctl.core.errors import BadInput
    from cbctl.core.promql import parse_duration

    st = state(ctx)
    fmt = output_format(ctx, output)
    if after is not None and workflow is None:
        err("cbctl: error: --after needs --workflow (seqs are per workflow)")
        raise typer.Exit(2)
    duration = parse_duration(for_, what="--for") if for_ is not None else None
    if not subscriber.strip():
        raise typer.Exit(2)

    async def body() -> int:
        from cbctl.cli.common import with_coordinator
        from cbctl.core.registration import read_nodes

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
                    from cbctl.core.errors import BackendUnavailable

                    raise BackendUnavailable(f"no live node with an HTTP address in cluster {c.cluster}")
                chosen = with_http[0]
            if not chosen.http:
                from cbctl.core.errors import BackendUnavailable

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
    """Read the SSE stream and print; returns the exit code (raises BackendUnavailable -> 4)."""
    import asyncio

    import httpx

    from cbctl.core.errors import BackendUnavailable
    from cbctl.core.sse import SseParser

    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration if duration is not None else None
    path = f"/v1/workflows/{_quote(workflow)}/events" if workflow is not None else "/v1/events"
    url = f"http://{address}{path}"
    last = after
    connected_once = False
    out = sys.stdout
    received = 0
    refused_reason: str | None = None

    def remaining(idle_deadline: float | None) -> float | None:
        ends = [t for t in (deadline, idle_deadline) if t is not None]
        return None if not ends else max(0.0, min(ends) - loop.time())

    async with httpx.AsyncClient(timeout=httpx.Timeout(3.0, read=None), trust_env=False) as client:
        while True:
            params: dict[str, Any] = {"subscriber": subscriber}
            if last is not None and workflow is not None:
                params["after"] = last
            try:
                async with client.stream("GET", url, params=params) as resp:
                    if resp.status_code != 200:
                        body = await resp.aread()
                        try:
                            reason = json.loads(body).get("reason", body.decode(errors="replace"))
                        except ValueError:
                            reason = body.decode(errors="replace")[:200]
                        if follow and resp.status_code in (403, 503):
                            # Not eligible yet (bridge off/read-only, not a canary subscriber):
                            # a standing subscriber waits for the rollout to reach it.
                            connected_once = True
                            if reason != refused_reason:
                                err(f"cbctl: node {node_id} refuses the subscription for now (HTTP "
                                    f"{resp.status_code}): {reason}; asking again every second")
                                refused_reason = reason
                            t = remaining(None)
                            if t is not None and t <= 0:
                                return _done(received, quiet)
                            await asyncio.sleep(min(1.0, t) if t is not None else 1.0)
                            continue
                        err(f"cbctl: node {node_id} refused the subscription (HTTP {resp.status_code}): {reason}")
                        return 2 if resp.status_code in (400, 404) else 1
                    refused_reason = None
                    connected_once = True
                    parser = SseParser()
                    lines = resp.aiter_lines()
                    idle_deadline = None if follow else loop.time() + IDLE_SECONDS
                    ended: dict[str, Any] | None = None
                    while True:
                        t = remaining(idle_deadline)
                        if t is not None and t <= 0:
                            return _done(received, quiet)
                        try:
                            line = await asyncio.wait_for(lines.__anext__(), t)
                        except TimeoutError:
                            return _done(received, quiet)  # idle (no --follow) or --for elapsed
                        except StopAsyncIteration:
                            break
                        msg = parser.feed(line)
                        if msg is None or msg.comment is not None:
                            continue
                        if msg.event == "end":
                            ended = json.loads(msg.data or "{}")
                            break
                        ev = json.loads(msg.data)
                        if workflow is not None:
                            last = ev.get("seq", last)
                        received += 1
                        if not quiet:
                            out.write((json.dumps(ev, separators=(",", ":")) if as_json else _line(ev)) + "\n")
                            out.flush()
                        if not follow:
                            idle_deadline = loop.time() + IDLE_SECONDS
            except httpx.HTTPError as exc:
                if not connected_once:
                    raise BackendUnavailable(f"node {node_id} at {address} is unreachable: {exc}",
                                             backend="agent") from None
                err(f"cbctl: stream from {node_id} broke ({exc}); reconnecting")
                ended = None
            if not follow:
                if ended is not None:
                    err(f"cbctl: node {node_id} ended the stream: {ended.get('reason')}")
                return _done(received, quiet)
            if ended is not None:
                err(f"cbctl: node {node_id} ended the stream ({ended.get('reason')}); reconnecting")
            t = remaining(None)
            if t is not None and t <= 0:
                return _done(received, quiet)
            await asyncio.sleep(min(1.0, t) if t is not None else 1.0)


def _done(received: int, quiet: bool) -> int:
    if quiet:
        err(f"received {received} events")
    return 0


def _quote(workflow: str) -> str:
    from urllib.parse import quote

    return quote(workflow, safe="")
