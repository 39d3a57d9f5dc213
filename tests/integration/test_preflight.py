"""`cbctl preflight` against real etcd, nats-server (user/password), redis-server and prometheus
scraping a real /metrics endpoint.  Healthy first; then each failure is made real and must be
reported on the right check.

Node records are written by the test (as an agent would: ``probes`` and ``clock`` filled), so the
node-side checks can be driven precisely: missing, stale, failing, skewed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import start_http_server

from cbctl.core.model import keys
from cbctl.core.model.config import load_config
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.model.metrics import AgentMetrics
from cbctl.sandbox import NatsServer, PrometheusServer, free_port
from cbctl.sandbox.waiting import wait_until
from tests.helpers import cbctl_run, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NATS_USER, NATS_PASSWORD = "cb", "s3cret-pw"
NODES = ("node-a", "node-b")


class Env:
    """A healthy set of services shared by this module's tests (each test has its own cluster)."""

    def __init__(self, base: Path) -> None:
        self.nats = NatsServer(base / "nats", user=NATS_USER, password=NATS_PASSWORD)
        self.prom = PrometheusServer(base / "prom")
        self.metrics = AgentMetrics("node-a")
        self.metrics.applied_revision.set(0)  # as an agent does once it has read the document
        port = free_port()
        self.http, _ = start_http_server(port, addr="127.0.0.1", registry=self.metrics.registry)
        self.prom._targets = [(f"127.0.0.1:{port}", {"node": "node-a"})]

    def start(self) -> None:
        self.nats.start()
        self.prom.start()
        import httpx

        def scraped() -> bool:
            targets = httpx.get(f"{self.prom.url}/api/v1/targets").json()["data"]["activeTargets"]
            names = httpx.get(f"{self.prom.url}/api/v1/label/__name__/values").json()["data"]
            return bool(targets) and all(t["health"] == "up" for t in targets) and "event_bus_degraded" in names

        wait_until(scraped, 20, interval=0.1, message="prometheus scraped the exporter")

    def make_stream(self, cfg: Path, **overrides: Any) -> None:
        """The context's event stream (one per cluster), as ``ensure_stream`` creates it;
        ``overrides`` replace fields of the nats-py stream config (e.g. ``max_age=0``)."""
        asyncio.run(self._stream(cfg, overrides))

    async def _stream(self, cfg: Path, overrides: dict[str, Any]) -> None:
        from dataclasses import replace

        from cbctl.core.backends.nats.connect import connect_nats
        from cbctl.core.backends.nats.stream import desired_config, ensure_stream

        os.environ["CBCTL_TEST_NATS_PW"] = NATS_PASSWORD
        ctx = load_config(cfg).context()
        nc = await connect_nats(ctx.nats, name="test")
        try:
            js = nc.jetstream()
            if overrides:
                await js.add_stream(replace(desired_config(ctx.nats.stream, cluster=ctx.cluster), **overrides))
            else:
                await ensure_stream(js, ctx.nats.stream, cluster=ctx.cluster)
        finally:
            await nc.close()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.prom.stop()
        self.nats.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("preflight-env"))
    try:
        e.start()
        yield e
    finally:
        e.stop()


def make_config(path: Path, env: Env, etcd_url: str, redis_url: str, cluster: str, *,
                nats_url: str | None = None, nats_extra: dict[str, Any] | None = None,
                coordination: dict[str, Any] | None = None) -> Path:
    nats = {"user": NATS_USER, "password-env": "CBCTL_TEST_NATS_PW", **(nats_extra or {})}
    return write_config(
        path, cluster=cluster, etcd=etcd_url, nats=nats_url or env.nats.url, redis=redis_url,
        prometheus=env.prom.url,
        extra={"nats": nats, "expected-nodes": list(NODES), "ntp-servers": ["127.0.0.1:123"],
               "agent": {"probe-interval": "2s"}, **({"coordination": coordination} if coordination else {})},
    )


def probe(ok: bool = True, age: float = 0.0, detail: str = "fine") -> dict[str, Any]:
    return {"ok": ok, "detail": detail, "at": time.time() - age, "ms": 1.0}


def node_record(node_id: str, *, offset_ms: float = 3.0, probes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "node_id": node_id, "machine_id": f"machine-{node_id}", "instance_id": f"inst-{node_id}", "host": "h",
        "pid": 1, "applied_revision": 0, "heartbeat": time.time(),
        "probes": probes if probes is not None else {"etcd": probe(), "nats": probe(), "redis": probe()},
        "clock": {"offset_ms": offset_ms, "source": "127.0.0.1:123", "at": time.time(), "error": None},
    }


