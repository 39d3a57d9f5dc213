"""The etcd JSON-gateway client (cbctl/core/backends/coord/etcd_gateway.py) without an etcd: its
error conversion and config checks agree with the aetcd backend's, failover over fake HTTP
endpoints keeps the shared deadline, and it loads no asyncio/grpc/aetcd/tenacity.
(Against real etcd members: tests/integration/test_coord_gateway.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from cbctl.core.backends.coord import etcd as grpc_backend
from cbctl.core.backends.coord import etcd_gateway as gw
from cbctl.core.backends.coord.etcd import EtcdCoordinator
from cbctl.core.backends.coord.etcd_readonly import EtcdReadOnlyCoordinator
from cbctl.core.model.config import Secret
from cbctl.core.model.errors import BackendUnavailable, CbctlError, ConfigError

pytestmark = pytest.mark.timeout(30)


def test_marker_tables_match_the_grpc_backend() -> None:
    assert gw._AUTH_MARKERS == grpc_backend._AUTH_MARKERS
    assert gw._REAUTH_MARKERS == grpc_backend._REAUTH_MARKERS
    assert gw._TLS_MARKERS == grpc_backend._TLS_MARKERS


@pytest.mark.parametrize(("code", "details"), [
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: authentication failed, invalid user ID or password"),
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty"),
    (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token"),
    (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"),
    (grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: authentication is not enabled"),
    (grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"),
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided"),
    (grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision"),
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader"),
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out"),
    (grpc.StatusCode.UNKNOWN, "SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED"),
])
def test_server_errors_convert_as_grpc(code: grpc.StatusCode, details: str) -> None:
    what = "get '/k' at http://127.0.0.1:2379"
    expected = grpc_backend._convert(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details), what)
    got = gw.convert(gw.ServerError(400, code.value[0], details), what)
    assert (type(got).__name__, got.exit_code, str(got)) == (type(expected).__name__, expected.exit_code, str(expected))
    assert isinstance(got, BackendUnavailable) == isinstance(expected, BackendUnavailable)


def test_timeouts_and_refusals_convert() -> None:
    what = "read revision at http://127.0.0.1:1"
    assert str(gw.convert(TimeoutError(), what)) == str(grpc_backend._convert(TimeoutError(), what))
    refused = gw.convert(ConnectionRefusedError(111, "Connection refused"), what)
    assert type(refused) is gw.Unreachable and refused.exit_code == 4
    assert str(refused) == f"etcd {what}: failed to connect: Connection refused"
    plain = gw.convert(gw.ServerError(400, None, "Client sent an HTTP request to an HTTPS server."), what)
    assert plain.exit_code == 4 and "HTTP 400" in str(plain)


@pytest.mark.parametrize("kwargs", [
    {"endpoints": []},
    {"endpoints": ["ftp://h:1"]},
    {"endpoints": ["http://h:notaport"]},
    {"endpoints": ["http://a:1", "https://b:1"]},
    {"endpoints": ["http://a:1"], "ca_file": "/ca.pem"},
    {"endpoints": ["https://a:1"], "cert_file": "/c.pem"},
    {"endpoints": ["http://a:1"], "timeout": 0},
    {"endpoints": ["http://a:1"], "username": "root"},
    {"endpoints": ["http://a:1"], "password": Secret("x", "t")},
])
def test_config_errors_match(kwargs: dict[str, Any]) -> None:
    kw = dict(kwargs)
    endpoints = kw.pop("endpoints")
    with pytest.raises(ConfigError) as expected:
        EtcdCoordinator(endpoints, **kw)
    with pytest.raises(ConfigError) as got:
        EtcdReadOnlyCoordinator(endpoints, **kw)
    assert str(got.value) == str(expected.value)


def test_prefix_range_end_matches_aetcd() -> None:
    from aetcd.utils import prefix_range_end

    # Where they agree: a last byte below 0xff (every cbctl prefix ends with "/"). For a 0xff
    # tail aetcd keeps the 0xff bytes (b"a\xff" -> b"b\xff", a range wider than the prefix);
    # ours is etcd's own rule (drop them, then increment: b"b").
    for p in (b"/cbctl/", b"/cbctl/t1/nodes/", b"x", b"\xff/"):
        assert gw.prefix_range_end(p) == prefix_range_end(p)
    assert gw.prefix_range_end(b"a\xff") == b"b" and gw.prefix_range_end(b"\xff") == b"\0"


# -- failover over fake endpoints ----------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    reply: tuple[int, dict[str, Any]] = (200, {})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.server.reply  # type: ignore[attr-defined]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[Any]:
    servers = []

    def start(status: int, body: dict[str, Any]) -> str:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.reply = (status, body)  # type: ignore[attr-defined]
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def silent() -> Iterator[str]:
    """A port that accepts connections (backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def test_failover_splits_the_deadline(fake: Any, silent: str) -> None:
    live = fake(200, {"header": {"revision": "42"}, "kvs": [
        {"key": "L2s=", "value": "", "mod_revision": "41", "create_revision": "7", "lease": "99"}]})
    session = gw.GatewaySession([silent, live], timeout=1.0)
    start = time.monotonic()
    rev, kvs = session.call("get '/k'", lambda c, d: c.range(b"/k", None, d))
    took = time.monotonic() - start
    assert rev == 42 and kvs == [gw.RawKV(b"/k", b"", 41, 7, 99)]
    assert 0.4 <= took < 0.9, took  # the silent member got half of the second, not all of it
    assert session.current_endpoint == live


def test_every_endpoint_failing_names_each(silent: str) -> None:
    session = gw.GatewaySession([silent, "http://127.0.0.1:1"], timeout=0.6)
    with pytest.raises(BackendUnavailable) as info:
        session.call("read revision", lambda c, d: c.range(b"/", None, d))
    msg = str(info.value)
    assert msg.startswith("etcd unreachable (2 endpoints tried): etcd read revision at ")
    assert "no answer in time" in msg and "Connection refused" in msg


def test_gateway_refusals_are_not_errors(fake: Any) -> None:
    url = fake(404, {})
    with pytest.raises(gw.GatewayUnsupported):
        gw.GatewaySession([url], timeout=1.0).call("get", lambda c, d: c.range(b"/k", None, d))
    denied = fake(403, {"code": 7, "message": "etcdserver: permission denied"})
    with pytest.raises(CbctlError, match="permission denied"):
        gw.GatewaySession([denied], timeout=1.0).call("get", lambda c, d: c.range(b"/k", None, d))


def test_gateway_module_loads_no_async_or_grpc() -> None:
    code = ("import json, sys; import cbctl.core.backends.coord.etcd_gateway, cbctl.core.backends.coord.peek;"
            "print(json.dumps([m for m in ('asyncio', 'grpc', 'aetcd', 'tenacity') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(out.stdout) == []
