"""Preflight checks over the coordination store, read once (:func:`read_snapshot`): nodes
registered with fresh probes, node ids unique and stable, clocks, lease timing; and the
credential files' modes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cbctl.core.model import keys
from cbctl.core.model.redaction import check_private_file
from cbctl.core.model.errors import BadInput
from cbctl.core.model.records import ConflictRecord, IdentityRecord, NodeRecord
from cbctl.core.operator.preflight_report import CheckResult, PreflightOptions, Status, StoreSnapshot, row

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator
    from cbctl.core.model.config import Context


async def read_snapshot(ctx: Context, coord: Coordinator) -> StoreSnapshot:
    """Nodes, conflicts, identities and the rollout's schema versions, read concurrently."""
    from cbctl.core.model.flags import SCHEMA_VERSIONS
    from cbctl.core.model.rollout import RolloutDocument

    nodes_kv, conflicts, idents, doc_kv = await asyncio.gather(
        coord.list(keys.nodes_prefix(ctx.cluster)),
        coord.list(keys.conflicts_prefix(ctx.cluster)),
        coord.list(keys.identity_prefix(ctx.cluster)),
        coord.get(keys.rollout(ctx.cluster)),
    )
    snap = StoreSnapshot(conflicts=conflicts, now=time.time())
    # The snapshot keeps each record's stored shape (StoreSnapshot's contract); the checks read
    # it through the records of cbctl/core/model/records.py (_node, _identity).
    for kv in nodes_kv:
        node_id = kv.key[len(keys.nodes_prefix(ctx.cluster)):]
        try:
            snap.nodes[node_id] = NodeRecord.from_json(kv.value, require_object=True).to_dict()
        except ValueError as exc:
            snap.bad_records[node_id] = f"unreadable registration record: {exc}"
    for kv in idents:
        try:
            ident = IdentityRecord.from_json(kv.value, require_object=True)
        except ValueError:
            continue  # a broken identity record only weakens the stability check
        snap.identities[kv.key[len(keys.identity_prefix(ctx.cluster)):]] = ident.to_dict()
    if doc_kv is not None:
        try:
            versions = RolloutDocument.from_json(doc_kv.value).flags.get(SCHEMA_VERSIONS) or [1]
            snap.schema_versions = tuple(int(v) for v in versions)
        except (BadInput, TypeError, ValueError):
            pass  # `stage status` reports a broken document; preflight probes v1
    return snap


def _node(record: Mapping[str, Any]) -> NodeRecord:
    return NodeRecord.from_dict(record)


def _identity(record: Mapping[str, Any]) -> IdentityRecord:
    return IdentityRecord.from_dict(record)


def credential_files(ctx: Context) -> list[tuple[str, str]]:
    """(what, path) of every configured file holding a secret or a private key."""
    out: list[tuple[str, str]] = []
    n, c, r = ctx.nats, ctx.coordination, ctx.redis
    for what, path in (
        ("nats creds-file", n.creds_file), ("nats nkey-file", n.nkey_file), ("nats password-file", n.password.file),
        ("nats token-file", n.token.file), ("nats tls key-file", n.tls.key_file),
        ("coordination password-file", c.password.file), ("coordination tls key-file", c.tls.key_file),
        ("redis password-file", r.password.file),
    ):
        if path:
            out.append((what, path))
    return out


async def check_credentials(ctx: Context) -> list[CheckResult]:
    """Every secret/key/creds file must be readable by its owner only (mode 0600 or stricter)."""
    files = credential_files(ctx)
    if not files:
        return [row("credentials", "-", "pass", "no credential files configured")]
    rows = []
    for what, path in files:
        problem = check_private_file(path)
        rows.append(row("credentials", f"{what} {path}", "fail" if problem else "pass", problem or "owner-only"))
    return rows


# -- nodes ---------------------------------------------------------------------------------------


def check_nodes(ctx: Context, snap: StoreSnapshot) -> list[CheckResult]:
    """Expected nodes registered; each node's own probes fresh and ok."""
    from cbctl.core.backends.probes import stale_after

    limit = stale_after(ctx)
    rows: list[CheckResult] = []
    for node_id in ctx.expected_nodes:
        if node_id not in snap.nodes and node_id not in snap.bad_records:
            rows.append(row("nodes", "registration", "fail", "expected node is not registered (agent down?)", node_id))
    for node_id, why in sorted(snap.bad_records.items()):
        rows.append(row("nodes", "registration", "fail", why, node_id))
    if not snap.nodes and not ctx.expected_nodes:
        rows.append(row("nodes", "registration", "warn", "no node registered and no expected-nodes configured"))
    for node_id, record in sorted(snap.nodes.items()):
        probes = _node(record).probes
        if probes is None:
            rows.append(row("nodes", "probes", "fail", "no reachability report in the node record", node_id))
            continue
        for backend in ("etcd", "nats", "redis"):
            p = probes.get(backend)
            if not isinstance(p, Mapping) or not isinstance(p.get("at"), (int, float)):
                rows.append(row("nodes", backend, "fail", "no report from this node", node_id))
                continue
            age = snap.now - float(p["at"])
            if age > limit:
                rows.append(row("nodes", backend, "fail",
                                 f"stale report: {age:.0f}s old (limit {limit:g}s); last said: {p.get('detail', '')}",
                                 node_id))
            elif not p.get("ok"):
                rows.append(row("nodes", backend, "fail", str(p.get("detail") or "not ok"), node_id))
            else:
                rows.append(row("nodes", backend, "pass", f"ok {age:.0f}s ago ({p.get('detail', '')})", node_id))
    return rows


