"""Preflight checks of the backends: etcd (or the coordination store), NATS with JetStream and
publish permission, Redis with persistence, Prometheus with the metrics the gates read. A check
never raises for a backend problem: it returns ``fail`` rows naming why."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, ConfigError
from cbctl.core.operator.preflight_report import REQUIRED_METRICS, CheckResult, Status, fmt_size, row

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator
    from cbctl.core.model.config import Context
    from cbctl.core.operator.preflight_report import StoreSnapshot

# Raft indexes of healthy members differ by the entries in flight; a large gap means a member
# is falling behind (slow disk, partition).
RAFT_SPREAD_WARN = 1000

PREFLIGHT_SUBJECT_TOKEN = "__preflight__"


async def check_etcd(ctx: Context, coord: Coordinator) -> list[CheckResult]:
    """Per endpoint: reachable, version, leader, DB size, alarms; cluster: leader, quorum, spread."""
    member_status = getattr(coord, "member_status", None)
    if member_status is None:  # a backend without per-member status (Consul): one round trip
        rev = await coord.current_revision()
        return [row("etcd", ",".join(ctx.coordination.endpoints), "pass", f"{coord.backend_name} revision {rev}")]
    rows: list[CheckResult] = []
    members = await member_status()
    leaders: set[int] = set()
    indexes: list[int] = []
    for m in members:
        ep = m["endpoint"]
        if not m["reachable"]:
            rows.append(row("etcd", ep, "fail", f"unreachable: {m['error']}"))
            continue
        if m["error"]:  # answered, but refused us
            rows.append(row("etcd", ep, "fail", f"auth: {m['error']}"))
            continue
        if m.get("leader_id"):
            leaders.add(m["leader_id"])
        if m.get("raft_index") is not None:
            indexes.append(m["raft_index"])
        detail = (f"etcd {m['version']}, {'leader' if m['is_leader'] else 'follower'}, db {fmt_size(m['db_size'])}, "
                  f"raft index {m['raft_index']}")
        if m.get("errors"):
            rows.append(row("etcd", ep, "fail", f"{detail}; member errors: {'; '.join(map(str, m['errors']))}"))
        elif not m.get("leader_id"):
            rows.append(row("etcd", ep, "fail", f"{detail}; no leader"))
        else:
            rows.append(row("etcd", ep, "pass", detail))
    reachable = len(indexes)
    total = len(members)
    if reachable == 0:
        rows.append(row("etcd", "cluster", "fail", f"no member of {total} reachable"))
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
    rows.append(row("etcd", "cluster", status, detail + ("; " + "; ".join(problems) if problems else "")))
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
        return [row("nats", target, "fail", f"auth: {exc}")]
    except BackendUnavailable as exc:
        return [row("nats", target, "fail", f"unreachable: {exc}")]
    except ConfigError as exc:
        return [row("nats", target, "fail", f"config: {exc}")]
    rows: list[CheckResult] = []
    try:
        rows.append(row("nats", target, "pass", f"connected, nats-server {nats_version(nc)}"))
        js = nc.jetstream(timeout=timeout / 2)
        try:
            info = await js.account_info()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            rows.append(row("nats", "jetstream", "fail", "JetStream is not enabled for this account/server"))
            return rows
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            rows.append(row("nats", "jetstream", "fail", f"account info: {type(exc).__name__}: {exc}"))
            return rows
        rows.append(row("nats", "jetstream", "pass", f"enabled, {info.streams} streams, {fmt_size(info.storage)} file"))
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
        return row("nats", target, "fail", "does not exist")
    except (nats.errors.Error, asyncio.TimeoutError) as exc:
        return row("nats", target, "fail", f"stream info: {type(exc).__name__}: {exc}")
    cfg = si.config
    storage = getattr(cfg.storage, "value", cfg.storage)
    problems = stream_mismatches(cfg, want, cluster=ctx.cluster)
    if problems:
        return row("nats", target, "fail", "; ".join(problems))
    return row("nats", target, "pass",
                f"{storage}, {cfg.num_replicas or 1} replica(s), dup window {cfg.duplicate_window:g}s, "
                f"limits max-age {cfg.max_age:g}s / max-bytes {fmt_size(cfg.max_bytes)} / "
                f"{cfg.max_msgs_per_subject} msgs per subject; {si.state.messages} messages, "
                f"{fmt_size(si.state.bytes)}")


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
            return row("nats", target, "pass", "the stream answered (publish permitted, nothing stored)")
        return row("nats", target, "fail", f"stream refused: {exc}")
    except nats.errors.NoRespondersError:
        return row("nats", target, "fail", "no stream captures this subject (no responders)")
    except nats.js.errors.NoStreamResponseError:
        return row("nats", target, "fail", "no stream captures this subject (no response from a stream)")
    except (nats.errors.TimeoutError, asyncio.TimeoutError):
        denied = [e for e in async_errors[before:] if "permission" in str(e).lower()]
        if denied:
            return row("nats", target, "fail", f"permission denied: {denied[-1]}")
        return row("nats", target, "fail", f"no answer from the stream within {timeout:g}s")
    except nats.errors.Error as exc:
        return row("nats", target, "fail", f"{type(exc).__name__}: {exc}")
    # Stored after all (a server that ignores the header): harmless, but say so.
    return row("nats", target, "warn", "published and stored a preflight message (expected-sequence ignored)")


# -- Redis ---------------------------------------------------------------------------------------


async def check_redis(ctx: Context, timeout: float) -> list[CheckResult]:
    """PING, server version, and that the fencing guard script loads (scripting allowed)."""
    from cbctl.core.backends.redis.guard import GUARD_LUA
    from cbctl.core.backends.redis.client import open_redis, redis_call

    target = ctx.redis.url
    try:
        client = open_redis(ctx.redis, timeout=timeout)
    except ConfigError as exc:
        return [row("redis", target, "fail", f"config: {exc}")]
    try:
        await redis_call("PING", client.ping())
        info = await redis_call("INFO server", client.info("server"))
        sha = await redis_call("SCRIPT LOAD", client.script_load(GUARD_LUA))
        persistence = await redis_call("INFO persistence", client.info("persistence"))
        config = await _redis_config(client, ("appendonly", "appendfsync"))
    except AuthFailed as exc:
        return [row("redis", target, "fail", f"auth: {exc}")]
    except BackendUnavailable as exc:
        return [row("redis", target, "fail", f"unreachable: {exc}")]
    finally:
        await client.aclose()
    sha_text = sha.decode() if isinstance(sha, bytes) else str(sha)
    return [
        row("redis", target, "pass", f"redis {info.get('redis_version', '?')}, guard script {sha_text[:12]} loaded"),
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
        return row("redis", target, "fail",
                    "AOF is off (appendonly no): a restart forgets fencing tokens, workflow seqs and applied "
                    "markers, so stale owners can write again and event ids are reused; set appendonly yes")
    status = str(persistence.get("aof_last_write_status", "ok"))
    if status != "ok":
        return row("redis", target, "fail", f"AOF on but its last write failed (aof_last_write_status {status})")
    fsync = config_value(config, "appendfsync")
    if fsync is None:
        why = config if isinstance(config, str) else "appendfsync not reported"
        return row("redis", target, "warn", f"AOF on; fsync policy unknown ({why})")
    if fsync == "no":
        return row("redis", target, "warn",
                    "AOF on with appendfsync no: the kernel decides when to flush, so a host crash can lose "
                    "acknowledged writes; use everysec (at most ~1 s lost) or always")
    return row("redis", target, "pass", f"AOF on, appendfsync {fsync}")


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
                return [row("prometheus", url, "fail", "not ready (/-/ready)")]
            targets, names = await asyncio.gather(prom.targets(), prom.metric_names())
        except BackendUnavailable as exc:
            return [row("prometheus", url, "fail", f"unreachable: {exc}")]
        except BadInput as exc:
            return [row("prometheus", url, "fail", str(exc))]
    rows.append(row("prometheus", url, "pass", "ready"))
    if not targets:
        rows.append(row("prometheus", "targets", "fail", "no active scrape targets"))
    for t in targets:
        where = t.labels.get("node") or t.labels.get("instance") or t.scrape_url
        if t.health == "up":
            rows.append(row("prometheus", f"target {t.scrape_url}", "pass", "up", node=t.labels.get("node")))
        elif t.health == "unknown":
            rows.append(row("prometheus", f"target {t.scrape_url}", "warn", "not scraped yet", node=t.labels.get("node")))
        else:
            rows.append(row("prometheus", f"target {t.scrape_url}", "fail", f"down: {t.last_error or where}",
                             node=t.labels.get("node")))
    missing = [m for m in REQUIRED_METRICS if m not in names]
    if missing:
        rows.append(row("prometheus", "metrics", "fail", f"missing {len(missing)}: {', '.join(missing)}"))
    else:
        rows.append(row("prometheus", "metrics", "pass", f"all {len(REQUIRED_METRICS)} required metrics present"))
    return rows
