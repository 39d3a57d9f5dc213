"""The real-service harness itself: readiness, refusal, failure reporting, process groups,
faults (kill, pause), restart, and the etcd cluster's leader change."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cbctl.sandbox import (
    ChronyServer,
    EtcdServer,
    HarnessError,
    NatsServer,
    RedisServer,
    Service,
    async_wait_until,
    free_port,
    group_members,
    port_answers,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _no_proxy.open(req, timeout=2) as resp:
        return json.loads(resp.read())


def etcd_put(client_url: str, key: bytes, value: bytes) -> None:
    import base64

    http_json(f"{client_url}/v3/kv/put", {"key": base64.b64encode(key).decode(),
                                          "value": base64.b64encode(value).decode()})


def etcd_get(client_url: str, key: bytes) -> bytes | None:
    import base64

    kvs = http_json(f"{client_url}/v3/kv/range", {"key": base64.b64encode(key).decode()}).get("kvs")
    return base64.b64decode(kvs[0]["value"]) if kvs else None


# redis-py retries 3 times with backoff by default; the tests want one attempt per call.
NO_RETRY = Retry(NoBackoff(), 0)


def cmdline(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline())


class ShellService(Service):
    """A stand-in service running a shell script: lets tests exercise process-group handling
    and the readiness deadline without depending on a particular server's behaviour."""

    binary = "sh"

    def __init__(self, base_dir: Path, script: str, ready: bool = True) -> None:
        super().__init__(base_dir, name="sh")
        self.script = script
        self.ready = ready

    def command(self) -> list[str]:
        return ["sh", "-c", self.script]

    def probe(self) -> bool:
        return self.ready

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        return []


# --- each service starts and is healthy -------------------------------------------------------

def test_etcd_ready_and_serves(etcd: EtcdServer) -> None:
    assert etcd.is_running() and etcd.is_healthy()
    assert etcd.client_url == f"http://127.0.0.1:{etcd.port}"
    etcd_put(etcd.client_url, b"k", b"v")
    assert etcd_get(etcd.client_url, b"k") == b"v"
    info = etcd.to_dict()
    assert info["healthy"] is True and info["pid"] == etcd.pid and info["port"] == etcd.port
    assert info["name"] == "etcd" and info["client_url"] == etcd.client_url
    assert Path(info["log_path"]).is_file() and etcd.data_dir in etcd.log_path.parents


async def test_nats_ready_with_jetstream(nats: NatsServer) -> None:
    import nats as nats_client

    assert nats.is_healthy()
    nc = await nats_client.connect(nats.url, connect_timeout=2, allow_reconnect=False)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()
    assert http_json(f"{nats.monitor_url}/varz")["port"] == nats.port


