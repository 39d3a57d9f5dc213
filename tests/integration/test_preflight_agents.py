"""`cbctl preflight` against real agents: agent-level failures made real and reported on the
right node and check.

Unlike ``test_preflight.py`` (which writes node records by hand), every node here is a real
``cbctl agent run`` process with its own state dir, probing etcd, NATS and Redis every 0.5 s and
measuring its clock against a real chronyd on loopback:

- one agent runs under ``faketime -f +2s``: its clock report says so, the clock check fails on
  that node only, and the spread between the nodes is reported;
- one agent runs under a group id of its own (``setpriv --regid``) and an nftables rule drops
  that group's packets to the Redis port only: its next probe report says Redis is unreachable,
  and preflight fails that node's ``redis`` row and nothing else.

The backing services (NATS with the event stream, Redis, chronyd, Prometheus scraping a static
exporter so its check passes) are shared by the module; each test has its own cluster name.
Every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import start_http_server

from cbctl.core.model import keys
from cbctl.core.model.config import load_config
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.model.metrics import AgentMetrics
from cbctl.sandbox import ChronyServer, NatsServer, PrometheusServer, RedisServer, Service, free_port
from cbctl.sandbox.services.cbctl_procs import AgentProcess
from cbctl.sandbox.waiting import wait_until
from tests.helpers import cbctl_run, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CONTEXT = "test"  # write_config's context name
PROBE_INTERVAL = 0.5
SKEW_S = 2.0


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


class Env:
    """NATS (event stream provisioned), Redis, chronyd and a Prometheus that has scraped a static
    exporter: everything the cbctl-side checks need to pass, so a failing preflight can only
    be the agents' doing."""

    def __init__(self, base: Path) -> None:
        self.nats = NatsServer(base / "nats")
        self.redis = RedisServer(base / "redis")
        self.chrony = ChronyServer(base / "chrony")
        self.metrics = AgentMetrics("exporter")
        self.metrics.applied_revision.set(0)  # as an agent does once it has read the document
        port = free_port()
        self.http, _ = start_http_server(port, addr="127.0.0.1", registry=self.metrics.registry)
        self.prom = PrometheusServer(base / "prom", targets=[(f"127.0.0.1:{port}", {})])
        self.services: list[Service] = [self.prom, self.nats, self.redis, self.chrony]
        self._scraped = False

    def start(self) -> None:
        for svc in self.services:
            svc.launch()  # start all, then wait: their start-up overlaps
        for svc in self.services:
            svc.wait_ready(20)

    async def ensure_stream(self, cluster: str) -> None:
        """Each test's cluster has its own stream (subjects cb.<cluster>.events.>), as agents
        with the bus would create it; these agents run --no-bus."""
        from cbctl.core.backends.nats.connect import connect_nats
        from cbctl.core.backends.nats.stream import ensure_stream
        from cbctl.core.model.config import NatsConfig, StreamConfig, default_stream_name

        nc = await connect_nats(NatsConfig(servers=(self.nats.url,)), name="test")
        try:
            await ensure_stream(nc.jetstream(), StreamConfig(name=default_stream_name(cluster)), cluster=cluster)
        finally:
            await nc.close()

    def wait_scraped(self) -> None:
        """Prometheus hands a new target to its scrapers only after ~5-10 s: wait for it once,
        late (after the agents started), so the wait overlaps theirs."""
        if self._scraped:
            return
        import httpx

        def scraped() -> bool:
            targets = httpx.get(f"{self.prom.url}/api/v1/targets").json()["data"]["activeTargets"]
            names = httpx.get(f"{self.prom.url}/api/v1/label/__name__/values").json()["data"]
            return bool(targets) and all(t["health"] == "up" for t in targets) and "event_bus_degraded" in names

        wait_until(scraped, 25, interval=0.1, message="prometheus scraped the exporter")
        self._scraped = True

    def stop(self) -> None:
        try:
            self.http.shutdown()
            self.http.server_close()
        finally:
            for svc in self.services:
                svc.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    for binary in ("nats-server", "redis-server", "chronyd", "prometheus"):
        if _binary(binary) is None:
            pytest.skip(f"{binary} is not installed (run `make setup`)")
    e = Env(tmp_path_factory.mktemp("preflight-agents"))
    try:
        e.start()
        yield e
    finally:
        e.stop()


