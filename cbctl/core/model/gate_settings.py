"""Gate settings: the built-in metric-gate rule table and the one validator of a context's
``[gates]`` (and ``[preflight] max-age``) settings — pure data, no I/O.

Contract: rule names, defaults and the ``[gates]`` keys are config contracts (README.md;
docs/operator.md, Metric gates). The config loader (cbctl/core/model/config.py) validates
``[gates]`` with :func:`gate_config` at load; evaluation lives on the operator side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from cbctl.core.model.durations import format_duration, parse_duration
from cbctl.core.model.errors import BadInput, ConfigError
from cbctl.core.model.metric_names import (
    DECISION_DENY,
    DECISION_WOULD_DENY,
    M_CLUSTER_LEASE_LOST_TOTAL,
    M_CLUSTER_OWNERSHIP_CHANGES_TOTAL,
    M_CLUSTER_ROLLOUT_APPLIED_REVISION,
    M_EVENT_BUS_BRIDGE_ORDERING_VIOLATIONS_TOTAL,
    M_EVENT_BUS_CONSUMER_DEDUP_MISMATCH_TOTAL,
    M_EVENT_BUS_DEGRADED,
    M_EVENT_BUS_OUTAGES_TOTAL,
    M_EVENT_BUS_OUTBOX_DEPTH,
    M_EVENT_BUS_PUBLISH_RETRIES_TOTAL,
    M_EVENT_BUS_PUBLISH_TOTAL,
    M_REDIS_LANE_OWNERSHIP_DECISION_TOTAL,
    M_REDIS_LANE_STALE_FENCING_TOTAL,
    PUBLISH_STATUS_BUFFERED,
    PUBLISH_STATUS_ERROR,
    PUBLISH_STATUS_OK,
)


class GateContext(Protocol):
    """What the gate settings read of a context (cbctl/core/model/config.py ``Context``)."""

    @property
    def name(self) -> str: ...

    @property
    def extra(self) -> Mapping[str, Any]: ...


Outcome = Literal["pass", "fail", "no-data"]

OPS = {
    "<=": lambda v, t: v <= t,
    "<": lambda v, t: v < t,
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
    "==": lambda v, t: v == t,
    "!=": lambda v, t: v != t,
}

DEFAULT_WINDOW = 600.0
DEFAULT_MIN_SAMPLES = 5
DEFAULT_RATE_WINDOW = 60.0
DEFAULT_PREFLIGHT_MAX_AGE = 3600.0
DEFAULT_SCRAPE_INTERVAL = 15.0


@dataclass(frozen=True)
class Rule:
    """One gate rule or watched metric.

    ``expr`` is an instant PromQL query aggregating to ONE sample; ``$window`` is replaced by the
    window.  ``metric`` is the series selector whose sample count proves there is data.
    ``rate_expr`` (optional, ``$rate`` = the rate window) is only displayed by ``watch``.
    ``threshold`` None = informational (watch only, never a gate).
    """

    name: str
    metric: str
    expr: str
    op: str = "<="
    threshold: float | None = None
    window: float | None = None
    min_samples: int | None = None
    rate_expr: str | None = None
    description: str = ""

    def query(self, window: float, scrape_interval: float = 15.0) -> str:
        """The expression with ``$window``, ``$step`` (one scrape interval) and ``$grace`` (two
        scrape intervals plus one second) replaced."""
        return (self.expr.replace("$window", format_duration(window))
                .replace("$step", format_duration(scrape_interval))
                .replace("$grace", format_duration(grace_of(scrape_interval))))

    def coverage_query(self, window: float) -> str:
        # Per instance the best-covered series, then the worst instance: every instance that
        # exports the metric must have min_samples in the window.
        return f"min(max by (instance) (count_over_time({self.metric}[{format_duration(window)}])))"

    def rate_query(self, rate_window: float) -> str | None:
        return self.rate_expr.replace("$rate", format_duration(rate_window)) if self.rate_expr else None

    def threshold_text(self) -> str | None:
        return None if self.threshold is None else f"{self.op} {fmt_num(self.threshold)}"


def grace_of(scrape_interval: float) -> float:
    """How long after a write a node may still show the old revision without lagging."""
    return 2 * scrape_interval + 1.0


def fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        return str(int(v))
    return f"{v:.4g}"


def _counter(name: str, metric: str, description: str, *, threshold: float | None = 0.0) -> Rule:
    """A counter: judged on its increase over the window; rate shown by watch."""
    return Rule(
        name=name,
        metric=metric,
        expr=f"sum(increase({metric}[$window]))",
        threshold=threshold,
        rate_expr=f"sum(rate({metric}[$rate]))",
        description=description,
    )


def _gauge_max(name: str, metric: str, description: str, *, threshold: float | None = 0.0) -> Rule:
    """A gauge: judged on its maximum over the window, on any node."""
    return Rule(
        name=name, metric=metric, expr=f"max(max_over_time({metric}[$window]))", threshold=threshold,
        description=description,
    )


def _sel(metric: str, **labels: str) -> str:
    """``metric{label="value",...}``: a series selector."""
    return metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


_DENY = _sel(M_REDIS_LANE_OWNERSHIP_DECISION_TOTAL, decision=DECISION_DENY)

#: Every built-in rule, by name. Metric names: cbctl/core/model/metric_names.py.
RULES: Mapping[str, Rule] = {
    r.name: r
    for r in (
        _counter("ownership-changes", M_CLUSTER_OWNERSHIP_CHANGES_TOTAL,
                 "lane ownership acquisitions/releases (informational)", threshold=None),
        _counter("publish-ok", _sel(M_EVENT_BUS_PUBLISH_TOTAL, status=PUBLISH_STATUS_OK), "events published (informational)",
                 threshold=None),
        _counter("publish-buffered", _sel(M_EVENT_BUS_PUBLISH_TOTAL, status=PUBLISH_STATUS_BUFFERED),
                 "events written to the outbox instead of the bus (informational)", threshold=None),
        _counter("publish-errors", _sel(M_EVENT_BUS_PUBLISH_TOTAL, status=PUBLISH_STATUS_ERROR), "publishes that failed"),
        _gauge_max("degraded", M_EVENT_BUS_DEGRADED, "any node in degraded mode (outbox) in the window"),
        _counter("outages", M_EVENT_BUS_OUTAGES_TOTAL, "entries into degraded mode"),
        _counter("deny-decisions", _DENY,
                 "lane writes denied by the fencing guard", threshold=None),
        _counter("would-deny-decisions", _sel(M_REDIS_LANE_OWNERSHIP_DECISION_TOTAL, decision=DECISION_WOULD_DENY),
                 "writes the guard would deny (observe mode)", threshold=None),
        Rule("deny-rate", _DENY, f"sum(rate({_DENY}[$window]))", "<=", 0.1,
             description="denied lane writes per second (only stale owners should be denied)"),
        _counter("stale-fencing", M_REDIS_LANE_STALE_FENCING_TOTAL, "writes rejected for a stale fencing token",
                 threshold=None),
        Rule("publish-retries", M_EVENT_BUS_PUBLISH_RETRIES_TOTAL,
             f"sum(rate({M_EVENT_BUS_PUBLISH_RETRIES_TOTAL}[$window]))", "<=", 1.0,
             rate_expr=f"sum(rate({M_EVENT_BUS_PUBLISH_RETRIES_TOTAL}[$rate]))",
             description="publish retries per second"),
        _counter("dedup-mismatches", M_EVENT_BUS_CONSUMER_DEDUP_MISMATCH_TOTAL,
                 "duplicates that reached a consumer"),
        _counter("ordering-violations", M_EVENT_BUS_BRIDGE_ORDERING_VIOLATIONS_TOTAL,
                 "out-of-order deliveries or timed-out gaps in the bridge"),
        _gauge_max("outbox-depth", M_EVENT_BUS_OUTBOX_DEPTH, "events waiting in any node's outbox"),
        _counter("lease-lost", M_CLUSTER_LEASE_LOST_TOTAL, "leases lost by any node"),
        # Lag = how far some node is, at an instant, behind a revision another node had ALREADY
        # applied $grace earlier.  Comparing nodes at one instant (max - min) measures scrape
        # phase, not lag: right after a write, a node scraped just before it shows the old
        # revision while another shows the new one, and a burst of writes keeps that spread
        # open for as long as the burst lasts.  $grace (two scrape intervals plus 1 s) leaves
        # every node scraped at least once after applying; what is still behind then is lag.
        Rule("rollout-lag", M_CLUSTER_ROLLOUT_APPLIED_REVISION,
             f"max(max_over_time(clamp_min(max({M_CLUSTER_ROLLOUT_APPLIED_REVISION} offset $grace)"
             f" - min({M_CLUSTER_ROLLOUT_APPLIED_REVISION}), 0)[$window:$step]))",
             "<=", 0.0, description="revisions a node was behind what another node had applied $grace earlier"),
    )
}

_INFO = ("ownership-changes", "publish-ok", "publish-buffered", "deny-decisions", "would-deny-decisions",
         "stale-fencing")
_BASE = ("degraded", "outages", "publish-errors", "dedup-mismatches", "ordering-violations", "lease-lost",
         "rollout-lag")

#: Gate rules per stage: what must hold before LEAVING the stage. Stage 0: preflight only.
STAGE_GATES: Mapping[int, tuple[str, ...]] = {
    0: (),
    1: _BASE,
    2: _BASE + ("deny-rate", "publish-retries", "outbox-depth"),
    3: _BASE + ("deny-rate", "publish-retries", "outbox-depth"),
}

#: What ``cbctl watch`` shows per stage: the informational metrics, then the stage's gates.
STAGE_WATCH: Mapping[int, tuple[str, ...]] = {
    0: _INFO + _BASE,
    1: _INFO + _BASE,
    2: _INFO + STAGE_GATES[2],
    3: _INFO + STAGE_GATES[3],
}


@dataclass(frozen=True)
class GateConfig:
    """The effective rule table of one context (built-ins with its overrides applied)."""

    rules: Mapping[str, Rule]
    stages: Mapping[int, tuple[str, ...]]
    watch: Mapping[int, tuple[str, ...]]
    window: float
    min_samples: int
    rate_window: float
    preflight_max_age: float

    def stage_rules(self, stage: int) -> list[Rule]:
        return [self.rules[n] for n in self.stages.get(stage, ()) if n in self.rules]

    def watch_rules(self, stage: int) -> list[Rule]:
        return [self.rules[n] for n in self.watch.get(stage, ()) if n in self.rules]

    def window_of(self, rule: Rule) -> float:
        return rule.window or self.window

    def min_samples_of(self, rule: Rule) -> int:
        return rule.min_samples if rule.min_samples is not None else self.min_samples


def _dur(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    if key not in table:
        return default
    try:
        return parse_duration(table[key], what=f"{where}.{key}")
    except BadInput as exc:
        raise ConfigError(str(exc)) from None


def _int(table: Mapping[str, Any], key: str, default: int | None, where: str) -> int | None:
    if key not in table:
        return default
    v = table[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{where}.{key}: must be a positive integer, got {v!r}")
    return v


def gate_config(ctx: GateContext) -> GateConfig:
    """Built-in rules with ``ctx.extra["gates"]`` applied; raises ``ConfigError`` naming the key."""
    where = f"contexts.{ctx.name}.gates"
    g = dict(ctx.extra.get("gates", {}) or {})
    p = dict(ctx.extra.get("preflight", {}) or {})
    allowed = {"window", "min-samples", "rate-window", "rules", "stages", "scrape-interval"}
    for key in g:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
    rules = dict(RULES)
    raw_rules = g.get("rules", {})
    if not isinstance(raw_rules, Mapping):
        raise ConfigError(f"{where}.rules: expected a table")
    disabled: set[str] = set()
    for name, table in raw_rules.items():
        rw = f"{where}.rules.{name}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{rw}: expected a table")
        known = {"threshold", "op", "window", "min-samples", "expr", "metric", "enabled", "description"}
        for key in table:
            if key not in known:
                raise ConfigError(f"{rw}: unknown key {key!r} (allowed: {', '.join(sorted(known))})")
        base = rules.get(name)
        if base is None:
            missing = [k for k in ("expr", "metric", "threshold") if k not in table]
            if missing:
                raise ConfigError(f"{rw}: a new rule needs {', '.join(missing)} (built-in: {', '.join(RULES)})")
            base = Rule(name=name, metric="", expr="")
        changes: dict[str, Any] = {}
        for key in ("expr", "metric", "description"):
            if key in table:
                if not isinstance(table[key], str) or not table[key]:
                    raise ConfigError(f"{rw}.{key}: expected a non-empty string, got {table[key]!r}")
                changes[key] = table[key]
        if "op" in table:
            if table["op"] not in OPS:
                raise ConfigError(f"{rw}.op: must be one of {', '.join(OPS)}, got {table['op']!r}")
            changes["op"] = table["op"]
        if "threshold" in table:
            t = table["threshold"]
            if not isinstance(t, (int, float)) or isinstance(t, bool):
                raise ConfigError(f"{rw}.threshold: expected a number, got {t!r}")
            changes["threshold"] = float(t)
        if "window" in table:
            changes["window"] = _dur(table, "window", 0.0, rw)
        if "min-samples" in table:
            changes["min_samples"] = _int(table, "min-samples", None, rw)
        if table.get("enabled", True) is False:
            disabled.add(name)
        rules[name] = replace(base, **changes)
    for name in disabled:
        rules.pop(name)

    stages = dict(STAGE_GATES)
    watch = dict(STAGE_WATCH)
    raw_stages = g.get("stages", {})
    if not isinstance(raw_stages, Mapping):
        raise ConfigError(f"{where}.stages: expected a table")
    for key, names in raw_stages.items():
        sw = f"{where}.stages.{key}"
        try:
            stage = int(key)
        except ValueError:
            raise ConfigError(f"{sw}: stage must be 0..3, got {key!r}") from None
        if stage not in STAGE_GATES:
            raise ConfigError(f"{sw}: stage must be 0..3, got {key!r}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{sw}: expected a list of rule names")
        for n in names:
            if n not in rules:
                raise ConfigError(f"{sw}: unknown rule {n!r} (known: {', '.join(sorted(rules))})")
        stages[stage] = tuple(names)
        watch[stage] = tuple(dict.fromkeys(_INFO + tuple(names)))
    # Custom rules not placed in any stage are still watched everywhere.
    extra_rules = tuple(n for n in rules if n not in RULES)
    if extra_rules:
        watch = {s: tuple(dict.fromkeys(v + extra_rules)) for s, v in watch.items()}
    return GateConfig(
        rules=rules,
        stages=stages,
        watch=watch,
        window=_dur(g, "window", DEFAULT_WINDOW, where),
        min_samples=_int(g, "min-samples", DEFAULT_MIN_SAMPLES, where) or DEFAULT_MIN_SAMPLES,
        rate_window=_dur(g, "rate-window", DEFAULT_RATE_WINDOW, where),
        preflight_max_age=_dur(p, "max-age", DEFAULT_PREFLIGHT_MAX_AGE, f"contexts.{ctx.name}.preflight"),
    )


def configured_scrape_interval(ctx: GateContext) -> float | None:
    """``[gates] scrape-interval`` when set."""
    g = ctx.extra.get("gates", {}) or {}
    if "scrape-interval" not in g:
        return None
    return _dur(g, "scrape-interval", DEFAULT_SCRAPE_INTERVAL, f"contexts.{ctx.name}.gates")


__all__ = [
    "DEFAULT_MIN_SAMPLES", "DEFAULT_PREFLIGHT_MAX_AGE", "DEFAULT_RATE_WINDOW", "DEFAULT_SCRAPE_INTERVAL",
    "DEFAULT_WINDOW", "OPS", "RULES", "STAGE_GATES", "STAGE_WATCH", "GateConfig", "GateContext", "Outcome", "Rule",
    "configured_scrape_interval", "fmt_num", "gate_config", "grace_of",
]