def check_node_ids(ctx: Context, snap: StoreSnapshot) -> list[CheckResult]:
    """No unresolved duplicate-id conflict; each node id on one machine, each machine one id."""
    rows: list[CheckResult] = []
    prefix = keys.conflicts_prefix(ctx.cluster)
    for kv in snap.conflicts:
        rest = kv.key[len(prefix):]
        node_id = rest.split("/", 1)[0]
        try:
            conflict = ConflictRecord.from_json(kv.value)
        except ValueError:
            conflict = ConflictRecord()
        rec = conflict.to_dict()  # the kind's evidence (host, pid, machine_id) is in extra
        reason = rec.get("reason") or conflict.kind or "duplicate node id"
        parts = [f"{k} {rec[k]}" for k in ("host", "pid", "machine_id", "instance_id") if rec.get(k)]
        rows.append(row("node-ids", f"conflict {rest}", "fail",
                         f"{reason}" + (f" ({', '.join(parts)})" if parts else "") + f"; clear {kv.key} once resolved",
                         node_id))
    # Stability: a live node on a machine other than the one its id was last bound to.
    for node_id, record in sorted(snap.nodes.items()):
        ident = snap.identities.get(node_id)
        bound = _identity(ident).machine_id if ident is not None else None
        mine = _node(record).machine_id
        if bound and mine and bound != mine:
            rows.append(row("node-ids", "identity", "fail",
                             f"node id bound to machine {bound} but registered from {mine}", node_id))
    by_machine: dict[str, set[str]] = {}
    for node_id, ident in snap.identities.items():
        m = _identity(ident).machine_id
        if m:
            by_machine.setdefault(m, set()).add(node_id)
    for node_id, record in snap.nodes.items():
        m = _node(record).machine_id
        if m:
            by_machine.setdefault(m, set()).add(node_id)
    for machine, ids in sorted(by_machine.items()):
        if len(ids) > 1:
            rows.append(row("node-ids", f"machine {machine}", "fail",
                             f"one machine identity under several node ids: {', '.join(sorted(ids))}"))
    if not rows:
        rows.append(row("node-ids", "-", "pass", f"{len(snap.nodes)} live node ids unique and stable"))
    return rows


def clock_spread_ms(snap: StoreSnapshot) -> float | None:
    clocks = [_node(r).clock for r in snap.nodes.values()]
    offsets = [float(c["offset_ms"]) for c in clocks
               if c is not None and isinstance(c.get("offset_ms"), (int, float))]
    return max(offsets) - min(offsets) if len(offsets) >= 2 else (0.0 if offsets else None)


def check_clock(ctx: Context, snap: StoreSnapshot, opts: PreflightOptions) -> list[CheckResult]:
    """|offset| per node and the spread between nodes against the skew thresholds."""
    rows: list[CheckResult] = []
    warn, fail = opts.skew_warn_ms, opts.skew_fail_ms
    if not ctx.ntp_servers:
        rows.append(row("clock", "ntp-servers", "warn", "no ntp-servers configured: node clocks are not measured"))
    for node_id, record in sorted(snap.nodes.items()):
        clock = _node(record).clock
        if clock is None:
            rows.append(row("clock", "offset", "warn", "no clock report in the node record", node_id))
            continue
        off = clock.get("offset_ms")
        if not isinstance(off, (int, float)):
            rows.append(row("clock", "offset", "warn", f"not measured: {clock.get('error') or 'no offset'}", node_id))
            continue
        src = clock.get("source") or "?"
        mag = abs(float(off))
        status: Status = "fail" if mag >= fail else "warn" if mag >= warn else "pass"
        limit = f" (fail >= {fail:g} ms)" if status == "fail" else f" (warn >= {warn:g} ms)" if status == "warn" else ""
        rows.append(row("clock", "offset", status, f"offset {float(off):+.1f} ms vs {src}{limit}", node_id))
    spread = clock_spread_ms(snap)
    if spread is not None and len(snap.nodes) >= 2:
        status = "fail" if spread >= fail else "warn" if spread >= warn else "pass"
        rows.append(row("clock", "spread", status, f"spread between nodes {spread:.1f} ms (warn {warn:g}, fail {fail:g})"))
    return rows


def check_lease_timing(ctx: Context, snap: StoreSnapshot | None) -> list[CheckResult]:
    """keep-alive × 3 <= TTL; keep-alive + request timeout < TTL; clock spread << TTL."""
    c = ctx.coordination
    ttl, ka, to = c.lease_ttl, c.keepalive_interval, c.timeout
    rows = [
        row("lease-timing", "keepalive", "pass" if ka * 3 <= ttl else "fail",
             f"keep-alive {ka:g}s × 3 = {ka * 3:g}s {'<=' if ka * 3 <= ttl else '>'} TTL {ttl:g}s"
             + ("" if ka * 3 <= ttl else ": two missed keep-alives lose the lease")),
        row("lease-timing", "timeout", "pass" if ka + to < ttl else "fail",
             f"keep-alive {ka:g}s + request timeout {to:g}s {'<' if ka + to < ttl else '>='} TTL {ttl:g}s"
             + ("" if ka + to < ttl else ": one slow keep-alive can outlast the lease")),
    ]
    spread = clock_spread_ms(snap) if snap is not None else None
    if spread is not None:
        ttl_ms = ttl * 1000
        status: Status = "fail" if spread >= ttl_ms / 2 else "warn" if spread >= ttl_ms / 10 else "pass"
        rows.append(row("lease-timing", "clock-spread", status,
                         f"clock spread {spread:.1f} ms vs TTL {ttl:g}s (warn >= TTL/10, fail >= TTL/2)"))
    return rows
