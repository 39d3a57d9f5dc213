"""The coordinator interface: the one abstraction over etcd and Consul.

Shape borrowed from Patroni's ``AbstractDCS``: shared logic (lease keeper, JSON helpers,
key layout) lives here in public methods; each backend fills in small primitives.

Contract for every backend:

* Values are bytes; keys are ``str`` paths such as ``/cbctl/<cluster>/rollout``.
* Every read returns a frozen :class:`KV` carrying ``mod_revision``: the opaque version a
  caller hands back for compare-and-swap.  ``mod_revision`` and ``create_revision`` are
  store-wide, strictly increasing and never reused (etcd revision, Consul ModifyIndex), so the
  ``create_revision`` of an ownership key is a valid fencing token.
* ``commit`` is the only multi-key write and is transactional: either the guarded key still has
  the expected revision and every put happens, or nothing is written and :class:`Conflict` is
  raised.
* Any failure to reach the store raises :class:`BackendUnavailable` (``AuthFailed`` for
  refused credentials); a lease that is gone raises :class:`LeaseLost`.  No gRPC/HTTP exception
  escapes a backend.
* ``watch`` yields events in revision order, resumes by itself from ``last revision + 1`` after
  the member it talks to dies, and only raises ``BackendUnavailable`` when no member answers
  within the backend's reconnect deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cbctl.core.model.errors import BackendUnavailable, LeaseLost

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KV:
    """One key as read from the store, with the versions needed for CAS and fencing."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int | str | None = None

    def json(self) -> Any:
        """Decode the value as UTF-8 JSON."""
        return json.loads(self.value.decode("utf-8"))


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change seen by a watch. ``value`` is empty for deletes."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


@dataclass(slots=True)
class Lease:
    """A granted lease. ``id`` is the backend's lease/session id; ``ttl`` the granted seconds.

    ``granted_at``: the event loop's clock (``loop.time()``) when the grant request was *sent*,
    or None when unknown.  The store starts the TTL at some point after that, so counting the
    TTL from ``granted_at`` never overestimates how long the lease lives: :class:`LeaseKeeper`
    counts its deadline from here, not from when it started (registering in between can take a
    while on a slow store).
    """

    id: int | str
    ttl: float
    granted_at: float | None = None


class Coordinator(ABC):
    """Async client of a coordination store (etcd or Consul). See the module docstring."""

    backend_name: str = "abstract"

    # -- lifecycle ---------------------------------------------------------------------
    @abstractmethod
    async def connect(self) -> None:
        """Open connections; raise ``BackendUnavailable`` if no endpoint answers."""

    @abstractmethod
    async def close(self) -> None:
        """Close connections. Idempotent."""

    async def __aenter__(self) -> Coordinator:
        try:
            await self.connect()
        except BaseException:
            await self.close()  # a half-open connect must not leak channels or sessions
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reads -------------------------------------------------------------------------
    @abstractmethod
    async def get(self, key: str) -> KV | None:
        """The key, or None when absent."""

    @abstractmethod
    async def list(self, prefix: str) -> list[KV]:
        """Every key under ``prefix``, sorted by key."""

    @abstractmethod
    async def current_revision(self) -> int:
        """The store's current revision (etcd header revision, Consul X-Consul-Index)."""

    # -- writes ------------------------------------------------------------------------
    @abstractmethod
    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        """Unconditional put; returns the new revision."""

    @abstractmethod
    async def commit(
        self,
        key: str,
        value: bytes,
        *,
        expected_revision: int,
        also_put: Mapping[str, bytes] | None = None,
        lease: Lease | None = None,
    ) -> int:
        """Compare-and-swap ``key`` on its ``mod_revision`` and put ``also_put`` atomically.

        ``expected_revision == 0`` means the key must not exist (create).  Returns the new
        revision.  Raises ``Conflict`` (carrying the current revision) and writes nothing when
        the key's revision differs.  ``lease`` attaches to ``key`` only.
        """

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        """Create-if-absent. Raises ``Conflict`` if the key exists."""
        return await self.commit(key, value, expected_revision=0, lease=lease)

    @abstractmethod
    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        """Delete ``key`` (only if at ``expected_revision`` when given). True if deleted."""

    # -- leases ------------------------------------------------------------------------
    @abstractmethod
    async def grant_lease(self, ttl: float) -> Lease:
        """Grant a lease of ``ttl`` seconds."""

    @abstractmethod
    async def refresh_lease(self, lease: Lease) -> float:
        """Keep the lease alive once; return the remaining TTL.

        Raises ``LeaseLost`` when the lease is gone — including etcd's refresh that answers
        TTL 0 without error after expiry.
        """

    @abstractmethod
    async def revoke_lease(self, lease: Lease) -> None:
        """Revoke the lease (its keys are deleted). Absent lease is not an error."""

    # -- watch -------------------------------------------------------------------------
    @abstractmethod
    def watch(self, key: str, *, prefix: bool = False, start_revision: int | None = None) -> AsyncIterator[WatchEvent]:
        """Changes to ``key`` (or every key under it when ``prefix``) from ``start_revision``.

        etcd: resumes after a member failure from the last delivered revision, so no event is
        delivered twice or skipped.  Consul (blocking queries): changes between two polls are
        merged (a key written twice may show once).  Cancel the consuming task to stop.
        """

    # -- shared helpers ----------------------------------------------------------------
    async def get_json(self, key: str) -> tuple[Any, int] | None:
        """(decoded JSON, mod_revision) or None."""
        kv = await self.get(key)
        return None if kv is None else (kv.json(), kv.mod_revision)

    def keep_alive(
        self,
        lease: Lease,
        *,
        interval: float,
        on_lost: Callable[[LeaseLost | BackendUnavailable], None] | None = None,
    ) -> LeaseKeeper:
        """Start a :class:`LeaseKeeper` for ``lease`` on the running loop."""
        keeper = LeaseKeeper(self, lease, interval=interval, on_lost=on_lost)
        keeper.start()
        return keeper


