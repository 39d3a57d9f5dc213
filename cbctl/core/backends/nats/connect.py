"""One way to open a NATS connection from a :class:`~cbctl.core.model.config.NatsConfig`.

Contract of :func:`connect_nats`: refused credentials -> ``AuthFailed`` at once (no retry
rounds); nothing reachable after ``connect_attempts`` rounds -> ``BackendUnavailable``; bad local
settings -> ``ConfigError``.  Messages never contain a secret.  While reconnecting,
``max_auth_failures`` consecutive refusals close the client (``Client.is_closed``).
Why and how: docs/backends.md, "NATS".
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.client import Client

from cbctl.core.model.config import NatsConfig, TLSConfig
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, ConfigError

log = logging.getLogger(__name__)

ErrorCallback = Callable[[Exception], Awaitable[None]]
Callback = Callable[[], Awaitable[None]]


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def servers_text(cfg: NatsConfig) -> str:
    """The configured servers, redacted, for messages."""
    return ", ".join(redact_url(s) for s in cfg.servers)


def is_auth_error(exc: BaseException) -> bool:
    """True if ``exc`` is the server refusing our credentials (any auth method)."""
    if isinstance(exc, nats.errors.AuthorizationError):
        return True
    if isinstance(exc, nats.errors.Error):
        text = str(exc).lower()
        return "authorization violation" in text or "authentication" in text
    return False


def ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """A client TLS context verifying the server against ``ca_file`` (or the system CAs),
    presenting ``cert_file``/``key_file`` when given.  Bad files -> ``ConfigError``."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        elif tls.key_file:
            raise ConfigError("nats tls: key-file is set without cert-file")
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"nats tls: cannot load CA/certificate/key ({exc})") from None
    return ctx


def _auth_options(cfg: NatsConfig) -> tuple[dict[str, Any], str]:
    """nats-py connect options for the configured auth, and a description for messages."""
    opts: dict[str, Any] = {}
    described: list[str] = []
    if cfg.password and not cfg.user:
        raise ConfigError(f"nats: a password ({cfg.password.describe()}) is configured without a user")
    if cfg.user:
        opts["user"] = cfg.user
        described.append(f"user {cfg.user!r}")
        secret = cfg.password.resolve()
        if secret is not None:
            opts["password"] = secret.reveal()
            described.append(f"password from {secret.source}")
    if cfg.token:
        secret = cfg.token.resolve()
        if secret is not None:
            opts["token"] = secret.reveal()
            described.append(f"token from {secret.source}")
    if cfg.creds_file or cfg.nkey_file:
        try:
            import nkeys  # noqa: F401  (nats-py needs it to sign the server's nonce)
        except ImportError:
            raise ConfigError(
                "nats creds-file/nkey-file need the 'nkeys' package (pip install 'nats-py[nkeys]')"
            ) from None
    for key, path in (("user_credentials", cfg.creds_file), ("nkeys_seed", cfg.nkey_file)):
        if path:
            p = Path(path).expanduser()
            if not p.is_file():
                raise ConfigError(f"nats {key.replace('_', ' ')} file {p} does not exist")
            opts[key] = str(p)
            described.append(f"{'creds' if key == 'user_credentials' else 'nkey seed'} file {p}")
    if cfg.tls:
        opts["tls"] = ssl_context(cfg.tls)
        described.append("TLS")
    return opts, ", ".join(described) or "no auth"