@pytest.fixture
def agents(request: pytest.FixtureRequest) -> Iterator[list[AgentProcess]]:
    """Agents a test starts; all stopped at teardown (log tails printed if the test failed)."""
    started: list[AgentProcess] = []
    yield started
    failed = any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
                 for w in ("setup", "call"))
    for proc in started:
        if failed:
            print(f"\n--- {proc.name} log tail ({proc.log_path}) ---\n{proc.log_tail(40)}", file=sys.stderr)
        proc.stop(timeout=5.0)


def make_config(path: Path, env: Env, etcd_url: str, cluster: str, nodes: tuple[str, ...]) -> Path:
    asyncio.run(env.ensure_stream(cluster))
    return write_config(
        path, cluster=cluster, etcd=etcd_url, nats=env.nats.url, redis=env.redis.url, prometheus=env.prom.url,
        lane_count=4, context=CONTEXT,
        extra={
            "agent": {"probe-interval": f"{PROBE_INTERVAL}s"},
            "ntp-servers": [f"127.0.0.1:{env.chrony.port}"],
            # timeout 2 s: keep-alive + request timeout must fit in the TTL (lease-timing check)
            "coordination": {"lease-ttl": 3, "keepalive-interval": 0.5, "timeout": 2.0},
            "expected-nodes": list(nodes),
        },
    )


def start_agents(base: Path, cfg: Path, started: list[AgentProcess], specs: dict[str, dict[str, Any]]) -> None:
    """Launch one ``cbctl agent run`` per node (own state dir under ``base/<node>``), then wait
    for every /healthz."""
    for node, opts in specs.items():
        proc = AgentProcess(base, name=node, config_path=str(cfg), context=CONTEXT, **opts)
        # The event bus is not what these tests are about; its NATS probe runs either way.
        proc.extra_args = ["--no-bus"]
        started.append(proc)
        proc.launch()
    for proc in started:
        proc.wait_ready(20)


def read_records(cfg: Path, cluster: str) -> dict[str, dict[str, Any]]:
    ctx = load_config(cfg).context()

    async def body() -> dict[str, dict[str, Any]]:
        coord = make_coordinator(ctx)
        await coord.connect()
        try:
            kvs = await coord.list(keys.nodes_prefix(cluster))
        finally:
            await coord.close()
        prefix = keys.nodes_prefix(cluster)
        return {kv.key[len(prefix):]: json.loads(kv.value) for kv in kvs}

    return asyncio.run(body())


def wait_records(cfg: Path, cluster: str, cond: Callable[[dict[str, dict[str, Any]]], bool], what: str,
                 timeout: float = 15.0) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}

    def check() -> bool:
        nonlocal last
        last = read_records(cfg, cluster)
        return cond(last)

    try:
        wait_until(check, timeout, interval=0.1, message=what)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last records: {json.dumps(last, indent=1)}") from None
    return last


def probes_since(record: dict[str, Any] | None, since: float) -> dict[str, Any] | None:
    """The record's probe reports if all three were made after ``since`` (node wall clock)."""
    probes = (record or {}).get("probes") or {}
    if all(isinstance(probes.get(b), dict) and probes[b].get("at", 0) > since for b in ("etcd", "nats", "redis")):
        return probes
    return None


