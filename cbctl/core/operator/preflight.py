"""Preflight checks: plain async functions returning :class:`CheckResult` rows.

:func:`run_preflight` runs every check concurrently, each under its own deadline, and returns a
:class:`PreflightReport`.  A check never raises for a backend problem: an unreachable backend,
refused credentials or a timeout is a ``fail`` row naming why.  Statuses: ``pass``, ``warn``
(does not fail the preflight), ``fail``.

Checks (names are what ``--only`` takes):

============== ==================================================================================
``etcd``        every endpoint: reachable, version, leader, DB size; the cluster: a leader, quorum
                reachable, raft index spread
``nats``        connect with the configured auth (refused credentials reported as ``auth``),
                server version, JetStream, the event stream's settings, and publish permission on
                the event subjects proven by a round trip to the stream (see :func:`_publish_probe`)
``redis``       PING, version, the fencing script loads; persistence: AOF on (fail if off),
                ``appendfsync`` not ``no`` (warn)
``prometheus``  ready, every target up, the metrics the gates need exist
``credentials`` every secret/key/creds file is readable by its owner only
``nodes``       every expected node is registered; each node's own reachability reports
                (``probes`` in its record) are fresh and ok
``node-ids``    no recorded duplicate start; node ids stable against their machine identity
``clock``       each node's NTP offset (``clock`` in its record) and the spread between nodes
``lease-timing`` keep-alive × 3 <= TTL, a request timeout fits in the TTL, clock spread << TTL
============== ==================================================================================

The coordination store is read once (:class:`StoreSnapshot`); if it cannot be reached,
:attr:`PreflightReport.store_unreachable` is set (the CLI exits 4) and the checks that need it
fail with that reason.  A full run (no ``--only``) is recorded at ``keys.preflight_last`` by
:func:`record_preflight`; ``stage advance`` requires a passing record (``cbctl.core.operator.gates``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cbctl.core.model import keys
from cbctl.core.model.config import check_private_file
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, ConfigError

if TYPE_CHECKING:
    from cbctl.core.model.config import Context
    from cbctl.core.backends.coord.base import KV, Coordinator

Status = Literal["pass", "warn", "fail"]

CHECK_NAMES: tuple[str, ...] = (
    "etcd", "nats", "redis", "prometheus", "credentials", "nodes", "node-ids", "clock", "lease-timing",
)

#: Metrics the gates and exit criteria read; each must have at least one series in Prometheus.
REQUIRED_METRICS: tuple[str, ...] = (
    "event_bus_publish_total", "event_bus_degraded", "event_bus_outages_total",
    "redis_lane_ownership_decision_total", "event_bus_publish_retries_total", "redis_lane_stale_fencing_total",
    "event_bus_outbox_depth", "event_bus_bridge_ordering_violations_total", "event_bus_consumer_dedup_mismatch_total",
    "cluster_rollout_applied_revision", "cluster_lease_lost_total",
)

# Raft indexes of healthy members differ by the entries in flight; a large gap means a member
# is falling behind (slow disk, partition).
RAFT_SPREAD_WARN = 1000

PREFLIGHT_SUBJECT_TOKEN = "__preflight__"


@dataclass
class CheckResult:
    """One row of the preflight table (and of ``-o json``'s ``checks``)."""

    name: str
    target: str
    node: str | None
    status: Status
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreflightOptions:
    """What to run and how strictly. ``only`` None = every check."""

    only: frozenset[str] | None = None
    skew_warn_ms: float = 50.0
    skew_fail_ms: float = 250.0
    check_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.only is not None:
            unknown = sorted(set(self.only) - set(CHECK_NAMES))
            if unknown:
                raise BadInput(f"--only: unknown check {', '.join(map(repr, unknown))} (known: {', '.join(CHECK_NAMES)})")
        if not 0 < self.skew_warn_ms <= self.skew_fail_ms:
            raise BadInput(
                f"--skew-warn-ms ({self.skew_warn_ms:g}) must be positive and <= --skew-fail-ms ({self.skew_fail_ms:g})"
            )

    def wants(self, name: str) -> bool:
        return self.only is None or name in self.only


@dataclass
class PreflightReport:
    checks: list[CheckResult]
    store_unreachable: str | None = None  # why, when the coordination store could not be read
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.store_unreachable is None and all(c.status != "fail" for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return sorted({c.name for c in self.checks if c.status == "fail"})

    def to_dict(self) -> dict[str, Any]:
        """The ``preflight -o json`` shape (a contract)."""
        return {"ok": self.ok, "checks": [c.to_dict() for c in self.checks]}


@dataclass
class StoreSnapshot:
    """What preflight reads from the coordination store, once, for every node check."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_records: dict[str, str] = field(default_factory=dict)  # node id -> why unreadable
    conflicts: list[KV] = field(default_factory=list)
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema_versions: tuple[int, ...] = (1,)
    now: float = 0.0


def _row(name: str, target: str, status: Status, detail: str, node: str | None = None) -> CheckResult:
    return CheckResult(name, target, node, status, detail)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n}"


# -- store ---------------------------------------------------------------------------------------


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
    for kv in nodes_kv:
        node_id = kv.key[len(keys.nodes_prefix(ctx.cluster)):]
        try:
            record = json.loads(kv.value)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            snap.nodes[node_id] = record
        except ValueError as exc:
            snap.bad_records[node_id] = f"unreadable registration record: {exc}"
    for kv in idents:
        try:
            rec = json.loads(kv.value)
        except ValueError:
            continue  # a broken identity record only weakens the stability check
        if isinstance(rec, dict):
            snap.identities[kv.key[len(keys.identity_prefix(ctx.cluster)):]] = rec
    if doc_kv is not None:
        try:
            versions = RolloutDocument.from_json(doc_kv.value).flags.get(SCHEMA_VERSIONS) or [1]
            snap.schema_versions = tuple(int(v) for v in versions)
        except (BadInput, TypeError, ValueError):
            pass  # `stage status` reports a broken document; preflight probes v1
    return snap


# -- etcd ----------------------------------------------------------------------------------------


async def check_etcd(ctx: Context, coord: Coordinator) -> list[CheckResult]:
    """Per endpoint: reachable, version, leader, DB size, alarms; cluster: leader, quorum, spread."""
    member_status = getattr(coord, "member_status", None)
    if member_status is None:  # a backend without per-member status (Consul): one round trip
        rev = await coord.current_revision()
        return [_row("etcd", ",".join(ctx.coordination.endpoints), "pass", f"{coord.backend_name} revision {rev}")]
    rows: list[CheckResult] = []
    members = await member_status()
    leaders: set[int] = set()
    indexes: list[int] = []
    for m in members:
        ep = m["endpoint"]
        if not m["reachable"]:
            rows.append(_row("etcd", ep, "fail", f"unreachable: {m['error']}"))
            continue
        if m["error"]:  # answered, but refused us
            rows.append(_row("etcd", ep, "fail", f"auth: {m['error']}"))
            continue
        if m.get("leader_id"):
            leaders.add(m["leader_id"])
        if m.get("raft_index") is not None:
            indexes.append(m["raft_index"])
        detail = (f"etcd {m['version']}, {'leader' if m['is_leader'] else 'follower'}, db {_size(m['db_size'])}, "
                  f"raft index {m['raft_index']}")
        if m.get("errors"):
            rows.append(_row("etcd", ep, "fail", f"{detail}; member errors: {'; '.join(map(str, m['errors']))}"))
        elif not m.get("leader_id"):
            rows.append(_row("etcd", ep, "fail", f"{detail}; no leader"))
        else:
            rows.append(_row("etcd", ep, "pass", detail))
    reachable = len(indexes)
    total = len(members)
    if reachable == 0:
        rows.append(_row("etcd", "cluster", "fail", f"no member of {total} reachable"))
        return rows
    problems: list[str] = []
    status: Status = "pass"
    if len(leaders) > 1:
        status, _ = "fail", problems.append(f"members disagree on the leader ({len(leaders)} leaders)")
    elif not leaders:
        status, _ = "fail", problems.append("no leader")
    spread = max(indexes) - min(indexes)
    if reachable < total // 2 + 1:
        # The configured endpoints may be a subset of the members; then this is only a warning.
        status = "fail" if total >= 3 else status
        problems.append(f"only {reachable} of {total} configured members reachable")
    elif reachable < total:
        status = "warn" if status == "pass" else status
        problems.append(f"{total - reachable} of {total} configured members unreachable")
    if spread > RAFT_SPREAD_WARN:
        status = "warn" if status == "pass" else status
        problems.append(f"raft index spread {spread} > {RAFT_SPREAD_WARN}")
    detail = f"{reachable}/{total} members, raft index spread {spread}"
    rows.append(_row("etcd", "cluster", status, detail + ("; " + "; ".join(problems) if problems else "")))
    return rows


# -- NATS ----------------------------------------------------------------------------------------


async def check_nats(ctx: Context, snap: StoreSnapshot | None, timeout: float) -> list[CheckResult]:
    """Connect with the configured auth; JetStream; stream settings; publish permission."""
    import nats.errors
    import nats.js.errors

    from cbctl.core.backends.nats.connect import connect_nats, servers_text
    from cbctl.core.backends.probes import nats_version

    target = servers_text(ctx.nats)
    async_errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        async_errors.append(exc)  # permission violations arrive here, not on the publish call

    try:
        nc = await connect_nats(ctx.nats, name="cbctl-preflight", reconnect=False, error_cb=on_error)
    except AuthFailed as exc:
        return [_row("nats", target, "fail", f"auth: {exc}")]
    except BackendUnavailable as exc:
        return [_row("nats", target, "fail", f"unreachable: {exc}")]
    except ConfigError as exc:
        return [_row("nats", target, "fail", f"config: {exc}")]
    rows: list[CheckResult] = []
    try:
        rows.append(_row("nats", target, "pass", f"connected, nats-server {nats_version(nc)}"))
        js = nc.jetstream(timeout=timeout / 2)
        try:
            info = await js.account_info()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            rows.append(_row("nats", "jetstream", "fail", "JetStream is not enabled for this account/server"))
            return rows
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            rows.append(_row("nats", "jetstream", "fail", f"account info: {type(exc).__name__}: {exc}"))
            return rows
        rows.append(_row("nats", "jetstream", "pass", f"enabled, {info.streams} streams, {_size(info.storage)} file"))
        rows.append(await _stream_row(ctx, js))
        versions = snap.schema_versions if snap is not None else (1,)
        for v in versions:
            rows.append(await _publish_probe(js, v, async_errors, timeout / 2, ctx.cluster))
    finally:
        try:
            await nc.close()
        except (nats.errors.Error, OSError, asyncio.TimeoutError):
            pass  # the check's result is already known
    return rows


async def _stream_row(ctx: Context, js: Any) -> CheckResult:
    """The event stream exists with the configured storage, replicas, duplicate window, subjects
    and limits (a stream without limits fails: it grows without bound)."""
    import nats.errors
    import nats.js.errors

    from cbctl.core.backends.nats.stream import stream_mismatches

    want = ctx.nats.stream
    target = f"stream {want.name}"
    try:
        si = await js.stream_info(want.name)
    except nats.js.errors.NotFoundError:
        return _row("nats", target, "fail", "does not exist")
    except (nats.errors.Error, asyncio.TimeoutError) as exc:
        return _row("nats", target, "fail", f"stream info: {type(exc).__name__}: {exc}")
    cfg = si.config
    storage = getattr(cfg.storage, "value", cfg.storage)
    problems = stream_mismatches(cfg, want, cluster=ctx.cluster)
    if problems:
        return _row("nats", target, "fail", "; ".join(problems))
    return _row("nats", target, "pass",
                f"{storage}, {cfg.num_replicas or 1} replica(s), dup window {cfg.duplicate_window:g}s, "
                f"limits max-age {cfg.max_age:g}s / max-bytes {_size(cfg.max_bytes)} / "
                f"{cfg.max_msgs_per_subject} msgs per subject; {si.state.messages} messages, "
                f"{_size(si.state.bytes)}")


async def _publish_probe(js: Any, version: int, async_errors: list[Exception], timeout: float,
                         cluster: str) -> CheckResult:
    """Prove publish permission on ``cb.events.v<N>.*`` and that the stream captures it — without
    storing anything: the publish carries ``Nats-Expected-Last-Subject-Sequence`` set to an
    impossible value, so the stream answers "wrong last sequence" (error 10071) instead of
    storing.  That answer can only come from the stream, after the server let us publish on
    the subject.  A permission violation arrives as an async error and the publish times out.
    """
    import nats.errors
    import nats.js.errors

    from cbctl.core.model.events import subject as event_subject

    subject = event_subject(cluster, version, PREFLIGHT_SUBJECT_TOKEN)
    target = f"publish {subject}"
    before = len(async_errors)
    try:
        await js.publish(subject, b"", timeout=timeout,
                         headers={"Nats-Expected-Last-Subject-Sequence": str(2**62), "Cb-Preflight": "1"})
    except nats.js.errors.APIError as exc:
        if getattr(exc, "err_code", None) == 10071 or "wrong last sequence" in str(exc).lower():
            return _row("nats", target, "pass", "the stream answered (publish permitted, nothing stored)")
        return _row("nats", target, "fail", f"stream refused: {exc}")
    except nats.errors.NoRespondersError:
        return _row("nats", target, "fail", "no stream captures this subject (no responders)")
    except nats.js.errors.NoStreamResponseError:
        return _row("nats", target, "fail", "no stream captures this subject (no response from a stream)")
    except (nats.errors.TimeoutError, asyncio.TimeoutError):
        denied = [e for e in async_errors[before:] if "permission" in str(e).lower()]
        if denied:
            return _row("nats", target, "fail", f"permission denied: {denied[-1]}")
        return _row("nats", target, "fail", f"no answer from the stream within {timeout:g}s")
    except nats.errors.Error as exc:
        return _row("nats", target, "fail", f"{type(exc).__name__}: {exc}")
    # Stored after all (a server that ignores the header): harmless, but say so.
    return _row("nats", target, "warn", "published and stored a preflight message (expected-sequence ignored)")


# -- Redis ---------------------------------------------------------------------------------------


async def check_redis(ctx: Context, timeout: float) -> list[CheckResult]:
    """PING, server version, and that the fencing guard script loads (scripting allowed)."""
    from cbctl.core.backends.redis.lanes import GUARD_LUA
    from cbctl.core.backends.probes import open_redis, redis_call

    target = ctx.redis.url
    try:
        client = open_redis(ctx.redis, timeout=timeout)
    except ConfigError as exc:
        return [_row("redis", target, "fail", f"config: {exc}")]
    try:
        await redis_call("PING", client.ping())
        info = await redis_call("INFO server", client.info("server"))
        sha = await redis_call("SCRIPT LOAD", client.script_load(GUARD_LUA))
        persistence = await redis_call("INFO persistence", client.info("persistence"))
        config = await _redis_config(client, ("appendonly", "appendfsync"))
    except AuthFailed as exc:
        return [_row("redis", target, "fail", f"auth: {exc}")]
    except BackendUnavailable as exc:
        return [_row("redis", target, "fail", f"unreachable: {exc}")]
    finally:
        await client.aclose()
    sha_text = sha.decode() if isinstance(sha, bytes) else str(sha)
    return [
        _row("redis", target, "pass", f"redis {info.get('redis_version', '?')}, guard script {sha_text[:12]} loaded"),
        redis_persistence_row(persistence, config),
    ]


async def _redis_config(client: Any, names: tuple[str, ...]) -> dict[str, str] | str:
    """``CONFIG GET`` of ``names``, or why it could not be read (a managed Redis may rename or
    deny CONFIG; INFO persistence still tells whether AOF is on)."""
    from redis import exceptions as rexc

    try:
        raw = await client.config_get(*names)
    except (rexc.ResponseError, rexc.NoPermissionError) as exc:
        return f"CONFIG GET refused: {exc}"
    return {str(k): str(v) for k, v in raw.items()}


def redis_persistence_row(persistence: Mapping[str, Any], config: Mapping[str, str] | str) -> CheckResult:
    """Judge Redis durability (pure): fences, per-workflow seqs and applied markers live in Redis,
    and a restart that forgets them lets a stale owner write again and reuses event ids.

    ``fail`` when AOF is off (``aof_enabled:0`` in INFO persistence) or its last write failed;
    ``warn`` on ``appendfsync no`` (the kernel flushes when it likes: a host crash can lose tens
    of seconds of acknowledged writes) or when ``appendfsync`` cannot be read; ``pass`` otherwise.
    """
    target = "persistence"
    aof = str(persistence.get("aof_enabled", "")).strip()
    if aof != "1":
        return _row("redis", target, "fail",
                    "AOF is off (appendonly no): a restart forgets fencing tokens, workflow seqs and applied "
                    "markers, so stale owners can write again and event ids are reused; set appendonly yes")
    status = str(persistence.get("aof_last_write_status", "ok"))
    if status != "ok":
        return _row("redis", target, "fail", f"AOF on but its last write failed (aof_last_write_status {status})")
    fsync = config_value(config, "appendfsync")
    if fsync is None:
        why = config if isinstance(config, str) else "appendfsync not reported"
        return _row("redis", target, "warn", f"AOF on; fsync policy unknown ({why})")
    if fsync == "no":
        return _row("redis", target, "warn",
                    "AOF on with appendfsync no: the kernel decides when to flush, so a host crash can lose "
                    "acknowledged writes; use everysec (at most ~1 s lost) or always")
    return _row("redis", target, "pass", f"AOF on, appendfsync {fsync}")


def config_value(config: Mapping[str, str] | str, name: str) -> str | None:
    """One value from a ``CONFIG GET`` result (None when unknown or refused)."""
    return None if isinstance(config, str) else config.get(name)


# -- Prometheus ----------------------------------------------------------------------------------


async def check_prometheus(ctx: Context, timeout: float) -> list[CheckResult]:
    """Ready; every active target up; the metrics the gates need exist."""
    from cbctl.core.backends.prometheus import PromClient

    url = ctx.prometheus.url
    rows: list[CheckResult] = []
    async with PromClient(url, timeout=timeout) as prom:
        try:
            if not await prom.ready():
                return [_row("prometheus", url, "fail", "not ready (/-/ready)")]
            targets, names = await asyncio.gather(prom.targets(), prom.metric_names())
        except BackendUnavailable as exc:
            return [_row("prometheus", url, "fail", f"unreachable: {exc}")]
        except BadInput as exc:
            return [_row("prometheus", url, "fail", str(exc))]
    rows.append(_row("prometheus", url, "pass", "ready"))
    if not targets:
        rows.append(_row("prometheus", "targets", "fail", "no active scrape targets"))
    for t in targets:
        where = t.labels.get("node") or t.labels.get("instance") or t.scrape_url
        if t.health == "up":
            rows.append(_row("prometheus", f"target {t.scrape_url}", "pass", "up", node=t.labels.get("node")))
        elif t.health == "unknown":
            rows.append(_row("prometheus", f"target {t.scrape_url}", "warn", "not scraped yet", node=t.labels.get("node")))
        else:
            rows.append(_row("prometheus", f"target {t.scrape_url}", "fail", f"down: {t.last_error or where}",
                             node=t.labels.get("node")))
    missing = [m for m in REQUIRED_METRICS if m not in names]
    if missing:
        rows.append(_row("prometheus", "metrics", "fail", f"missing {len(missing)}: {', '.join(missing)}"))
    else:
        rows.append(_row("prometheus", "metrics", "pass", f"all {len(REQUIRED_METRICS)} required metrics present"))
    return rows


# -- credentials ---------------------------------------------------------------------------------


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
        return [_row("credentials", "-", "pass", "no credential files configured")]
    rows = []
    for what, path in files:
        problem = check_private_file(path)
        rows.append(_row("credentials", f"{what} {path}", "fail" if problem else "pass", problem or "owner-only"))
    return rows


# -- nodes ---------------------------------------------------------------------------------------


def check_nodes(ctx: Context, snap: StoreSnapshot) -> list[CheckResult]:
    """Expected nodes registered; each node's own probes fresh and ok."""
    from cbctl.core.backends.probes import stale_after

    limit = stale_after(ctx)
    rows: list[CheckResult] = []
    for node_id in ctx.expected_nodes:
        if node_id not in snap.nodes and node_id not in snap.bad_records:
            rows.append(_row("nodes", "registration", "fail", "expected node is not registered (agent down?)", node_id))
    for node_id, why in sorted(snap.bad_records.items()):
        rows.append(_row("nodes", "registration", "fail", why, node_id))
    if not snap.nodes and not ctx.expected_nodes:
        rows.append(_row("nodes", "registration", "warn", "no node registered and no expected-nodes configured"))
    for node_id, record in sorted(snap.nodes.items()):
        probes = record.get("probes")
        if not isinstance(probes, Mapping):
            rows.append(_row("nodes", "probes", "fail", "no reachability report in the node record", node_id))
            continue
        for backend in ("etcd", "nats", "redis"):
            p = probes.get(backend)
            if not isinstance(p, Mapping) or not isinstance(p.get("at"), (int, float)):
                rows.append(_row("nodes", backend, "fail", "no report from this node", node_id))
                continue
            age = snap.now - float(p["at"])
            if age > limit:
                rows.append(_row("nodes", backend, "fail",
                                 f"stale report: {age:.0f}s old (limit {limit:g}s); last said: {p.get('detail', '')}",
                                 node_id))
            elif not p.get("ok"):
                rows.append(_row("nodes", backend, "fail", str(p.get("detail") or "not ok"), node_id))
            else:
                rows.append(_row("nodes", backend, "pass", f"ok {age:.0f}s ago ({p.get('detail', '')})", node_id))
    return rows


def check_node_ids(ctx: Context, snap: StoreSnapshot) -> list[CheckResult]:
    """No unresolved duplicate-id conflict; each node id on one machine, each machine one id."""
    rows: list[CheckResult] = []
    prefix = keys.conflicts_prefix(ctx.cluster)
    for kv in snap.conflicts:
        rest = kv.key[len(prefix):]
        node_id = rest.split("/", 1)[0]
        try:
            rec = json.loads(kv.value)
        except ValueError:
            rec = {}
        rec = rec if isinstance(rec, dict) else {}
        reason = rec.get("reason") or rec.get("kind") or "duplicate node id"
        parts = [f"{k} {rec[k]}" for k in ("host", "pid", "machine_id", "instance_id") if rec.get(k)]
        rows.append(_row("node-ids", f"conflict {rest}", "fail",
                         f"{reason}" + (f" ({', '.join(parts)})" if parts else "") + f"; clear {kv.key} once resolved",
                         node_id))
    # Stability: a live node on a machine other than the one its id was last bound to.
    for node_id, record in sorted(snap.nodes.items()):
        ident = snap.identities.get(node_id)
        mine = record.get("machine_id")
        if ident and mine and ident.get("machine_id") and ident["machine_id"] != mine:
            rows.append(_row("node-ids", "identity", "fail",
                             f"node id bound to machine {ident['machine_id']} but registered from {mine}", node_id))
    by_machine: dict[str, set[str]] = {}
    for node_id, ident in snap.identities.items():
        m = ident.get("machine_id")
        if m:
            by_machine.setdefault(str(m), set()).add(node_id)
    for node_id, record in snap.nodes.items():
        m = record.get("machine_id")
        if m:
            by_machine.setdefault(str(m), set()).add(node_id)
    for machine, ids in sorted(by_machine.items()):
        if len(ids) > 1:
            rows.append(_row("node-ids", f"machine {machine}", "fail",
                             f"one machine identity under several node ids: {', '.join(sorted(ids))}"))
    if not rows:
        rows.append(_row("node-ids", "-", "pass", f"{len(snap.nodes)} live node ids unique and stable"))
    return rows


def clock_spread_ms(snap: StoreSnapshot) -> float | None:
    offsets = [float(r["clock"]["offset_ms"]) for r in snap.nodes.values()
               if isinstance(r.get("clock"), Mapping) and isinstance(r["clock"].get("offset_ms"), (int, float))]
    return max(offsets) - min(offsets) if len(offsets) >= 2 else (0.0 if offsets else None)


def check_clock(ctx: Context, snap: StoreSnapshot, opts: PreflightOptions) -> list[CheckResult]:
    """|offset| per node and the spread between nodes against the skew thresholds."""
    rows: list[CheckResult] = []
    warn, fail = opts.skew_warn_ms, opts.skew_fail_ms
    if not ctx.ntp_servers:
        rows.append(_row("clock", "ntp-servers", "warn", "no ntp-servers configured: node clocks are not measured"))
    for node_id, record in sorted(snap.nodes.items()):
        clock = record.get("clock")
        if not isinstance(clock, Mapping):
            rows.append(_row("clock", "offset", "warn", "no clock report in the node record", node_id))
            continue
        off = clock.get("offset_ms")
        if not isinstance(off, (int, float)):
            rows.append(_row("clock", "offset", "warn", f"not measured: {clock.get('error') or 'no offset'}", node_id))
            continue
        src = clock.get("source") or "?"
        mag = abs(float(off))
        status: Status = "fail" if mag >= fail else "warn" if mag >= warn else "pass"
        limit = f" (fail >= {fail:g} ms)" if status == "fail" else f" (warn >= {warn:g} ms)" if status == "warn" else ""
        rows.append(_row("clock", "offset", status, f"offset {float(off):+.1f} ms vs {src}{limit}", node_id))
    spread = clock_spread_ms(snap)
    if spread is not None and len(snap.nodes) >= 2:
        status = "fail" if spread >= fail else "warn" if spread >= warn else "pass"
        rows.append(_row("clock", "spread", status, f"spread between nodes {spread:.1f} ms (warn {warn:g}, fail {fail:g})"))
    return rows


def check_lease_timing(ctx: Context, snap: StoreSnapshot | None) -> list[CheckResult]:
    """keep-alive × 3 <= TTL; keep-alive + request timeout < TTL; clock spread << TTL."""
    c = ctx.coordination
    ttl, ka, to = c.lease_ttl, c.keepalive_interval, c.timeout
    rows = [
        _row("lease-timing", "keepalive", "pass" if ka * 3 <= ttl else "fail",
             f"keep-alive {ka:g}s × 3 = {ka * 3:g}s {'<=' if ka * 3 <= ttl else '>'} TTL {ttl:g}s"
             + ("" if ka * 3 <= ttl else ": two missed keep-alives lose the lease")),
        _row("lease-timing", "timeout", "pass" if ka + to < ttl else "fail",
             f"keep-alive {ka:g}s + request timeout {to:g}s {'<' if ka + to < ttl else '>='} TTL {ttl:g}s"
             + ("" if ka + to < ttl else ": one slow keep-alive can outlast the lease")),
    ]
    spread = clock_spread_ms(snap) if snap is not None else None
    if spread is not None:
        ttl_ms = ttl * 1000
        status: Status = "fail" if spread >= ttl_ms / 2 else "warn" if spread >= ttl_ms / 10 else "pass"
        rows.append(_row("lease-timing", "clock-spread", status,
                         f"clock spread {spread:.1f} ms vs TTL {ttl:g}s (warn >= TTL/10, fail >= TTL/2)"))
    return rows


# -- running ---------------------------------------------------------------------------------------


async def _deadline(name: str, target: str, timeout: float, body: Awaitable[list[CheckResult]]) -> list[CheckResult]:
    """Run one check under its own deadline; a timeout or a backend error is a fail row."""
    try:
        async with asyncio.timeout(timeout):
            return await body
    except TimeoutError:
        return [_row(name, target, "fail", f"no answer within {timeout:g}s")]
    except AuthFailed as exc:
        return [_row(name, target, "fail", f"auth: {exc}")]
    except BackendUnavailable as exc:
        return [_row(name, target, "fail", f"unreachable: {exc}")]
    except ConfigError as exc:
        return [_row(name, target, "fail", f"config: {exc}")]


async def _sync(fn: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    return fn()


async def run_preflight(ctx: Context, coord: Coordinator, opts: PreflightOptions) -> PreflightReport:
    """Run the selected checks concurrently against ``coord`` (built, connected or not).

    Never raises for a backend problem; ``store_unreachable`` is set when the coordination
    store could not be read (the caller exits 4).  Configuration errors (``ConfigError``) of
    the context itself do propagate.
    """
    t0 = time.monotonic()
    to = opts.check_timeout
    store_error: str | None = None
    snap: StoreSnapshot | None = None

    async def load() -> None:
        nonlocal snap, store_error
        try:
            async with asyncio.timeout(to):
                snap = await read_snapshot(ctx, coord)
        except TimeoutError:
            store_error = f"the coordination store did not answer within {to:g}s"
        except BackendUnavailable as exc:  # AuthFailed included: we cannot read either way
            store_error = str(exc)

    # NATS needs the schema versions from the document: read the store first, concurrently
    # with the checks that do not need it.
    independent: list[Awaitable[list[CheckResult]]] = []
    eps = ",".join(ctx.coordination.endpoints)
    if opts.wants("etcd"):
        independent.append(_deadline("etcd", eps, to, check_etcd(ctx, coord)))
    if opts.wants("redis"):
        independent.append(_deadline("redis", ctx.redis.url, to, check_redis(ctx, to / 2)))
    if opts.wants("prometheus"):
        independent.append(_deadline("prometheus", ctx.prometheus.url, to, check_prometheus(ctx, to / 2)))
    if opts.wants("credentials"):
        independent.append(_deadline("credentials", "-", to, check_credentials(ctx)))
    first = asyncio.gather(*independent)
    await load()

    dependent: list[Awaitable[list[CheckResult]]] = []
    if opts.wants("nats"):
        from cbctl.core.backends.nats.connect import servers_text  # redacted, like every NATS message

        dependent.append(_deadline("nats", servers_text(ctx.nats), to, check_nats(ctx, snap, to / 2)))
    if opts.wants("lease-timing"):
        dependent.append(_deadline("lease-timing", "-", to, _sync(lambda: check_lease_timing(ctx, snap))))
    for name, fn in (("nodes", check_nodes), ("node-ids", check_node_ids)):
        if opts.wants(name):
            if snap is None:
                dependent.append(_sync(lambda name=name: [_row(name, "store", "fail", "cannot read the coordination store")]))
            else:
                dependent.append(_deadline(name, "store", to, _sync(lambda fn=fn, s=snap: fn(ctx, s))))
    if opts.wants("clock"):
        if snap is None:
            dependent.append(_sync(lambda: [_row("clock", "store", "fail", "cannot read the coordination store")]))
        else:
            dependent.append(_deadline("clock", "store", to, _sync(lambda s=snap: check_clock(ctx, s, opts))))
    second = await asyncio.gather(*dependent)
    rows = [r for group in (*await first, *second) for r in group]
    order = {n: i for i, n in enumerate(CHECK_NAMES)}
    rows.sort(key=lambda r: order.get(r.name, len(order)))  # stable: keeps each check's own order
    return PreflightReport(rows, store_error, time.monotonic() - t0)


async def record_preflight(ctx: Context, coord: Coordinator, report: PreflightReport, *, actor: str) -> None:
    """Record a full run at ``keys.preflight_last`` (read by the advance gate)."""
    record = {
        "time": time.time(),
        "ok": report.ok,
        "failed": report.failed,
        "warnings": sum(1 for c in report.checks if c.status == "warn"),
        "checks": len(report.checks),
        "actor": actor,
    }
    await coord.put(keys.preflight_last(ctx.cluster), json.dumps(record, sort_keys=True).encode())


__all__ = [
    "CHECK_NAMES", "CheckResult", "PreflightOptions", "PreflightReport", "REQUIRED_METRICS", "StoreSnapshot",
    "check_clock", "check_credentials", "check_etcd", "check_lease_timing", "check_nats", "check_node_ids",
    "check_nodes", "check_prometheus", "check_redis", "credential_files", "read_snapshot", "record_preflight",
    "redis_persistence_row",
    "run_preflight",
]
