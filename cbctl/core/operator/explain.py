"""``cbctl explain FLAG|METRIC|GATE``: the meaning, the allowed values and where each comes from,
read from the tables the code itself uses (no second copy of the facts).

Contract: flags come from the flag table and the stage plan (cbctl/core/model/flags.py,
cbctl/core/model/stages.py: help, allowed values, the value each stage sets, the rollbacks that
hold it); metrics from the agent's exporter (cbctl/core/model/metrics.py, built on a private
registry: help, type, labels and the label values it exports from the start) and the metric
name table (cbctl/core/model/metric_names.py); gates from the gate rule table
(cbctl/core/model/gate_settings.py, or a context's effective :class:`GateConfig` when given:
its expression, threshold, window and the stages whose gates or watch include it). Pure apart
from building that registry; nothing is read from a backend.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cbctl.core.model.errors import BadInput
from cbctl.core.model.flags import FLAGS, PERSISTENT_FLAGS, format_flag_value
from cbctl.core.model.gate_settings import (
    DEFAULT_MIN_SAMPLES,
    DEFAULT_WINDOW,
    RULES,
    STAGE_GATES,
    STAGE_WATCH,
    Rule,
)
from cbctl.core.model.metric_names import ALL_METRICS
from cbctl.core.model.stages import ROLLBACKS, STAGES

if TYPE_CHECKING:
    from cbctl.core.model.gate_settings import GateConfig

Kind = Literal["flag", "metric", "gate"]


@dataclass(frozen=True)
class Explanation:
    """What ``explain`` prints. ``facts``: ordered (label, text) pairs for the table view;
    ``data``: the JSON details (snake_case keys)."""

    kind: Kind
    name: str
    meaning: str
    facts: tuple[tuple[str, str], ...] = ()
    data: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "meaning": self.meaning, **self.data}


# -- flags -----------------------------------------------------------------------------------


def explain_flag(name: str) -> Explanation:
    """A flag: help, allowed values, default, the value each stage's plan sets, the rollbacks
    that hold it and whether a manual override of it survives a stage transition."""
    spec = FLAGS[name]
    by_stage: list[dict[str, Any]] = []
    for stage in STAGES:
        if name in stage.flags:
            value = format_flag_value(name, stage.flags[name])
        else:  # the canary sets are inputs recorded on entering stage 2 (--canary FILE)
            value = "the --canary sets given on entering stage 2" if stage.carries_canary else "empty"
        by_stage.append({"stage": stage.number, "stage_name": stage.name, "value": value})
    # "Set by": the first stage whose plan changes the value (the stage that sets it).
    sets = [s for prev, s in zip(by_stage, by_stage[1:]) if s["value"] != prev["value"]]
    rollbacks = [{"capability": r.capability, "description": r.description,
                  "value": format_flag_value(name, r.fixed[name]) if name in r.fixed else "--schema-version N"}
                 for r in ROLLBACKS.values() if name in r.flags]
    persistent = name in PERSISTENT_FLAGS
    facts = [
        ("allowed", spec.allowed_text),
        ("default", format_flag_value(name, spec.default) or '""'),
        ("per stage", "; ".join(f"{s['stage']} {s['stage_name']}: {s['value'] or chr(34) * 2}" for s in by_stage)),
        ("set by", ", ".join(f"stage {s['stage']} ({s['stage_name']}) -> {s['value']}" for s in sets) or "no stage changes it"),
        ("rollbacks", "; ".join(f"{r['capability']}: {r['value']}" for r in rollbacks) or "none"),
        ("manual override", "kept across stage transitions" if persistent
         else "`flags set` overrides it until the next stage transition; `flags unset` drops the override"),
    ]
    return Explanation("flag", name, spec.help, tuple(facts), {
        "allowed": spec.allowed_text,
        "allowed_values": list(spec.allowed) if spec.kind == "enum" else None,
        "value_kind": spec.kind,
        "default": spec.default_value(),
        "stages": by_stage,
        "set_by": [{"stage": s["stage"], "value": s["value"]} for s in sets],
        "rollbacks": rollbacks,
        "override_persists": persistent,
    })


# -- metrics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Exported:
    name: str
    type: str
    help: str
    labels: tuple[str, ...]
    label_values: dict[str, list[str]]


def _exported() -> dict[str, _Exported]:
    """Every series the exporter defines, read from a throwaway AgentMetrics (own registry)."""
    from prometheus_client import CollectorRegistry

    from cbctl.core.model.metrics import AgentMetrics

    metrics = AgentMetrics("explain", CollectorRegistry())
    metrics.applied_revision.set(0)  # it exports nothing until set; here only its help is wanted
    # The wrappers know their label names even before a child exists (prometheus_client keeps
    # them as _labelnames; there is no public accessor). The gauge above has none.
    label_names = {getattr(w, "_name", None): tuple(getattr(w, "_labelnames", ()))
                   for w in vars(metrics).values() if hasattr(w, "_labelnames")}
    out: dict[str, _Exported] = {}
    for family in metrics.registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        values: dict[str, list[str]] = {}
        for sample in family.samples:
            for key, value in sample.labels.items():
                if key != "node_id" and value not in values.setdefault(key, []):
                    values[key].append(value)
        labels = label_names.get(family.name, tuple(values))
        out[name] = _Exported(name, family.type, family.documentation, labels, values)
    return out


def _rules_reading(metric: str, rules: dict[str, Rule]) -> list[Rule]:
    # Whole names only: one metric name may be the prefix of another.
    pattern = re.compile(rf"(?<![A-Za-z0-9_:]){re.escape(metric)}(?![A-Za-z0-9_:])")
    return [r for r in rules.values() if pattern.search(r.metric) or pattern.search(r.expr)]


def explain_metric(name: str, cfg: GateConfig | None = None) -> Explanation:
    """A metric: the exporter's help, type and labels, and the gates that read it."""
    exp = _exported()[name]
    rules, stages, _ = _tables(cfg)
    readers = _rules_reading(name, rules)
    gated = sorted({s for r in readers for s, names in stages.items() if r.name in names})
    facts = [
        ("type", exp.type),
        ("labels", ", ".join(
            f"{lbl} ({', '.join(exp.label_values[lbl])})" if exp.label_values.get(lbl) else lbl
            for lbl in exp.labels) + (", " if exp.labels else "") + "cluster (every series)"),
        ("gates", ", ".join(r.name + (f" ({r.threshold_text()})" if r.threshold is not None else " (informational)")
                            for r in readers) or "none"),
        ("judged at stages", ", ".join(f"{s} ({STAGES[s].name})" for s in gated) or "none"),
    ]
    return Explanation("metric", name, exp.help, tuple(facts), {
        "type": exp.type,
        "labels": [*exp.labels, "cluster"],
        "label_values": exp.label_values,
        "gates": [r.name for r in readers],
        "stages": gated,
    })


