"""etcd backend of :class:`~cbctl.core.backends.coord.base.Coordinator` (aetcd 1.0, asyncio gRPC).

Every primitive is one or two aetcd calls run through the shared failover loop
(:class:`~cbctl.core.backends.coord.failover.FailoverCoordinator`); :class:`_EtcdErrors` is the one
converter of aetcd/gRPC exceptions into cbctl errors, used by the watch iterator too.  Writes are
retried on another member only when the failure proves the request never reached a server.
Failover rules and the aetcd 1.0 sharp edges handled here: docs/backends.md.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import aetcd
import grpc
from aetcd import rpc, transactions, watcher
from aetcd.utils import prefix_range_end

from cbctl.core.backends.coord.base import KV, Lease, WatchEvent
# The error-detail marker tables are shared with the JSON-gateway client, which must stay free of
# aetcd and grpc (cbctl/core/backends/coord/etcd_gateway.py): one table, two transports.
from cbctl.core.backends.coord.etcd_gateway import _AUTH_MARKERS, _REAUTH_MARKERS, _TLS_HINT, _TLS_MARKERS
from cbctl.core.backends.coord.failover import (
    WATCH_RESUME,
    ErrorEdge,
    FailoverCoordinator,
    ReauthNeeded,
    Unreachable,
)
from cbctl.core.backends.retry import Backoff
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, CbctlError, ConfigError, Conflict, LeaseLost

if TYPE_CHECKING:
    from cbctl.core.model.config import Context, Secret

__all__ = ["EtcdCoordinator", "RevisionCompacted"]

log = logging.getLogger(__name__)

BACKEND = "etcd"

# gRPC channel options, per endpoint.
_CHANNEL_OPTIONS: dict[str, int] = {
    # gRPC's default reconnect backoff grows to 120 s: a member that comes back would be ignored
    # for minutes.  Keep it short; a connection attempt to a loopback/LAN member is cheap.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    # A long-lived watch on a member that stops answering (SIGSTOP, partition) is only noticed by
    # keep-alive pings.  etcd answers pings more often than every 5 s (--grpc-keepalive-min-time)
    # with GOAWAY, so 6 s; keep pinging on an idle stream (the default stops after 2); and the
    # ping's timeout is ping_timeout_ms in grpcio 1.85 (default 60 s: keepalive_timeout_ms alone
    # was measured not to apply).  A frozen member's watch resumes elsewhere after ~10 s.
    "grpc.keepalive_time_ms": 6_000,
    "grpc.keepalive_timeout_ms": 4_000,
    "grpc.http2.ping_timeout_ms": 4_000,
    "grpc.http2.max_pings_without_data": 0,
}

# Details proving the request never reached a server, so even a write may be sent elsewhere.
_NOT_SENT_MARKERS = ("failed to connect to all addresses", "connection refused", "etcdserver: no leader")


class RevisionCompacted(CbctlError):
    """A watch's start revision is older than etcd's compaction point: history is gone.

    The caller must re-read the state (``get``/``list``) and watch from the revision it read.
    """

    exit_code = 1

    def __init__(self, message: str, *, compacted_revision: int) -> None:
        super().__init__(message)
        self.compacted_revision = compacted_revision


def _unreachable(message: str, *, maybe_applied: bool) -> Unreachable:
    return Unreachable(message, backend=BACKEND, maybe_applied=maybe_applied)


def _grpc_status(exc: BaseException) -> tuple[grpc.StatusCode | None, str]:
    """(gRPC code, details) of an aetcd or gRPC error; aetcd keeps the gRPC error as __cause__."""
    src = exc if isinstance(exc, grpc.aio.AioRpcError) else exc.__cause__
    if isinstance(src, grpc.aio.AioRpcError):
        return src.code(), src.details() or ""
    return None, str(exc)


def _convert(exc: BaseException, what: str) -> CbctlError:
    """Map one aetcd/gRPC/timeout exception to the cbctl error a caller can act on."""
    if isinstance(exc, aetcd.RevisionCompactedError):
        return RevisionCompacted(
            f"etcd {what}: {exc}; re-read and watch from a newer revision",
            compacted_revision=exc.compacted_revision,
        )
    if isinstance(exc, TimeoutError):
        return _unreachable(f"etcd {what}: no answer in time", maybe_applied=True)
    if isinstance(exc, aetcd.WatchTimeoutError):
        return _unreachable(f"etcd {what}: watch not created in time", maybe_applied=False)
    code, details = _grpc_status(exc)
    low = details.lower()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or any(
        m in low for m in _AUTH_MARKERS
    ):
        if any(m in low for m in _REAUTH_MARKERS):
            return ReauthNeeded(f"etcd {what}: {details}", backend=BACKEND)
        if "user name is empty" in low:  # etcd's words for "auth is on and you sent no credentials"
            details += " (authentication required: set coordination.username and password-env or password-file)"
        return AuthFailed(f"etcd {what}: {details}", backend=BACKEND)
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in low:
        return LeaseLost(f"etcd {what}: {details}")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return BadInput(f"etcd rejected {what}: {details}")
    if isinstance(exc, grpc.aio.UsageError):  # e.g. RPC on a channel closed under us
        return _unreachable(f"etcd {what}: {exc}", maybe_applied=False)
    if any(m in low for m in _TLS_MARKERS):  # gRPC's words say little about the likely cause
        details += _TLS_HINT
    not_sent = code == grpc.StatusCode.UNAVAILABLE and any(m in low for m in _NOT_SENT_MARKERS)
    return _unreachable(f"etcd {what}: {details or type(exc).__name__}", maybe_applied=not not_sent)


# What the converter takes; anything else (our own errors, CancelledError, bugs) passes through.
_SOURCE_ERRORS = (aetcd.ClientError, grpc.RpcError, grpc.aio.BaseError, TimeoutError)


class _EtcdErrors(ErrorEdge):
    """``with _EtcdErrors(what):`` — the one edge where aetcd/gRPC exceptions become cbctl errors."""

    __slots__ = ()
    sources = _SOURCE_ERRORS
    convert = staticmethod(_convert)


class _Client(aetcd.Client):
    """``aetcd.Client`` plus TLS and re-authentication (aetcd 1.0 has neither).

    ``connect`` mirrors aetcd 1.0's (same attributes), opening a secure channel when
    ``credentials`` is given and closing the channel again if authentication fails.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None,
        password: str | None,
        timeout: float,
        credentials: grpc.ChannelCredentials | None,
    ) -> None:
        super().__init__(host=host, port=port, username=username, password=password,
                         timeout=timeout, options=_CHANNEL_OPTIONS)
        self._credentials = credentials
        self.auth_lock = asyncio.Lock()
        self.token_generation = 0

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]  # another task is connecting: wait
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            if self._credentials is not None:
                self.channel = rpc.secure_channel(target, self._credentials, options=options)
            else:
                self.channel = rpc.insecure_channel(target, options=options)
            try:
                if self._username is not None:
                    await self._authenticate()
            except BaseException:
                await self.channel.close()
                self._init_channel_attrs()
                raise
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)  # type: ignore[has-type]
            self._connected.set()
        finally:
            self._is_connecting = False

    async def _authenticate(self) -> None:
        self.auth_stub = rpc.AuthStub(self.channel)
        resp = await self.auth_stub.Authenticate(
            rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout
        )
        self.metadata = (("token", resp.token),)
        if self._watcher is not None:
            self._watcher._metadata = self.metadata  # new watch streams carry the new token
        self.token_generation += 1

    async def reauthenticate(self, seen_generation: int) -> None:
        """Fetch a new token unless another task already did since ``seen_generation``."""
        async with self.auth_lock:
            if self.token_generation == seen_generation and self._connected.is_set():
                await self._authenticate()


