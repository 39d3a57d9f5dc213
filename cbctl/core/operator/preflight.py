"""``cbctl preflight``: every check concurrently, each under its own deadline, and the record of
a full run at ``keys.preflight_last`` (which ``stage advance`` requires). The checks and what each
proves: docs/operator.md (Preflight)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from cbctl.core.model import keys
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, ConfigError
from cbctl.core.operator.preflight_backends import check_etcd, check_nats, check_prometheus, check_redis
from cbctl.core.operator.preflight_nodes import (
    check_clock,
    check_credentials,
    check_lease_timing,
    check_node_ids,
    check_nodes,
    read_snapshot,
)
from cbctl.core.operator.preflight_report import (
    CHECK_NAMES,
    CheckResult,
    PreflightOptions,
    PreflightReport,
    StoreSnapshot,
    row,
)

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator
    from cbctl.core.model.config import Context


async def _deadline(name: str, target: str, timeout: float, body: Awaitable[list[CheckResult]]) -> list[CheckResult]:
    """Run one check under its own deadline; a timeout or a backend error is a fail row."""
    try:
        async with asyncio.timeout(timeout):
            return await body
    except TimeoutError:
        return [row(name, target, "fail", f"no answer within {timeout:g}s")]
    except AuthFailed as exc:
        return [row(name, target, "fail", f"auth: {exc}")]
    except BackendUnavailable as exc:
        return [row(name, target, "fail", f"unreachable: {exc}")]
    except ConfigError as exc:
        return [row(name, target, "fail", f"config: {exc}")]


async def _sync(fn: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    return fn()


#: ``progress(name, rows, done, total)``: check ``name`` finished with ``rows``; ``done`` of
#: ``total`` selected checks have finished.
PreflightProgress = Callable[[str, list[CheckResult], int, int], None]


async def run_preflight(ctx: Context, coord: Coordinator, opts: PreflightOptions,
                        progress: PreflightProgress | None = None) -> PreflightReport:
    """Run the selected checks concurrently against ``coord`` (built, connected or not).

    Never raises for a backend problem; ``store_unreachable`` is set when the coordination
    store could not be read (the caller exits 4).  Configuration errors (``ConfigError``) of
    the context itself do propagate.  ``progress`` is told as each check finishes (in the
    order they finish; one call per check).
    """
    t0 = time.monotonic()
    total = sum(1 for name in CHECK_NAMES if opts.wants(name))
    finished = 0

    async def told(name: str, body: Awaitable[list[CheckResult]]) -> list[CheckResult]:
        nonlocal finished
        rows = await body
        finished += 1
        if progress is not None:
            progress(name, rows, finished, total)
        return rows

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
        independent.append(told("etcd", _deadline("etcd", eps, to, check_etcd(ctx, coord))))
    if opts.wants("redis"):
        independent.append(told("redis", _deadline("redis", ctx.redis.url, to, check_redis(ctx, to / 2))))
    if opts.wants("prometheus"):
        independent.append(told("prometheus", _deadline("prometheus", ctx.prometheus.url, to, check_prometheus(ctx, to / 2))))
    if opts.wants("credentials"):
        independent.append(told("credentials", _deadline("credentials", "-", to, check_credentials(ctx))))
    first = asyncio.gather(*independent)
    await load()

    dependent: list[Awaitable[list[CheckResult]]] = []
    if opts.wants("nats"):
        from cbctl.core.backends.nats.connect import servers_text  # redacted, like every NATS message

        dependent.append(told("nats", _deadline("nats", servers_text(ctx.nats), to, check_nats(ctx, snap, to / 2))))
    if opts.wants("lease-timing"):
        dependent.append(told("lease-timing", _deadline("lease-timing", "-", to, _sync(lambda: check_lease_timing(ctx, snap)))))
    for name, fn in (("nodes", check_nodes), ("node-ids", check_node_ids)):
        if opts.wants(name):
            if snap is None:
                dependent.append(told(name, _sync(lambda name=name: [row(name, "store", "fail", "cannot read the coordination store")])))
            else:
                dependent.append(told(name, _deadline(name, "store", to, _sync(lambda fn=fn, s=snap: fn(ctx, s)))))
    if opts.wants("clock"):
        if snap is None:
            dependent.append(told("clock", _sync(lambda: [row("clock", "store", "fail", "cannot read the coordination store")])))
        else:
            dependent.append(told("clock", _deadline("clock", "store", to, _sync(lambda s=snap: check_clock(ctx, s, opts)))))
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


__all__ = ["PreflightProgress", "record_preflight", "run_preflight"]
