"""Prometheus rules, their promtool unit tests and a Grafana dashboard, generated from the gate
rule table (``RULES`` in cbctl/core/model/gate_settings.py) — ``make deploy``.

    python -m cbctl.core.operator.deploy_gen [DIR]          # write DIR/prometheus/..., DIR/grafana/...
    python -m cbctl.core.operator.deploy_gen --check [DIR]  # write nothing; exit 1 naming stale files

DIR defaults to ``deploy`` (the repository's deploy/, run from the repository root).

Contract: per rule of the table, one recording rule ``cluster:cbctl_gate_<name>:<window>``
holding the gate's expression per ``cluster`` label (the default window and scrape interval:
``DEFAULT_WINDOW``, ``DEFAULT_SCRAPE_INTERVAL``), and, for every rule with a threshold, one
alert ``CbctlGate<Name>`` firing while the recorded value breaks the rule's threshold with the
rule's own comparison — the same expression and threshold ``stage advance`` judges. The
alerts are the standing view of the gates: ``stage advance`` also waits for a settled instant
and never counts from before the stage's entry (docs/operator.md), which a rule cannot know.
One dashboard panel per rule shows the same expression (plus the rate ``watch`` shows) for the
dashboard's ``$cluster``. Output is deterministic: tests/unit/test_deploy.py fails when a
committed file differs from a fresh generation.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from cbctl.core.backends.prometheus import scope_selectors
from cbctl.core.model.durations import format_duration
from cbctl.core.model.gate_settings import (
    DEFAULT_RATE_WINDOW,
    DEFAULT_SCRAPE_INTERVAL,
    DEFAULT_WINDOW,
    RULES,
    STAGE_GATES,
    Rule,
    fmt_num,
)
from cbctl.core.model.metric_names import M_CLUSTER_ROLLOUT_APPLIED_REVISION

RULES_FILE: Final = "prometheus/cbctl-rules.yml"
RULES_TEST_FILE: Final = "prometheus/cbctl-rules.test.yml"
DASHBOARD_FILE: Final = "grafana/cbctl-dashboard.json"
DASHBOARD_UID: Final = "cbctl-gates"

#: The comparison under which an alert fires: the negation of the rule's pass condition.
_BREACH: Final = {"<=": ">", "<": ">=", ">=": "<", ">": "<=", "==": "!=", "!=": "=="}
_HEADER: Final = "# Generated from cbctl/core/model/gate_settings.py by `make deploy`; do not edit.\n"
# Aggregations in the table's expressions collapse every series into one sample; per cluster
# they keep the cluster label instead (`max_over_time(`, `clamp_min(` are not matched).
_AGG_RE: Final = re.compile(r"\b(sum|max|min|avg|count)\(")


def record_name(rule: Rule) -> str:
    """``cluster:cbctl_gate_<snake name>:<window>`` (Prometheus' level:metric:operation)."""
    return f"cluster:cbctl_gate_{rule.name.replace('-', '_')}:{format_duration(DEFAULT_WINDOW)}"


def alert_name(rule: Rule) -> str:
    """``publish-errors`` -> ``CbctlGatePublishErrors``."""
    return "CbctlGate" + "".join(part.capitalize() for part in rule.name.split("-"))


def per_cluster(expr: str) -> str:
    """A table expression (one sample in total) as one sample per ``cluster`` label."""
    return _AGG_RE.sub(r"\1 by (cluster) (", expr)


def rule_expr(rule: Rule) -> str:
    """The gate's expression at the default window and scrape interval, per cluster."""
    return per_cluster(rule.query(DEFAULT_WINDOW, DEFAULT_SCRAPE_INTERVAL))


def gated_stages(rule: Rule) -> list[int]:
    """The stages whose advance this rule gates (what must hold before leaving them)."""
    return [s for s, names in sorted(STAGE_GATES.items()) if rule.name in names]


def _alert(rule: Rule) -> dict[str, Any]:
    assert rule.threshold is not None
    stages = gated_stages(rule)
    where = (f"gate of stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))}: "
             "cbctl stage advance refuses while it fails" if stages else "not a gate of any stage by default")
    return {
        "alert": alert_name(rule),
        "expr": f"{record_name(rule)} {_BREACH[rule.op]} {fmt_num(rule.threshold)}",
        "labels": {"severity": "warning", "gate": rule.name},
        "annotations": {
            "summary": f"cbctl gate {rule.name} fails in cluster {{{{ $labels.cluster }}}}",
            "description": (f"{rule.description} over {format_duration(DEFAULT_WINDOW)} must be "
                            f"{rule.op} {fmt_num(rule.threshold)} ({where})."),
        },
    }


def rules_doc() -> dict[str, Any]:
    """The rule file: one recording group (every rule) and one alerting group (thresholded)."""
    return {"groups": [
        {"name": "cbctl-gates-recording",
         "rules": [{"record": record_name(r), "expr": rule_expr(r)} for r in RULES.values()]},
        {"name": "cbctl-gates-alerts",
         "rules": [_alert(r) for r in RULES.values() if r.threshold is not None]},
    ]}


# -- promtool unit tests -------------------------------------------------------------------------

_BAD: Final = "breaching"
_OK: Final = "healthy"
_MINUTES: Final = 40  # input length; evaluated at 15m, after one full window


def series(selector: str, cluster: str, instance: str) -> str:
    """``m{k="v"}`` -> ``m{k="v",cluster="...",instance="..."}`` (promtool's series notation)."""
    extra = f'cluster="{cluster}",instance="{instance}"'
    if selector.endswith("}"):
        return selector[:-1] + ("," if not selector.endswith("{}") else "") + extra + "}"
    return selector + "{" + extra + "}"


def _is_counter(rule: Rule) -> bool:
    return "increase(" in rule.expr or "rate(" in rule.expr


def _inputs() -> list[dict[str, str]]:
    """Two instances per cluster. ``breaching``: node a's counters grow (per second) well past
    every threshold, its gauges sit above it, node b stays at 0 (so a spread between nodes
    breaks too); ``healthy``: everything 0. Pass conditions must be ``<=``/``<`` with a
    threshold >= 0, as every rule of the table is; another rule fails the generation loudly."""
    values: dict[str, str] = {}
    for rule in RULES.values():
        threshold = rule.threshold if rule.threshold is not None else 0.0
        if rule.op not in ("<=", "<") or threshold < 0:
            raise ValueError(f"rule {rule.name}: generated tests expect a '<=' or '<' threshold >= 0")
        if _is_counter(rule):
            per_min = 60 * 10 * (int(threshold) + 1)  # 10x the threshold per second, and more
            bad = f"0+{per_min}x{_MINUTES}"
        else:
            bad = f"{2 * (int(threshold) + 1)}x{_MINUTES}"
        key = series(rule.metric, _BAD, "a")
        values[key] = max(values.get(key, bad), bad, key=lambda v: int(v.split("x")[0].split("+")[-1]))
        values.setdefault(series(rule.metric, _BAD, "b"), f"0x{_MINUTES}")
        values.setdefault(series(rule.metric, _OK, "a"), f"0x{_MINUTES}")
        values.setdefault(series(rule.metric, _OK, "b"), f"0x{_MINUTES}")
    return [{"series": s, "values": v} for s, v in values.items()]


def rules_test_doc() -> dict[str, Any]:
    """promtool's unit test file: every alert fires for ``breaching`` and only for it; every
    recording rule is 0 for ``healthy``."""
    alerts = [_alert(r) for r in RULES.values() if r.threshold is not None]
    at = "15m"
    return {
        "rule_files": [Path(RULES_FILE).name],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": _inputs(),
            "alert_rule_test": [
                {"eval_time": at, "alertname": a["alert"], "exp_alerts": [{
                    "exp_labels": {**a["labels"], "cluster": _BAD},
                    "exp_annotations": {**a["annotations"],
                                        "summary": a["annotations"]["summary"].replace("{{ $labels.cluster }}", _BAD)},
                }]}
                for a in alerts
            ],
            "promql_expr_test": [
                {"expr": f'{record_name(r)}{{cluster="{_OK}"}}', "eval_time": at,
                 "exp_samples": [{"labels": f'{record_name(r)}{{cluster="{_OK}"}}', "value": 0}]}
                for r in RULES.values()
            ],
        }],
    }


