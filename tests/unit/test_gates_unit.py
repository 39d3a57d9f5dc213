"""Pure logic of gates, durations, watch rendering and the store-side preflight checks."""

from __future__ import annotations

import time

import pytest

from cbctl.core.operator.preflight_nodes import check_clock, check_lease_timing, check_node_ids, check_nodes
from cbctl.core.operator.preflight_report import PreflightOptions, StoreSnapshot
from cbctl.core.model.config import parse_context
from cbctl.core.backends.coord.base import KV
from cbctl.core.model.errors import BadInput, ConfigError
from cbctl.core.model.gate_settings import RULES, STAGE_GATES, gate_config
from cbctl.core.backends.prometheus import format_duration, parse_duration

pytestmark = pytest.mark.timeout(10)


def ctx(**table):
    return parse_context("t", {"cluster": "t", **table}, where="contexts.t")


@pytest.mark.parametrize("text,seconds", [
    ("2s", 2.0), ("500ms", 0.5), ("1m", 60.0), ("24h", 86400.0), ("1h30m", 5400.0), ("7d", 604800.0),
    ("1.5s", 1.5), ("10", 10.0), (3, 3.0), (" 2S ", 2.0),
])
def test_parse_duration(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "fast", "-1s", "0s", "1x", "s", "1s2", True])
def test_parse_duration_rejects_with_the_value(text) -> None:
    with pytest.raises(BadInput) as exc:
        parse_duration(text, what="--interval")
    assert "--interval" in str(exc.value)


@pytest.mark.parametrize("seconds,text", [(10, "10s"), (86400, "1d"), (3600, "1h"), (90, "90s"), (1.5, "1500ms"),
                                          (600, "10m")])
def test_format_duration(seconds, text) -> None:
    assert format_duration(seconds) == text


def test_rule_queries_substitute_the_window() -> None:
    r = RULES["degraded"]
    assert r.query(10) == "max(max_over_time(event_bus_degraded[10s]))"
    assert "count_over_time(event_bus_degraded[10s])" in r.coverage_query(10)
    assert RULES["publish-errors"].rate_query(60) == 'sum(rate(event_bus_publish_total{status="error"}[1m]))'


def test_stage_0_has_only_the_preflight_gate_and_later_stages_have_rules() -> None:
    assert STAGE_GATES[0] == ()
    assert "degraded" in STAGE_GATES[1] and "deny-rate" in STAGE_GATES[2]
    for names in STAGE_GATES.values():
        for n in names:
            assert RULES[n].threshold is not None  # an informational rule is never a gate


def test_gate_overrides() -> None:
    c = ctx(gates={"window": "10s", "min-samples": 2,
                   "rules": {"publish-errors": {"threshold": 3, "window": "30s"},
                             "outages": {"enabled": False},
                             "custom": {"expr": "sum(x)", "metric": "x", "op": "<", "threshold": 1}},
                   "stages": {"1": ["degraded", "custom"]}},
            preflight={"max-age": "10m"})
    g = gate_config(c)
    assert g.window == 10 and g.min_samples == 2 and g.preflight_max_age == 600
    assert g.rules["publish-errors"].threshold == 3 and g.window_of(g.rules["publish-errors"]) == 30
    assert "outages" not in g.rules
    assert [r.name for r in g.stage_rules(1)] == ["degraded", "custom"]
    assert "custom" in [r.name for r in g.watch_rules(3)]


@pytest.mark.parametrize("gates,needle", [
    ({"windw": "1s"}, "unknown key 'windw'"),
    ({"rules": {"degraded": {"op": "~"}}}, "gates.rules.degraded.op"),
    ({"rules": {"new": {"expr": "x"}}}, "a new rule needs metric, threshold"),
    ({"stages": {"1": ["nope"]}}, "unknown rule 'nope'"),
    ({"stages": {"9": []}}, "stage must be 0..3"),
    ({"window": "soon"}, "gates.window"),
])
def test_gate_config_errors_name_the_key(gates, needle) -> None:
    with pytest.raises(ConfigError) as exc:
        gate_config(ctx(gates=gates))
    assert needle in str(exc.value)


def snapshot(**nodes) -> StoreSnapshot:
    return StoreSnapshot(nodes=nodes, now=time.time())


def rec(offset=None, probes=None, machine="m1"):
    now = time.time()
    p = probes if probes is not None else {b: {"ok": True, "detail": "", "at": now} for b in ("etcd", "nats", "redis")}
    r = {"machine_id": machine, "probes": p}
    if offset is not None:
        r["clock"] = {"offset_ms": offset, "source": "ntp"}
    return r


