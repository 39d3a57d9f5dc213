"""The agent's Prometheus metrics. Names are a contract (README.md, and the tables in
``cbctl/core/operator/gates.py`` and ``cbctl/core/operator/preflight.py`` that query them).

Each :class:`AgentMetrics` owns its own ``CollectorRegistry`` so that several agents can live in
one process (tests, benchmarks) without colliding in the global registry.  Only
``prometheus_client`` is imported here: it is light and needed by every agent.

Every exported series carries the agent's cluster as the label ``cluster`` (added at
exposition by :class:`ClusterRegistry`, so no call site has to pass it): gates, ``watch`` and
``exit-criteria`` select their cluster's series with it, and one Prometheus can scrape several
clusters' agents without mixing their verdicts.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

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
            "cluster_ownership_changes_total", "Lane ownership acquisitions and releases by this node", ["lane"], registry=r
        )
        self.lease_lost = Counter("cluster_lease_lost_total", "Leases this node lost (expiry, TTL 0, partition)", registry=r)
        self.applied_revision = UnsetUntilKnownGauge(
            "cluster_rollout_applied_revision", "Rollout document revision this node has applied", r
        )
        self.owned_lanes = Gauge("cluster_owned_lanes", "Lanes this node currently owns", registry=r)
        # Ownership enforcement
        self.lane_decisions = Counter(
            "redis_lane_ownership_decision_total", "Fencing guard decisions", ["decision"], registry=r
        )
        self.stale_fencing = Counter(
            "redis_lane_stale_fencing_total", "Lane writes rejected because of a stale fencing token", registry=r
        )
        # Event bus
        self.publish = Counter("event_bus_publish_total", "Canonical event publishes by outcome", ["status"], registry=r)
        self.publish_retries = Counter("event_bus_publish_retries_total", "Publish retries", registry=r)
        self.degraded = Gauge("event_bus_degraded", "1 while events go to the local outbox", registry=r)
        self.outages = Counter("event_bus_outages_total", "Event bus outages (entries into degraded mode)", registry=r)
        self.outbox_depth = Gauge("event_bus_outbox_depth", "Events waiting in the local outbox", registry=r)
        self.outbox_backpressure = Gauge(
            "event_bus_outbox_backpressure", "1 while the outbox is full and publishers wait (no new tasks)", registry=r
        )
        self.bridge_duplicates = Counter(
            "event_bus_bridge_duplicates_suppressed_total", "Duplicates suppressed by the bridge", registry=r
        )
        self.bridge_ordering_violations = Counter(
            "event_bus_bridge_ordering_violations_total", "Gaps timed out or out-of-order deliveries", registry=r
        )
        self.consumer_dedup_mismatch = Counter(
            "event_bus_consumer_dedup_mismatch_total",
            "Duplicates the broker should have suppressed that reached the consumer",
            registry=r,
        )
        self.bridge_delivered = Counter(
            "event_bus_bridge_delivered_total", "Events delivered to subscribers", ["origin"], registry=r
        )
        self.bad_events = Counter("event_bus_bad_events_total", "Undecodable events skipped", ["reason"], registry=r)
        # Signals
        self.signals_routed = Counter("signals_routed_total", "Signals routed to lane owners", ["result"], registry=r)
        # Tasks
        self.tasks = Counter("cbctl_tasks_total", "Lane tasks processed", ["result"], registry=r)
        self.info = Gauge("cbctl_agent_info", "Constant 1, labelled with the node id", ["node_id"], registry=r)
        self.info.labels(node_id=node_id).set(1)
        for decision in ("allow", "deny", "would_deny"):
            self.lane_decisions.labels(decision=decision)
        for status in ("ok", "duplicate", "error", "buffered"):
            self.publish.labels(status=status)

    def render(self) -> bytes:
        """The text exposition of this registry."""
        return generate_latest(self.registry)
