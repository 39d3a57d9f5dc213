"""nats-server (JetStream on by default) on loopback, configured by a generated config file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbctl.sandbox.services.base import HarnessError, Service, free_port, http_call, write_private

__all__ = ["NatsServer"]


@dataclass(eq=False, repr=False, kw_only=True)
class NatsServer(Service):
    """nats-server with JetStream (default on), configured by a generated JSON config file.

    ``url`` is nats://host:port; ``monitor_url`` http://host:monitor_port. Credentials
    (``user``/``password`` or ``token``) live only in the mode-0600 config file. ``tls`` is a
    mapping with ``cert``, ``key`` and optional ``ca`` paths (``verify`` to require client
    certificates). With ``extra_listen_hosts`` the client port listens on all interfaces
    (nats-server binds one address only) while monitoring stays on ``host``.

    ``max_file_store`` is a ceiling, not an allocation: JetStream reserves each stream's
    ``max_bytes`` against it when the stream is created, while the disk holds only what is
    stored.  Event streams carry a ``max_bytes`` limit (1 GiB by default) and the tests create
    one stream per cluster on a shared server, so the default ceiling is 1 TiB.
    """

    binary = "nats-server"

    name: str = "nats"
    monitor_port: int | None = None
    jetstream: bool = True
    store_dir: str | os.PathLike[str] | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls: Mapping[str, Any] | None = None
    extra_listen_hosts: Sequence[str] = ()
    max_memory_store: int = 256 * 1024 * 1024
    max_file_store: int = 1 << 40

    def __post_init__(self) -> None:
        if self.token and (self.user or self.password):
            raise HarnessError(f"{self.name}: give either user/password or token, not both")
        if (self.user is None) != (self.password is None):
            raise HarnessError(f"{self.name}: user and password go together")
        super().__post_init__()
        if self.monitor_port is None:
            self.monitor_port = free_port(self.host)
        self.store_dir = Path(self.store_dir) if self.store_dir is not None else self.data_dir / "jetstream"
        self.tls = dict(self.tls) if self.tls else None
        self.extra_listen_hosts = list(self.extra_listen_hosts)
        self.config_path = self.data_dir / "nats.conf"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def urls(self) -> list[str]:
        """Client URLs: loopback first, then one per extra listen host."""
        return [self.url, *(f"nats://{h}:{self.port}" for h in self.extra_listen_hosts)]

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        assert self.port is not None and self.monitor_port is not None
        return [(self.host, self.port), (self.host, self.monitor_port),
                *((h, self.port) for h in self.extra_listen_hosts)]

    def prepare(self) -> None:
        listen_host = "0.0.0.0" if self.extra_listen_hosts else self.host
        conf: dict[str, Any] = {
            "server_name": self.name,
            "listen": f"{listen_host}:{self.port}",
            "http": f"{self.host}:{self.monitor_port}",
        }
        if self.jetstream:
            conf["jetstream"] = {"store_dir": str(self.store_dir),
                                 "max_memory_store": self.max_memory_store,
                                 "max_file_store": self.max_file_store}
        if self.user is not None:
            conf["authorization"] = {"user": self.user, "password": self.password}
        elif self.token is not None:
            conf["authorization"] = {"token": self.token}
        if self.tls:
            tls_conf: dict[str, Any] = {"cert_file": str(self.tls["cert"]),
                                        "key_file": str(self.tls["key"])}
            if self.tls.get("ca"):
                tls_conf["ca_file"] = str(self.tls["ca"])
            if self.tls.get("verify"):
                tls_conf["verify"] = True
            conf["tls"] = tls_conf
        # nats-server's config syntax is a superset of JSON, and JSON escaping handles any
        # character a password may contain.
        write_private(self.config_path, json.dumps(conf, indent=2))

    def command(self) -> list[str]:
        return ["nats-server", "-c", str(self.config_path)]

    def probe(self) -> bool:
        query = "?js-enabled-only=true" if self.jetstream else ""
        status, _ = http_call(f"{self.monitor_url}/healthz{query}")
        return status == 200

    def extra_info(self) -> dict[str, Any]:
        return {"url": self.url, "urls": self.urls, "monitor_port": self.monitor_port,
                "monitor_url": self.monitor_url, "jetstream": self.jetstream,
                "auth": "user" if self.user else ("token" if self.token else None),
                "tls": bool(self.tls)}
