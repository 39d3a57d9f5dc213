"""Node-side probes: what every agent measures on a short period and writes into its record.

Shapes (the contract with preflight, ``cbctl.core.operator.preflight``)::

    probes = {"etcd":  {"ok": bool, "detail": str, "at": epoch_s, "ms": float | None},
              "nats":  {...}, "redis": {...}}
    clock  = {"offset_ms": float | None, "source": "host:port" | None, "at": epoch_s,
              "error": str | None, "delay_ms": float | None}

``at`` is the node's own wall clock.  A probe never raises for an unreachable or refusing
backend: it reports ``ok: false`` with ``auth: ...`` or ``unreachable: ...``; each probe runs
under its own deadline, concurrently.  More: docs/backends.md, "Probes".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from cbctl.core.model.errors import AuthFailed, BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from redis.asyncio import Redis

    from cbctl.core.model.config import Context, NatsConfig, RedisConfig
    from cbctl.core.backends.coord.base import Coordinator

DEFAULT_PROBE_INTERVAL = 5.0
DEFAULT_PROBE_TIMEOUT = 2.0
NTP_TIMEOUT = 1.0

__all__ = [
    "DEFAULT_PROBE_INTERVAL", "measure_clock", "measure_clock_async", "parse_ntp_server",
    "probe_all", "probe_loop", "probe_etcd", "probe_interval", "probe_nats", "probe_redis", "stale_after",
]


def probe_interval(ctx: Context) -> float:
    """``[contexts.X.agent] probe-interval`` (seconds or a duration), default 5 s."""
    from cbctl.core.backends.prometheus import parse_duration

    raw = (ctx.extra.get("agent") or {}).get("probe-interval", DEFAULT_PROBE_INTERVAL)
    return parse_duration(raw, what=f"contexts.{ctx.name}.agent.probe-interval")


def stale_after(ctx: Context) -> float:
    """A probe report older than this is stale: ``[preflight] probe-stale-after``, default 3
    rounds, a round lasting the probe interval or, if longer, the longest a round can take
    (a probe's timeout, or one NTP timeout per server).  Without that floor a short interval
    turns one unreachable backend (whose probe waits out its timeout) into "stale" reports
    for every backend of the node."""
    from cbctl.core.backends.prometheus import parse_duration

    raw = (ctx.extra.get("preflight") or {}).get("probe-stale-after")
    if raw is None:
        longest_round = max(DEFAULT_PROBE_TIMEOUT, NTP_TIMEOUT * len(ctx.ntp_servers))
        return 3 * max(probe_interval(ctx), longest_round)
    return parse_duration(raw, what=f"contexts.{ctx.name}.preflight.probe-stale-after")


def _result(ok: bool, detail: str, started: float) -> dict[str, Any]:
    return {"ok": ok, "detail": detail, "at": round(time.time(), 3),
            "ms": round((time.monotonic() - started) * 1000, 2)}


async def _guarded(what: str, body: Callable[[], Awaitable[str]], timeout: float) -> dict[str, Any]:
    """Run one probe body under ``timeout``; map our error types to an ok/detail report."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            detail = await body()
    except TimeoutError:
        return _result(False, f"unreachable: {what} did not answer within {timeout:g}s", started)
    except AuthFailed as exc:
        return _result(False, f"auth: {exc}", started)
    except BackendUnavailable as exc:
        return _result(False, f"unreachable: {exc}", started)
    except ConfigError as exc:
        return _result(False, f"config: {exc}", started)
    return _result(True, detail, started)


# -- etcd ------------------------------------------------------------------------------------


async def probe_etcd(ctx: Context, coord: Coordinator | None = None, *, timeout: float = DEFAULT_PROBE_TIMEOUT) -> dict[str, Any]:
    """Read the store's revision, through ``coord`` if given (the agent's own), else a new one."""

    async def body() -> str:
        if coord is not None:
            return f"revision {await coord.current_revision()}"
        from cbctl.core.backends.coord import make_coordinator

        own = make_coordinator(ctx)
        try:
            await own.connect()
            return f"revision {await own.current_revision()}"
        finally:
            await own.close()

    return await _guarded("etcd", body, timeout)


# -- NATS ------------------------------------------------------------------------------------


async def probe_nats(
    nats_cfg: NatsConfig, nc: NatsClient | None = None, *, timeout: float = DEFAULT_PROBE_TIMEOUT, name: str = "cbctl-probe"
) -> dict[str, Any]:
    """A PING/PONG round trip and a JetStream account lookup, on ``nc`` if given (the agent's
    connection) else on a new connection with ``nats_cfg``'s credentials."""
    import nats.errors
    import nats.js.errors

    from cbctl.core.backends.nats.connect import connect_nats

    async def check(client: NatsClient) -> str:
        if not client.is_connected:
            raise BackendUnavailable("the connection is not connected (reconnecting)", backend="nats")
        try:
            await client.flush(timeout=max(timeout / 2, 0.1))
            info = await client.jetstream(timeout=max(timeout / 2, 0.1)).account_info()
        except nats.js.errors.ServiceUnavailableError:
            raise BackendUnavailable("JetStream is not enabled or not available", backend="nats") from None
        except nats.js.errors.APIError as exc:
            raise BackendUnavailable(f"JetStream: {exc}", backend="nats") from None
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}", backend="nats") from None
        return f"server {nats_version(client)}, JetStream streams {info.streams}"

    async def body() -> str:
        if nc is not None:
            return await check(nc)
        own = await connect_nats(nats_cfg, name=name, reconnect=False)
        try:
            return await check(own)
        finally:
            try:
                await own.close()
            except (nats.errors.Error, OSError, asyncio.TimeoutError):
                pass  # the probe's result is already known

    return await _guarded("nats", body, timeout)


