"""Service fixtures: real etcd, nats-server, redis-server, prometheus and chronyd processes,
started by ``cbctl.sandbox`` (the same classes ``cbctl sandbox`` runs), all made by one
factory, :func:`service_fixture` (docs/testing.md).

Function-scoped fixtures (``etcd``, ``etcd_cluster``, ``nats``, ``redis_server``,
``prometheus``, ``chrony``) give a test its own server in its own temporary directory; use them
when the test kills, pauses or reconfigures the server. Session-scoped ``shared_etcd``,
``shared_nats``, ``shared_redis`` are one server each for the whole run: tests that use them
must isolate themselves by key prefix / subject / stream name, e.g. with ``unique_cluster``.

Every server is stopped at teardown, also when the test failed; if the test failed, the tail of
each server's log is printed in the test's report ("Captured stderr teardown").
"""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from cbctl.sandbox import (
    ChronyServer,
    EtcdCluster,
    EtcdServer,
    NatsServer,
    PrometheusServer,
    RedisServer,
    Service,
)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Keep each phase's report on the item so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by directory, so ``-m "not chaos"`` and friends work without decorators."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "chaos" in parts:
            item.add_marker(pytest.mark.chaos)


def _require(binary: str) -> None:
    if shutil.which(binary) is None and shutil.which(binary, path="/usr/sbin:/sbin") is None:
        pytest.skip(f"{binary} is not installed (run `make setup`)")


def _test_failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(getattr(node, f"rep_{when}", None) is not None and getattr(node, f"rep_{when}").failed
               for when in ("setup", "call"))


def _print_log_tails(services: Sequence[Service]) -> None:
    for service in services:
        print(f"\n--- {service.name} log tail ({service.log_path}) ---\n{service.log_tail(60)}",
              file=sys.stderr)


def service_fixture(name: str, make: Callable[[Path], Service | EtcdCluster], binary: str, doc: str, *,
                    scope: Literal["function", "session"] = "function") -> Any:
    """A pytest fixture called ``name`` that starts ``make(fresh temp dir)`` and yields it.

    The test is skipped when ``binary`` is not installed. At teardown the service is stopped
    (also when the test failed); a function-scoped one first prints each process's log tail if
    the test failed.
    """

    def fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
        _require(binary)
        service = make(tmp_path_factory.mktemp(name))
        service.start()
        try:
            yield service
        finally:
            if scope == "function" and _test_failed(request):
                _print_log_tails(service.members if isinstance(service, EtcdCluster) else [service])
            service.stop()

    fixture.__doc__ = doc
    fixture.__name__ = name
    return pytest.fixture(scope=scope, name=name)(fixture)


etcd = service_fixture("etcd", EtcdServer, "etcd",
                       "A single-member etcd of its own; ``.client_url`` is http://127.0.0.1:PORT.")
etcd_cluster = service_fixture("etcd_cluster", EtcdCluster, "etcd",
                               "A 3-member etcd cluster of its own; ``.endpoints``, ``.members``, ``.leader()``.")
nats = service_fixture("nats", NatsServer, "nats-server",
                       "A nats-server with JetStream of its own; ``.url``, ``.monitor_url``.")
redis_server = service_fixture("redis_server", RedisServer, "redis-server",
                               "A redis-server of its own (AOF on, as the harness default); ``.url``, ``.client()``.")
prometheus = service_fixture("prometheus", PrometheusServer, "prometheus",
                             "A prometheus of its own, 1 s scrape/evaluation interval; targets via ``.set_targets``.")
chrony = service_fixture("chrony", ChronyServer, "chronyd",
                         "A chronyd NTP server of its own on 127.0.0.1:``.port`` (UDP).")
shared_etcd = service_fixture("shared_etcd", EtcdServer, "etcd",
                              "One etcd for the whole run. Isolate by key prefix; never kill or pause it.",
                              scope="session")
shared_nats = service_fixture("shared_nats", NatsServer, "nats-server",
                              "One nats-server (JetStream) for the whole run. Isolate by subject/stream name.",
                              scope="session")
shared_redis = service_fixture("shared_redis", RedisServer, "redis-server",
                               "One redis-server for the whole run. Isolate by key prefix; never FLUSHALL.",
                               scope="session")


@pytest.fixture
def unique_cluster() -> str:
    """A cluster name no other test uses: lowercase letters and digits only, so it is safe in
    etcd keys, Redis keys, NATS subjects and JetStream stream names."""
    return f"t{uuid.uuid4().hex[:12]}"