def preflight(cfg: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    r = cbctl_run(cfg, "preflight", "-o", "json", *args)
    return r.exit_code, (json.loads(r.stdout) if r.stdout.strip() else {}), r.stderr


def rows(data: dict[str, Any], name: str, status: str | None = None) -> list[dict[str, Any]]:
    return [c for c in data["checks"] if c["name"] == name and (status is None or c["status"] == status)]


def failing(data: dict[str, Any]) -> set[tuple[str, str, str | None]]:
    return {(c["name"], c["target"], c["node"]) for c in data["checks"] if c["status"] == "fail"}


# -- clock skew --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.skipif(_binary("faketime") is None, reason="faketime is not installed")
def test_agent_under_faketime_fails_the_clock_check_on_its_node(
    tmp_path: Path, env: Env, shared_etcd: Any, unique_cluster: str, agents: list[AgentProcess]
) -> None:
    nodes = ("node-ok", "node-skew")
    cfg = make_config(tmp_path / "config.toml", env, shared_etcd.client_url, unique_cluster, nodes)
    start_agents(tmp_path, cfg, agents, {"node-ok": {}, "node-skew": {"clock_offset": SKEW_S}})

    def measured(recs: dict[str, dict[str, Any]]) -> bool:
        return all(isinstance(((recs.get(n) or {}).get("clock") or {}).get("offset_ms"), (int, float))
                   and probes_since(recs.get(n), 0) for n in nodes)

    recs = wait_records(cfg, unique_cluster, measured, "both agents reported a measured clock offset")
    skew = recs["node-skew"]["clock"]
    ok = recs["node-ok"]["clock"]
    assert skew["source"] == ok["source"] == f"127.0.0.1:{env.chrony.port}"
    # ntplib's sign: positive = the server is ahead of us; this node is 2 s ahead of the server.
    assert abs(skew["offset_ms"] + SKEW_S * 1000) < 200, skew
    assert abs(ok["offset_ms"]) < 50, ok

    env.wait_scraped()
    code, data, err = preflight(cfg)
    assert code == 1, err
    assert data["ok"] is False
    by_node = {r["node"]: r for r in rows(data, "clock") if r["target"] == "offset"}
    assert set(by_node) == set(nodes)
    assert by_node["node-skew"]["status"] == "fail"
    assert "offset -" in by_node["node-skew"]["detail"] and "fail >= 250 ms" in by_node["node-skew"]["detail"]
    reported = float(by_node["node-skew"]["detail"].split()[1])
    assert abs(reported + SKEW_S * 1000) < 250, by_node["node-skew"]
    # The healthy node: judged on its own (small) offset against the thresholds.
    ok_reported = abs(float(by_node["node-ok"]["detail"].split()[1]))
    assert by_node["node-ok"]["status"] == ("pass" if ok_reported < 50 else "warn"), by_node["node-ok"]
    (spread,) = [r for r in rows(data, "clock") if r["target"] == "spread"]
    assert spread["status"] == "fail" and spread["node"] is None
    spread_ms = float(spread["detail"].split("spread between nodes ")[1].split()[0])
    assert abs(spread_ms - SKEW_S * 1000) < 250, spread
    # A 2 s spread against a 3 s lease TTL is unsafe too; nothing else fails (both nodes reach
    # every backend: their probe reports pass).
    assert failing(data) == {("clock", "offset", "node-skew"), ("clock", "spread", None),
                             ("lease-timing", "clock-spread", None)}, json.dumps(data, indent=1)
    assert {(r["node"], r["target"]) for r in rows(data, "nodes", "pass")} == {
        (n, b) for n in nodes for b in ("etcd", "nats", "redis")}

    # With thresholds above the skew, the same cluster only warns (warnings do not fail).
    code, data, err = preflight(cfg, "--only", "clock", "--skew-warn-ms", "1000", "--skew-fail-ms", "5000")
    assert code == 0, err
    assert {r["node"] for r in rows(data, "clock", "warn")} == {"node-skew", None}


# -- partition from Redis ------------------------------------------------------------------------


def _partition_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (nftables rule, setpriv --regid)"
    if _binary("nft") is None:
        return "nft (nftables) is not installed"
    if _binary("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return None


class RedisCut:
    """An nftables table of its own whose output-hook rule drops the packets that sockets owned
    by group ``gid`` send to 127.0.0.1:``port`` (TCP) — loopback traffic carries its socket's
    owner through the output hook (``meta skgid``), as ``cbctl sandbox chaos partition-node`` does."""

    def __init__(self, gid: int, port: int) -> None:
        self.gid, self.port = gid, port
        self.table = f"cbctl_test_{os.getpid()}"
        self.nft = _binary("nft") or "nft"

    def _run(self, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.nft, *args], input=script, capture_output=True, text=True, timeout=10, check=False)

    def apply(self) -> None:
        script = (
            f"add table inet {self.table}\n"
            f"add chain inet {self.table} output {{ type filter hook output priority 0 ; policy accept ; }}\n"
            f"add rule inet {self.table} output meta skgid {self.gid} ip daddr 127.0.0.1 "
            f"tcp dport {self.port} drop\n"
        )
        res = self._run("-f", "-", script=script)
        if res.returncode != 0:
            self.remove()
            pytest.skip(f"cannot install the nftables rule: {res.stderr.strip()}")

    def remove(self) -> None:
        self._run("delete", "table", "inet", self.table)  # absent table: nft fails, nothing to do

    def installed(self) -> bool:
        return self._run("list", "table", "inet", self.table).returncode == 0


@pytest.fixture
def redis_cut(env: Env) -> Iterator[RedisCut]:
    if (why := _partition_unavailable()) is not None:
        pytest.skip(why)
    cut = RedisCut(gid=62000 + os.getpid() % 1000, port=env.redis.port)
    try:
        yield cut
    finally:
        cut.remove()
    assert not cut.installed()


@pytest.mark.timeout(60)
def test_agent_partitioned_from_redis_fails_its_redis_row(
    tmp_path: Path, env: Env, shared_etcd: Any, unique_cluster: str, agents: list[AgentProcess],
    redis_cut: RedisCut,
) -> None:
    # ``agents`` before ``redis_cut``: teardown removes the rule first, then stops the agents
    # (a graceful stop releases lanes in Redis).
    nodes = ("node-ok", "node-cut")
    cfg = make_config(tmp_path / "config.toml", env, shared_etcd.client_url, unique_cluster, nodes)
    start_agents(tmp_path, cfg, agents, {"node-ok": {}, "node-cut": {"gid": redis_cut.gid}})

    def healthy(recs: dict[str, dict[str, Any]]) -> bool:
        return all((p := probes_since(recs.get(n), 0)) and all(v["ok"] for v in p.values()) for n in nodes)

    wait_records(cfg, unique_cluster, healthy, "both agents reported every backend reachable")

    redis_cut.apply()
    cut_at = time.time()
    recs = wait_records(
        cfg, unique_cluster,
        lambda r: bool((p := probes_since(r.get("node-cut"), cut_at)) and not p["redis"]["ok"]),
        "node-cut reported redis failing after the cut",
    )
    cut_probes = recs["node-cut"]["probes"]
    assert cut_probes["redis"]["detail"].startswith("unreachable:"), cut_probes
    assert cut_probes["etcd"]["ok"] and cut_probes["nats"]["ok"], cut_probes  # only Redis is cut

    env.wait_scraped()
    code, data, err = preflight(cfg)
    assert code == 1, err
    assert data["ok"] is False
    assert failing(data) == {("nodes", "redis", "node-cut")}, json.dumps(data, indent=1)
    (bad,) = rows(data, "nodes", "fail")
    assert bad["detail"].startswith("unreachable:") and "redis" in bad["detail"]
    assert {(r["node"], r["target"]) for r in rows(data, "nodes", "pass")} == {
        ("node-ok", "etcd"), ("node-ok", "nats"), ("node-ok", "redis"), ("node-cut", "etcd"), ("node-cut", "nats")}
    # cbctl itself still reaches Redis: the cut is the node's alone.
    assert rows(data, "redis") and not rows(data, "redis", "fail")