# -- Grafana -----------------------------------------------------------------------------------

def panel_queries(rule: Rule) -> list[tuple[str, str]]:
    """(refId, PromQL) of the rule's panel: the gate expression per cluster and, when the table
    has one, the rate ``cbctl watch`` shows; every selector scoped to ``cluster="$cluster"``."""
    scope = {"cluster": "$cluster"}
    out = [("A", scope_selectors(rule_expr(rule), scope))]
    rate = rule.rate_query(DEFAULT_RATE_WINDOW)
    if rate:
        out.append(("B", scope_selectors(per_cluster(rate), scope)))
    return out


def _panel(rule: Rule, i: int, y: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if rule.threshold is not None:
        steps.append({"color": "red", "value": rule.threshold})
    title = rule.name + ("" if rule.threshold is None else f" ({rule.op} {fmt_num(rule.threshold)})")
    legends = {"A": f"{format_duration(DEFAULT_WINDOW)} window", "B": f"rate {format_duration(DEFAULT_RATE_WINDOW)}"}
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "description": rule.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y},
        "fieldConfig": {"defaults": {
            "custom": {"thresholdsStyle": {"mode": "line" if rule.threshold is not None else "off"}},
            "thresholds": {"mode": "absolute", "steps": steps},
        }, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": ref, "expr": q, "legendFormat": legends[ref],
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for ref, q in panel_queries(rule)],
    }