def test_redis_ready_and_serves(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(redis_server.url)
    client.set("a", "1")
    assert client.get("a") == b"1"
    client.close()


def test_prometheus_scrapes_targets_added_live(prometheus) -> None:  # type: ignore[no-untyped-def]
    assert prometheus.is_healthy()
    # Prometheus scraping itself is a target that is surely up.
    prometheus.set_targets([(f"127.0.0.1:{prometheus.port}", {"role": "self"})])

    # Prometheus hands new targets to its scrapers every 5 s: allow two rounds.
    wait_until(lambda: any(r["value"][1] == "1" for r in prometheus.query('up{role="self"}')),
               15, interval=0.1, message="prometheus scraped the new target")


def test_prometheus_rules_reload_live(prometheus) -> None:  # type: ignore[no-untyped-def]
    # Rules are not throttled like discovery: a recorded series shows up within ~1 interval.
    prometheus.set_rules(
        "groups:\n- name: t\n  rules:\n  - record: cbctl_harness_one\n    expr: vector(1)\n"
    )
    wait_until(lambda: prometheus.query("cbctl_harness_one"), 5, interval=0.05,
               message="recording rule evaluated after SIGHUP reload")


def test_chrony_serves_ntp(chrony: ChronyServer) -> None:
    assert chrony.is_healthy()
    assert abs(chrony.ntp_offset()) < 0.5
    assert chrony.to_dict()["protocol"] == "udp"


def test_chrony_under_faketime_serves_a_shifted_clock(tmp_path: Path) -> None:
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed")
    with ChronyServer(tmp_path, offset_seconds=30) as server:
        assert 29 < server.ntp_offset() < 31


# --- refusal, failure reporting, deadlines ------------------------------------------------------

def test_refuses_a_port_that_already_answers(etcd: EtcdServer, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="already answers"):
        EtcdServer(tmp_path, port=etcd.port).start(timeout=5)
    assert etcd.is_healthy()  # the first server is untouched


def test_refuses_a_busy_udp_port_for_chrony(chrony: ChronyServer, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="already in use"):
        ChronyServer(tmp_path, port=chrony.port).start(timeout=5)


def test_process_dying_at_start_raises_with_log_tail(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path, extra_args=["--no-such-flag"])
    with pytest.raises(HarnessError) as info:
        server.start(timeout=10)
    text = str(info.value)
    assert "exited" in text and "no-such-flag" in text and str(server.log_path) in text
    assert not server.is_running() and server.pid is None
    assert not port_answers("127.0.0.1", server.port)


@pytest.mark.timeout(10)
def test_missed_deadline_raises_and_leaves_nothing_running(tmp_path: Path) -> None:
    service = ShellService(tmp_path, "echo starting-but-never-ready; exec sleep 300", ready=False)
    started = time.monotonic()
    with pytest.raises(HarnessError, match="not ready within") as info:
        service.start(timeout=0.5)
    assert time.monotonic() - started < 4
    assert "starting-but-never-ready" in str(info.value)
    assert not service.is_running()


# --- process groups, stop, kill -----------------------------------------------------------------

def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    service = ShellService(tmp_path, "sleep 300 & sleep 300 & wait").start(timeout=5)
    pgid = service.pid
    assert pgid is not None
    wait_until(lambda: len(group_members(pgid)) == 3, 5, message="shell and two children running")
    service.stop()
    assert group_members(pgid) == []
    assert service.pid is None and not service.is_running()


@pytest.mark.timeout(10)
def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    # An ignored signal disposition is inherited across exec, so the children ignore TERM too.
    service = ShellService(tmp_path, "trap '' TERM; sleep 300 & sleep 300 & wait").start(timeout=5)
    pgid = service.pid
    assert pgid is not None
    wait_until(lambda: len(group_members(pgid)) == 3, 5, message="shell and two children running")
    started = time.monotonic()
    service.stop(timeout=0.3)
    assert time.monotonic() - started < 3
    assert group_members(pgid) == []


def test_stop_real_server_and_stop_is_idempotent(redis_server: RedisServer) -> None:
    pid = redis_server.pid
    assert pid is not None
    redis_server.stop()
    assert not psutil.pid_exists(pid) or group_members(pid) == []
    assert not port_answers("127.0.0.1", redis_server.port)
    redis_server.stop()  # again: no-op
    assert redis_server.to_dict()["healthy"] is False
    with pytest.raises(HarnessError):
        redis_server.kill()


def test_kill_then_restart_on_same_port_and_data_dir(etcd: EtcdServer) -> None:
    etcd_put(etcd.client_url, b"survives", b"restart")
    old_pid, port = etcd.pid, etcd.port
    etcd.kill(signal.SIGKILL)
    wait_until(lambda: not etcd.is_running(), 5, message="etcd dead after SIGKILL")
    assert not etcd.is_healthy()
    etcd.restart(timeout=10)
    assert etcd.port == port and etcd.pid != old_pid
    assert etcd_get(etcd.client_url, b"survives") == b"restart"


def test_redis_restart_on_same_port(redis_server: RedisServer) -> None:
    port, old_pid = redis_server.port, redis_server.pid
    redis_server.restart(timeout=10)
    assert redis_server.port == port and redis_server.pid != old_pid
    assert redis_server.client().ping()


def test_pause_and_resume(redis_server: RedisServer) -> None:
    client = redis_server.client(socket_timeout=0.3, socket_connect_timeout=0.3, retry=NO_RETRY)
    assert client.ping()
    redis_server.pause()
    try:
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert redis_server.to_dict()["paused"] is True
    finally:
        redis_server.resume()
    wait_until(lambda: redis_server.is_healthy(), 5, message="redis answers after SIGCONT")
    fresh = redis_server.client(socket_timeout=1)
    assert fresh.ping()


def test_stop_of_a_paused_server_does_not_hang(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    server.pause()
    started = time.monotonic()
    server.stop(timeout=5)
    assert time.monotonic() - started < 2  # SIGTERM took effect, no SIGKILL needed
    assert not server.is_running()


# --- etcd cluster --------------------------------------------------------------------------------

def test_etcd_cluster_leader_failover(etcd_cluster) -> None:  # type: ignore[no-untyped-def]
    assert len(etcd_cluster.members) == 3 and len(set(etcd_cluster.endpoints)) == 3
    assert etcd_cluster.is_healthy()
    leader = etcd_cluster.leader()
    leader.kill()
    started = time.monotonic()
    new_leader = etcd_cluster.wait_for_leader(timeout=5, exclude=leader)
    elapsed = time.monotonic() - started
    assert new_leader is not leader and new_leader.is_running()
    assert elapsed < 5
    etcd_put(new_leader.client_url, b"after-failover", b"ok")
    # The killed member comes back on its ports with its data and catches up.
    leader.restart(timeout=10)
    wait_until(lambda: etcd_get(leader.client_url, b"after-failover") == b"ok", 5,
               message="restarted member caught up")


# --- options -----------------------------------------------------------------------------------

def test_extra_listen_hosts(tmp_path: Path) -> None:
    # 127.0.0.2 is on lo as well (127/8), so it stands in for a veth address here.
    with EtcdServer(tmp_path, extra_listen_hosts=["127.0.0.2"]) as etcd:
        assert http_json(f"http://127.0.0.2:{etcd.port}/health")["health"] == "true"
    with RedisServer(tmp_path, extra_bind_hosts=["127.0.0.2"]) as server:
        assert redis.Redis(host="127.0.0.2", port=server.port).ping()
    with NatsServer(tmp_path, extra_listen_hosts=["127.0.0.2"]) as server:
        assert port_answers("127.0.0.2", server.port)


def test_redis_requirepass_is_not_on_the_command_line(tmp_path: Path) -> None:
    secret = 'pa ss"w\\rd'
    with RedisServer(tmp_path, requirepass=secret) as server:
        assert server.pid is not None
        assert secret not in cmdline(server.pid)
        assert oct(server.config_path.stat().st_mode & 0o777) == "0o600"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port, retry=NO_RETRY).set("x", 1)
        assert redis.Redis(host=server.host, port=server.port, password=secret).ping()


async def test_nats_user_password_and_token(tmp_path: Path) -> None:
    import nats as nats_client
    from nats.errors import Error as NatsError

    async def quiet(_: Exception) -> None:
        return None

    opts = {"connect_timeout": 2, "allow_reconnect": False, "error_cb": quiet}
    with NatsServer(tmp_path, name="nats-user", user="agent", password='s3"cr\\et') as server:
        assert server.pid is not None and "s3" not in cmdline(server.pid)
        with pytest.raises((NatsError, OSError)):
            await nats_client.connect(server.url, user="agent", password="wrong", **opts)
        nc = await nats_client.connect(server.url, user="agent", password='s3"cr\\et', **opts)
        await nc.close()
    with NatsServer(tmp_path, name="nats-token", token="tok123") as server:
        nc = await nats_client.connect(server.url, token="tok123", **opts)
        await nc.close()


async def test_nats_tls(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    import nats as nats_client

    from cbctl.sandbox.tls import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    with NatsServer(tmp_path, tls=pki) as server:
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        nc = await nats_client.connect(server.url, tls=ctx, connect_timeout=2, allow_reconnect=False)
        assert nc.is_connected
        await nc.close()


# --- waiting helpers ---------------------------------------------------------------------------

def test_wait_until_returns_value_or_raises_with_message() -> None:
    calls = iter(range(100))
    assert wait_until(lambda: next(calls) >= 3, 1, interval=0.001) is True
    with pytest.raises(TimeoutError, match="the thing"):
        wait_until(lambda: False, 0.05, message="the thing")
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, 1)
    with pytest.raises(TimeoutError, match="ConnectionError"):
        wait_until(lambda: (_ for _ in ()).throw(ConnectionError("x")), 0.05,
                   ignore=(ConnectionError,))


async def test_async_wait_until_accepts_sync_and_async_predicates() -> None:
    state = {"n": 0}

    async def bump() -> bool:
        state["n"] += 1
        await asyncio.sleep(0)
        return state["n"] >= 3

    assert await async_wait_until(bump, 1, interval=0.001) is True
    assert await async_wait_until(lambda: "v", 1) == "v"
    with pytest.raises(TimeoutError, match="never"):
        await async_wait_until(lambda: False, 0.05, message="never")


def test_free_port_never_repeats_in_one_process() -> None:
    ports = {free_port() for _ in range(50)}
    assert len(ports) == 50


# --- testcontainers ------------------------------------------------------------------------------

def _docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_testcontainers_provider() -> None:
    if not _docker_engine_answers():
        pytest.skip("no Docker engine on this machine; testcontainers provider not exercised")
    from testcontainers.redis import RedisContainer

    with RedisContainer() as container:
        client = container.get_client()
        assert client.ping()
