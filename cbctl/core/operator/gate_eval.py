"""Evaluating gate rules against Prometheus (``pass`` / ``fail`` / ``no-data``, see
docs/operator.md), the preflight gate, and the gate check of ``stage advance``."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from cbctl.core.backends.prometheus import PromClient, format_duration, range_spans
from cbctl.core.model import keys
from cbctl.core.model.errors import BackendUnavailable, BadInput, CheckFailed
from cbctl.core.model.gate_settings import (
    DEFAULT_SCRAPE_INTERVAL,
    OPS,
    GateConfig,
    Outcome,
    Rule,
    fmt_num,
    gate_config,
    grace_of,
)
from cbctl.core.model.times import rfc3339
from cbctl.core.operator.instant import Instant, evaluation_instant, stage_entry

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator
    from cbctl.core.model.config import Context
    from cbctl.core.operator.controlplane import Plan


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
        return f"{self.name}: value {fmt_num(self.value)} (threshold {self.threshold or '-'}) -> {self.outcome}: {self.detail}"


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
                     rfc3339(inst.at))
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
        res.detail = f"{fmt_num(samples)} samples in {res.window} < {need} required"
        res.wait_seconds = round((need - samples) * inst.scrape_interval, 3)
    elif math.isnan(value):
        res.detail = "value is NaN"
    elif rule.threshold is None:
        res.outcome = "pass"
        res.detail = "informational"
    elif OPS[rule.op](value, rule.threshold):
        res.outcome = "pass"
        res.detail = f"{fmt_num(value)} {rule.op} {fmt_num(rule.threshold)} over {res.window}"
    else:
        res.outcome = "fail"
        res.detail = f"{fmt_num(value)} breaks {rule.op} {fmt_num(rule.threshold)} over {res.window}"
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


__all__ = [
    "GateResult", "advance_gate_check", "evaluate_rule", "evaluate_rules", "gate_report", "preflight_gate",
    "stage_gates",
]