def dashboard_doc() -> dict[str, Any]:
    """One row of gates (thresholded rules), one of informational metrics; one panel each."""
    gates = [r for r in RULES.values() if r.threshold is not None]
    info = [r for r in RULES.values() if r.threshold is None]
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 100
    for title, rules in (("Gates", gates), ("Informational", info)):
        panels.append({"id": next_id, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        for i, rule in enumerate(rules):
            p = _panel(rule, len(panels), y + 8 * (i // 2))
            panels.append(p)
        y += 8 * ((len(rules) + 1) // 2)
    for i, p in enumerate(panels):  # ids unique and stable
        p["id"] = i + 1
    return {
        "title": "cbctl rollout gates",
        "uid": DASHBOARD_UID,
        "description": "Generated from cbctl/core/model/gate_settings.py by `make deploy`; do not edit.",
        "tags": ["cbctl"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "cluster", "type": "query", "label": "cluster",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": f"label_values({M_CLUSTER_ROLLOUT_APPLIED_REVISION}, cluster)", "refId": "cluster"},
             "definition": f"label_values({M_CLUSTER_ROLLOUT_APPLIED_REVISION}, cluster)", "refresh": 2},
        ]},
        "panels": panels,
    }


# -- files -------------------------------------------------------------------------------------

def _yaml(doc: Mapping[str, Any]) -> str:
    return _HEADER + yaml.safe_dump(dict(doc), sort_keys=False, width=1000, allow_unicode=True)


def expected_files() -> dict[str, str]:
    """Path under the deploy directory -> content."""
    return {
        RULES_FILE: _yaml(rules_doc()),
        RULES_TEST_FILE: _yaml(rules_test_doc()),
        DASHBOARD_FILE: json.dumps(dashboard_doc(), indent=2, sort_keys=False) + "\n",
    }


def stale(directory: Path) -> list[str]:
    """The generated files under ``directory`` that are missing or differ."""
    return [name for name, content in expected_files().items()
            if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != content]


def write(directory: Path) -> list[str]:
    """Write every generated file under ``directory``; return their names."""
    for name, content in expected_files().items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(content, encoding="utf-8")
    return list(expected_files())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbctl.core.operator.deploy_gen",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("directory", type=Path, nargs="?", default=Path("deploy"), help="default: deploy")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale(args.directory)
        for name in bad:
            sys.stderr.write(f"{args.directory / name}: stale; run make deploy\n")
        return 1 if bad else 0
    for name in write(args.directory):
        sys.stderr.write(f"wrote {args.directory / name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
