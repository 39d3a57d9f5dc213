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
