"""etcd's JSON gateway (``POST /v3/...``, etcd 3.4+) over the standard library: cbctl's one HTTP
client of etcd, for reads.

Why it exists: a one-shot read command (``stage status``, ``nodes``, ``lanes``) and a TAB
completion would spend more time importing grpc/aetcd/tenacity and opening a gRPC channel than
reading.  This module imports only the standard library (``http.client``; ``ssl`` for https) and
``cbctl.core.model.errors``: no asyncio, so the completion path can use it too.

Contract:

* :class:`GatewayClient` talks to ONE endpoint over one kept-alive HTTP(S) connection (the
  context's CA, client certificate and key), authenticates with ``/v3/auth/authenticate``
  (the token goes in the ``Authorization`` header; the password is sent in that request's body
  only, never logged), and raises library errors (``OSError``, ``ssl.SSLError``,
  ``TimeoutError``, :class:`ServerError`) within the absolute ``deadline`` it is given.
* :func:`convert` maps those errors to the cbctl error the aetcd backend
  (``cbctl/core/backends/coord/etcd.py``) raises for the same failure: same classes, same
  "etcd <what> at <url>: <details>" wording, same rules on etcd's gRPC code and message (the
  gateway returns both in its JSON error body), same TLS hint.
* :class:`GatewaySession` is the failover loop of ``FailoverCoordinator._call`` for idempotent
  calls with a shared deadline (``cbctl/core/backends/coord/failover.py``): one call's attempts
  share ``timeout``, what is left is split over the endpoints not yet tried, a failed endpoint
  moves the session to the next, expired tokens are renewed once, and after every endpoint
  failed ``BackendUnavailable`` names each failure.  Config errors are worded as the aetcd
  backend's.  Reads only: nothing here writes.
* :class:`GatewayUnsupported` (not a cbctl error): the gateway refuses a client that gRPC would
  serve — gateway disabled (HTTP 404), host not whitelisted (421), or a client certificate with a
  CommonName while auth is on (etcd's gateway rejects those, 400, see etcd's embed/serve.go).
  Callers fall back to the gRPC coordinator.
* Revisions are etcd's own numbers (the gateway sends int64 as strings): ``mod_revision``,
  ``create_revision``, ``lease`` and the header revision equal what gRPC returns.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, CbctlError, ConfigError, LeaseLost

if TYPE_CHECKING:
    import http.client
    import ssl

    from cbctl.core.model.config import Secret

__all__ = [
    "GatewayClient",
    "GatewaySession",
    "GatewayUnsupported",
    "RawKV",
    "ServerError",
    "convert",
    "prefix_range_end",
]

log = logging.getLogger(__name__)

BACKEND = "etcd"

# gRPC status codes (grpc.StatusCode values), as the gateway reports them in "code".
_INVALID_ARGUMENT, _NOT_FOUND, _PERMISSION_DENIED, _OUT_OF_RANGE, _UNAUTHENTICATED = 3, 5, 7, 11, 16

# Substrings of etcd error details that mean "your credentials/permissions", whatever the gRPC
# code (etcd 3.4 reports a wrong password as INVALID_ARGUMENT, a denied key as PERMISSION_DENIED);
# the gRPC backend (cbctl/core/backends/coord/etcd.py) reads the same tables from here.
_AUTH_MARKERS = (
    "authentication failed",
    "user name is empty",
    "invalid auth token",
    "permission denied",
    "authentication is not enabled",
    "auth: revision in header is old",
    "root user does not have root role",
)
# ... and those that only need a fresh token.
_REAUTH_MARKERS = ("invalid auth token", "auth: revision in header is old")
# Details of a failed TLS handshake (gRPC C-core: "Tls handshake failed", "Unwrap failed (TSI_...)").
_TLS_MARKERS = ("handshake failed", "tsi_", "ssl_error", "certificate_verify_failed")
_TLS_HINT = (" (TLS handshake failed: check coordination.tls ca-file, cert-file and key-file;"
             " the server may require a client certificate)")
# What etcd's gateway answers (HTTP 400) to a client certificate with a CommonName while auth is on.
_CN_REFUSAL = "commonname of client sending a request against gateway"


class ServerError(Exception):
    """etcd answered with an error: HTTP ``status``, and the gRPC ``code`` and ``message`` of
    its JSON body (``code`` None when the body is not the gateway's JSON)."""

    def __init__(self, status: int, code: int | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class GatewayUnsupported(Exception):
    """The gateway refuses this client although etcd's gRPC API would serve it (module doc)."""


class Unreachable(BackendUnavailable):
    """The endpoint did not answer (as ``failover.Unreachable``; reads only, so never applied)."""


class ReauthNeeded(AuthFailed):
    """The token expired (not refused): authenticate again and retry once."""


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range end for a prefix (the prefix with its last byte incremented, as aetcd)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unreachable(message: str) -> Unreachable:
    return Unreachable(message, backend=BACKEND)


def _is_ssl_error(exc: BaseException) -> bool:
    import sys

    ssl_mod = sys.modules.get("ssl")  # loaded iff an https endpoint was used
    return ssl_mod is not None and isinstance(exc, ssl_mod.SSLError)


def convert(exc: BaseException, what: str, *, tls: bool = False) -> CbctlError:
    """Map one gateway/socket error to the cbctl error etcd.py's ``_convert`` gives for it.

    ``what`` is "<operation> at <url>"; ``tls``: the endpoint is https (a connection cut during
    the handshake then gets the TLS hint, as gRPC's "handshake failed" does).
    """
    if isinstance(exc, TimeoutError):
        return _unreachable(f"etcd {what}: no answer in time")
    if isinstance(exc, ServerError):
        if exc.code is None:
            return _unreachable(f"etcd {what}: HTTP {exc.status}: {exc.message or 'no body'}")
        code, details = exc.code, exc.message
        low = details.lower()
        if code in (_UNAUTHENTICATED, _PERMISSION_DENIED) or any(m in low for m in _AUTH_MARKERS):
            if any(m in low for m in _REAUTH_MARKERS):
                return ReauthNeeded(f"etcd {what}: {details}", backend=BACKEND)
            if "user name is empty" in low:  # etcd's words for "auth is on and you sent no credentials"
                details += " (authentication required: set coordination.username and password-env or password-file)"
            return AuthFailed(f"etcd {what}: {details}", backend=BACKEND)
        if code == _NOT_FOUND and "lease not found" in low:
            return LeaseLost(f"etcd {what}: {details}")
        if code in (_INVALID_ARGUMENT, _OUT_OF_RANGE):
            return BadInput(f"etcd rejected {what}: {details}")
        if any(m in low for m in _TLS_MARKERS):
            details += _TLS_HINT
        return _unreachable(f"etcd {what}: {details or 'error'}")
    if _is_ssl_error(exc):
        return _unreachable(f"etcd {what}: {exc}{_TLS_HINT}")
    if isinstance(exc, ConnectionRefusedError):
        return _unreachable(f"etcd {what}: failed to connect: {exc.strerror or 'connection refused'}")
    details = str(exc) or type(exc).__name__
    if tls and isinstance(exc, (ConnectionResetError, EOFError)) or tls and type(exc).__name__ == "RemoteDisconnected":
        details += _TLS_HINT
    return _unreachable(f"etcd {what}: {details}")


@dataclass(frozen=True)
class RawKV:
    """One key-value of a range reply, decoded from the gateway's JSON (base64, int64 strings)."""

    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int

    @classmethod
    def from_json(cls, kv: Mapping[str, Any]) -> RawKV:
        # proto3 JSON omits zero values: an empty value or no lease has no field at all.
        return cls(
            key=base64.b64decode(kv.get("key", "")),
            value=base64.b64decode(kv.get("value", "")),
            mod_revision=int(kv.get("mod_revision", 0)),
            create_revision=int(kv.get("create_revision", 0)),
            lease=int(kv.get("lease", 0)),
        )


def ssl_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A client TLS context: the CA (system roots when None), the client certificate and key.

    Unreadable files raise ``ConfigError`` worded as etcd.py's ``_read_pem``.
    """
    import ssl

    def read(path: str | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise ConfigError(f"etcd TLS {what} {path}: {exc.strerror}") from None

    ca = read(ca_file, "ca-file")
    read(cert_file, "cert-file")
    read(key_file, "key-file")
    ctx = ssl.create_default_context()
    if ca is not None:
        ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as exc:
            raise ConfigError(f"etcd TLS cert-file {cert_file} / key-file {key_file}: {exc}") from None
    return ctx


class GatewayClient:
    """One endpoint: a kept-alive HTTP(S) connection, JSON requests, etcd authentication.

    ``host`` may be a bracketed IPv6 literal.  ``tls``: an ``ssl.SSLContext`` for https, None
    for http.  ``username``/``password``: etcd user auth (the password is only put in the
    authenticate request's body).
    """

    def __init__(self, url: str, host: str, port: int, *, tls: ssl.SSLContext | None,
                 username: str | None = None, password: str | None = None) -> None:
        self.url = url
        self._host, self._port, self._tls = host.strip("[]"), port, tls
        self._username, self._password = username, password
        self._conn: http.client.HTTPConnection | None = None
        self._used = False  # the connection has carried a request (it may have been closed since)
        self.token: str | None = None

    @property
    def is_tls(self) -> bool:
        return self._tls is not None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._used = False
        if conn is not None:
            conn.close()

    def request(self, method: str, path: str, body: Any, deadline: float,
                headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """Send one request, return (HTTP status, body); every socket step ends by ``deadline``
        (``time.monotonic()``).  A kept-alive connection the server closed meanwhile is
        reopened once (the requests sent here are reads)."""
        import http.client

        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        for attempt in (0, 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            reused = self._used
            if self._conn is None:
                if self._tls is not None:
                    self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=remaining,
                                                             context=self._tls)
                else:
                    self._conn = http.client.HTTPConnection(self._host, self._port, timeout=remaining)
            conn = self._conn
            try:
                conn.timeout = remaining
                if conn.sock is not None:
                    conn.sock.settimeout(remaining)
                conn.request(method, path, body=data, headers=hdrs)
                self._used = True
                if conn.sock is not None:
                    conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                resp = conn.getresponse()
                payload = resp.read()
                return resp.status, payload
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if not reused or attempt:
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def call(self, path: str, body: Mapping[str, Any], deadline: float, *, auth: bool = True) -> dict[str, Any]:
        """POST ``body`` to ``path`` and return the JSON reply; ``ServerError`` on an error reply.

        With ``auth`` and a username, authenticates first when no token is held.
        """
        headers: dict[str, str] = {}
        if auth and self._username is not None:
            if self.token is None:
                self.authenticate(deadline)
            headers["Authorization"] = str(self.token)
        status, payload = self.request("POST", path, body, deadline, headers)
        if status == 200:
            reply = json.loads(payload or b"{}")
            if not isinstance(reply, dict):
                raise ValueError(f"unexpected reply to {path}: {type(reply).__name__}")
            return reply
        raise _server_error(status, payload)

    def authenticate(self, deadline: float) -> None:
        """Get a token for the configured user (``ServerError`` when etcd refuses)."""
        reply = self.call("/v3/auth/authenticate", {"name": self._username, "password": self._password or ""},
                          deadline, auth=False)
        self.token = str(reply.get("token", ""))

    def range(self, key: bytes, range_end: bytes | None, deadline: float, *, keys_only: bool = False,
              sort_by_key: bool = False) -> tuple[int, list[RawKV]]:
        """One linearizable Range: (header revision, key-values)."""
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if keys_only:
            body["keys_only"] = True
        if sort_by_key:
            body["sort_order"], body["sort_target"] = "ASCEND", "KEY"
        reply = self.call("/v3/kv/range", body, deadline)
        header = reply.get("header") or {}
        return int(header.get("revision", 0)), [RawKV.from_json(kv) for kv in reply.get("kvs") or []]


def _server_error(status: int, payload: bytes) -> Exception:
    text = payload.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), int):
        message = str(body.get("message") or body.get("error") or "")
        return ServerError(status, body["code"], message)
    if status in (404, 421) or (status == 400 and _CN_REFUSAL in text.lower()):
        return GatewayUnsupported(f"HTTP {status}: {text[:200]}")
    return ServerError(status, None, text[:300])


@dataclass(frozen=True)
class _Endpoint:
    url: str
    host: str
    port: int
    tls: bool


def _parse_endpoint(url: str) -> _Endpoint:
    """As ``failover.parse_endpoint`` (same ConfigError wording), for etcd's default port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{BACKEND} endpoint {url!r}: expected http(s)://host:port")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ConfigError(f"{BACKEND} endpoint {url!r}: invalid port") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return _Endpoint(url=url, host=host, port=port, tls=parts.scheme == "https")


class GatewaySession:
    """Reads over every configured endpoint with failover (module doc); synchronous.

    Parameters and their checks are those of ``EtcdCoordinator`` (``ConfigError`` wording
    included).  ``password`` is revealed only when a client is built.
    """

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
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ConfigError(f"{BACKEND}: at least one endpoint is required")
        self._endpoints = [_parse_endpoint(u) for u in endpoints]
        schemes = {ep.tls for ep in self._endpoints}
        if len(schemes) > 1:
            raise ConfigError("etcd endpoints mix http:// and https://; use one scheme")
        self._tls = schemes == {True}
        if not self._tls and (ca_file or cert_file or key_file):
            raise ConfigError("etcd TLS files are configured but the endpoints are http://; use https://")
        if bool(cert_file) != bool(key_file):
            raise ConfigError(f"{BACKEND} TLS: give both cert-file and key-file, or neither")
        if timeout <= 0:
            raise ConfigError(f"{BACKEND} timeout must be positive, got {timeout!r}")
        if (username is None) != (password is None):
            raise ConfigError("etcd auth: a username needs a password (password-env or password-file), and vice versa")
        self._timeout = float(timeout)
        self._username, self._password = username, password
        self._tls_files = (ca_file, cert_file, key_file)
        self._ssl: ssl.SSLContext | None = None
        self._clients: list[GatewayClient | None] = [None] * len(self._endpoints)
        self._current = 0

    @property
    def endpoints(self) -> list[str]:
        return [ep.url for ep in self._endpoints]

    @property
    def current_endpoint(self) -> str:
        return self._endpoints[self._current].url

    def _client(self, idx: int) -> GatewayClient:
        client = self._clients[idx]
        if client is None:
            if self._tls and self._ssl is None:
                self._ssl = ssl_context(*self._tls_files)
            ep = self._endpoints[idx]
            client = self._clients[idx] = GatewayClient(
                ep.url, ep.host, ep.port, tls=self._ssl if self._tls else None, username=self._username,
                password=self._password.reveal() if self._password is not None else None)
        return client

    def _rotate(self, failed_idx: int) -> None:
        if self._current == failed_idx and len(self._endpoints) > 1:
            self._current = (failed_idx + 1) % len(self._endpoints)
            log.info("%s: %s failed, switching to %s", BACKEND, self._endpoints[failed_idx].url, self.current_endpoint)

    def call(self, what: str, op: Callable[[GatewayClient, float], Any]) -> Any:
        """Run the read ``op(client, deadline)`` with failover; cbctl errors only, or
        :class:`GatewayUnsupported`."""
        deadline = time.monotonic() + self._timeout
        n = len(self._endpoints)
        failures: list[str] = []
        reauthenticated = False
        while True:
            idx = self._current
            client = self._client(idx)
            started = time.monotonic()
            budget = max(deadline - started, 0.001)
            left = n - len(failures)
            if left > 1:
                budget /= left  # one silent member cannot use all of the deadline
            try:
                try:
                    return op(client, started + budget)
                except (GatewayUnsupported, CbctlError):
                    raise
                except Exception as exc:  # noqa: BLE001 - the error edge: converted just below
                    raise convert(exc, f"{what} at {client.url}", tls=client.is_tls) from exc
            except ReauthNeeded:
                if reauthenticated:
                    raise
                reauthenticated = True
                client.token = None  # the next call authenticates again, within this deadline
            except Unreachable as exc:
                self._rotate(idx)
                failures.append(str(exc))
                if len(failures) >= n or time.monotonic() >= deadline:
                    message = failures[0] if len(failures) == 1 else (
                        f"{BACKEND} unreachable ({len(failures)} endpoints tried): " + "; ".join(failures))
                    raise BackendUnavailable(message, backend=BACKEND) from exc

    def close(self) -> None:
        clients, self._clients = self._clients, [None] * len(self._endpoints)
        for client in clients:
            if client is not None:
                client.close()
