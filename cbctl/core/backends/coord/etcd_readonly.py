"""A read-only etcd :class:`~cbctl.core.backends.coord.base.Coordinator` over etcd's JSON gateway.

For one-shot read commands (``stage status``, ``nodes``, ``lanes``): ``get``, ``list``,
``current_revision`` and ``connect`` keep the coordinator contract — the same key-values and
revisions as :class:`~cbctl.core.backends.coord.etcd.EtcdCoordinator`, the same errors, TLS,
user auth and endpoint failover (rules: ``cbctl/core/backends/coord/etcd_gateway.py``) — without
importing grpc, aetcd or tenacity.  Writes, leases and watches raise ``NotImplementedError``: a
command that needs them opens the full coordinator (``make_coordinator(ctx)``).

Each read is one blocking HTTP request made inside the coroutine: the event loop is held for its
duration (bounded by ``timeout``), which a one-shot command running one task at a time does not
notice.  Do not use it in the agent or next to other tasks.

When the gateway refuses a client that gRPC would serve (:class:`GatewayUnsupported`: gateway
disabled, host whitelist, or a client certificate with a CommonName while auth is on), the
coordinator switches for good to an ``EtcdCoordinator`` with the same settings and serves every
read through it (``served_by`` says which path answered).
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from cbctl.core.backends.coord.base import KV, Coordinator, Lease, WatchEvent
from cbctl.core.backends.coord.etcd_gateway import GatewaySession, GatewayUnsupported, RawKV, prefix_range_end
from cbctl.core.model.errors import BackendUnavailable

if TYPE_CHECKING:
    from cbctl.core.model.config import Context, Secret

__all__ = ["EtcdReadOnlyCoordinator"]

log = logging.getLogger(__name__)


def _key(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _kv(raw: RawKV) -> KV:
    """As etcd.py's ``_kv``: keys round-trip even if not UTF-8; lease 0 is None."""
    return KV(key=raw.key.decode("utf-8", "surrogateescape"), value=raw.value, mod_revision=raw.mod_revision,
              create_revision=raw.create_revision, lease=raw.lease or None)


class EtcdReadOnlyCoordinator(Coordinator):
    """Reads of etcd v3 through its JSON gateway; parameters as ``EtcdCoordinator``'s."""

    backend_name = "etcd"

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        username: str | None = None,
        password: Secret | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        probe_key: str = "/cbctl/",
    ) -> None:
        self._settings: dict[str, Any] = dict(timeout=timeout, username=username, password=password,
                                              ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self._endpoint_urls = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self._session = GatewaySession(self._endpoint_urls, **self._settings)
        self._probe = _key(probe_key)
        self._probe_key = probe_key
        self._fallback: Coordinator | None = None
        self._via_grpc = False  # sticky: stays true after close()
        self._closed = False

    @classmethod
    def from_context(cls, ctx: Context) -> EtcdReadOnlyCoordinator:
        """Build from a context; resolves the password reference now (``ConfigError`` if unset)."""
        c = ctx.coordination
        return cls(c.endpoints, timeout=c.timeout, username=c.username,
                   password=c.password.resolve() if c.password else None,
                   ca_file=c.tls.ca_file, cert_file=c.tls.cert_file, key_file=c.tls.key_file,
                   probe_key=ctx.prefix)

    @property
    def served_by(self) -> str:
        """``"gateway"``, or ``"grpc"`` once the coordinator fell back to ``EtcdCoordinator``."""
        return "grpc" if self._via_grpc else "gateway"

    @property
    def endpoints(self) -> list[str]:
        return self._session.endpoints

    async def _use_grpc(self, why: GatewayUnsupported) -> Coordinator:
        from cbctl.core.backends.coord.etcd import EtcdCoordinator

        log.info("etcd JSON gateway refused this client (%s); using gRPC", why)
        self._session.close()
        self._via_grpc = True
        fallback = EtcdCoordinator(self._endpoint_urls, probe_key=self._probe_key, **self._settings)
        await fallback.connect()  # closes what it opened when it fails
        self._fallback = fallback
        return fallback

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("etcd coordinator is closed", backend="etcd")

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Reach one endpoint and read through it; ``BackendUnavailable``/``AuthFailed`` if none."""
        self._closed = False
        try:
            await self.current_revision()
        except BaseException:
            await self.close()
            self._closed = False
            raise

    async def close(self) -> None:
        self._closed = True
        self._session.close()
        fallback, self._fallback = self._fallback, None
        if fallback is not None:
            await fallback.close()

    # -- reads -----------------------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        self._check_open()
        if self._fallback is None:
            try:
                _, kvs = self._session.call(f"get {key!r}", lambda c, d: c.range(_key(key), None, d))
                return _kv(kvs[-1]) if kvs else None
            except GatewayUnsupported as exc:
                await self._use_grpc(exc)
        assert self._fallback is not None
        return await self._fallback.get(key)

    async def list(self, prefix: str) -> builtins.list[KV]:
        """Every key under ``prefix``, sorted by key (etcd sorts bytes = UTF-8 code point order)."""
        self._check_open()
        if self._fallback is None:
            p = _key(prefix)
            try:
                _, kvs = self._session.call(
                    f"list {prefix!r}", lambda c, d: c.range(p, prefix_range_end(p), d, sort_by_key=True))
                return [_kv(kv) for kv in kvs]
            except GatewayUnsupported as exc:
                await self._use_grpc(exc)
        assert self._fallback is not None
        return await self._fallback.list(prefix)

    async def current_revision(self) -> int:
        """Header revision of a linearizable read of ``probe_key`` (a key the user may read)."""
        self._check_open()
        if self._fallback is None:
            try:
                rev, _ = self._session.call("read revision",
                                            lambda c, d: c.range(self._probe, self._probe + b"\0", d))
                return int(rev)
            except GatewayUnsupported as exc:
                await self._use_grpc(exc)
        assert self._fallback is not None
        return await self._fallback.current_revision()

    # -- not offered -----------------------------------------------------------------------

    def _read_only(self, op: str) -> NoReturn:
        raise NotImplementedError(f"{op}: this etcd coordinator is read-only (make_coordinator(ctx, read_only=True)); "
                                  "open the full coordinator to write, hold leases or watch")

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        self._read_only("put")

    async def commit(self, key: str, value: bytes, *, expected_revision: int,
                     also_put: Mapping[str, bytes] | None = None, lease: Lease | None = None) -> int:
        self._read_only("commit")

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        self._read_only("delete")

    async def grant_lease(self, ttl: float) -> Lease:
        self._read_only("grant_lease")

    async def refresh_lease(self, lease: Lease) -> float:
        self._read_only("refresh_lease")

    async def revoke_lease(self, lease: Lease) -> None:
        self._read_only("revoke_lease")

    def watch(self, key: str, *, prefix: bool = False, start_revision: int | None = None) -> AsyncIterator[WatchEvent]:
        self._read_only("watch")
