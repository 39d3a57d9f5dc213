"""redis-server on loopback, configured by a generated file (AOF persistence by default)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cbctl.sandbox.services.base import Service, write_private

__all__ = ["RedisServer"]


def _redis_quote(value: str) -> str:
    """Quote a value for redis.conf (sdssplitargs syntax)."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return '"' + "".join(out) + '"'


@dataclass(eq=False, repr=False, kw_only=True)
class RedisServer(Service):
    """redis-server configured by a generated file; ``url`` is redis://host:port/0.

    Persistent by default, as production must be: ``appendonly yes`` with ``appendfsync
    everysec`` (the AOF in the data dir, which a restart keeps), so a restart keeps the fences,
    seqs and applied markers (preflight fails on a Redis without AOF, see
    :func:`cbctl.core.operator.preflight.check_redis`).  ``appendonly=False`` (a restart starts
    empty) and ``appendfsync`` (``always`` / ``everysec`` / ``no``) exist for tests of exactly
    those settings.  RDB snapshots are off.  ``requirepass`` goes only into the mode-0600
    config file.
    """

    binary = "redis-server"

    name: str = "redis"
    extra_bind_hosts: Sequence[str] = ()
    requirepass: str | None = None
    appendonly: bool = True
    appendfsync: str = "everysec"

    def __post_init__(self) -> None:
        if self.appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync {self.appendfsync!r}: must be always, everysec or no")
        super().__post_init__()
        self.extra_bind_hosts = list(self.extra_bind_hosts)
        self.config_path = self.data_dir / "redis.conf"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def password(self) -> str | None:
        return self.requirepass

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        assert self.port is not None
        return [(self.host, self.port), *((h, self.port) for h in self.extra_bind_hosts)]

    def prepare(self) -> None:
        lines = [
            f"bind {' '.join([self.host, *self.extra_bind_hosts])}",
            f"port {self.port}",
            "daemonize no",
            'logfile ""',
            # Explicit bind addresses already restrict access; protected mode would also refuse
            # clients from a network namespace when there is no password.
            "protected-mode no",
            f"dir {_redis_quote(str(self.data_dir))}",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
        ]
        if self.requirepass is not None:
            lines.append(f"requirepass {_redis_quote(self.requirepass)}")
        write_private(self.config_path, "\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return ["redis-server", str(self.config_path)]

    def client(self, **kwargs: Any) -> Any:
        """A ``redis.Redis`` client for this server (password applied). Imported lazily."""
        import redis

        kwargs.setdefault("password", self.requirepass)
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def probe(self) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # redis-py >= 6 retries 3 times with exponential backoff by default, which turns one
        # probe of a paused server into seconds; a probe must be a single attempt.
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def extra_info(self) -> dict[str, Any]:
        return {"url": self.url, "bind": [self.host, *self.extra_bind_hosts],
                "auth": self.requirepass is not None}
