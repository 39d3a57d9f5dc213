"""Unit tests of the shared coordinator failover (cbctl.core.backends.coord.failover) and of the
parts of the etcd/Consul backends that need no server (config checks, error conversion, the
failover loop and the watch give-up, driven by fake clients).  The Consul backend has no server
on this machine; these tests are what keeps its code exercised.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from cbctl.core.backends.coord.consul import ConsulCoordinator, _ConsulErrors
from cbctl.core.backends.coord.etcd import EtcdCoordinator
from cbctl.core.backends.coord.failover import ReauthNeeded, Unreachable, parse_endpoint
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, BadInput, ConfigError

pytestmark = pytest.mark.timeout(10)


class FakeClient:
    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.token_generation = 0
        self.reauths = 0
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    async def reauthenticate(self, seen: int) -> None:
        self.reauths += 1
        self.token_generation += 1


def fake_clients(coord: Any) -> list[FakeClient]:
    made: list[FakeClient] = []

    def new(idx: int) -> FakeClient:
        made.append(FakeClient(idx))
        return made[-1]

    coord._new_client = new
    return made


def test_parse_endpoint_ports_and_ipv6() -> None:
    ep = parse_endpoint("https://[::1]", "consul", http_port=8500, https_port=8501)
    assert (ep.host, ep.port, ep.tls) == ("[::1]", 8501, True)
    assert parse_endpoint("http://h:1", "etcd", http_port=2379, https_port=2379).port == 1
    with pytest.raises(ConfigError, match="consul endpoint 'h:1'"):
        parse_endpoint("h:1", "consul", http_port=8500, https_port=8501)
    with pytest.raises(ConfigError, match="invalid port"):
        parse_endpoint("http://h:99999", "etcd", http_port=2379, https_port=2379)


@pytest.mark.parametrize("cls,name", [(ConsulCoordinator, "consul"), (EtcdCoordinator, "etcd")])
def test_config_checks_name_the_backend(cls: Any, name: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: at least one endpoint"):
        cls([])
    with pytest.raises(ConfigError, match=f"^{name} TLS: give both"):
        cls(["https://h:1"], cert_file="c")
    with pytest.raises(ConfigError, match=f"^{name} timeout must be positive"):
        cls(["http://h:1"], timeout=0)
    c = cls("http://h:1", timeout=2)
    assert c.endpoints == ["http://h:1"] and c._reconnect_deadline == 4.0


def test_etcd_specific_config_checks() -> None:
    with pytest.raises(ConfigError, match="mix http"):
        EtcdCoordinator(["http://a:1", "https://b:1"])
    with pytest.raises(ConfigError, match="endpoints are http://"):
        EtcdCoordinator(["http://a:1"], ca_file="ca")
    with pytest.raises(ConfigError, match="username needs a password"):
        EtcdCoordinator(["http://a:1"], username="u")


def test_consul_error_edge_converts() -> None:
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)
    with pytest.raises(Unreachable) as info, _ConsulErrors("get 'k'"):
        raise aiohttp.ClientConnectorError(key, OSError(111, "refused"))
    assert info.value.maybe_applied is False and str(info.value).startswith("consul get 'k'")
    with pytest.raises(Unreachable) as info, _ConsulErrors("put"):
        raise TimeoutError()
    assert info.value.maybe_applied is True
    with pytest.raises(KeyError), _ConsulErrors("x"):
        raise KeyError("ours pass through")


async def test_idempotent_call_fails_over_to_next_endpoint() -> None:
    c = ConsulCoordinator(["http://a:1", "http://b:1", "http://c:1"])
    fake_clients(c)
    seen: list[int] = []

    async def op(client: FakeClient) -> str:
        seen.append(client.idx)
        if client.idx == 0:
            raise TimeoutError()
        return "ok"

    assert await c._call("get", op, idempotent=True) == "ok"
    assert seen == [0, 1] and c.current_endpoint == "http://b:1"


async def test_write_that_may_have_landed_is_not_repeated() -> None:
    c = ConsulCoordinator(["http://a:1", "http://b:1"])
    fake_clients(c)
    calls = 0

    async def op(client: FakeClient) -> None:
        nonlocal calls
        calls += 1
        raise TimeoutError()

    with pytest.raises(BackendUnavailable, match="^consul put at http://a:1"):
        await c._call("put", op, idempotent=False)
    assert calls == 1


async def test_all_endpoints_failing_names_each() -> None:
    c = ConsulCoordinator(["http://a:1", "http://b:1"])
    fake_clients(c)

    async def op(client: FakeClient) -> None:
        raise OSError("down")

    with pytest.raises(BackendUnavailable, match=r"consul unreachable \(2 agents tried\)") as info:
        await c._call("get", op, idempotent=True)
    assert not isinstance(info.value, Unreachable)  # the internal type does not escape


async def test_closed_coordinator_refuses_and_close_closes_clients() -> None:
    c = ConsulCoordinator(["http://a:1"])
    made = fake_clients(c)
    c._client(0)
    await c.close()
    assert made[0].closed
    with pytest.raises(BackendUnavailable, match="consul coordinator is closed"):
        await c._call("get", lambda cl: asyncio.sleep(0), idempotent=True)


async def test_etcd_reauthenticates_once_then_gives_up() -> None:
    c = EtcdCoordinator(["http://a:1"])
    made = fake_clients(c)
    n = 0

    async def op(client: FakeClient) -> str:
        nonlocal n
        n += 1
        if n == 1:
            raise ReauthNeeded("token expired", backend="etcd")
        return "ok"

    assert await c._call("get", op, idempotent=True) == "ok"
    assert made[0].reauths == 1

    async def always(client: FakeClient) -> None:
        raise ReauthNeeded("token expired", backend="etcd")

    with pytest.raises(AuthFailed):
        await c._call("get", always, idempotent=True)


async def test_etcd_splits_the_deadline_over_untried_endpoints() -> None:
    c = EtcdCoordinator(["http://a:1", "http://b:1"], timeout=0.2)
    fake_clients(c)

    async def op(client: FakeClient) -> str:
        if client.idx == 0:
            await asyncio.sleep(10)  # silent member: cut off by its share of the deadline
        return "ok"

    started = asyncio.get_running_loop().time()
    assert await c._call("get", op, idempotent=True) == "ok"
    assert asyncio.get_running_loop().time() - started < 0.19  # first attempt got ~half


async def test_consul_watch_gives_up_after_reconnect_deadline() -> None:
    c = ConsulCoordinator(["http://a:1"], timeout=1, reconnect_deadline=0.05)
    calls = 0

    async def snapshot(ck: str, prefix: bool, index: int, wait: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return 5, {}
        raise BackendUnavailable("down", backend="consul")

    c._snapshot = snapshot  # type: ignore[method-assign]
    with pytest.raises(BackendUnavailable, match=r"^consul watch '/k': no agent answered for 0\.\d+s"):
        async for _ in c.watch("/k"):
            pass
    assert calls >= 3


def test_consul_key_mapping() -> None:
    from cbctl.core.backends.coord.consul import _ck

    assert _ck("/app/x") == "app/x"
    with pytest.raises(BadInput):
        _ck("app/x")
