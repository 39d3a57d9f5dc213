"""The settled evaluation instant every verdict is computed at (gates, watch, runbook checks,
exit criteria): why not "now" is in docs/operator.md (Metric gates, The settled instant)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cbctl.core.backends.prometheus import PromClient, parse_duration, scope_selectors
from cbctl.core.model import metric_names as mn
from cbctl.core.model.errors import BackendUnavailable, BadInput
from cbctl.core.model.labels import CLUSTER_LABEL
from cbctl.core.model.times import rfc3339
from cbctl.core.model.gate_settings import DEFAULT_SCRAPE_INTERVAL, configured_scrape_interval

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator
    from cbctl.core.model.config import Context

#: Every agent exports this gauge in every scrape; its sample timestamps are the scrapes'.
SCRAPE_MARKER = mn.M_CBCTL_AGENT_INFO
#: A settled instant is never older than this many scrape intervals (a target whose scrapes
#: stall without failing must not freeze every verdict in the past).
MAX_SETTLE_INTERVALS = 10
MIN_SETTLE_BOUND = 30.0


@dataclass(frozen=True)
class Instant:
    """What one verdict is about: the cluster, the evaluation instant and the window bound.

    ``at``: the settled instant (see above); ``now``: the wall clock when it was fixed;
    ``since``: when the stage being judged was entered (the revision time of its audit entry),
    None when it never was (stage 0, or another stage than the current one); no window reaches
    back before it.  ``scrape_interval`` turns a sample count into a wait.
    """

    cluster: str
    at: float
    now: float
    since: float | None = None
    stage: int | None = None
    scrape_interval: float = DEFAULT_SCRAPE_INTERVAL

    @property
    def elapsed(self) -> float | None:
        """Seconds of data since the stage entry at the evaluation instant (may be < 0)."""
        return None if self.since is None else self.at - self.since

    def scope(self, expr: str) -> str:
        """``expr`` restricted to this cluster's series."""
        return scope_selectors(expr, {CLUSTER_LABEL: self.cluster})

    def public(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "at": rfc3339(self.at), "lag_seconds": round(self.now - self.at, 3),
                "stage": self.stage, "stage_entered_at": None if self.since is None else rfc3339(self.since)}


async def scrape_interval_of(ctx: Context, prom: PromClient) -> float:
    """The configured interval, else the longest one Prometheus reports for its targets, else 15 s."""
    configured = configured_scrape_interval(ctx)
    if configured is not None:
        return configured
    try:
        targets = await prom.targets()
    except (BackendUnavailable, BadInput):
        return DEFAULT_SCRAPE_INTERVAL
    seen = []
    for t in targets:
        try:
            seen.append(parse_duration(t.scrape_interval)) if t.scrape_interval else None
        except BadInput:
            continue
    return max(seen) if seen else DEFAULT_SCRAPE_INTERVAL


async def settled_instant(prom: PromClient, cluster: str, scrape_interval: float, *, now: float | None = None) -> float:
    """The newest instant up to which every live target of ``cluster`` has been scraped and
    committed: the oldest of the targets' latest ``cbctl_agent_info`` timestamps.

    A dead target has a staleness marker and does not hold the instant back.  Without any
    target, one scrape interval before ``now``.  Never older than ``MAX_SETTLE_INTERVALS``
    intervals (at least 30 s) before ``now``.  Raises ``BackendUnavailable``.
    """
    now = time.time() if now is None else now
    q = scope_selectors(f"min(timestamp({SCRAPE_MARKER}))", {CLUSTER_LABEL: cluster})
    oldest = await prom.query_value(q, at=now)
    if oldest is None or math.isnan(oldest):
        return now - scrape_interval
    floor = now - max(MAX_SETTLE_INTERVALS * scrape_interval, MIN_SETTLE_BOUND)
    return min(now, max(floor, oldest))


async def stage_entry(coord: Coordinator, ctx: Context, stage: int) -> float | None:
    """When the cluster entered ``stage``: the time of the last audit entry moving to it
    (the revision that made it current); None if no audited transition reached it."""
    from cbctl.core.operator.controlplane import ControlPlane

    entries = await ControlPlane(ctx, coord).history()
    times = [e.time for e in entries if e.kind == "stage" and e.to_stage == stage and e.time > 0]
    return max(times) if times else None


async def evaluation_instant(
    ctx: Context, prom: PromClient, *, since: float | None = None, stage: int | None = None,
    now: float | None = None, scrape_interval: float | None = None,
) -> Instant:
    """The one way an evaluation instant is fixed (gates, watch, runbook checks, exit criteria)."""
    interval = scrape_interval if scrape_interval is not None else await scrape_interval_of(ctx, prom)
    now = time.time() if now is None else now
    at = await settled_instant(prom, ctx.cluster, interval, now=now)
    return Instant(ctx.cluster, at, now, since, stage, interval)


async def instant_values(ctx: Context, expr: str, *, prom: PromClient | None = None) -> list[float]:
    """An ad-hoc check (a runbook ``check:``): ``expr`` scoped to the cluster, evaluated at the
    settled instant.  Raises ``BackendUnavailable`` / ``BadInput`` like :class:`PromClient`."""
    own = prom is None
    client = prom or PromClient(ctx.prometheus.url)
    try:
        inst = await evaluation_instant(ctx, client)
        return [s.value for s in await client.query(inst.scope(expr), at=inst.at)]
    finally:
        if own:
            await client.aclose()
