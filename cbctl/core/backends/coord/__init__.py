"""Coordinator interface and backends. Import backends lazily via :func:`open_coordinator`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cbctl.core.backends.coord.base import KV, Coordinator, Lease, LeaseKeeper, WatchEvent

if TYPE_CHECKING:
    from cbctl.core.model.config import Context

__all__ = ["KV", "Coordinator", "Lease", "LeaseKeeper", "WatchEvent", "make_coordinator"]


def make_coordinator(ctx: Context) -> Coordinator:
    """Build (not connect) the coordinator a context names. Heavy imports happen here."""
    backend = ctx.coordination.backend
    if backend == "etcd":
        from cbctl.core.backends.coord.etcd import EtcdCoordinator

        return EtcdCoordinator.from_context(ctx)
    if backend == "consul":
        from cbctl.core.backends.coord.consul import ConsulCoordinator

        return ConsulCoordinator.from_context(ctx)
    raise ValueError(f"unknown coordination backend {backend!r}")
