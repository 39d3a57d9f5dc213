"""Metric gates: per-stage rules as data, evaluated against Prometheus with three outcomes.

A :class:`Rule` is a PromQL expression (``$window`` stands for the rule's window), a comparison
and a threshold.  Evaluating it gives exactly one of

* ``pass``    — the value satisfies the comparison AND Prometheus holds at least
  ``min_samples`` samples of the rule's metric in the window on every instance exporting it;
* ``fail``    — enough data, and the value breaks the threshold;
* ``no-data`` — the expression returned nothing, the value is NaN, there are fewer than
  ``min_samples`` samples, the query was rejected, or Prometheus did not answer.

``no-data`` never passes: a gate that cannot see is a closed gate.

The gates of stage N are the rules that must hold *before leaving* stage N (``stage advance``
evaluates the current stage's gates).  Every advance also requires a passing ``cbctl
preflight`` younger than ``[contexts.X.preflight] max-age`` (default 1 h); that is the only gate
of stage 0.

Per-context overrides (``[contexts.X.gates]``; all optional)::

    window = "10m"            # default window of every rule (sandbox: "10s")
    min-samples = 5           # default minimum samples per instance in the window
    rate-window = "1m"        # window of the "rate" column of `cbctl watch`
    scrape-interval = "15s"   # used by exit-criteria when Prometheus does not report it
    [contexts.X.gates.rules.publish-errors]
    threshold = 3             # also: op, window, min-samples, expr, metric, enabled = false
    [contexts.X.gates.stages]
    "1" = ["degraded", "publish-errors"]   # replace a stage's rule list

A rule name in ``rules`` that is not built in defines a new rule (``expr``, ``metric``, ``op``
and ``threshold`` required).  Errors name the key: ``contexts.sandbox.gates.rules.x.op``.

The same rule table drives ``cbctl watch`` (rules without a threshold are shown, never judged).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from cbctl.core.model import keys
from cbctl.core.model.errors import BackendUnavailable, BadInput, CheckFailed
from cbctl.core.model.labels import CLUSTER_LABEL
from cbctl.core.backends.prometheus import PromClient, format_duration, parse_duration, range_spans, scope_selectors

from cbctl.core.model.gate_settings import (  # the rule table and [gates] validation live in the model
    DEFAULT_SCRAPE_INTERVAL,
    OPS,
    RULES,
    STAGE_GATES,
    STAGE_WATCH,
    GateConfig,
    Outcome,
    Rule,
    configured_scrape_interval,
    gate_config,
    grace_of,
)
from cbctl.core.model.gate_settings import fmt_num as _num

if TYPE_CHECKING:
    from cbctl.core.model.config import Context
    from cbctl.core.operator.controlplane import Plan
    from cbctl.core.backends.coord.base import Coordinator

# -- the evaluation instant ------------------------------------------------------------------
#
# Why not "now": Prometheus stamps a scrape's samples with the scrape's START time but makes
# them visible only when the scrape has been read and committed, target by target.  A query
# at "now" therefore reads, per node, whichever scrape happens to be committed: right after a
# change some nodes show the new value and others an older one, and the same expression
# evaluated later at the same instant gives another answer.  Every verdict here is computed at
# the *settled instant*: the newest instant up to which every live target of the cluster has
# been scraped and committed (the oldest of the targets' latest sample timestamps).  All data
# up to that instant is final, so a verdict is a function of (rule, instant) alone, whoever
# asks and whenever they ask again.

#: Every agent exports this gauge in every scrape; its sample timestamps are the scrapes'.
SCRAPE_MARKER = "cbctl_agent_info"
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
        return {"cluster": self.cluster, "at": _rfc3339(self.at), "lag_seconds": round(self.now - self.at, 3),
                "stage": self.stage, "stage_entered_at": None if self.since is None else _rfc3339(self.since)}


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


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


# -- evaluation ------------------------------------------------------------------------------


@dataclass
class GateResult:
    """The outcome of one rule. ``to_dict`` is the shape recorded in audit entries."""

    name: str
    outcome: Outcome
    value: float | None
    threshold: str | None
    detail: str
    query: str = ""
    window: str | None = None
    samples: float | None = None
    min_samples: int | None = None
    at: str | None = None
    wait_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["value"] is not None and not math.isfinite(d["value"]):
            d["value"] = None  # JSON has no NaN
        return d

    def line(self) -> str:
        return f"{self.name}: value {_num(self.value)} (threshold {self.threshold or '-'}) -> {self.outcome}: {self.detail}"


def _fixed_span(rule: Rule) -> float:
    """How far back the rule's expression reads regardless of ``$window`` (its explicit ranges
    and subqueries, e.g. ``[15s:1s]``)."""
    spans = range_spans(rule.expr.replace("$window", "1ms").replace("$step", "1ms").replace("$grace", "1ms"))
    return max(spans, default=0.0)


def _plan_window(rule: Rule, cfg: GateConfig, inst: Instant) -> tuple[float, float | None]:
    """(window to use, seconds still to wait or None).

    The configured window, cut at the stage entry.  The rule needs ``min_samples`` scrapes
    (plus one interval of slack for the window's edges) and its fixed ranges entirely after
    the entry; until then it must wait.
    """
    window = cfg.window_of(rule)
    elapsed = inst.elapsed
    if elapsed is None:
        return window, None
    if "$grace" in rule.expr:  # the offset reads that much further back
        elapsed -= grace_of(inst.scrape_interval)
    fixed = _fixed_span(rule)
    need = max(fixed, (cfg.min_samples_of(rule) + 1) * inst.scrape_interval)
    need = min(need, max(window, fixed))  # never more than the rule itself reads
    if elapsed < need:
        return window, round(need - elapsed, 3)
    return min(window, math.floor(elapsed * 1000) / 1000), None


async def evaluate_rule(prom: PromClient, rule: Rule, cfg: GateConfig, inst: Instant) -> GateResult:
    """Evaluate one rule at ``inst`` (value and coverage concurrently, both scoped to the
    cluster, both at the settled instant, the window cut at the stage entry).

    Never raises for a Prometheus problem: an unreachable Prometheus or a rejected query is
    ``no-data`` with the reason.  Too little time since the stage entry is ``no-data`` saying
    how long to wait (``wait_seconds``).
    """
    need = cfg.min_samples_of(rule)
    window, wait = _plan_window(rule, cfg, inst)
    q = inst.scope(rule.query(window, inst.scrape_interval))
    res = GateResult(rule.name, "no-data", None, rule.threshold_text(), "", q, format_duration(window), None, need,
                     _rfc3339(inst.at))
    if wait is not None:
        res.wait_seconds = wait
        res.detail = (f"stage {inst.stage} was entered {max(inst.elapsed or 0.0, 0.0):.1f}s before the last complete "
                      f"scrape; this rule needs data since then: wait {wait:.1f}s")
        return res
    try:
        value, samples = await asyncio.gather(
            prom.query_value(q, at=inst.at), prom.query_value(inst.scope(rule.coverage_query(window)), at=inst.at)
        )
    except BackendUnavailable as exc:
        res.detail = f"prometheus unreachable: {exc}"
        return res
    except BadInput as exc:
        res.detail = str(exc)
        return res
    res.value, res.samples = value, samples
    if samples is None or value is None:
        res.detail = f"no series of {rule.metric} in cluster {inst.cluster} in the last {res.window}"
    elif samples < need:
        res.detail = f"{_num(samples)} samples in {res.window} < {need} required"
        res.wait_seconds = round((need - samples) * inst.scrape_interval, 3)
    elif math.isnan(value):
        res.detail = "value is NaN"
    elif rule.threshold is None:
        res.outcome = "pass"
        res.detail = "informational"
    elif OPS[rule.op](value, rule.threshold):
        res.outcome = "pass"
        res.detail = f"{_num(value)} {rule.op} {_num(rule.threshold)} over {res.window}"
    else:
        res.outcome = "fail"
        res.detail = f"{_num(value)} breaks {rule.op} {_num(rule.threshold)} over {res.window}"
    return res


async def evaluate_rules(
    ctx: Context, rules: Sequence[Rule], cfg: GateConfig | None = None, *, inst: Instant | None = None,
    since: float | None = None, stage: int | None = None, prom: PromClient | None = None,
) -> list[GateResult]:
    """Evaluate ``rules`` concurrently against the context's Prometheus, at ONE settled instant
    (``inst``, else fixed now with ``since``/``stage``).  An unreachable Prometheus makes every
    rule ``no-data``."""
    cfg = cfg or gate_config(ctx)
    if not rules:
        return []
    own = prom is None
    client = prom or PromClient(ctx.prometheus.url)
    try:
        if inst is None:
            try:
                inst = await evaluation_instant(ctx, client, since=since, stage=stage)
            except (BackendUnavailable, BadInput) as exc:
                return [GateResult(r.name, "no-data", None, r.threshold_text(), f"prometheus unreachable: {exc}",
                                   r.query(cfg.window_of(r), DEFAULT_SCRAPE_INTERVAL), format_duration(cfg.window_of(r)), None,
                                   cfg.min_samples_of(r)) for r in rules]
        return list(await asyncio.gather(*(evaluate_rule(client, r, cfg, inst) for r in rules)))
    finally:
        if own:
            await client.aclose()


async def preflight_gate(ctx: Context, coord: Coordinator, cfg: GateConfig, *, now: float | None = None) -> GateResult:
    """Pass when the last ``cbctl preflight`` passed and is younger than the configured age."""
    max_age = cfg.preflight_max_age
    res = GateResult("preflight", "no-data", None, f"age <= {format_duration(max_age)}", "",
                     query=keys.preflight_last(ctx.cluster))
    kv = await coord.get(keys.preflight_last(ctx.cluster))
    if kv is None:
        res.detail = "no preflight recorded; run `cbctl preflight`"
        return res
    try:
        record = json.loads(kv.value)
        when = float(record["time"])
        ok = bool(record["ok"])
    except (ValueError, KeyError, TypeError):
        res.detail = f"{kv.key}: unreadable preflight record"
        return res
    age = (now if now is not None else time.time()) - when
    res.value = round(age, 3)
    if not ok:
        res.outcome = "fail"
        failed = ", ".join(record.get("failed", [])) or "see `cbctl preflight`"
        res.detail = f"the last preflight ({format_duration(max(age, 1))} ago) failed: {failed}"
    elif age > max_age:
        res.outcome = "fail"
        res.detail = f"the last passing preflight is {format_duration(max(round(age), 1))} old (max {format_duration(max_age)}); re-run it"
    else:
        res.outcome = "pass"
        res.detail = f"passed {format_duration(max(round(age), 1))} ago"
    return res


async def stage_gates(ctx: Context, coord: Coordinator, stage: int, cfg: GateConfig | None = None) -> list[GateResult]:
    """The preflight gate plus every metric gate of ``stage`` (what must hold to leave it),
    scoped to the context's cluster, windows cut at the stage's entry, at one settled instant."""
    cfg = cfg or gate_config(ctx)
    rules = cfg.stage_rules(stage)
    since = await stage_entry(coord, ctx, stage) if rules else None
    pre, metric = await asyncio.gather(preflight_gate(ctx, coord, cfg),
                                       evaluate_rules(ctx, rules, cfg, since=since, stage=stage))
    return [pre, *metric]


def gate_report(stage: int, results: Sequence[GateResult]) -> str | None:
    """The refusal message of a gate check (None when every gate passes)."""
    bad = [r for r in results if r.outcome != "pass"]
    if not bad:
        return None
    lines = "\n".join(f"  {r.line()}" for r in results)
    waits = [r.wait_seconds for r in bad if r.wait_seconds is not None]
    hint = f"\nnot enough data yet since stage {stage} was entered: retry in about {math.ceil(max(waits))}s" if waits else ""
    return (f"gates of stage {stage} did not pass ({len(bad)} of {len(results)}: "
            f"{', '.join(f'{r.name} {r.outcome}' for r in bad)}); nothing written:\n{lines}{hint}\n"
            "fix the cause, or override with --force --reason TEXT (recorded in the audit log)")


async def advance_gate_check(
    ctx: Context, coord: Coordinator, plan: Plan, *, force: bool = False, gate_timeout: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Called by ``stage advance`` (and its ``--dry-run``) before it writes.

    Evaluates the gates of the stage being left (``plan.old.stage``).  All pass -> returns the
    results (recorded in the audit entry).  Any ``fail`` or ``no-data``: raises ``CheckFailed``
    (exit 1, nothing written) whose message lists every rule with value, threshold and outcome
    — unless ``force``, in which case the results are returned for the audit entry.

    ``gate_timeout`` > 0: while every gate that does not pass is ``no-data`` (not enough samples
    since the stage was entered, or not scraped yet), wait and evaluate again, for at most that
    many seconds; a ``fail`` refuses at once.  ``on_wait`` is told each time why it waits.
    """
    stage = plan.old.stage
    deadline = time.monotonic() + max(0.0, gate_timeout)
    while True:
        results = await stage_gates(ctx, coord, stage)
        message = gate_report(stage, results)
        if message is None or force:
            return [r.to_dict() for r in results]
        bad = [r for r in results if r.outcome != "pass"]
        remaining = deadline - time.monotonic()
        if remaining <= 0 or any(r.outcome != "no-data" for r in bad):
            raise CheckFailed(message)
        waits = [r.wait_seconds for r in bad if r.wait_seconds]
        pause = min(remaining, max(0.5, min(max(waits) if waits else 2.0, 5.0)))
        if on_wait is not None:
            on_wait(f"gates of stage {stage}: waiting for data ({', '.join(r.name for r in bad)}); "
                    f"again in {pause:.1f}s, giving up in {remaining:.0f}s")
        await asyncio.sleep(pause)


# -- watch ---------------------------------------------------------------------------------


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


__all__ = [
    "WatchRow", "watch_snapshot", "Instant", "evaluation_instant", "instant_values", "settled_instant",
    "stage_entry", "scrape_interval_of", "gate_report",
    "GateConfig", "GateResult", "OPS", "RULES", "Rule", "STAGE_GATES", "STAGE_WATCH", "advance_gate_check",
    "evaluate_rule", "evaluate_rules", "gate_config", "preflight_gate", "stage_gates",
]