# -- gates -----------------------------------------------------------------------------------


def _tables(cfg: GateConfig | None) -> tuple[dict[str, Rule], dict[int, tuple[str, ...]], dict[int, tuple[str, ...]]]:
    if cfg is None:
        return dict(RULES), dict(STAGE_GATES), dict(STAGE_WATCH)
    return dict(cfg.rules), dict(cfg.stages), dict(cfg.watch)


def explain_gate(name: str, cfg: GateConfig | None = None) -> Explanation:
    """A gate rule: description, expression, threshold, window, minimum samples, the stages
    whose gates it is (what must hold before LEAVING the stage) and where ``watch`` shows it."""
    rules, stages, watch = _tables(cfg)
    rule = rules[name]
    window = rule.window or (cfg.window if cfg else DEFAULT_WINDOW)
    min_samples = rule.min_samples if rule.min_samples is not None else (cfg.min_samples if cfg else DEFAULT_MIN_SAMPLES)
    gate_of = [s for s, names in sorted(stages.items()) if name in names]
    shown = [s for s, names in sorted(watch.items()) if name in names]
    from cbctl.core.model.durations import format_duration

    facts = [
        ("threshold", rule.threshold_text() or "none (informational: shown by watch, never judged)"),
        ("expression", rule.expr),
        ("metric", rule.metric),
        ("window", f"{format_duration(window)} (never before the stage was entered)"),
        ("min samples", f"{min_samples} per instance"),
        ("gate of stages", ", ".join(f"{s} ({STAGES[s].name})" for s in gate_of) + " (must hold before leaving)"
         if gate_of else "none"),
        ("watched at stages", ", ".join(str(s) for s in shown) or "none"),
    ]
    return Explanation("gate", name, rule.description, tuple(facts), {
        "expr": rule.expr,
        "metric": rule.metric,
        "op": rule.op,
        "threshold": rule.threshold,
        "window_seconds": window,
        "min_samples": min_samples,
        "gate_of_stages": gate_of,
        "watched_at_stages": shown,
    })


# -- lookup ----------------------------------------------------------------------------------


def known_names(cfg: GateConfig | None = None) -> list[tuple[Kind, str]]:
    """Every name ``explain`` knows, as (kind, name): flags, metrics, gates, in table order."""
    rules, _, _ = _tables(cfg)
    return [*(("flag", n) for n in FLAGS), *(("metric", n) for n in ALL_METRICS), *(("gate", n) for n in rules)]


def explain(name: str, cfg: GateConfig | None = None) -> list[Explanation]:
    """Every explanation of ``name`` (a flag, a metric or a gate; a name in two tables gives
    two). Unknown: ``BadInput`` with the closest known names."""
    rules, _, _ = _tables(cfg)
    out = []
    if name in FLAGS:
        out.append(explain_flag(name))
    if name in ALL_METRICS:
        out.append(explain_metric(name, cfg))
    if name in rules:
        out.append(explain_gate(name, cfg))
    if out:
        return out
    names = [n for _, n in known_names(cfg)]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise BadInput(f"unknown flag, metric or gate {name!r}{hint}; `cbctl explain` lists them")


def summary(cfg: GateConfig | None = None) -> list[dict[str, str]]:
    """One row per known name: kind, name, one-line meaning (``cbctl explain`` without a name)."""
    rules, _, _ = _tables(cfg)
    exported = _exported()
    rows = [{"kind": "flag", "name": n, "meaning": s.help} for n, s in FLAGS.items()]
    rows += [{"kind": "metric", "name": n, "meaning": exported[n].help} for n in ALL_METRICS]
    rows += [{"kind": "gate", "name": n, "meaning": r.description} for n, r in rules.items()]
    return rows


__all__ = ["Explanation", "Kind", "explain", "explain_flag", "explain_gate", "explain_metric", "known_names", "summary"]