def test_clock_thresholds_and_spread() -> None:
    c = ctx(**{"ntp-servers": ["127.0.0.1"]})
    rows = check_clock(c, snapshot(a=rec(10), b=rec(-60), d=rec(300)), PreflightOptions())
    st = {(r.node, r.target): r.status for r in rows}
    assert st[("a", "offset")] == "pass" and st[("b", "offset")] == "warn" and st[("d", "offset")] == "fail"
    assert st[(None, "spread")] == "fail"  # 360 ms between b and d


def test_skew_options_are_validated() -> None:
    with pytest.raises(BadInput):
        PreflightOptions(skew_warn_ms=300, skew_fail_ms=100)
    with pytest.raises(BadInput):
        PreflightOptions(only=frozenset({"etc"}))


def test_nodes_missing_stale_and_no_report() -> None:
    c = ctx(**{"expected-nodes": ["a", "b", "c"], "agent": {"probe-interval": "1s"}})
    old = {b: {"ok": True, "detail": "", "at": time.time() - 10} for b in ("etcd", "nats", "redis")}
    rows = check_nodes(c, snapshot(a=rec(), b=rec(probes=old), x={"machine_id": "q"}))
    fails = {(r.node, r.target) for r in rows if r.status == "fail"}
    assert ("c", "registration") in fails
    assert {("b", "etcd"), ("b", "nats"), ("b", "redis")} <= fails
    assert ("x", "probes") in fails
    assert not any(n == "a" for n, _ in fails)


def test_node_ids_machine_under_two_ids() -> None:
    c = ctx()
    snap = snapshot(a=rec(machine="m1"), b=rec(machine="m1"))
    rows = check_node_ids(c, snap)
    assert any(r.status == "fail" and "a, b" in r.detail for r in rows)
    snap.conflicts = [KV("/cbctl/t/conflicts/a/i1", b'{"kind": "duplicate-node-id"}', 1, 1)]
    assert any(r.node == "a" and "duplicate-node-id" in r.detail for r in check_node_ids(c, snap))


def test_lease_timing() -> None:
    ok = check_lease_timing(ctx(), snapshot(a=rec(0), b=rec(5)))
    assert all(r.status == "pass" for r in ok)
    bad = check_lease_timing(ctx(coordination={"lease-ttl": 6, "keepalive-interval": 3, "timeout": 4}),
                             snapshot(a=rec(0), b=rec(4000)))
    st = {r.target: r.status for r in bad}
    assert st == {"keepalive": "fail", "timeout": "fail", "clock-spread": "fail"}


def test_sparkline() -> None:
    from cbctl.cli.watch import sparkline

    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([1, None, 1]) == "▁ ▁"
    assert sparkline([]) == ""


@pytest.mark.parametrize("expr, scoped", [
    ("rate(x[5m])", 'rate(x{cluster="c"}[5m])'),
    ('y{k="v"}', 'y{cluster="c",k="v"}'),
    ('{__name__=~"z.*"}', '{cluster="c",__name__=~"z.*"}'),
    ("sum by (instance) (count_over_time(m[10s]))", 'sum by (instance) (count_over_time(m{cluster="c"}[10s]))'),
    ("x and on(node) y", 'x{cluster="c"} and on(node) y{cluster="c"}'),
    ("max(x) by (node)", 'max(x{cluster="c"}) by (node)'),
    ('label_replace(up, "a", "$1", "b", "(.*)")', 'label_replace(up{cluster="c"}, "a", "$1", "b", "(.*)")'),
    ("x offset 5m", 'x{cluster="c"} offset 5m'),
    ("vector(1) + 1e3", "vector(1) + 1e3"),
])
def test_every_selector_is_scoped_to_the_cluster(expr: str, scoped: str) -> None:
    from cbctl.core.backends.prometheus import scope_selectors

    assert scope_selectors(expr, {"cluster": "c"}) == scoped


def test_range_spans_and_rule_rendering() -> None:
    from cbctl.core.backends.prometheus import range_spans

    assert range_spans("min_over_time((max(x) - min(x))[15s:1s]) + rate(y[5m])") == [15.0, 300.0]
    q = RULES["rollout-lag"].query(10.0, 1.0)
    assert "offset 3s" in q and "[10s:1s]" in q
