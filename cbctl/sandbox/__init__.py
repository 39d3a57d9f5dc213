"""Real services on loopback for ``cbctl sandbox`` and the test fixtures (one code path).

See :mod:`cbctl.sandbox.procs` for the process contract and :mod:`cbctl.sandbox.waiting` for
polling under a deadline. Importing this package starts nothing and imports no client library.
"""

from cbctl.sandbox.procs import (
    ChronyServer,
    EtcdCluster,
    EtcdServer,
    HarnessError,
    NatsServer,
    PrometheusServer,
    RedisServer,
    Service,
    free_port,
    group_members,
    port_answers,
    stop_all,
)
from cbctl.sandbox.waiting import async_wait_until, wait_until

__all__ = [
    "ChronyServer",
    "EtcdCluster",
    "EtcdServer",
    "HarnessError",
    "NatsServer",
    "PrometheusServer",
    "RedisServer",
    "Service",
    "async_wait_until",
    "free_port",
    "group_members",
    "port_answers",
    "stop_all",
    "wait_until",
]