def put(cfg: Path, items: dict[str, Any]) -> None:
    ctx = load_config(cfg).context()

    async def body() -> None:
        coord = make_coordinator(ctx)
        await coord.connect()
        try:
            for key, value in items.items():
                await coord.put(key, json.dumps(value).encode())
        finally:
            await coord.close()

    asyncio.run(body())


def register(cfg: Path, cluster: str, **overrides: dict[str, Any]) -> None:
    """Healthy records for every node in NODES; ``overrides[node] = record`` replaces one."""
    items: dict[str, Any] = {}
    for n in NODES:
        items[keys.node(cluster, n)] = overrides.get(n.replace("-", "_"), node_record(n))
        items[keys.identity(cluster, n)] = {"node_id": n, "machine_id": f"machine-{n}", "host": "h"}
    put(cfg, items)


def preflight(cfg: Path, *args: str, pw: str = NATS_PASSWORD) -> tuple[int, dict[str, Any], str]:
    r = cbctl_run(cfg, "preflight", "-o", "json", *args, env={"CBCTL_TEST_NATS_PW": pw})
    return r.exit_code, (json.loads(r.stdout) if r.stdout.strip() else {}), r.stderr


def rows(data: dict[str, Any], name: str, status: str | None = None) -> list[dict[str, Any]]:
    return [c for c in data["checks"] if c["name"] == name and (status is None or c["status"] == status)]


@pytest.fixture
def cfg(tmp_path: Path, env: Env, shared_etcd, shared_redis, unique_cluster: str) -> Path:
    path = make_config(tmp_path / "config.toml", env, shared_etcd.client_url, shared_redis.url, unique_cluster)
    env.make_stream(path)
    return path


def test_healthy_cluster_passes_and_is_recorded(cfg: Path, unique_cluster: str) -> None:
    register(cfg, unique_cluster)
    t0 = time.monotonic()
    code, data, err = preflight(cfg)
    elapsed = time.monotonic() - t0
    assert code == 0, err + json.dumps([c for c in data.get("checks", []) if c["status"] != "pass"], indent=1)
    assert data["ok"] is True
    names = {c["name"] for c in data["checks"]}
    assert names == {"etcd", "nats", "redis", "prometheus", "credentials", "nodes", "node-ids", "clock", "lease-timing"}
    assert not rows(data, "nats", "fail")
    assert any(f"publish cb.{unique_cluster}.events.v1" in c["target"] for c in rows(data, "nats", "pass"))
    (persistence,) = [c for c in rows(data, "redis") if c["target"] == "persistence"]
    assert persistence["status"] == "pass" and "appendfsync everysec" in persistence["detail"]
    assert len(rows(data, "nodes", "pass")) == 3 * len(NODES)
    assert set(data["checks"][0]) == {"name", "target", "node", "status", "detail"}
    assert elapsed < 5

    ctx = load_config(cfg).context()

    async def last() -> dict[str, Any]:
        coord = make_coordinator(ctx)
        await coord.connect()
        try:
            kv = await coord.get(keys.preflight_last(unique_cluster))
            assert kv is not None
            return json.loads(kv.value)
        finally:
            await coord.close()

    record = asyncio.run(last())
    assert record["ok"] is True and time.time() - record["time"] < 30


def test_wrong_nats_password_is_an_auth_failure(cfg: Path, unique_cluster: str) -> None:
    register(cfg, unique_cluster)
    code, data, _ = preflight(cfg, pw="wrong")
    assert code == 1
    (nats_row,) = rows(data, "nats")
    assert nats_row["status"] == "fail"
    assert nats_row["detail"].startswith("auth:")
    assert "unreachable" not in nats_row["detail"]
    assert "wrong" not in nats_row["detail"]  # the secret is never shown
    assert not rows(data, "etcd", "fail") and not rows(data, "redis", "fail")


# -- stream limits ---------------------------------------------------------------------------------


def _stream_row(data: dict[str, Any]) -> dict[str, Any]:
    (row,) = [c for c in rows(data, "nats") if c["target"].startswith("stream ")]
    return row


