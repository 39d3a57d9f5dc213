"""Real services on loopback for ``cbctl sandbox`` and the test fixtures (one code path).

The services live in :mod:`cbctl.sandbox.services` (contract in its ``base`` module), polling
under a deadline in :mod:`cbctl.sandbox.waiting`. Importing this package starts nothing and
imports no client library. How the tests use it: docs/testing.md.
"""

from cbctl.sandbox.services.base import (
    HarnessError,
    Service,
    free_port,
    group_members,
    port_answers,
    stop_all,
)
from cbctl.sandbox.services.chrony import ChronyServer
from cbctl.sandbox.services.etcd import EtcdCluster, EtcdServer
from cbctl.sandbox.services.nats import NatsServer
from cbctl.sandbox.services.prometheus import PrometheusServer
from cbctl.sandbox.services.redis import RedisServer
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
