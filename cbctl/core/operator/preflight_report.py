"""Preflight rows and their containers: :class:`CheckResult`, :class:`PreflightOptions`,
:class:`PreflightReport` (the ``preflight -o json`` shape) and the :class:`StoreSnapshot` the
store-side checks judge. Shared by the checks of :mod:`cbctl.core.operator.preflight_backends` and
:mod:`cbctl.core.operator.preflight_nodes`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cbctl.core.model import metric_names as mn
from cbctl.core.model.errors import BadInput

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import KV

Status = Literal["pass", "warn", "fail"]

CHECK_NAMES: tuple[str, ...] = (
    "etcd", "nats", "redis", "prometheus", "credentials", "nodes", "node-ids", "clock", "lease-timing",
)

#: Metrics the gates and exit criteria read; each must have at least one series in Prometheus.
REQUIRED_METRICS: tuple[str, ...] = (
    mn.M_EVENT_BUS_PUBLISH_TOTAL, mn.M_EVENT_BUS_DEGRADED, mn.M_EVENT_BUS_OUTAGES_TOTAL,
    mn.M_REDIS_LANE_OWNERSHIP_DECISION_TOTAL, mn.M_EVENT_BUS_PUBLISH_RETRIES_TOTAL, mn.M_REDIS_LANE_STALE_FENCING_TOTAL,
    mn.M_EVENT_BUS_OUTBOX_DEPTH, mn.M_EVENT_BUS_BRIDGE_ORDERING_VIOLATIONS_TOTAL,
    mn.M_EVENT_BUS_CONSUMER_DEDUP_MISMATCH_TOTAL, mn.M_CLUSTER_ROLLOUT_APPLIED_REVISION, mn.M_CLUSTER_LEASE_LOST_TOTAL,
)


@dataclass
class CheckResult:
    """One row of the preflight table (and of ``-o json``'s ``checks``)."""

    name: str
    target: str
    node: str | None
    status: Status
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreflightOptions:
    """What to run and how strictly. ``only`` None = every check."""

    only: frozenset[str] | None = None
    skew_warn_ms: float = 50.0
    skew_fail_ms: float = 250.0
    check_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.only is not None:
            unknown = sorted(set(self.only) - set(CHECK_NAMES))
            if unknown:
                raise BadInput(f"--only: unknown check {', '.join(map(repr, unknown))} (known: {', '.join(CHECK_NAMES)})")
        if not 0 < self.skew_warn_ms <= self.skew_fail_ms:
            raise BadInput(
                f"--skew-warn-ms ({self.skew_warn_ms:g}) must be positive and <= --skew-fail-ms ({self.skew_fail_ms:g})"
            )

    def wants(self, name: str) -> bool:
        return self.only is None or name in self.only


@dataclass
class PreflightReport:
    checks: list[CheckResult]
    store_unreachable: str | None = None  # why, when the coordination store could not be read
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.store_unreachable is None and all(c.status != "fail" for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return sorted({c.name for c in self.checks if c.status == "fail"})

    def to_dict(self) -> dict[str, Any]:
        """The ``preflight -o json`` shape (a contract)."""
        return {"ok": self.ok, "checks": [c.to_dict() for c in self.checks]}


@dataclass
class StoreSnapshot:
    """What preflight reads from the coordination store, once, for every node check."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_records: dict[str, str] = field(default_factory=dict)  # node id -> why unreadable
    conflicts: list[KV] = field(default_factory=list)
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema_versions: tuple[int, ...] = (1,)
    now: float = 0.0


def row(name: str, target: str, status: Status, detail: str, node: str | None = None) -> CheckResult:
    return CheckResult(name, target, node, status, detail)


def fmt_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n}"