@pytest.mark.parametrize("overrides, expect", [
    ({"max_age": 0, "max_bytes": -1, "max_msgs_per_subject": -1},
     ["max-age is unlimited", "max-bytes is unlimited", "max-msgs-per-subject is unlimited"]),
    ({"max_bytes": 1 << 20}, ["max-bytes is 1048576, configured 1073741824"]),
    ({"max_age": 3600.0}, ["max-age is 3600s, configured 604800s"]),
], ids=["no-limits", "other-max-bytes", "other-max-age"])
def test_stream_without_the_configured_limits_fails(tmp_path: Path, env: Env, shared_etcd, shared_redis,
                                                    unique_cluster: str, overrides: dict[str, Any],
                                                    expect: list[str]) -> None:
    cfg = make_config(tmp_path / "c.toml", env, shared_etcd.client_url, shared_redis.url, unique_cluster)
    env.make_stream(cfg, **overrides)  # as an operator might have created it by hand
    register(cfg, unique_cluster)
    code, data, _ = preflight(cfg)
    assert code == 1 and "nats" in {c["name"] for c in data["checks"] if c["status"] == "fail"}
    row = _stream_row(data)
    assert row["status"] == "fail"
    for text in expect:
        assert text in row["detail"], row["detail"]
    # Nothing else about the stream is wrong, and nothing else fails because of it.
    assert "storage" not in row["detail"] and "subjects" not in row["detail"]
    assert [c for c in data["checks"] if c["status"] == "fail"] == [row]


def test_stream_limits_from_the_config_pass(tmp_path: Path, env: Env, shared_etcd, shared_redis,
                                            unique_cluster: str) -> None:
    cfg = make_config(tmp_path / "c.toml", env, shared_etcd.client_url, shared_redis.url, unique_cluster,
                      nats_extra={"stream": {"max-age": "2h", "max-bytes": 64 << 20, "max-msgs-per-subject": 500}})
    env.make_stream(cfg)
    register(cfg, unique_cluster)
    code, data, err = preflight(cfg, "--only", "nats")
    assert code == 0, err + json.dumps(data, indent=1)
    row = _stream_row(data)
    assert "max-age 7200s" in row["detail"] and "64.0 MiB" in row["detail"] and "500 msgs per subject" in row["detail"]


# -- Redis durability ------------------------------------------------------------------------------


@pytest.mark.parametrize("redis_args, status, text", [
    ({"appendonly": False}, "fail", "AOF is off"),
    ({"appendfsync": "no"}, "warn", "appendfsync no"),
    ({"appendfsync": "always"}, "pass", "AOF on, appendfsync always"),
], ids=["aof-off", "appendfsync-no", "appendfsync-always"])
def test_redis_persistence_is_checked(tmp_path: Path, env: Env, shared_etcd, unique_cluster: str,
                                      redis_args: dict[str, Any], status: str, text: str) -> None:
    from cbctl.sandbox import RedisServer

    with RedisServer(tmp_path / "redis", **redis_args) as server:
        cfg = make_config(tmp_path / "c.toml", env, shared_etcd.client_url, server.url, unique_cluster)
        code, data, err = preflight(cfg, "--only", "redis")
    (row,) = [c for c in rows(data, "redis") if c["target"] == "persistence"]
    assert row["status"] == status and text in row["detail"], row
    # The rest of the Redis check is unaffected: reachable, script loaded.
    assert [c["status"] for c in rows(data, "redis") if c["target"] != "persistence"] == ["pass"]
    assert code == (1 if status == "fail" else 0), err


def test_nats_down_is_unreachable(tmp_path: Path, env: Env, shared_etcd, shared_redis, unique_cluster: str) -> None:
    other = NatsServer(tmp_path / "nats2", user=NATS_USER, password=NATS_PASSWORD)
    other.start()
    other.stop()
    cfg = make_config(tmp_path / "c.toml", env, shared_etcd.client_url, shared_redis.url, unique_cluster,
                      nats_url=other.url)
    register(cfg, unique_cluster)
    code, data, _ = preflight(cfg)
    assert code == 1
    (nats_row,) = rows(data, "nats")
    assert nats_row["status"] == "fail" and nats_row["detail"].startswith("unreachable:")


