"""`cbctl nodes` and `cbctl lanes`: who is live, what it applied, who owns which lane."""

from __future__ import annotations

import time
from typing import Any

import typer

from cbctl.cli.common import (
    NoHeadersOpt,
    OutputOpt,
    emit,
    err,
    output_format,
    print_table,
    rfc3339,
    run,
    state,
    with_coordinator,
)
from cbctl.cli.lazy import single


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return f"{max(0.0, time.time() - ts):.1f}s ago"


def nodes(ctx: typer.Context, output: OutputOpt = None, no_headers: NoHeadersOpt = False) -> None:
    """Live nodes: host, instance, applied revision, lag behind the rollout, owned lanes,
    last heartbeat, recorded conflicts (duplicate or unstable node ids); and every expected
    node (`expected-nodes`) that is not live, as missing: it has not applied the rollout.
    -o wide shows the whole instance id, the heartbeat's time and the HTTP address."""
    from cbctl.core.agent.registration import read_nodes

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    async def body() -> None:
        async def inner(c: Any, coord: Any) -> None:
            views, current = await read_nodes(coord, c.cluster)
            live = {v.node_id for v in views if v.live}
            missing = [n for n in c.expected_nodes if n not in live]
            if fmt.structured:
                items = [{**v.public(), "heartbeat": rfc3339(v.heartbeat), "state": "live" if v.live else "gone"}
                         for v in views]
                known = {v.node_id for v in views}
                items += [{"node_id": n, "host": None, "instance_id": None, "applied_revision": None, "lag": None,
                           "lanes": 0, "heartbeat": None, "conflicts": 0, "state": "missing"}
                          for n in missing if n not in known]
                for item in items:
                    if item["node_id"] in missing:
                        item["state"] = "missing"
                emit(fmt, {"nodes": items, "missing": missing})
                return
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
            known = {v.node_id for v in views}
            rows += [(n, "-", "-", "-", "-", "-", "-", "-", "-", "-", "missing", "-") for n in missing if n not in known]
            print_table(f"nodes (rollout revision {current})",
                        ["node", "host", "instance", "instance_id", "applied", "lag", "lanes", "heartbeat",
                         "heartbeat_at", "conflicts", "state", "http"], rows,
                        wide=("instance_id", "heartbeat_at", "http"))
            if missing:
                err(f"expected but not live: {', '.join(missing)} (they have not applied revision {current})")

        await with_coordinator(st, inner, read_only=True)

    run(body)


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


nodes_app = single(nodes)
lanes_app = single(lanes)
