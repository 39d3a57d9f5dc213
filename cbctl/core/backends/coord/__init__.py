"""Coordinator interface and backends. Backends are built (and imported) by :func:`make_coordinator`.

The interface names (``KV``, ``Coordinator``, ...) are loaded from ``base.py`` on first use, not
with the package: ``base.py`` imports asyncio, which the completion path
(``coord/peek.py``, ``coord/etcd_gateway.py``) must not load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import KV, Coordinator, Lease, LeaseKeeper, WatchEvent
    from cbctl.core.model.config import Context

__all__ = ["KV", "Coordinator", "Lease", "LeaseKeeper", "WatchEvent", "make_coordinator"]


def make_coordinator(ctx: Context, *, read_only: bool = False) -> Coordinator:
    """Build (not connect) the coordinator a context names. Heavy imports happen here.

    ``read_only``: the caller only calls ``get``/``list``/``current_revision`` (a one-shot read
    command). For etcd that is :class:`~cbctl.core.backends.coord.etcd_readonly.EtcdReadOnlyCoordinator`
    (JSON gateway over the standard library: no grpc/aetcd/tenacity import; same results and
    errors); Consul ignores it.
    """
    backend = ctx.coordination.backend
    if backend == "etcd" and read_only:
        from cbctl.core.backends.coord.etcd_readonly import EtcdReadOnlyCoordinator

        return EtcdReadOnlyCoordinator.from_context(ctx)
    if backend == "etcd":
        from cbctl.core.backends.coord.etcd import EtcdCoordinator

        return EtcdCoordinator.from_context(ctx)
    if backend == "consul":
        from cbctl.core.backends.coord.consul import ConsulCoordinator

        return ConsulCoordinator.from_context(ctx)
    raise ValueError(f"unknown coordination backend {backend!r}")


def __getattr__(name: str) -> Any:
    """``KV``, ``Coordinator``, ``Lease``, ``LeaseKeeper``, ``WatchEvent`` from ``base.py``, lazily."""
    if name in ("KV", "Coordinator", "Lease", "LeaseKeeper", "WatchEvent"):
        from cbctl.core.backends.coord import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
