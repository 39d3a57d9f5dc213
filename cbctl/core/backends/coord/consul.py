"""Consul backend of :class:`~cbctl.core.backends.coord.base.Coordinator` (py-consul's ``consul.aio``).

Keys lose their leading ``/`` on the way in; revisions are Raft indexes (``ModifyIndex``,
``CreateIndex``); writes go through ``/v1/txn``; leases are TTL sessions (10 s .. 24 h); the
watch is level-triggered (blocking queries, diffed).  :class:`_ConsulErrors` is the one converter
of py-consul/aiohttp exceptions.  The mapping and py-consul quirks: docs/backends.md.
No Consul server exists on the development machines: the contract suite runs it only when
``CBCTL_TEST_CONSUL_URL`` names an agent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
import consul
import consul.aio
from consul import base as consul_base
from consul.exceptions import BadRequest, ClientError

from cbctl.core.backends.coord.base import KV, Lease, WatchEvent
from cbctl.core.backends.coord.failover import WATCH_RESUME, ErrorEdge, FailoverCoordinator, Unreachable
from cbctl.core.backends.retry import Backoff
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, CbctlError, Conflict, LeaseLost

if TYPE_CHECKING:
    from cbctl.core.model.config import Context, Secret

__all__ = ["ConsulCoordinator"]

BACKEND = "consul"
_MAX_TXN_OPS = 64  # Consul's limit per transaction
_MIN_SESSION_TTL = 10  # seconds; Consul refuses shorter session TTLs


def _unreachable(message: str, *, maybe_applied: bool) -> Unreachable:
    return Unreachable(message, backend=BACKEND, maybe_applied=maybe_applied)


def _convert(exc: BaseException, what: str) -> CbctlError:
    """Map one py-consul/aiohttp/timeout exception to the cbctl error a caller can act on."""
    if isinstance(exc, (consul.ACLPermissionDenied, consul.ACLDisabled)):
        return AuthFailed(f"consul {what}: ACL refused: {exc}", backend=BACKEND)
    if isinstance(exc, BadRequest):
        return BadInput(f"consul rejected {what}: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Refused/unresolvable before anything was sent: safe to send elsewhere.
        return _unreachable(f"consul {what}: {exc}", maybe_applied=False)
    if isinstance(exc, (aiohttp.ClientError, TimeoutError, consul.Timeout, OSError)):
        return _unreachable(f"consul {what}: {exc or type(exc).__name__}", maybe_applied=True)
    text = str(exc)
    if "invalid session" in text.lower():
        return LeaseLost(f"consul {what}: {text}")
    if isinstance(exc, ClientError):  # other 4xx, e.g. 429 rate limited
        return BackendUnavailable(f"consul {what}: {text}", backend=BACKEND)
    # ConsulException: 5xx ("No cluster leader", "rpc error ...") or an undecodable answer.
    return _unreachable(f"consul {what}: {text}", maybe_applied=True)


_SOURCE_ERRORS = (consul.ConsulException, aiohttp.ClientError, TimeoutError, OSError)


class _ConsulErrors(ErrorEdge):
    """``with _ConsulErrors(what):`` — the one edge where py-consul/aiohttp errors become ours."""

    __slots__ = ()
    sources = _SOURCE_ERRORS
    convert = staticmethod(_convert)


def _ck(key: str) -> str:
    """Our key -> Consul's (no leading slash)."""
    if not key.startswith("/"):
        raise BadInput(f"coordination keys start with '/': {key!r}")
    return key[1:]


def _kv(item: Mapping[str, Any]) -> KV:
    return KV(
        key="/" + item["Key"],
        value=item.get("Value") or b"",  # py-consul already base64-decoded it; null = empty
        mod_revision=int(item["ModifyIndex"]),
        create_revision=int(item["CreateIndex"]),
        lease=item.get("Session") or None,
    )


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _raw(response: consul_base.Response) -> consul_base.Response:
    """py-consul callback that hands us the response untouched (status handled by us)."""
    return response


