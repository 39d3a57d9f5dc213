"""The agent's Prometheus exporter registry: every series a node agent exports.

Contract: names come from cbctl/core/model/metric_names.py (the one spelling, also used by the
queries). Each :class:`AgentMetrics` owns its own registry (several agents may share a process),
and every series carries the agent's cluster as the label ``cluster`` (docs/model.md, Metrics).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from cbctl.core.model import metric_names as m
from cbctl.core.model.labels import CLUSTER_LABEL


class ClusterRegistry(CollectorRegistry):
    """A registry whose every collected sample also carries ``cluster="<cluster>"``.

    Served by ``generate_latest`` or ``prometheus_client.start_http_server`` alike.  A sample
    that already has a ``cluster`` label keeps its own value.
    """

    def __init__(self, cluster: str) -> None:
        super().__init__()
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                labelled.add_sample(s.name, {CLUSTER_LABEL: self.cluster, **s.labels}, s.value, s.timestamp,
                                    s.exemplar)
            yield labelled


class UnsetUntilKnownGauge:
    """A label-less gauge that exports NOTHING until its first :meth:`set`.

    ``cluster_rollout_applied_revision`` must not read 0 while a (re)starting agent has not
    applied any revision yet: one such scrape makes ``max - min`` across nodes equal to the whole
    revision number, and the rollout-lag gate would fail a rolling restart.  Absent is honest:
    the node simply has no value yet.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._value: float | None = None
        registry.register(self)  # type: ignore[arg-type]  # the collector protocol: collect()

    def set(self, value: float) -> None:
        self._value = float(value)

    def get(self) -> float | None:
        return self._value

    def collect(self) -> Iterator[Metric]:
        if self._value is not None:
            yield GaugeMetricFamily(self.name, self.documentation, value=self._value)

    def describe(self) -> Iterator[Metric]:
        # Keeps the registry's duplicate-name check working without collecting a value.
        yield GaugeMetricFamily(self.name, self.documentation)


class AgentMetrics:
    """Every metric one node agent exports on ``/metrics``.

    ``cluster``: the agent's cluster, exported as the ``cluster`` label of every series (None:
    no label, only for an explicitly given ``registry``).
    """

    def __init__(self, node_id: str, registry: CollectorRegistry | None = None, *, cluster: str | None = None) -> None:
        self.node_id = node_id
        self.cluster = cluster
        if registry is None:
            registry = ClusterRegistry(cluster) if cluster else CollectorRegistry()
        r = self.registry = registry
        # Coordination
        self.ownership_changes = Counter(
            m.M_CLUSTER_OWNERSHIP_CHANGES_TOTAL, "Lane ownership acquisitions and releases by this node", ["lane"], registry=r
        )
        self.lease_lost = Counter(m.M_CLUSTER_LEASE_LOST_TOTAL, "Leases this node lost (expiry, TTL 0, partition)", registry=r)
        self.applied_revision = UnsetUntilKnownGauge(
            m.M_CLUSTER_ROLLOUT_APPLIED_REVISION, "Rollout document revision this node has applied", r
        )
        self.owned_lanes = Gauge(m.M_CLUSTER_OWNED_LANES, "Lanes this node currently owns", registry=r)
        # Ownership enforcement
        self.lane_decisions = Counter(
            m.M_REDIS_LANE_OWNERSHIP_DECISION_TOTAL, "Fencing guard decisions", ["decision"], registry=r
        )
        self.stale_fencing = Counter(
            m.M_REDIS_LANE_STALE_FENCING_TOTAL, "Lane writes rejected because of a stale fencing token", registry=r
        )
        # Event bus
        self.publish = Counter(m.M_EVENT_BUS_PUBLISH_TOTAL, "Canonical event publishes by outcome", ["status"], registry=r)
        self.publish_retries = Counter(m.M_EVENT_BUS_PUBLISH_RETRIES_TOTAL, "Publish retries", registry=r)
        self.degraded = Gauge(m.M_EVENT_BUS_DEGRADED, "1 while events go to the local outbox", registry=r)
        self.outages = Counter(m.M_EVENT_BUS_OUTAGES_TOTAL, "Event bus outages (entries into degraded mode)", registry=r)
        self.outbox_depth = Gauge(m.M_EVENT_BUS_OUTBOX_DEPTH, "Events waiting in the local outbox", registry=r)
        self.outbox_backpressure = Gauge(
            m.M_EVENT_BUS_OUTBOX_BACKPRESSURE, "1 while the outbox is full and publishers wait (no new tasks)", registry=r
        )
        self.bridge_duplicates = Counter(
            m.M_EVENT_BUS_BRIDGE_DUPLICATES_SUPPRESSED_TOTAL, "Duplicates suppressed by the bridge", registry=r
        )
        self.bridge_ordering_violations = Counter(
            m.M_EVENT_BUS_BRIDGE_ORDERING_VIOLATIONS_TOTAL, "Gaps timed out or out-of-order deliveries", registry=r
        )
        self.consumer_dedup_mismatch = Counter(
            m.M_EVENT_BUS_CONSUMER_DEDUP_MISMATCH_TOTAL,
            "Duplicates the broker should have suppressed that reached the consumer",
            registry=r,
        )
        self.bridge_delivered = Counter(
            m.M_EVENT_BUS_BRIDGE_DELIVERED_TOTAL, "Events delivered to subscribers", ["origin"], registry=r
        )
        self.bad_events = Counter(m.M_EVENT_BUS_BAD_EVENTS_TOTAL, "Undecodable events skipped", ["reason"], registry=r)
        # Signals
        self.signals_routed = Counter(m.M_SIGNALS_ROUTED_TOTAL, "Signals routed to lane owners", ["result"], registry=r)
        # Tasks
        self.tasks = Counter(m.M_CBCTL_TASKS_TOTAL, "Lane tasks processed", ["result"], registry=r)
        self.info = Gauge(m.M_CBCTL_AGENT_INFO, "Constant 1, labelled with the node id", ["node_id"], registry=r)
        self.info.labels(node_id=node_id).set(1)
        for decision in m.DECISIONS:
            self.lane_decisions.labels(decision=decision)
        for status in m.PUBLISH_STATUSES:
            self.publish.labels(status=status)

    def render(self) -> bytes:
        """The text exposition of this registry."""
        return generate_latest(self.registry)
