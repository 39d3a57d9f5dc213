"""The ``cbctl watch`` snapshot: every watched metric of a stage with value, rate, verdict and
trend; the verdicts are exactly what :mod:`cbctl.core.operator.gate_eval` gives for the same
instant and stage entry."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cbctl.core.backends.prometheus import PromClient
from cbctl.core.model.errors import BackendUnavailable, BadInput
from cbctl.core.operator.gate_eval import evaluate_rule
from cbctl.core.model.gate_settings import GateConfig, Rule, gate_config
from cbctl.core.operator.instant import Instant, evaluation_instant

if TYPE_CHECKING:
    from cbctl.core.model.config import Context


@dataclass
class WatchRow:
    """One metric of a ``cbctl watch`` snapshot. ``verdict``: pass, fail, no-data or info."""

    name: str
    query: str
    value: float | None
    rate: float | None
    threshold: str | None
    verdict: str
    detail: str
    trend: list[float | None]

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else round(v, 6)

        return {"name": self.name, "query": self.query, "value": clean(self.value), "rate": clean(self.rate),
                "threshold": self.threshold, "verdict": self.verdict, "detail": self.detail,
                "trend": [clean(v) for v in self.trend]}


async def watch_snapshot(
    ctx: Context, stage: int, *, points: int = 20, step: float = 2.0, cfg: GateConfig | None = None,
    prom: PromClient | None = None, since: float | None = None, inst: Instant | None = None,
) -> list[WatchRow]:
    """Every watched metric of ``stage``: value (the gate expression), rate, verdict, and the
    last ``points`` values ``step`` seconds apart (for a sparkline).  All queries concurrent,
    all scoped to the cluster, all at one settled instant; the verdicts are exactly what
    :func:`evaluate_rules` (``stage advance``) gives for the same instant and stage entry.

    Raises ``BackendUnavailable`` when Prometheus cannot be reached at all (the caller decides
    whether that ends the watch); a single rejected query gives that row ``no-data``.
    """
    cfg = cfg or gate_config(ctx)
    rules = cfg.watch_rules(stage)
    own = prom is None
    client = prom or PromClient(ctx.prometheus.url)
    try:
        if not await client.ready():  # one clear BackendUnavailable instead of N no-data rows
            raise BackendUnavailable(f"prometheus {client.url}: not ready", backend="prometheus")
        if inst is None:
            inst = await evaluation_instant(ctx, client, since=since, stage=stage)
        at = inst.at

        async def rate_of(rule: Rule) -> float | None:
            q = rule.rate_query(cfg.rate_window)
            if q is None:
                return None
            try:
                return await client.query_value(inst.scope(q), at=at)
            except BadInput:
                return None

        async def trend_of(rule: Rule) -> list[float | None]:
            if points <= 1:
                return []
            start = at - step * (points - 1)
            try:
                series = await client.query_range(inst.scope(rule.query(cfg.window_of(rule), inst.scrape_interval)), start=start, end=at,
                                                  step=step)
            except BadInput:
                return []
            if len(series) != 1:
                return []
            by_t = {round(t, 3): v for t, v in series[0].values}
            return [by_t.get(round(start + i * step, 3)) for i in range(points)]

        async def row(rule: Rule) -> WatchRow:
            res, rate, trend = await asyncio.gather(evaluate_rule(client, rule, cfg, inst), rate_of(rule), trend_of(rule))
            # Informational rows are never judged: no data there is shown, not counted.
            verdict = "info" if rule.threshold is None else res.outcome
            return WatchRow(rule.name, res.query, res.value, rate, res.threshold, verdict, res.detail, trend)

        return list(await asyncio.gather(*(row(r) for r in rules)))
    finally:
        if own:
            await client.aclose()


__all__ = ["WatchRow", "watch_snapshot"]
