"""`cbctl nodes [describe ID]` and `cbctl lanes`: who is live, what it applied, who owns which lane."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from cbctl.cli.common import (
    NoHeadersOpt,
    OutputOpt,
    emit,
    err,
    output_format,
    print_table,
    run,
    state,
    with_coordinator,
)
from cbctl.core.model.times import rfc3339
from cbctl.cli import complete_values as cv
from cbctl.cli.lazy import single
from cbctl.cli.watching import CountOpt, ForOpt, IntervalOpt, WatchOpt


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return f"{max(0.0, time.time() - ts):.1f}s ago"


def _nodes_view(c: Any, views: list[Any], current: int) -> tuple[dict[str, Any], Any]:
    """The `nodes -o json` data and the table printer of one read."""
    live = {v.node_id for v in views if v.live}
    missing = [n for n in c.expected_nodes if n not in live]
    items = [{**v.public(), "heartbeat": rfc3339(v.heartbeat), "state": "live" if v.live else "gone"}
             for v in views]
    known = {v.node_id for v in views}
    items += [{"node_id": n, "host": None, "instance_id": None, "applied_revision": None, "lag": None,
               "lanes": 0, "heartbeat": None, "conflicts": 0, "state": "missing"}
              for n in missing if n not in known]
    for item in items:
        if item["node_id"] in missing:
            item["state"] = "missing"

    def render() -> None:
        if not views and not missing:
            err(f"no live nodes in cluster {c.cluster}")
            return
        rows = [
            (v.node_id, v.host or "-", (v.instance_id or "-")[:12], v.instance_id or "-",
             v.applied_revision if v.applied_revision is not None else "-",
             v.lag if v.lag is not None else "-", v.lanes, _ago(v.heartbeat), rfc3339(v.heartbeat) or "-",
             v.conflicts or "-", "live" if v.live else "missing" if v.node_id in missing else "gone", v.http or "-")
            for v in views
        ]
        rows += [(n, "-", "-", "-", "-", "-", "-", "-", "-", "-", "missing", "-") for n in missing if n not in known]
        print_table(f"nodes (rollout revision {current})",
                    ["node", "host", "instance", "instance_id", "applied", "lag", "lanes", "heartbeat",
                     "heartbeat_at", "conflicts", "state", "http"], rows,
                    wide=("instance_id", "heartbeat_at", "http"))
        if missing:
            err(f"expected but not live: {', '.join(missing)} (they have not applied revision {current})")

    return {"nodes": items, "missing": missing}, render


def nodes(
    ctx: typer.Context,
    output: OutputOpt = None,
    no_headers: NoHeadersOpt = False,
    watch: WatchOpt = False,
    interval: IntervalOpt = 2.0,
    for_: ForOpt = None,
    count: CountOpt = None,
) -> None:
    """Live nodes: host, instance, applied revision, lag behind the rollout, owned lanes,
    last heartbeat, recorded conflicts (duplicate or unstable node ids); and every expected
    node (`expected-nodes`) that is not live, as missing: it has not applied the rollout.
    -o wide shows the whole instance id, the heartbeat's time and the HTTP address.

    --watch: redraw on a terminal; elsewhere print the nodes again only when something other
    than a heartbeat changed (one JSON object per line with -o json). `nodes describe ID`: one
    node in full."""
    if ctx.invoked_subcommand is not None:
        return
    from cbctl.cli.watching import Snapshot, show_snapshots
    from cbctl.core.agent.registration import read_nodes

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    async def body() -> int:
        async def inner(c: Any, coord: Any) -> int:
            async def take() -> Snapshot:
                views, current = await read_nodes(coord, c.cluster)
                data, render = _nodes_view(c, views, current)
                # A heartbeat is not a change: it moves every few seconds on every live node.
                key = {**data, "nodes": [{k: v for k, v in n.items() if k != "heartbeat"} for n in data["nodes"]]}
                return Snapshot(key, data, render)

            return await show_snapshots(take, watch=watch, fmt=fmt, interval=interval, for_=for_, count=count)

        return await with_coordinator(st, inner, read_only=True)

    code = run(body)
    if code:
        raise typer.Exit(code)


def describe(
    ctx: typer.Context,
    node_id: Annotated[str, typer.Argument(metavar="ID", help="The node id.", shell_complete=cv.node_ids)],
    output: OutputOpt = None,
) -> None:
    """Everything the store holds about one node: its record (host, instance, pid, version,
    lease, applied revision, heartbeat), its probes and clock report, the lanes it owns with
    their fencing tokens, its recorded conflicts and refused duplicate starts, and its machine
    identity. Exit 2 for a node id the store does not know and the context does not expect."""
    from cbctl.core.operator.node_describe import describe_node

    st = state(ctx)
    fmt = output_format(ctx, output)

    async def body() -> None:
        async def inner(c: Any, coord: Any) -> None:
            desc = await describe_node(c, coord, node_id)
            data = desc.public(rfc3339)
            if fmt.structured:
                emit(fmt, data)
                return
            _print_description(data)

        await with_coordinator(st, inner, read_only=True)

    run(body)


def _print_description(data: dict[str, Any]) -> None:
    """`nodes describe` as kubectl describe does it: sections of `key: value` lines."""
    import json

    def line(key: str, value: Any, indent: int = 0) -> None:
        if isinstance(value, (dict, list)):
            value = json.dumps(value, separators=(", ", ": "), default=str)
        print(f"{' ' * indent}{key + ':':<20} {'-' if value is None else value}")

    applied = {True: "yes", False: "no", None: "-"}[data["applied_current"]]
    line("node", data["node_id"])
    line("state", data["state"] + (" (expected)" if data["expected"] else ""))
    line("applied current", f"{applied} (rollout revision {data['rollout_revision']})")
    print("record:")
    for key, value in (data["record"] or {}).items():
        line(key, value, 2)
    for section in ("probes", "clock"):
        print(f"{section}:" + ("" if data[section] else " -"))
        for key, value in (data[section] or {}).items():
            line(key, value, 2)
    print("lanes:" + ("" if data["lanes"] else " -"))
    for ln in data["lanes"]:
        line(ln["lane"], f"token {ln['token']}, since {ln['since'] or '-'}", 2)
    print("conflicts:" + ("" if data["conflicts"] else " -"))
    for conflict in data["conflicts"]:
        line(conflict.get("kind") or "?", {k: v for k, v in conflict.items() if k != "kind"}, 2)
    print("refusals:" + ("" if data["refusals"] else " -"))
    for refusal in data["refusals"]:
        line(refusal.get("kind") or "?", {k: v for k, v in refusal.items() if k != "kind"}, 2)
    print("identity:" + ("" if data["identity"] else " -"))
    for key, value in (data["identity"] or {}).items():
        line(key, value, 2)


def lanes(ctx: typer.Context, output: OutputOpt = None, no_headers: NoHeadersOpt = False) -> None:
    """Lane ownership: owner node, fencing token (monotonic per acquisition) and since when
    (-o wide: the full UTC time)."""
    from cbctl.core.agent.ownership import read_lanes

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    async def body() -> None:
        async def inner(c: Any, coord: Any) -> None:
            views = await read_lanes(coord, c.cluster, c.lanes)
            if fmt.structured:
                emit(fmt, {"lanes": [{**v.public(), "since": rfc3339(v.since)} for v in views]})
                return
            rows = [(v.lane, v.owner or "-", v.token if v.token is not None else "-",
                     time.strftime("%H:%M:%S", time.localtime(v.since)) if v.since else "-",
                     rfc3339(v.since) or "-") for v in views]
            print_table("lanes", ["lane", "owner", "token", "since", "since_utc"], rows, wide=("since_utc",))

        await with_coordinator(st, inner, read_only=True)

    run(body)


# `cbctl nodes` lists (its own options, --watch), `cbctl nodes describe ID` shows one node.
nodes_app = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False,
                        invoke_without_command=True, no_args_is_help=False)
nodes_app.callback()(nodes)
nodes_app.command("describe")(describe)
lanes_app = single(lanes)