def nats_version(client: NatsClient) -> str:
    """The connected server's version text, e.g. ``2.9.10``."""
    v = client.connected_server_version
    return f"{v.major}.{v.minor}.{v.patch}"


# -- Redis -----------------------------------------------------------------------------------


async def probe_redis(cfg: RedisConfig, client: Redis | None = None, *, timeout: float = DEFAULT_PROBE_TIMEOUT) -> dict[str, Any]:
    """PING, on ``client`` if given (the agent's), else on a new connection."""
    from cbctl.core.backends.redis.client import open_redis, redis_call

    async def body() -> str:
        own = client if client is not None else open_redis(cfg, timeout=timeout)
        try:
            await redis_call("PING", own.ping())
            return "PONG"
        finally:
            if client is None:
                await own.aclose()

    return await _guarded("redis", body, timeout)


# -- all -------------------------------------------------------------------------------------


async def probe_all(
    ctx: Context,
    nats_cfg: NatsConfig | None = None,
    *,
    coord: Coordinator | None = None,
    nc: NatsClient | None = None,
    redis_client: Redis | None = None,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
) -> dict[str, dict[str, Any]]:
    """Probe etcd, NATS and Redis concurrently, each under ``timeout``; never raises for a
    backend problem.  ``nats_cfg`` defaults to ``ctx.nats`` (an agent passes its own creds).
    Pass the agent's live clients to probe the paths it really uses; without them fresh
    connections are opened and closed."""
    etcd, nats_r, redis_r = await asyncio.gather(
        probe_etcd(ctx, coord, timeout=timeout),
        probe_nats(nats_cfg or ctx.nats, nc, timeout=timeout),
        probe_redis(ctx.redis, redis_client, timeout=timeout),
    )
    return {"etcd": etcd, "nats": nats_r, "redis": redis_r}


# -- clock -----------------------------------------------------------------------------------


def parse_ntp_server(text: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port); default port 123."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 123
    if text.count(":") == 1:
        host, port = text.split(":")
        if not port.isdigit():
            raise ConfigError(f"ntp server {text!r}: port must be a number")
        return host, int(port)
    return text, 123


def measure_clock(ntp_servers: Sequence[str], *, timeout: float = NTP_TIMEOUT) -> dict[str, Any]:
    """SNTP offset of this host's clock against the first server that answers (blocking).

    Returns ``{"offset_ms", "source", "at", "error", "delay_ms"}``: positive ``offset_ms`` means
    the server is ahead of us (ntplib's convention).  With no server configured or none
    answering, ``offset_ms`` is None and ``error`` says why.
    """
    import ntplib

    errors: list[str] = []
    client = ntplib.NTPClient()
    for server in ntp_servers:
        try:
            host, port = parse_ntp_server(server)
            resp = client.request(host, version=3, port=port, timeout=timeout)
        except (ntplib.NTPException, OSError, ValueError, ConfigError) as exc:
            errors.append(f"{server}: {exc}")
            continue
        return {"offset_ms": round(resp.offset * 1000, 3), "source": server, "at": round(time.time(), 3),
                "error": None, "delay_ms": round(resp.delay * 1000, 3)}
    return {"offset_ms": None, "source": None, "at": round(time.time(), 3),
            "error": "; ".join(errors) if errors else "no ntp-servers configured", "delay_ms": None}


async def probe_loop(
    ctx: Context,
    report: Callable[..., Awaitable[None]],
    *,
    nats_cfg: NatsConfig | None = None,
    coord: Coordinator | None = None,
    nc: NatsClient | None = None,
    redis_client: Redis | None = None,
    interval: float | None = None,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
) -> None:
    """Forever: probe, measure the clock, ``await report(probes=..., clock=...)``, sleep.

    Meant for the agent: ``asyncio.create_task(probe_loop(ctx, agent.update_record, ...))``;
    cancel the task to stop.  ``interval`` defaults to :func:`probe_interval`.  A ``report``
    that raises ``BackendUnavailable`` (store unreachable) is skipped: the next round retries,
    and preflight sees the report go stale, which is the point.
    """
    period = interval if interval is not None else probe_interval(ctx)
    while True:
        started = time.monotonic()
        probes, clock = await asyncio.gather(
            probe_all(ctx, nats_cfg, coord=coord, nc=nc, redis_client=redis_client, timeout=timeout),
            measure_clock_async(ctx.ntp_servers),
        )
        try:
            await report(probes=probes, clock=clock)
        except BackendUnavailable:
            pass  # reported as stale by preflight; retried next period
        await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))


async def measure_clock_async(ntp_servers: Sequence[str], *, timeout: float = NTP_TIMEOUT) -> dict[str, Any]:
    """:func:`measure_clock` in a worker thread, so the agent's loop never blocks on UDP."""
    return await asyncio.to_thread(measure_clock, ntp_servers, timeout=timeout)
