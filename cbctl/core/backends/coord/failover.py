"""What the etcd and Consul coordinators share: endpoints, failover, the error edge, resume policy.

:class:`FailoverCoordinator` keeps one lazily created client per configured endpoint, sends
every call to the *current* endpoint through :meth:`FailoverCoordinator._call` and moves to the
next endpoint when one is unreachable.  Contract of ``_call`` (details in docs/backends.md):

* idempotent calls (reads, lease operations) are retried on the next endpoint; writes only when
  the failure proves nothing was sent (``Unreachable.maybe_applied`` is false);
* after every endpoint failed (or the shared deadline passed) it raises ``BackendUnavailable``
  naming each failure; no library exception escapes (the backend's :class:`ErrorEdge` converts).

A backend subclass supplies the client factory (``_new_client``), its :class:`ErrorEdge`, and
optionally re-authentication (``_reauthenticate`` on :class:`ReauthNeeded`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar
from urllib.parse import urlsplit

from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.backends.retry import BackoffPolicy
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, CbctlError, ConfigError

__all__ = [
    "WATCH_RESUME",
    "Endpoint",
    "ErrorEdge",
    "FailoverCoordinator",
    "ReauthNeeded",
    "Unreachable",
    "parse_endpoint",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
C = TypeVar("C")

# How a watch resumes while no endpoint answers: 50 ms doubling to 1 s, no jitter (one watcher
# per process), until the backend's reconnect deadline.
WATCH_RESUME = BackoffPolicy(initial=0.05, cap=1.0)


class Unreachable(BackendUnavailable):
    """The endpoint did not answer. ``maybe_applied`` when a write may have landed."""

    def __init__(self, message: str, *, backend: str, maybe_applied: bool) -> None:
        super().__init__(message, backend=backend)
        self.maybe_applied = maybe_applied


class ReauthNeeded(AuthFailed):
    """The credentials expired (not refused): authenticate again and retry once."""


class ErrorEdge:
    """``with Edge(what):`` — where a library's exceptions become cbctl errors.

    Subclasses set ``sources`` (the library exception types) and ``convert`` (one exception and
    the operation's description -> the cbctl error).  Anything else (our own errors,
    ``CancelledError``, bugs) passes through.  A class, not ``@contextmanager``: it wraps every
    call and should cost next to nothing.
    """

    __slots__ = ("what",)
    sources: ClassVar[tuple[type[BaseException], ...]] = ()
    convert: ClassVar[Callable[[BaseException, str], CbctlError]]

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None and isinstance(exc, self.sources):
            raise type(self).convert(exc, self.what) from exc


@dataclass(frozen=True)
class Endpoint:
    """One configured ``http(s)://host:port``; ``host`` as a URL/gRPC target wants it."""

    url: str
    host: str  # IPv6 literals in brackets
    port: int
    scheme: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def parse_endpoint(url: str, backend: str, *, http_port: int, https_port: int) -> Endpoint:
    """Parse one endpoint URL; ``ConfigError`` naming ``backend`` when it is not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{backend} endpoint {url!r}: expected http(s)://host:port")
    try:
        port = parts.port or (https_port if parts.scheme == "https" else http_port)
    except ValueError:
        raise ConfigError(f"{backend} endpoint {url!r}: invalid port") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return Endpoint(url=url, host=host, port=port, scheme=parts.scheme)


class FailoverCoordinator(Coordinator, Generic[C]):
    """A coordinator over several endpoints of one store, one client ``C`` per endpoint.

    Class attributes a backend sets: ``backend_name``; ``errors`` (its :class:`ErrorEdge`);
    ``http_port``/``https_port`` (defaults for URLs without a port); ``shared_deadline``: when
    true one call's failover attempts share ``timeout`` (idempotent calls split what is left over
    the endpoints not yet tried), else each attempt gets the full ``timeout``; ``slow_rpc``: a
    caller that cancels a call running this long moves the next call to another endpoint
    (``None``: never); ``endpoint_word``: what error messages call the endpoints.
    """

    errors: ClassVar[type[ErrorEdge]]
    http_port: ClassVar[int]
    https_port: ClassVar[int]
    shared_deadline: ClassVar[bool] = False
    slow_rpc: ClassVar[float | None] = None
    endpoint_word: ClassVar[str] = "endpoints"  # how error messages name the endpoints tried

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float,
        cert_file: str | None,
        key_file: str | None,
        reconnect_deadline: float | None,
    ) -> None:
        name = self.backend_name
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ConfigError(f"{name}: at least one endpoint is required")
        self._endpoints = [parse_endpoint(u, name, http_port=self.http_port, https_port=self.https_port)
                           for u in endpoints]
        self._check_endpoints()
        if bool(cert_file) != bool(key_file):
            raise ConfigError(f"{name} TLS: give both cert-file and key-file, or neither")
        if timeout <= 0:
            raise ConfigError(f"{name} timeout must be positive, got {timeout!r}")
        self._timeout = float(timeout)
        self._reconnect_deadline = float(reconnect_deadline) if reconnect_deadline is not None else 2 * self._timeout
        self._clients: list[C | None] = [None] * len(self._endpoints)
        self._current = 0
        self._closed = False

    # -- what a backend provides ---------------------------------------------------------------

    def _check_endpoints(self) -> None:
        """Backend-specific checks of the parsed endpoints (``ConfigError``)."""

    def _new_client(self, idx: int) -> C:
        """A new client for endpoint ``idx`` (not connected yet)."""
        raise NotImplementedError

    async def _close_client(self, client: C) -> None:
        await client.close()  # type: ignore[attr-defined]

    def _auth_generation(self, client: C) -> int:
        """The client's credential generation (see :meth:`_reauthenticate`)."""
        return 0

    async def _reauthenticate(self, client: C, seen_generation: int, url: str, budget: float) -> None:
        """Renew ``client``'s credentials unless done since ``seen_generation``."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """The configured endpoint URLs, in order."""
        return [ep.url for ep in self._endpoints]

    @property
    def current_endpoint(self) -> str:
        """The endpoint the next call goes to."""
        return self._endpoints[self._current].url

    def _client(self, idx: int) -> C:
        client = self._clients[idx]
        if client is None:
            client = self._clients[idx] = self._new_client(idx)
        return client

    def _rotate(self, failed_idx: int) -> None:
        # Only the first of several concurrent failures on one endpoint moves us on.
        if self._current == failed_idx and len(self._endpoints) > 1:
            self._current = (failed_idx + 1) % len(self._endpoints)
            log.info("%s: %s failed, switching to %s", self.backend_name, self._endpoints[failed_idx].url,
                     self.current_endpoint)

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable(f"{self.backend_name} coordinator is closed", backend=self.backend_name)

    async def _call(
        self, what: str, op: Callable[[C], Awaitable[T]], *, idempotent: bool, budget: float | None = None
    ) -> T:
        """Run ``op`` on the current endpoint under the deadline, failing over (module doc).

        ``budget``: the per-attempt timeout instead of ``timeout`` (a blocking query's wait).
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        per_attempt = budget if budget is not None else self._timeout
        deadline = loop.time() + per_attempt
        n = len(self._endpoints)
        failures: list[str] = []
        reauthenticated = False
        while True:
            idx = self._current
            client = self._client(idx)
            url = self._endpoints[idx].url
            started = loop.time()
            attempt_budget = per_attempt
            if self.shared_deadline:
                attempt_budget = max(deadline - started, 0.001)
                left = n - len(failures)
                if idempotent and left > 1:
                    # Split what is left over the endpoints not yet tried, so one silent
                    # member cannot use all of it.
                    attempt_budget /= left
            generation = self._auth_generation(client)
            try:
                with self.errors(f"{what} at {url}"):
                    async with asyncio.timeout(attempt_budget):
                        return await op(client)
            except ReauthNeeded:
                if reauthenticated:
                    raise
                reauthenticated = True
                await self._reauthenticate(client, generation, url, max(deadline - loop.time(), 0.001))
            except Unreachable as exc:
                self._rotate(idx)
                failures.append(str(exc))
                retry = idempotent or not exc.maybe_applied
                out_of_time = self.shared_deadline and loop.time() >= deadline
                if not retry or len(failures) >= n or out_of_time:
                    message = failures[0] if len(failures) == 1 else (
                        f"{self.backend_name} unreachable ({len(failures)} {self.endpoint_word} tried): " + "; ".join(failures))
                    raise BackendUnavailable(message, backend=self.backend_name) from exc
            except asyncio.CancelledError:
                if self.slow_rpc is not None and loop.time() - started >= self.slow_rpc:
                    self._rotate(idx)
                raise

    async def connect(self) -> None:
        """Reach one endpoint and read through it; ``BackendUnavailable``/``AuthFailed`` if none."""
        self._closed = False
        try:
            await self.current_revision()
        except BaseException:
            # ``async with`` does not call close() when connect() fails: release what we opened.
            await self._close_clients()
            raise

    async def close(self) -> None:
        """Close every client; running watches end. Idempotent."""
        self._closed = True
        await self._close_clients()

    async def _close_clients(self) -> None:
        clients, self._clients = self._clients, [None] * len(self._endpoints)
        for client in clients:
            if client is not None:
                await self._close_client(client)
