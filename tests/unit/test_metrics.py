"""The agent's exposition: the cluster label on every series, and no applied revision before
one is known (a restarting agent must not read as revision 0 to the rollout-lag gate)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cbctl.core.model.metrics import AgentMetrics


def samples(m: AgentMetrics) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


def test_applied_revision_is_absent_until_the_first_revision_is_applied() -> None:
    m = AgentMetrics("node-1", cluster="prod")
    assert "cluster_rollout_applied_revision" not in samples(m)
    m.applied_revision.set(41)
    assert m.applied_revision.get() == 41
    text = m.render().decode()
    assert 'cluster_rollout_applied_revision{cluster="prod"} 41.0' in text


def test_every_series_carries_the_cluster() -> None:
    m = AgentMetrics("node-1", cluster="prod")
    m.applied_revision.set(1)
    m.lane_decisions.labels(decision="deny").inc()
    got = samples(m)
    assert got, "something is exported"
    for name, label_sets in got.items():
        assert all(ls.get("cluster") == "prod" for ls in label_sets), name


# The exported names are a contract with Prometheus, gates and dashboards: spelled out here in
# full, on purpose, so that renaming a constant's value fails this test.
EXPECTED_NAMES = {
    "cluster_ownership_changes_total", "cluster_lease_lost_total", "cluster_rollout_applied_revision",
    "cluster_owned_lanes", "redis_lane_ownership_decision_total", "redis_lane_stale_fencing_total",
    "event_bus_publish_total", "event_bus_publish_retries_total", "event_bus_degraded", "event_bus_outages_total",
    "event_bus_outbox_depth", "event_bus_outbox_backpressure", "event_bus_bridge_duplicates_suppressed_total",
    "event_bus_bridge_ordering_violations_total", "event_bus_consumer_dedup_mismatch_total",
    "event_bus_bridge_delivered_total", "event_bus_bad_events_total", "signals_routed_total", "cbctl_tasks_total",
    "cbctl_agent_info",
}


def test_metric_name_constants_are_the_contract_names() -> None:
    from cbctl.core.model import metric_names as mn

    constants = {getattr(mn, n) for n in dir(mn) if n.startswith("M_")}
    assert constants == EXPECTED_NAMES == set(mn.ALL_METRICS)
    assert len(mn.ALL_METRICS) == len(EXPECTED_NAMES)


def test_exporter_registers_exactly_the_named_metrics() -> None:
    from cbctl.core.model import metric_names as mn

    m = AgentMetrics("node-1", cluster="prod")
    m.applied_revision.set(1)
    registered: set[str] = set()
    for fam in m.registry.collect():
        # prometheus_client strips "_total" from a counter family's name; its samples carry it.
        registered.add(fam.name + "_total" if fam.type == "counter" else fam.name)
    assert registered == set(mn.ALL_METRICS)
    exported = set(samples(m))
    assert {f"{mn.M_REDIS_LANE_OWNERSHIP_DECISION_TOTAL}"} <= exported
    decisions = {ls["decision"] for ls in samples(m)[mn.M_REDIS_LANE_OWNERSHIP_DECISION_TOTAL]}
    assert decisions == set(mn.DECISIONS) == {"allow", "deny", "would_deny"}
    statuses = {ls["status"] for ls in samples(m)[mn.M_EVENT_BUS_PUBLISH_TOTAL]}
    assert statuses == set(mn.PUBLISH_STATUSES) == {"ok", "duplicate", "error", "buffered"}
    assert (mn.ORIGIN_LOCAL, mn.ORIGIN_REMOTE) == ("local", "remote")