def _read_pem(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"etcd TLS {what} {path}: {exc.strerror}") from None


def _kv(kv: Any) -> KV:
    """aetcd/protobuf KeyValue -> our frozen KV (keys round-trip even if not UTF-8)."""
    return KV(
        key=kv.key.decode("utf-8", "surrogateescape"),
        value=bytes(kv.value),
        mod_revision=kv.mod_revision,
        create_revision=kv.create_revision,
        lease=kv.lease or None,
    )


def _key(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


class EtcdCoordinator(FailoverCoordinator[_Client]):
    """Coordinator on etcd v3 (failover and error rules: docs/backends.md).

    ``endpoints``: ``http(s)://host:port`` URLs of the members (all http or all https).
    ``timeout``: deadline of each call in seconds, failover included.
    ``username``/``password``: etcd user auth (both or neither).
    ``ca_file``/``cert_file``/``key_file``: TLS for https endpoints (CA; client cert and key).
    ``reconnect_deadline``: how long a watch keeps trying to resume while no member answers
    before it raises :class:`BackendUnavailable` (default ``2 * timeout``).
    ``probe_key``: key read by :meth:`current_revision`; must be readable by ``username``.
    """

    backend_name = BACKEND
    errors = _EtcdErrors
    http_port = https_port = 2379
    shared_deadline = True
    # A caller that cancels an RPC that has been running this long (LeaseKeeper's per-refresh
    # timeout, a CLI deadline) has found the member slow: the next call goes to another endpoint.
    slow_rpc = 0.5

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
        reconnect_deadline: float | None = None,
        probe_key: str = "/cbctl/",
    ) -> None:
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        super().__init__(endpoints, timeout=timeout, cert_file=cert_file, key_file=key_file,
                         reconnect_deadline=reconnect_deadline)
        if (username is None) != (password is None):
            raise ConfigError("etcd auth: a username needs a password (password-env or password-file), and vice versa")
        self._username = username
        self._password = password
        self._probe = _key(probe_key)
        self._credentials: grpc.ChannelCredentials | None = None

    def _check_endpoints(self) -> None:
        schemes = {ep.tls for ep in self._endpoints}
        if len(schemes) > 1:
            raise ConfigError("etcd endpoints mix http:// and https://; use one scheme")
        self._tls = schemes == {True}
        if not self._tls and (self._ca_file or self._cert_file or self._key_file):
            raise ConfigError("etcd TLS files are configured but the endpoints are http://; use https://")

    @classmethod
    def from_context(cls, ctx: Context) -> EtcdCoordinator:
        """Build from a context; resolves the password reference now (``ConfigError`` if unset)."""
        c = ctx.coordination
        return cls(
            c.endpoints,
            timeout=c.timeout,
            username=c.username,
            password=c.password.resolve() if c.password else None,
            ca_file=c.tls.ca_file,
            cert_file=c.tls.cert_file,
            key_file=c.tls.key_file,
            probe_key=ctx.prefix,
        )

    # -- plumbing ------------------------------------------------------------------------------

    def _new_client(self, idx: int) -> _Client:
        if self._tls and self._credentials is None:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(self._ca_file, "ca-file"),
                private_key=_read_pem(self._key_file, "key-file"),
                certificate_chain=_read_pem(self._cert_file, "cert-file"),
            )
        ep = self._endpoints[idx]
        return _Client(
            ep.host,
            ep.port,
            username=self._username,
            password=self._password.reveal() if self._password is not None else None,
            timeout=self._timeout,
            credentials=self._credentials,
        )

    def _auth_generation(self, client: _Client) -> int:
        return client.token_generation

    async def _reauthenticate(self, client: _Client, seen_generation: int, url: str, budget: float) -> None:
        with _EtcdErrors(f"re-authentication at {url}"):
            async with asyncio.timeout(budget):
                await client.reauthenticate(seen_generation)

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        got = await self._call(f"get {key!r}", lambda c: c.get(_key(key)), idempotent=True)
        return None if got is None else _kv(got)

    async def list(self, prefix: str) -> list[KV]:
        """Every key under ``prefix``, sorted by key (etcd sorts bytes = UTF-8 code point order)."""
        rng = await self._call(
            f"list {prefix!r}", lambda c: c.get_prefix(_key(prefix), sort_order="ascend", sort_target="key"),
            idempotent=True,
        )
        return [_kv(kv) for kv in rng.kvs]

    async def current_revision(self) -> int:
        """Header revision of a linearizable read of ``probe_key`` (a key the user may read)."""
        rng = await self._call(
            "read revision", lambda c: c.get_range(self._probe, self._probe + b"\0"), idempotent=True
        )
        return int(rng.header.revision)

    # -- writes --------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        lease_id = int(lease.id) if lease is not None else None
        resp = await self._call(f"put {key!r}", lambda c: c.put(_key(key), value, lease=lease_id), idempotent=False)
        return int(resp.header.revision)

    async def commit(
        self,
        key: str,
        value: bytes,
        *,
        expected_revision: int,
        also_put: Mapping[str, bytes] | None = None,
        lease: Lease | None = None,
    ) -> int:
        """One etcd transaction: compare ``key``'s mod_revision (create_revision == 0 for a
        create), then put ``key`` (with ``lease``) and ``also_put``; on mismatch read the key's
        current mod_revision in the same transaction and raise ``Conflict`` with it."""
        k = _key(key)
        if expected_revision == 0:
            compare = [transactions.Create(k) == 0]
        else:
            compare = [transactions.Mod(k) == expected_revision]
        success = [transactions.Put(k, value, lease=int(lease.id) if lease is not None else None)]
        success += [transactions.Put(_key(ok), ov) for ok, ov in (also_put or {}).items()]
        failure = [transactions.Get(k)]  # aetcd 1.0 needs failure as a list anyway

        ok, responses = await self._call(
            f"commit {key!r}", lambda c: c.transaction(compare, success, failure), idempotent=False
        )
        if ok:
            return int(responses[0].response_put.header.revision)
        current = responses[0][0][1].mod_revision if responses and responses[0] else 0
        raise Conflict(
            f"{key} changed: expected revision {expected_revision}, found {current or 'no key'}",
            key=key,
            current_revision=current,
        )

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        k = _key(key)
        if expected_revision is None:
            resp = await self._call(f"delete {key!r}", lambda c: c.delete(k), idempotent=False)
            return resp is not None
        ok, responses = await self._call(
            f"delete {key!r}",
            lambda c: c.transaction([transactions.Mod(k) == expected_revision], [transactions.Delete(k)], []),
            idempotent=False,
        )
        return bool(ok and responses and responses[0].response_delete_range.deleted)

    # -- leases --------------------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> Lease:
        """Grant ``ceil(ttl)`` seconds; the returned ``ttl`` is what etcd granted (it may raise a
        TTL below its minimum).  Retried like a read: a lease granted twice just expires unused."""
        sent = asyncio.get_running_loop().time()  # the TTL starts no earlier (see Lease.granted_at)
        granted = await self._call("grant lease", lambda c: c.lease(max(1, math.ceil(ttl))), idempotent=True)
        return Lease(id=int(granted.id), ttl=float(granted.ttl), granted_at=sent)

    async def refresh_lease(self, lease: Lease) -> float:
        lease_id = int(lease.id)
        reply = await self._call(
            f"keep-alive of lease {lease_id}", lambda c: c.refresh_lease(lease_id), idempotent=True
        )
        if reply is None or reply.TTL <= 0:
            raise LeaseLost(f"etcd lease {lease_id} has expired (keep-alive answered TTL 0)", lease_id=lease_id)
        return float(reply.TTL)

    async def revoke_lease(self, lease: Lease) -> None:
        lease_id = int(lease.id)
        with contextlib.suppress(LeaseLost):  # already gone: that is what revoking wanted
            await self._call(f"revoke lease {lease_id}", lambda c: c.revoke_lease(lease_id), idempotent=True)

    # -- watch ---------------------------------------------------------------------------------

    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Events for ``key`` (or the prefix) from ``start_revision`` (default: the changes made
        after iteration starts — pass a revision you read to close that gap).

        On a member failure it resumes on the next endpoint from the revision of the last
        delivered event, skipping the events of that revision it already delivered (a
        transaction writes several keys at one revision).  Raises ``BackendUnavailable`` after
        ``reconnect_deadline`` seconds without any member accepting the watch, ``AuthFailed``
        when the user may not read the key, ``RevisionCompacted`` when the history is gone.
        """
        self._check_open()
        k = _key(key)
        range_end = prefix_range_end(k) if prefix else None
        if start_revision is None:
            start_revision = await self.current_revision() + 1
        last_rev: int | None = None  # revision of the last delivered event
        delivered_at_last = 0  # how many events of last_rev were delivered
        resume = Backoff(WATCH_RESUME, give_up_after=self._reconnect_deadline,
                         clock=asyncio.get_running_loop().time)
        reauthenticated = False
        while not self._closed:
            idx = self._current
            client = self._client(idx)
            what = f"watch {key!r} at {self._endpoints[idx].url}"
            from_rev = last_rev if last_rev is not None else start_revision
            to_skip = delivered_at_last if last_rev is not None else 0
            generation = client.token_generation
            try:
                with _EtcdErrors(what):
                    async with asyncio.timeout(self._timeout):
                        w = await client.watch(k, range_end=range_end, start_revision=from_rev)
                try:
                    if w.watch_id is not None and w.watch_id < 0:
                        # etcd 3.4 creates-and-cancels a watch the user may not read.
                        raise AuthFailed(f"etcd {what}: permission denied", backend=BACKEND)
                    resume.reset()
                    reauthenticated = False
                    with _EtcdErrors(what):
                        async for ev in w:
                            rev = ev.kv.mod_revision
                            if to_skip and rev == last_rev:
                                to_skip -= 1
                                continue
                            if rev == last_rev:
                                delivered_at_last += 1
                            else:
                                last_rev, delivered_at_last = rev, 1
                            kind: Literal["put", "delete"] = "put" if ev.kind == "PUT" else "delete"
                            yield WatchEvent(
                                kind=kind,
                                key=ev.kv.key.decode("utf-8", "surrogateescape"),
                                value=bytes(ev.kv.value) if kind == "put" else b"",
                                revision=rev,
                            )
                finally:
                    await self._cancel_watch(w)
                # The stream ended without an error: its client was closed (by close(), or
                # under us); resume unless we are closing.
                continue
            except ReauthNeeded:
                if reauthenticated:
                    raise
                reauthenticated = True
                await self._reauthenticate(client, generation, self._endpoints[idx].url, self._timeout)
            except Unreachable as exc:
                self._rotate(idx)
                if resume.failed():
                    raise BackendUnavailable(
                        f"etcd watch {key!r}: no member answered for {resume.failing_for:.1f}s ({exc})",
                        backend=BACKEND,
                    ) from exc
                log.info("etcd %s failed, resuming from revision %s: %s", what, from_rev, exc)
                await resume.pause()

    @staticmethod
    async def _cancel_watch(w: Any) -> None:
        # Cancelling enqueues a request on the watch stream; never let a dead stream hang us.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await w.cancel()

    # -- preflight -----------------------------------------------------------------------------

    async def member_status(self) -> builtins.list[dict[str, Any]]:
        """Status of every configured endpoint, queried in parallel (for preflight).

        One dict per endpoint, in configuration order: ``endpoint``, ``reachable`` (it
        answered — also true when it refused our credentials), ``version``, ``member_id``,
        ``leader_id``, ``is_leader``, ``db_size`` and ``db_size_in_use`` (bytes),
        ``raft_index``, ``raft_applied_index``, ``raft_term``, ``errors`` (etcd's own, e.g.
        alarms), ``error`` (why it could not be queried, else None).  Never raises for an
        unreachable member; the raft index spread across members is the caller's to judge.
        """
        self._check_open()
        return list(await asyncio.gather(*(self._one_status(i) for i in range(len(self._endpoints)))))

    async def _one_status(self, idx: int) -> dict[str, Any]:
        ep = self._endpoints[idx]
        row: dict[str, Any] = {
            "endpoint": ep.url, "reachable": False, "version": None, "member_id": None, "leader_id": None,
            "is_leader": False, "db_size": None, "db_size_in_use": None, "raft_index": None,
            "raft_applied_index": None, "raft_term": None, "errors": [], "error": None,
        }
        client = self._client(idx)

        async def status() -> Any:
            await client.connect()
            return await client.maintenancestub.Status(
                rpc.StatusRequest(), timeout=self._timeout, metadata=client.metadata
            )

        try:
            with _EtcdErrors(f"status at {ep.url}"):
                async with asyncio.timeout(self._timeout):
                    st = await status()
        except AuthFailed as exc:
            row.update(reachable=True, error=str(exc))
            return row
        except BackendUnavailable as exc:
            row["error"] = str(exc)
            return row
        row.update(
            reachable=True,
            version=st.version,
            member_id=st.header.member_id,
            leader_id=st.leader or None,
            is_leader=bool(st.leader) and st.leader == st.header.member_id,
            db_size=st.dbSize,
            db_size_in_use=st.dbSizeInUse,
            raft_index=st.raftIndex,
            raft_applied_index=st.raftAppliedIndex,
            raft_term=st.raftTerm,
            errors=list(st.errors),
        )
        return row