def test_world_readable_password_file_fails_credentials(tmp_path: Path, env: Env, shared_etcd, shared_redis,
                                                         unique_cluster: str) -> None:
    pw = tmp_path / "nats.pw"
    pw.write_text(NATS_PASSWORD + "\n")
    pw.chmod(0o644)
    cfg = write_config(
        tmp_path / "c.toml", cluster=unique_cluster, etcd=shared_etcd.client_url, nats=env.nats.url,
        redis=shared_redis.url, prometheus=env.prom.url,
        extra={"nats": {"user": NATS_USER, "password-file": str(pw)}, "expected-nodes": list(NODES)},
    )
    env.make_stream(make_config(tmp_path / "stream.toml", env, shared_etcd.client_url, shared_redis.url,
                                unique_cluster))
    register(cfg, unique_cluster)
    code, data, _ = preflight(cfg)
    assert code == 1
    (cred,) = rows(data, "credentials")
    assert cred["status"] == "fail" and "readable by group/others" in cred["detail"]
    assert not rows(data, "nats", "fail")  # the password itself is right

    pw.chmod(0o600)
    code, data, _ = preflight(cfg)
    assert rows(data, "credentials", "pass") and not rows(data, "credentials", "fail")


def test_unreachable_store_exits_4(tmp_path: Path, env: Env, etcd, shared_redis, unique_cluster: str) -> None:
    cfg = make_config(tmp_path / "c.toml", env, etcd.client_url, shared_redis.url, unique_cluster,
                      coordination={"timeout": 1})
    register(cfg, unique_cluster)
    etcd.stop()
    code, data, err = preflight(cfg)
    assert code == 4, err
    assert "unreachable" in err
    assert data["ok"] is False
    assert rows(data, "etcd", "fail")
    assert rows(data, "nodes", "fail") and rows(data, "clock", "fail")
    assert not rows(data, "redis", "fail")  # the other checks still ran


def test_duplicate_node_id_conflict_fails_node_ids(cfg: Path, unique_cluster: str) -> None:
    register(cfg, unique_cluster)
    put(cfg, {keys.conflict(unique_cluster, "node-a", "inst-x"): {
        "node_id": "node-a", "instance_id": "inst-x", "kind": "duplicate-node-id", "host": "other-host", "pid": 42}})
    code, data, _ = preflight(cfg)
    assert code == 1
    (row,) = rows(data, "node-ids", "fail")
    assert row["node"] == "node-a" and "duplicate-node-id" in row["detail"] and "other-host" in row["detail"]


def test_unstable_node_id_fails_node_ids(cfg: Path, unique_cluster: str) -> None:
    register(cfg, unique_cluster)
    # node-b's id was last bound to another machine.
    put(cfg, {keys.identity(unique_cluster, "node-b"): {"node_id": "node-b", "machine_id": "machine-old"}})
    code, data, _ = preflight(cfg)
    assert code == 1
    assert any(r["node"] == "node-b" and "machine-old" in r["detail"] for r in rows(data, "node-ids", "fail"))


def test_missing_expected_node_fails(cfg: Path, unique_cluster: str) -> None:
    put(cfg, {keys.node(unique_cluster, "node-a"): node_record("node-a")})
    code, data, _ = preflight(cfg)
    assert code == 1
    (row,) = rows(data, "nodes", "fail")
    assert row["node"] == "node-b" and "not registered" in row["detail"]


def test_stale_and_failing_probe_reports_fail_the_node(cfg: Path, unique_cluster: str) -> None:
    stale = node_record("node-a", probes={"etcd": probe(), "nats": probe(), "redis": probe(age=60)})
    failing = node_record("node-b", probes={"etcd": probe(), "redis": probe(),
                                             "nats": probe(ok=False, detail="auth: refused")})
    register(cfg, unique_cluster, node_a=stale, node_b=failing)
    code, data, _ = preflight(cfg)
    assert code == 1
    bad = {(r["node"], r["target"]): r["detail"] for r in rows(data, "nodes", "fail")}
    assert set(bad) == {("node-a", "redis"), ("node-b", "nats")}
    assert "stale" in bad[("node-a", "redis")]
    assert bad[("node-b", "nats")].startswith("auth:")


def test_clock_offset_over_threshold_fails_that_node(cfg: Path, unique_cluster: str) -> None:
    register(cfg, unique_cluster, node_b=node_record("node-b", offset_ms=400.0))
    code, data, _ = preflight(cfg)
    assert code == 1
    failed = rows(data, "clock", "fail")
    assert any(r["node"] == "node-b" and "+400.0 ms" in r["detail"] for r in failed)
    assert any(r["target"] == "spread" for r in failed)
    assert not any(r["node"] == "node-a" for r in failed)

    # 400 ms is only a warning with looser thresholds: warnings do not fail the preflight.
    code, data, _ = preflight(cfg, "--skew-warn-ms", "300", "--skew-fail-ms", "1000")
    assert code == 0 and data["ok"] is True
    assert any(r["node"] == "node-b" for r in rows(data, "clock", "warn"))


