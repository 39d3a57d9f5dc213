"""Service fixtures: real etcd, nats-server, redis-server, prometheus and chronyd processes,
started by ``cbctl.sandbox`` (the same code ``cbctl sandbox`` runs).

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
from collections.abc import Iterator
from pathlib import Path

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


def _run(request: pytest.FixtureRequest, *services: Service) -> None:
    """Teardown: print log tails if the test failed, then stop every service."""
    if _test_failed(request):
        for service in services:
            print(f"\n--- {service.name} log tail ({service.log_path}) ---\n{service.log_tail(60)}",
                  file=sys.stderr)
    for service in services:
        service.stop()


@pytest.fixture
def etcd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A single-member etcd of its own; ``.client_url`` is http://127.0.0.1:PORT."""
    _require("etcd")
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    _run(request, server)


@pytest.fixture
def etcd_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster of its own; ``.endpoints``, ``.members``, ``.leader()``."""
    _require("etcd")
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-cluster"))
    cluster.start()
    yield cluster
    if _test_failed(request):
        for m in cluster.members:
            print(f"\n--- {m.name} log tail ({m.log_path}) ---\n{m.log_tail(60)}", file=sys.stderr)
    cluster.stop()


@pytest.fixture
def nats(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream of its own; ``.url``, ``.monitor_url``."""
    _require("nats-server")
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    _run(request, server)


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of its own (no persistence); ``.url``, ``.client()``."""
    _require("redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    _run(request, server)


@pytest.fixture
def prometheus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A prometheus of its own, 1 s scrape/evaluation interval; targets via ``.set_targets``."""
    _require("prometheus")
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    server.start()
    yield server
    _run(request, server)


@pytest.fixture
def chrony(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChronyServer]:
    """A chronyd NTP server of its own on 127.0.0.1:``.port`` (UDP)."""
    _require("chronyd")
    server = ChronyServer(tmp_path_factory.mktemp("chrony"))
    server.start()
    yield server
    _run(request, server)


@pytest.fixture(scope="session")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for the whole run. Isolate by key prefix; never kill or pause it."""
    _require("etcd")
    server = EtcdServer(tmp_path_factory.mktemp("shared-etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server (JetStream) for the whole run. Isolate by subject/stream name."""
    _require("nats-server")
    server = NatsServer(tmp_path_factory.mktemp("shared-nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole run. Isolate by key prefix; never FLUSHALL."""
    _require("redis-server")
    server = RedisServer(tmp_path_factory.mktemp("shared-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def unique_cluster() -> str:
    """A cluster name no other test uses: lowercase letters and digits only, so it is safe in
    etcd keys, Redis keys, NATS subjects and JetStream stream names."""
    return f"t{uuid.uuid4().hex[:12]}"