class ConsulCoordinator(FailoverCoordinator["consul.aio.Consul"]):
    """Coordinator on Consul's KV store and sessions (docs/backends.md, "Consul").

    ``endpoints``: ``http(s)://host:port`` of Consul agents, tried in order on failure.
    ``timeout``: deadline of each call in seconds.  ``token``: ACL token.
    ``ca_file``/``cert_file``/``key_file``: TLS for https endpoints.
    ``reconnect_deadline``: how long a watch retries while no agent answers (default
    ``2 * timeout``).  ``watch_wait``: seconds one blocking query may wait on the server.
    ``probe_key``: key read by :meth:`current_revision`; must be readable with ``token``.
    """

    backend_name = BACKEND
    errors = _ConsulErrors
    http_port, https_port = 8500, 8501
    endpoint_word = "agents"

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        token: Secret | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        reconnect_deadline: float | None = None,
        watch_wait: float = 30.0,
        probe_key: str = "/cbctl/",
    ) -> None:
        super().__init__(endpoints, timeout=timeout, cert_file=cert_file, key_file=key_file,
                         reconnect_deadline=reconnect_deadline)
        self._token = token
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        self._watch_wait = max(1, int(watch_wait))
        self._probe = _ck(probe_key)

    @classmethod
    def from_context(cls, ctx: Context) -> ConsulCoordinator:
        """Build from a context; the ``password`` reference is the ACL token (resolved now)."""
        c = ctx.coordination
        return cls(
            c.endpoints,
            timeout=c.timeout,
            token=c.password.resolve() if c.password else None,
            ca_file=c.tls.ca_file,
            cert_file=c.tls.cert_file,
            key_file=c.tls.key_file,
            probe_key=ctx.prefix,
        )

    # -- plumbing ------------------------------------------------------------------------------

    def _new_client(self, idx: int) -> consul.aio.Consul:
        ep = self._endpoints[idx]
        # http: verify=False only stops py-consul from building an SSL context it won't use.
        verify: bool | str = (self._ca_file or True) if ep.scheme == "https" else False
        cert = (self._cert_file, self._key_file) if self._cert_file else None
        with warnings.catch_warnings():
            # py-consul 1.8 passes aiohttp's deprecated verify_ssl/ssl_context: its noise.
            warnings.simplefilter("ignore", DeprecationWarning)
            client = consul.aio.Consul(
                host=ep.host, port=ep.port, scheme=ep.scheme, verify=verify, cert=cert,
                connections_timeout=self._timeout,
            )
        # py-consul lets CONSUL_HTTP_TOKEN override the token we pass; the context wins.
        client.token = self._token.reveal() if self._token is not None else None
        return client

    async def _txn(self, what: str, ops: list[dict[str, Any]], *, idempotent: bool = False) -> tuple[bool, Any]:
        """Send one transaction. (True, Results) when applied, (False, Errors) when rolled back."""
        if len(ops) > _MAX_TXN_OPS:
            raise BadInput(f"consul {what}: {len(ops)} operations, Consul allows {_MAX_TXN_OPS} per transaction")

        async def send(c: consul.aio.Consul) -> consul_base.Response:
            params = [("dc", c.dc)] if c.dc else None
            return await c.http.put(_raw, "/v1/txn", params=params, data=json.dumps(ops),
                                    headers=c.prepare_headers(), connections_timeout=self._timeout)

        resp = await self._call(what, send, idempotent=idempotent)
        if resp.code in (200, 409):
            try:
                answer = json.loads(resp.body)
            except json.JSONDecodeError:
                raise BackendUnavailable(f"consul {what}: undecodable answer {resp.body[:200]!r}",
                                         backend=BACKEND) from None
        if resp.code == 200:
            return True, answer.get("Results") or []
        if resp.code == 409:  # rolled back: one of our checks failed
            errors = answer.get("Errors") or []
            text = "; ".join(str(e.get("What", "")) for e in errors)
            low = text.lower()
            if "permission denied" in low or "acl not found" in low:
                raise AuthFailed(f"consul {what}: {text}", backend=BACKEND)
            if "invalid session" in low:
                raise LeaseLost(f"consul {what}: {text}")
            return False, errors
        if resp.code in (401, 403):
            raise AuthFailed(f"consul {what}: HTTP {resp.code}: {resp.body.strip()}", backend=BACKEND)
        if resp.code in (400, 413):
            raise BadInput(f"consul rejected {what}: HTTP {resp.code}: {resp.body.strip()}")
        raise BackendUnavailable(f"consul {what}: HTTP {resp.code}: {resp.body.strip()}", backend=BACKEND)

    @staticmethod
    def _modify_index(results: list[dict[str, Any]], consul_key: str) -> int:
        """The index a successful write transaction landed at (all its writes share it)."""
        indexes = [int(r["KV"]["ModifyIndex"]) for r in results if r.get("KV") and r["KV"].get("Key") == consul_key]
        return max(indexes)

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        ck = _ck(key)
        _, item = await self._call(
            f"get {key!r}", lambda c: c.kv.get(ck, connections_timeout=self._timeout), idempotent=True
        )
        return None if item is None else _kv(item)

    async def list(self, prefix: str) -> list[KV]:
        ck = _ck(prefix)
        _, items = await self._call(
            f"list {prefix!r}", lambda c: c.kv.get(ck, recurse=True, connections_timeout=self._timeout),
            idempotent=True,
        )
        return sorted((_kv(i) for i in items or ()), key=lambda kv: kv.key)

    async def current_revision(self) -> int:
        """``X-Consul-Index`` of a read of ``probe_key`` (the KV table's highest index)."""
        index, _ = await self._call(
            "read revision", lambda c: c.kv.get(self._probe, connections_timeout=self._timeout), idempotent=True
        )
        return int(index)

    # -- writes --------------------------------------------------------------------------------

    @staticmethod
    def _write_op(ck: str, value: bytes, lease: Lease | None) -> dict[str, Any]:
        if lease is None:
            return {"KV": {"Verb": "set", "Key": ck, "Value": _b64(value)}}
        return {"KV": {"Verb": "lock", "Key": ck, "Value": _b64(value), "Session": str(lease.id)}}

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        ck = _ck(key)
        ok, out = await self._txn(f"put {key!r}", [self._write_op(ck, value, lease)])
        if not ok:  # only a lock can fail: another session holds the key
            raise Conflict(f"{key} is held by another session", key=key)
        return self._modify_index(out, ck)

    async def commit(
        self,
        key: str,
        value: bytes,
        *,
        expected_revision: int,
        also_put: Mapping[str, bytes] | None = None,
        lease: Lease | None = None,
    ) -> int:
        """One Consul transaction (docs/backends.md, "Consul"); on rollback the key's current
        ModifyIndex is read afterwards (Consul cannot read in a failed transaction) for the
        ``Conflict``."""
        ck = _ck(key)
        ops: list[dict[str, Any]]
        if lease is None:
            ops = [{"KV": {"Verb": "cas", "Key": ck, "Value": _b64(value), "Index": expected_revision}}]
        elif expected_revision == 0:
            ops = [{"KV": {"Verb": "check-not-exists", "Key": ck}}, self._write_op(ck, value, lease)]
        else:
            ops = [{"KV": {"Verb": "check-index", "Key": ck, "Index": expected_revision}},
                   self._write_op(ck, value, lease)]
        ops += [{"KV": {"Verb": "set", "Key": _ck(k), "Value": _b64(v)}} for k, v in (also_put or {}).items()]
        ok, out = await self._txn(f"commit {key!r}", ops)
        if ok:
            return self._modify_index(out, ck)
        current = await self.get(key)
        current_rev = current.mod_revision if current is not None else 0
        if current_rev == expected_revision and lease is not None:
            # The revision matched, so the lock failed: another session holds the key.
            raise Conflict(f"{key} is held by another session", key=key, current_revision=current_rev)
        raise Conflict(
            f"{key} changed: expected revision {expected_revision}, found {current_rev or 'no key'}",
            key=key,
            current_revision=current_rev,
        )

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        ck = _ck(key)
        if expected_revision == 0:
            return False  # "delete if absent" deletes nothing (as etcd's compare does)
        ops: list[dict[str, Any]]
        if expected_revision is None:
            # get + delete in one transaction: rolled back (False) when the key is absent.
            ops = [{"KV": {"Verb": "get", "Key": ck}}, {"KV": {"Verb": "delete", "Key": ck}}]
        else:
            ops = [{"KV": {"Verb": "delete-cas", "Key": ck, "Index": expected_revision}}]
        ok, _ = await self._txn(f"delete {key!r}", ops)
        return ok

    # -- leases --------------------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> Lease:
        """A TTL session (behavior delete, no lock delay); TTL raised to Consul's 10 s minimum."""
        seconds = min(max(_MIN_SESSION_TTL, math.ceil(ttl)), 86400)
        sid = await self._call(
            "create session",
            lambda c: c.session.create(name="cbctl", ttl=seconds, behavior="delete", lock_delay=0),
            idempotent=True,  # a duplicate session expires unused
        )
        return Lease(id=str(sid), ttl=float(seconds))

    async def refresh_lease(self, lease: Lease) -> float:
        sid = str(lease.id)

        async def renew(c: consul.aio.Consul) -> Any:
            try:
                return await c.session.renew(sid)
            except consul.NotFound:  # py-consul 1.8: HTTP 404, the session is gone
                return None

        session = await self._call(f"renew session {sid}", renew, idempotent=True)
        if not session:
            raise LeaseLost(f"consul session {sid} is gone (expired or destroyed)")
        return lease.ttl

    async def revoke_lease(self, lease: Lease) -> None:
        sid = str(lease.id)
        await self._call(f"destroy session {sid}", lambda c: c.session.destroy(sid), idempotent=True)

    # -- watch ---------------------------------------------------------------------------------

    async def _snapshot(
        self, ck: str, prefix: bool, index: int, wait: int | None
    ) -> tuple[int, dict[str, Mapping[str, Any]]]:
        """(X-Consul-Index, {consul key: item}) of the key/prefix; blocking when ``index``."""
        budget = self._timeout + (wait + wait / 16 if wait else 0)  # Consul adds up to wait/16 jitter

        async def read(c: consul.aio.Consul) -> tuple[str, Any]:
            return await c.kv.get(ck, index=index or None, wait=f"{wait}s" if wait else None, recurse=prefix,
                                  connections_timeout=budget)

        idx, data = await self._call(f"watch {ck!r}", read, idempotent=True, budget=budget)
        items = data if isinstance(data, list) else ([data] if data else [])
        return int(idx), {i["Key"]: i for i in items}

    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        """State changes of ``key`` (or the prefix), by blocking queries (level-triggered: see
        docs/backends.md).  With ``start_revision``, keys present with ``ModifyIndex >=
        start_revision`` are reported first (deletes before the start cannot be recovered).
        Raises ``BackendUnavailable`` after ``reconnect_deadline`` without an answering agent."""
        ck = _ck(key)
        loop = asyncio.get_running_loop()
        index, known = await self._snapshot(ck, prefix, 0, None)
        if start_revision is not None:
            for item in sorted(known.values(), key=lambda i: int(i["ModifyIndex"])):
                if int(item["ModifyIndex"]) >= start_revision:
                    yield WatchEvent("put", "/" + item["Key"], item.get("Value") or b"", int(item["ModifyIndex"]))
        resume = Backoff(WATCH_RESUME, give_up_after=self._reconnect_deadline, clock=loop.time)
        last_rev = index
        while not self._closed:
            try:
                new_index, now_items = await self._snapshot(ck, prefix, max(index, 1), self._watch_wait)
            except AuthFailed:
                raise
            except BackendUnavailable as exc:
                if resume.failed():
                    raise BackendUnavailable(
                        f"consul watch {key!r}: no agent answered for {resume.failing_for:.1f}s ({exc})",
                        backend=BACKEND,
                    ) from exc
                await resume.pause()
                continue
            resume.reset()
            events: list[WatchEvent] = []
            for k, item in now_items.items():
                old = known.get(k)
                if old is None or int(old["ModifyIndex"]) != int(item["ModifyIndex"]):
                    events.append(WatchEvent("put", "/" + k, item.get("Value") or b"", int(item["ModifyIndex"])))
            for k in known.keys() - now_items.keys():
                # The delete happened at or before this answer's index: the best Consul tells.
                events.append(WatchEvent("delete", "/" + k, b"", max(new_index, last_rev)))
            events.sort(key=lambda e: (e.revision, e.kind == "delete", e.key))
            for ev in events:
                last_rev = max(last_rev, ev.revision)
                yield ev
            known = now_items
            # Consul's documented rule: an index that goes backwards (snapshot restore) means
            # start over from 0; the diff above still reported every change.
            index = new_index if new_index >= index else 0
