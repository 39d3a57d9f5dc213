"""Exit criteria of the rollout (``cbctl exit-criteria``): ``no-degraded``, ``ownership``,
``ordered-streaming`` and ``rollback-runbooks``, each with its evidence.

Contract: every query selects the context's cluster and is evaluated at the settled instant
(:mod:`cbctl.core.operator.instant`); statuses are ``pass``, ``fail`` and ``no-data``, and missing
evidence is ``no-data``, which never passes. What each criterion proves and the coverage rule:
docs/operator.md (Exit criteria).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cbctl.core.model import metric_names as mn
from cbctl.core.model.errors import BackendUnavailable, BadInput
from cbctl.core.model.labels import CLUSTER_LABEL
from cbctl.core.backends.prometheus import PromClient, Target, format_duration, parse_duration, scope_selectors
from cbctl.core.operator.drills import SHIPPED, drill_verdicts

if TYPE_CHECKING:
    from cbctl.core.model.config import Context
    from cbctl.core.backends.coord.base import Coordinator

Status = Literal["pass", "fail", "no-data"]

ROLLBACK_RUNBOOKS: tuple[str, ...] = ("rollback-coordination", "rollback-event-bus", "rollback-consumers")
COVERAGE = 0.9  # of the expected samples; allows a few missed scrapes and the window's edges
DEFAULT_SCRAPE_INTERVAL = 15.0


@dataclass
class Criterion:
    name: str
    status: Status
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "evidence": self.evidence}


@dataclass
class CriteriaReport:
    window: str
    criteria: list[Criterion]
    prometheus_error: str | None = None

    @property
    def ok(self) -> bool:
        return all(c.status == "pass" for c in self.criteria)

    def to_dict(self) -> dict[str, Any]:
        """The ``exit-criteria -o json`` shape (a contract)."""
        return {"ok": self.ok, "window": self.window, "criteria": [c.to_dict() for c in self.criteria]}


def _worst(*statuses: Status) -> Status:
    if "fail" in statuses:
        return "fail"
    if "no-data" in statuses:
        return "no-data"
    return "pass"


def _scrape_interval(ctx: Context) -> float:
    raw = (ctx.extra.get("gates") or {}).get("scrape-interval", DEFAULT_SCRAPE_INTERVAL)
    return parse_duration(raw, what=f"contexts.{ctx.name}.gates.scrape-interval")


def _target_interval(t: Target | None, default: float) -> float:
    raw = getattr(t, "scrape_interval", None) if t is not None else None
    if raw:
        try:
            return parse_duration(raw)
        except BadInput:
            pass  # an unexpected spelling: fall back to the configured interval
    return default


def _scoped(cluster: str | None, expr: str) -> str:
    return expr if cluster is None else scope_selectors(expr, {CLUSTER_LABEL: cluster})


async def _value(prom: PromClient, expr: str, at: float) -> float | None:
    v = await prom.query_value(expr, at=at)
    return None if v is None or math.isnan(v) else v


async def criterion_no_degraded(ctx: Context, prom: PromClient, window: float, at: float) -> Criterion:
    w = format_duration(window)
    degraded_q = _scoped(ctx.cluster, f"max(max_over_time({mn.M_EVENT_BUS_DEGRADED}[{w}]))")
    count_q = _scoped(ctx.cluster, f"count_over_time({mn.M_EVENT_BUS_DEGRADED}[{w}])")
    degraded, counts, targets = await asyncio.gather(
        _value(prom, degraded_q, at), prom.query(count_q, at=at), prom.targets()
    )
    default_interval = _scrape_interval(ctx)
    by_instance = {t.labels.get("instance", ""): t for t in targets}
    coverage: dict[str, str] = {}
    short: list[str] = []
    seen_nodes: set[str] = set()
    for s in counts:
        inst = s.labels.get("instance", "?")
        node = s.labels.get("node") or inst
        seen_nodes.add(node)
        interval = _target_interval(by_instance.get(inst), default_interval)
        expected = window / interval
        coverage[node] = f"{s.value:.0f}/{expected:.0f} samples"
        if s.value < COVERAGE * expected:
            short.append(node)
    missing = sorted(set(ctx.expected_nodes) - seen_nodes)
    evidence: dict[str, Any] = {"query": degraded_q, "max_degraded": degraded, "coverage": coverage}
    if missing:
        evidence["missing_nodes"] = missing
    if not counts or degraded is None:
        evidence["reason"] = f"insufficient data: no {mn.M_EVENT_BUS_DEGRADED} series in the last {w}"
        return Criterion("no-degraded", "no-data", evidence)
    if degraded > 0:
        evidence["reason"] = "a node was in degraded mode within the window"
        return Criterion("no-degraded", "fail", evidence)
    if short or missing:
        parts = []
        if short:
            parts.append(f"data does not cover the whole {w} window on {', '.join(sorted(short))}")
        if missing:
            parts.append(f"no data at all from expected node(s) {', '.join(missing)}")
        evidence["reason"] = "insufficient data: " + "; ".join(parts)
        return Criterion("no-degraded", "no-data", evidence)
    evidence["reason"] = f"no degraded mode on {len(coverage)} node(s) for the whole {w}"
    return Criterion("no-degraded", "pass", evidence)


async def criterion_ownership(ctx: Context, coord: Coordinator, prom: PromClient | None, window: float, at: float,
                              prom_error: str | None) -> Criterion:
    from cbctl.core.model import keys

    w = format_duration(window)
    q = _scoped(ctx.cluster, f"sum(increase({mn.M_REDIS_LANE_STALE_FENCING_TOTAL}[{w}]))")
    conflicts = await coord.list(keys.conflicts_prefix(ctx.cluster))
    names = [kv.key[len(keys.conflicts_prefix(ctx.cluster)):] for kv in conflicts]
    evidence: dict[str, Any] = {"unresolved_conflicts": names, "query": q}
    store_status: Status = "fail" if names else "pass"
    if prom is None:
        evidence["stale_fencing"] = None
        evidence["reason"] = f"prometheus unreachable: {prom_error}"
        return Criterion("ownership", _worst(store_status, "no-data"), evidence)
    try:
        stale = await _value(prom, q, at)
    except BackendUnavailable as exc:
        evidence["stale_fencing"] = None
        evidence["reason"] = f"prometheus unreachable: {exc}"
        return Criterion("ownership", _worst(store_status, "no-data"), evidence)
    evidence["stale_fencing"] = stale
    metric_status: Status = "no-data" if stale is None else "fail" if stale > 0 else "pass"
    reasons = []
    if names:
        reasons.append(f"{len(names)} unresolved conflict record(s)")
    if stale is None:
        reasons.append(f"insufficient data: no {mn.M_REDIS_LANE_STALE_FENCING_TOTAL} in the last {w}")
    elif stale > 0:
        reasons.append(f"{stale:g} stale-fencing attempts in the last {w}")
    evidence["reason"] = "; ".join(reasons) or f"no conflicts, no stale-fencing attempts in {w}"
    return Criterion("ownership", _worst(store_status, metric_status), evidence)


async def criterion_ordered_streaming(prom: PromClient, window: float, at: float, cluster: str | None = None) -> Criterion:
    w = format_duration(window)
    vq = _scoped(cluster, f"sum(increase({mn.M_EVENT_BUS_BRIDGE_ORDERING_VIOLATIONS_TOTAL}[{w}]))")
    dq = _scoped(cluster, f'sum(increase({mn.M_EVENT_BUS_BRIDGE_DELIVERED_TOTAL}{{origin="{mn.ORIGIN_REMOTE}"}}[{w}]))')
    violations, remote = await asyncio.gather(_value(prom, vq, at), _value(prom, dq, at))
    evidence: dict[str, Any] = {"ordering_violations": violations, "remote_deliveries": remote,
                                "queries": [vq, dq]}
    if violations is None or remote is None:
        what = "ordering violations" if violations is None else "cross-node deliveries"
        evidence["reason"] = f"insufficient data: no series for {what} in the last {w}"
        return Criterion("ordered-streaming", "no-data", evidence)
    if violations > 0:
        evidence["reason"] = f"{violations:g} ordering violations in the last {w}"
        return Criterion("ordered-streaming", "fail", evidence)
    if remote <= 0:
        evidence["reason"] = f"no cross-node deliveries observed in the last {w}"
        return Criterion("ordered-streaming", "no-data", evidence)
    evidence["reason"] = f"{remote:g} cross-node deliveries, in order, in the last {w}"
    return Criterion("ordered-streaming", "pass", evidence)


async def criterion_runbooks(ctx: Context, coord: Coordinator) -> Criterion:
    """Each capability's rollback drilled, proven by run records and audit revisions (the rules:
    cbctl/core/operator/drills.py). Evidence per shipped runbook name: ``"no record"``, or the
    verdict with run ids and the audit revisions (and flag diffs) of the rollback and of the
    restore."""
    verdicts = await drill_verdicts(coord, ctx.cluster)
    evidence: dict[str, Any] = {}
    missing: list[str] = []
    for capability, verdict in verdicts.items():
        slot = SHIPPED[capability]
        if verdict is None:
            evidence[slot] = "no record"
            missing.append(capability)
        else:
            evidence[slot] = verdict.public()
            if not verdict.ok:
                missing.append(capability)
    if missing:
        evidence["reason"] = f"no proven rollback drill for {', '.join(missing)}"
        return Criterion("rollback-runbooks", "fail", evidence)
    evidence["reason"] = "every capability's rollback was drilled: rolled back and restored, per the audit log"
    return Criterion("rollback-runbooks", "pass", evidence)


async def evaluate(ctx: Context, coord: Coordinator, window: float) -> CriteriaReport:
    """Every criterion, concurrently, at one settled instant. Raises ``BackendUnavailable``
    only for the coordination store; an unreachable Prometheus makes the metric criteria
    ``no-data`` and sets ``prometheus_error``."""
    from cbctl.core.operator.instant import evaluation_instant

    at = time.time()
    w = format_duration(window)
    prom_error: str | None = None
    async with PromClient(ctx.prometheus.url) as prom:
        try:
            await prom.ready()
            at = (await evaluation_instant(ctx, prom)).at
        except BackendUnavailable as exc:
            prom_error = str(exc)

        async def metric(name: str, body: Any) -> Criterion:
            if prom_error is not None:
                body.close()  # never awaited: close the coroutine quietly
                return Criterion(name, "no-data", {"reason": f"prometheus unreachable: {prom_error}"})
            try:
                return await body
            except BackendUnavailable as exc:
                return Criterion(name, "no-data", {"reason": f"prometheus unreachable: {exc}"})

        results = await asyncio.gather(
            metric("no-degraded", criterion_no_degraded(ctx, prom, window, at)),
            criterion_ownership(ctx, coord, None if prom_error else prom, window, at, prom_error),
            metric("ordered-streaming", criterion_ordered_streaming(prom, window, at, ctx.cluster)),
            criterion_runbooks(ctx, coord),
        )
    return CriteriaReport(w, list(results), prom_error)


__all__ = ["COVERAGE", "CriteriaReport", "Criterion", "ROLLBACK_RUNBOOKS", "evaluate"]
