"""The one Redis client factory of cbctl and the edge where redis-py errors become ours.

Contract: every Redis client in cbctl comes from :func:`redis_client`, or for a context from
one of its two named settings: :func:`redis_client_for` (lanes: the agent's guard and queue, the
signal sender's enqueue) or :func:`open_redis` (probes: single attempts, raw replies), and every call whose failure a caller handles runs under
:func:`redis_errors` (or :func:`redis_call`), which raises
:class:`~cbctl.core.model.errors.AuthFailed` for refused credentials and
:class:`~cbctl.core.model.errors.BackendUnavailable` for an unreachable Redis or one that cannot
take writes (``READONLY``/``OOM``).  Other reply errors propagate unchanged (a bug in the
caller) unless ``reply_errors=True``.  Why the retry policy: docs/backends.md.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Iterator
from typing import TYPE_CHECKING, Any

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

from cbctl.core.model.errors import AuthFailed, BackendUnavailable

if TYPE_CHECKING:
    from cbctl.core.model.config import Context, RedisConfig

__all__ = ["as_str", "json_compact", "open_redis", "redis_call", "redis_client", "redis_client_for", "redis_errors"]

BACKEND = "redis"
DEFAULT_OPEN_TIMEOUT = 2.0

_AUTH_REPLIES = ("NOAUTH", "WRONGPASS", "NOPERM")

# One reusable encoder: json.dumps with non-default arguments builds a new encoder per call.
# ensure_ascii=False: the JSON goes to Redis as UTF-8, so Lua's cjson needs no \u decoding.
json_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def as_str(value: Any) -> str:
    """A Redis reply item as ``str`` whether or not the client decodes responses."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def redis_client(
    url: str,
    *,
    password: str | None = None,
    socket_timeout: float = 5.0,
    connect_timeout: float = 2.0,
    retries: int = 3,
    decode_responses: bool = True,
) -> Redis:
    """A ``redis.asyncio`` client.

    Connection errors and timeouts are retried ``retries`` times with a short jittered backoff
    (10 ms doubling, capped at 500 ms) inside redis-py before the call fails; ``retries=0``
    makes every call a single attempt (probes must see a failure, not wait through it).
    ``socket_timeout`` must exceed any blocking read's block time.
    """
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), retries) if retries > 0 else Retry(NoBackoff(), 0)
    return Redis.from_url(
        url,
        password=password,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=retry,
        retry_on_timeout=retries > 0,
        decode_responses=decode_responses,
    )


def _password(cfg: RedisConfig) -> str | None:
    # Resolved at the moment of use (ConfigError if the reference is unset), never stored.
    secret = cfg.password.resolve() if cfg.password else None
    return secret.reveal() if secret is not None else None


def redis_client_for(ctx: Context, block_ms: int = 0) -> Redis:
    """:func:`redis_client` for a context's lanes: the agent's guard and queue, the signal sender.

    The defaults of :func:`redis_client` (redis-py retries a dropped connection 3 times, decoded
    replies as the guard and queue parse them), with a generous socket timeout: it must outlast
    a blocking XREADGROUP of ``block_ms``, and a reply that arrived while the process was
    suspended must still be read.  The password reference is resolved now.
    """
    return redis_client(ctx.redis.url, password=_password(ctx.redis), socket_timeout=block_ms / 1000 + 10.0)


def open_redis(cfg: RedisConfig, *, timeout: float = DEFAULT_OPEN_TIMEOUT) -> Redis:
    """:func:`redis_client` for a context's ``redis`` section as probes need it: single attempts
    (a probe must see a failure, not wait through retries), raw replies, ``timeout`` for connect
    and every read.

    The password reference is resolved now (``ConfigError`` if it is unset).
    """
    return redis_client(
        cfg.url,
        password=_password(cfg),
        socket_timeout=timeout,
        connect_timeout=timeout,
        retries=0,
        decode_responses=False,
    )


@contextlib.contextmanager
def redis_errors(action: str, *, reply_errors: bool = False) -> Iterator[None]:
    """``with redis_errors("read lane 'a'"):`` converts redis-py errors (module contract).

    ``reply_errors``: also turn any other error reply into ``BackendUnavailable`` (for probes,
    where an unexpected reply means the backend is not usable, not a bug).
    """
    try:
        yield
    except (rexc.AuthenticationError, rexc.AuthorizationError, rexc.NoPermissionError) as e:
        raise AuthFailed(f"redis refused our credentials while trying to {action}: {e}", backend=BACKEND) from e
    except (rexc.ReadOnlyError, rexc.OutOfMemoryError) as e:
        # The server answers but cannot take writes: unusable until an operator acts.
        raise BackendUnavailable(f"redis cannot accept writes while trying to {action}: {e}", backend=BACKEND) from e
    except rexc.ResponseError as e:
        if str(e).startswith(_AUTH_REPLIES):
            raise AuthFailed(f"redis refused our credentials while trying to {action}: {e}", backend=BACKEND) from e
        if reply_errors:
            raise BackendUnavailable(f"redis {action}: {e}", backend=BACKEND) from e
        raise
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
        raise BackendUnavailable(
            f"redis unreachable while trying to {action}: {type(e).__name__}: {e}", backend=BACKEND
        ) from e


async def redis_call(action: str, op: Awaitable[Any]) -> Any:
    """Await one redis-py call under :func:`redis_errors` with ``reply_errors=True``."""
    with redis_errors(action, reply_errors=True):
        return await op