@dataclass(eq=False)
class LeaseKeeper:
    """Refreshes a lease every ``interval`` seconds and declares it lost conservatively.

    The lease is declared lost (``lost`` set, ``on_lost`` called once, task ends) when:

    * a refresh raises ``LeaseLost`` (gone, or TTL 0), or
    * no refresh has succeeded for longer than ``ttl - interval`` — that is, before the store
      itself could expire it, so the holder stops work *before* anyone else can own the lease.

    The clock of that deadline starts at the lease's grant (``Lease.granted_at``, else when the
    keeper starts) and is moved forward only to the moment a successful refresh was *sent*:
    the store renewed the TTL no earlier than that, so counting from the reply (or from after
    the registration that follows the grant) would let the holder work past the real expiry.

    Transient ``BackendUnavailable`` errors are retried until that deadline.
    """

    coord: Coordinator
    lease: Lease
    interval: float
    on_lost: Callable[[LeaseLost | BackendUnavailable], None] | None = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    reason: LeaseLost | BackendUnavailable | None = None
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lease-keeper-{self.lease.id}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        granted = self.lease.granted_at
        last_ok = granted if granted is not None and granted <= loop.time() else loop.time()
        # Stop strictly before the store can expire the lease: one interval of margin.
        deadline_span = max(self.lease.ttl - self.interval, self.interval)
        while True:
            sent = loop.time()
            try:
                ttl = await asyncio.wait_for(self.coord.refresh_lease(self.lease), timeout=self.interval)
                if ttl <= 0:
                    raise LeaseLost(f"lease {self.lease.id} expired (TTL 0)", lease_id=None)
                last_ok = sent  # the store renewed the TTL no earlier than this
            except LeaseLost as exc:
                self._declare_lost(exc)
                return
            except (BackendUnavailable, asyncio.TimeoutError) as exc:
                if loop.time() - last_ok >= deadline_span:
                    self._declare_lost(
                        LeaseLost(f"lease {self.lease.id}: no successful keep-alive for {deadline_span:.1f}s ({exc})")
                    )
                    return
                log.warning("keep-alive of lease %s failed, retrying: %s", self.lease.id, str(exc) or "no answer within the interval")
            await asyncio.sleep(min(self.interval, max(0.05, deadline_span - (loop.time() - last_ok))))

    def _declare_lost(self, exc: LeaseLost | BackendUnavailable) -> None:
        self.reason = exc
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost(exc)

    async def stop(self, timeout: float = 2.0) -> None:
        """Stop refreshing (does not revoke); waits at most ``timeout`` seconds for the task.

        Bounded because a refresh in flight against a frozen store may not end at once; the
        task is cancelled either way and left to finish on its own.
        """
        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.wait({task}, timeout=timeout)
