"""Every metric name the node agent exports, and the label values the operator side selects on.

Contract: these names are what Prometheus stores and what gates, preflight and exit criteria
query; changing one breaks every dashboard and gate. The exporter
(cbctl/core/model/metrics.py) and every query use these constants. Standard library only, so
the operator side imports them without prometheus_client. Counter names include ``_total``,
as queried.
"""

from typing import Final

# -- coordination ---------------------------------------------------------------------------
M_CLUSTER_OWNERSHIP_CHANGES_TOTAL: Final = "cluster_ownership_changes_total"  # label: lane
M_CLUSTER_LEASE_LOST_TOTAL: Final = "cluster_lease_lost_total"
M_CLUSTER_ROLLOUT_APPLIED_REVISION: Final = "cluster_rollout_applied_revision"  # absent until applied
M_CLUSTER_OWNED_LANES: Final = "cluster_owned_lanes"

# -- ownership enforcement (the fencing guard) ----------------------------------------------
M_REDIS_LANE_OWNERSHIP_DECISION_TOTAL: Final = "redis_lane_ownership_decision_total"  # label: decision
M_REDIS_LANE_STALE_FENCING_TOTAL: Final = "redis_lane_stale_fencing_total"

# -- event bus --------------------------------------------------------------------------------
M_EVENT_BUS_PUBLISH_TOTAL: Final = "event_bus_publish_total"  # label: status
M_EVENT_BUS_PUBLISH_RETRIES_TOTAL: Final = "event_bus_publish_retries_total"
M_EVENT_BUS_DEGRADED: Final = "event_bus_degraded"
M_EVENT_BUS_OUTAGES_TOTAL: Final = "event_bus_outages_total"
M_EVENT_BUS_OUTBOX_DEPTH: Final = "event_bus_outbox_depth"
M_EVENT_BUS_OUTBOX_BACKPRESSURE: Final = "event_bus_outbox_backpressure"
M_EVENT_BUS_BRIDGE_DUPLICATES_SUPPRESSED_TOTAL: Final = "event_bus_bridge_duplicates_suppressed_total"
M_EVENT_BUS_BRIDGE_ORDERING_VIOLATIONS_TOTAL: Final = "event_bus_bridge_ordering_violations_total"
M_EVENT_BUS_CONSUMER_DEDUP_MISMATCH_TOTAL: Final = "event_bus_consumer_dedup_mismatch_total"
M_EVENT_BUS_BRIDGE_DELIVERED_TOTAL: Final = "event_bus_bridge_delivered_total"  # label: origin
M_EVENT_BUS_BAD_EVENTS_TOTAL: Final = "event_bus_bad_events_total"  # label: reason

# -- signals and tasks ------------------------------------------------------------------------
M_SIGNALS_ROUTED_TOTAL: Final = "signals_routed_total"  # label: result
M_CBCTL_TASKS_TOTAL: Final = "cbctl_tasks_total"  # label: result
#: Constant 1 labelled node_id; exported by every agent from its start (the scrape marker).
M_CBCTL_AGENT_INFO: Final = "cbctl_agent_info"

#: Every exported name, in exporter order.
ALL_METRICS: Final[tuple[str, ...]] = (
    M_CLUSTER_OWNERSHIP_CHANGES_TOTAL, M_CLUSTER_LEASE_LOST_TOTAL, M_CLUSTER_ROLLOUT_APPLIED_REVISION,
    M_CLUSTER_OWNED_LANES, M_REDIS_LANE_OWNERSHIP_DECISION_TOTAL, M_REDIS_LANE_STALE_FENCING_TOTAL,
    M_EVENT_BUS_PUBLISH_TOTAL, M_EVENT_BUS_PUBLISH_RETRIES_TOTAL, M_EVENT_BUS_DEGRADED, M_EVENT_BUS_OUTAGES_TOTAL,
    M_EVENT_BUS_OUTBOX_DEPTH, M_EVENT_BUS_OUTBOX_BACKPRESSURE, M_EVENT_BUS_BRIDGE_DUPLICATES_SUPPRESSED_TOTAL,
    M_EVENT_BUS_BRIDGE_ORDERING_VIOLATIONS_TOTAL, M_EVENT_BUS_CONSUMER_DEDUP_MISMATCH_TOTAL,
    M_EVENT_BUS_BRIDGE_DELIVERED_TOTAL, M_EVENT_BUS_BAD_EVENTS_TOTAL, M_SIGNALS_ROUTED_TOTAL, M_CBCTL_TASKS_TOTAL,
    M_CBCTL_AGENT_INFO,
)

# -- label values the operator side selects on ------------------------------------------------
#: redis_lane_ownership_decision_total{decision=...}; all three exported from the start.
DECISION_ALLOW: Final = "allow"
DECISION_DENY: Final = "deny"
DECISION_WOULD_DENY: Final = "would_deny"
DECISIONS: Final = (DECISION_ALLOW, DECISION_DENY, DECISION_WOULD_DENY)

#: event_bus_publish_total{status=...}; all four exported from the start.
PUBLISH_STATUS_OK: Final = "ok"
PUBLISH_STATUS_DUPLICATE: Final = "duplicate"
PUBLISH_STATUS_ERROR: Final = "error"
PUBLISH_STATUS_BUFFERED: Final = "buffered"
PUBLISH_STATUSES: Final = (PUBLISH_STATUS_OK, PUBLISH_STATUS_DUPLICATE, PUBLISH_STATUS_ERROR, PUBLISH_STATUS_BUFFERED)

#: event_bus_bridge_delivered_total{origin=...}: the event was published by this node or another.
ORIGIN_LOCAL: Final = "local"
ORIGIN_REMOTE: Final = "remote"

__all__ = [name for name in dir() if name.isupper()]