async def connect_nats(
    cfg: NatsConfig,
    *,
    name: str,
    reconnect: bool = True,
    connect_attempts: int = 1,
    max_reconnect_attempts: int = -1,
    reconnect_time_wait: float = 1.0,
    max_auth_failures: int = 3,
    pending_size: int = 8 * 1024 * 1024,
    error_cb: ErrorCallback | None = None,
    disconnected_cb: Callback | None = None,
    reconnected_cb: Callback | None = None,
    closed_cb: Callback | None = None,
) -> Client:
    """Connect to ``cfg.servers`` with the configured auth; return a connected client.

    ``connect_attempts``: rounds over every server before giving up at start (rounds after the
    first wait ``reconnect_time_wait``).  ``reconnect``/``max_reconnect_attempts`` (-1 = forever)
    and ``reconnect_time_wait`` govern nats-py's reconnect loop once connected.
    ``max_auth_failures``: consecutive credential refusals while reconnecting before the client
    is closed.  The callbacks are nats-py's, called after ours.

    Raises ``AuthFailed`` (credentials refused), ``BackendUnavailable`` (no server reachable or
    TLS handshake failed), ``ConfigError`` (bad local auth/TLS settings).
    """
    if not cfg.servers:
        raise ConfigError("nats: no servers configured")
    auth, auth_text = _auth_options(cfg)
    where = servers_text(cfg)
    nc = Client()
    loop = asyncio.get_running_loop()
    initial = True
    errors_seen: list[Exception] = []
    auth_failures = 0
    closing: list[asyncio.Future[None]] = []  # keeps a reference to the close task
    gave_up: asyncio.Future[None] = loop.create_future()
    budget = max(1, connect_attempts) * len(cfg.servers)

    async def _on_error(exc: Exception) -> None:
        nonlocal auth_failures
        if initial:
            errors_seen.append(exc)
            # The connect loop does not stop by itself on auth errors: stop it from here.
            if (is_auth_error(exc) or len(errors_seen) >= budget) and not gave_up.done():
                gave_up.set_result(None)
        elif is_auth_error(exc):
            auth_failures += 1
            log.error("NATS at %s refused the credentials (%s) while reconnecting (%d/%d)",
                      where, auth_text, auth_failures, max_auth_failures)
            if auth_failures >= max_auth_failures and not nc.is_closed and not closing:
                # Closing ends nats-py's reconnect loop; the owner sees is_closed.  (Not awaited
                # here: close() waits for the reconnect task that is calling us.)
                closing.append(asyncio.ensure_future(nc.close()))
        if error_cb is not None:
            await error_cb(exc)

    async def _on_reconnected() -> None:
        nonlocal auth_failures
        auth_failures = 0
        if reconnected_cb is not None:
            await reconnected_cb()

    async def _noop() -> None:
        return None

    connect = asyncio.ensure_future(
        nc.connect(
            servers=list(cfg.servers),
            name=name,
            allow_reconnect=reconnect,
            # During the first connect nats-py uses these too; gave_up bounds it instead.
            max_reconnect_attempts=max_reconnect_attempts,
            reconnect_time_wait=reconnect_time_wait,  # type: ignore[arg-type]  # nats-py accepts floats
            connect_timeout=cfg.connect_timeout,  # type: ignore[arg-type]
            pending_size=pending_size,
            error_cb=_on_error,
            reconnected_cb=_on_reconnected,
            disconnected_cb=disconnected_cb or _noop,
            closed_cb=closed_cb or _noop,
            **auth,
        )
    )
    try:
        await asyncio.wait({connect, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        if not connect.done():
            connect.cancel()
        try:
            await connect
        except asyncio.CancelledError:
            if not gave_up.done():
                raise  # we were cancelled ourselves, not by gave_up
        except (TimeoutError, OSError, nats.errors.Error, ssl.SSLError) as exc:
            errors_seen.append(exc)
    except asyncio.CancelledError:
        connect.cancel()
        await _close_quietly(nc)
        raise
    finally:
        initial = False
    if nc.is_connected:
        return nc
    await _close_quietly(nc)
    auth_errors = [e for e in errors_seen if is_auth_error(e)]
    if auth_errors:
        raise AuthFailed(
            f"NATS at {where} refused the credentials ({auth_text}): {auth_errors[-1]}", backend="nats"
        )
    tls_errors = [e for e in errors_seen if isinstance(e, ssl.SSLError)]
    if tls_errors:
        raise BackendUnavailable(f"TLS handshake with NATS at {where} failed: {tls_errors[-1]}", backend="nats")
    last = errors_seen[-1] if errors_seen else None
    detail = f"{type(last).__name__}: {last}" if last is not None else "no server answered"
    raise BackendUnavailable(f"cannot reach NATS at {where} ({detail})", backend="nats")


async def close_nats(nc: Client, timeout: float) -> bool:
    """Close ``nc`` within ``timeout`` seconds; True if it closed, False if it was abandoned.

    nats-py's ``close()`` flushes what is pending and waits for the socket to close, and against
    a frozen server (SIGSTOPped: the socket open, nothing read) both can wait forever once the
    kernel's buffers are full.  So it runs as its own task (a cancellation swallowed inside the
    library cannot hold us either); at the deadline it is cancelled, the client's own tasks are
    cancelled and its socket is aborted (unsent data is discarded, which is what closing a
    connection to a dead peer means).  Never raises (errors are logged at debug level).
    """
    if nc.is_closed:
        return True
    task = asyncio.ensure_future(nc.close())
    task.add_done_callback(_retrieve)
    done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
    if done:
        return True
    task.cancel()
    _abort(nc)
    return False


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("closing a NATS connection: %s", task.exception())


def _abort(nc: Client) -> None:
    """Cancel the client's background tasks and abort its socket (after a close that hung).

    Uses nats-py internals (``_reading_task``, ``_transport``...), each looked up defensively: a
    version without one of them only loses that part of the cleanup."""
    for name in ("_reading_task", "_ping_interval_task", "_flusher_task", "_reconnection_task"):
        t = getattr(nc, name, None)
        if isinstance(t, asyncio.Future) and not t.done():
            t.cancel()
    transport = getattr(nc, "_transport", None)
    for attr in ("_io_writer", "_bare_io_writer"):
        writer = getattr(transport, attr, None)
        raw = getattr(writer, "transport", None)
        if raw is not None:
            try:
                raw.abort()
            except (OSError, RuntimeError) as exc:  # already closed, or the loop is closing
                log.debug("aborting a NATS socket: %s", exc)


async def _close_quietly(nc: Client) -> None:
    # Bounded: after a failed TLS upgrade asyncio's start_tls owns the old socket and nats-py's
    # close() would wait forever for a close it is never told about.
    try:
        async with asyncio.timeout(1.0):
            await nc.close()
    except (TimeoutError, nats.errors.Error, OSError):
        pass  # closing a half-open client: nothing left to report


__all__ = ["close_nats", "connect_nats", "is_auth_error", "redact_url", "servers_text", "ssl_context"]