def test_bad_lease_timing_fails(tmp_path: Path, env: Env, shared_etcd, shared_redis, unique_cluster: str) -> None:
    cfg = make_config(tmp_path / "c.toml", env, shared_etcd.client_url, shared_redis.url, unique_cluster,
                      coordination={"lease-ttl": 10, "keepalive-interval": 4})
    register(cfg, unique_cluster)
    code, data, _ = preflight(cfg, "--only", "lease-timing")
    assert code == 1
    (row,) = [r for r in rows(data, "lease-timing", "fail") if r["target"] == "keepalive"]
    assert "12s > TTL 10s" in row["detail"]


def test_only_runs_the_selected_checks_and_is_not_recorded(cfg: Path, unique_cluster: str) -> None:
    register(cfg, unique_cluster)
    code, data, err = preflight(cfg, "--only", "redis", "--only", "clock")
    assert code == 0, err
    assert {c["name"] for c in data["checks"]} == {"redis", "clock"}
    assert "not recorded" in err
    code, _, err = preflight(cfg, "--only", "bogus")
    assert code == 2 and "bogus" in err


# -- node-side probes (what each agent runs and writes into its record) -------------------------


async def test_probe_all_reports_auth_and_unreachable(tmp_path: Path, env: Env, shared_etcd, redis_server,
                                                      unique_cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cbctl.core.backends.probes import probe_all

    cfg = make_config(tmp_path / "c.toml", env, shared_etcd.client_url, redis_server.url, unique_cluster)
    ctx = load_config(cfg).context()
    monkeypatch.setenv("CBCTL_TEST_NATS_PW", NATS_PASSWORD)
    ok = await probe_all(ctx)
    assert all(p["ok"] for p in ok.values()), ok
    assert set(ok["nats"]) == {"ok", "detail", "at", "ms"}

    monkeypatch.setenv("CBCTL_TEST_NATS_PW", "wrong")
    redis_server.stop()
    bad = await probe_all(ctx, timeout=1.0)
    assert bad["etcd"]["ok"] is True
    assert bad["nats"]["ok"] is False and bad["nats"]["detail"].startswith("auth:")
    assert bad["redis"]["ok"] is False and bad["redis"]["detail"].startswith("unreachable:")


def test_measure_clock_against_a_skewed_ntp_server(tmp_path: Path) -> None:
    """A real chronyd serving a clock 2 s ahead (faketime): the SNTP offset says so."""
    import shutil

    from cbctl.core.backends.probes import measure_clock
    from cbctl.sandbox import ChronyServer

    if shutil.which("chronyd", path="/usr/sbin:/usr/bin:/sbin") is None or shutil.which("faketime") is None:
        pytest.skip("chronyd/faketime not installed")
    server = ChronyServer(tmp_path / "chrony", offset_seconds=2.0)
    server.start()
    try:
        clock = measure_clock([f"127.0.0.1:{free_port(udp=True)}", f"127.0.0.1:{server.port}"], timeout=0.5)
    finally:
        server.stop()
    assert clock["error"] is None and clock["source"] == f"127.0.0.1:{server.port}"
    assert 1800 < clock["offset_ms"] < 2200
    none = measure_clock([])
    assert none["offset_ms"] is None and "no ntp-servers" in none["error"]


async def test_probe_loop_reports_periodically(tmp_path: Path, env: Env, shared_etcd, shared_redis,
                                               unique_cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cbctl.core.backends.probes import probe_loop
    from cbctl.sandbox.waiting import async_wait_until

    monkeypatch.setenv("CBCTL_TEST_NATS_PW", NATS_PASSWORD)
    ctx = load_config(make_config(tmp_path / "c.toml", env, shared_etcd.client_url, shared_redis.url,
                                  unique_cluster)).context()
    reports: list[dict[str, Any]] = []

    async def report(**fields: Any) -> None:
        reports.append(fields)

    task = asyncio.create_task(probe_loop(ctx, report, interval=0.2, timeout=1.0))
    try:
        await async_wait_until(lambda: len(reports) >= 2, 10, message="two probe rounds")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    first = reports[0]
    assert set(first) == {"probes", "clock"}
    assert all(p["ok"] for p in first["probes"].values()), first
    assert first["clock"]["offset_ms"] is None and first["clock"]["error"]  # nothing answers on :123
