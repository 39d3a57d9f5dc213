"""The read-only etcd coordinator (JSON gateway, cbctl/core/backends/coord/etcd_readonly.py) against
the gRPC one (cbctl/core/backends/coord/etcd.py): the same read calls through both, against real
etcd members of the harness, must give equal results and equal errors.

Covered: get / list / current_revision (values, mod/create revisions, leases, non-UTF-8 keys,
empty values), a stopped member (exit 4, same message shape, alone and with failover), failover
to a live member, user/password auth (right, wrong, missing, expired token), and TLS: client
certificates without auth (gateway), wrong CA (TLS hint), and client certificates with auth on,
which etcd's gateway refuses, so the coordinator falls back to gRPC.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import urllib.request
import uuid
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.backends.coord.base import Coordinator
from cbctl.core.backends.coord.etcd import EtcdCoordinator
from cbctl.core.backends.coord.etcd_readonly import EtcdReadOnlyCoordinator
from cbctl.core.model.config import Secret
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, CbctlError
from cbctl.sandbox import EtcdServer
from cbctl.sandbox.tls import make_test_pki
from tests.helpers import cbctl_proc, write_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("etcdctl") is None, reason="etcdctl is needed (run `make setup`)"),
]


def both(endpoints: list[str], **kwargs: Any) -> tuple[EtcdCoordinator, EtcdReadOnlyCoordinator]:
    return EtcdCoordinator(endpoints, **kwargs), EtcdReadOnlyCoordinator(endpoints, **kwargs)


async def outcome(coord: Coordinator, reads: list[tuple[str, str]]) -> list[Any]:
    """Connect, run ``reads`` ((method, argument); "" for current_revision), close; a cbctl
    error ends the list as (class name, exit code, message)."""
    out: list[Any] = []
    try:
        await coord.connect()
        for method, arg in reads:
            out.append(await getattr(coord, method)(arg) if arg else await getattr(coord, method)())
    except CbctlError as exc:
        out.append((type(exc).__name__, exc.exit_code, str(exc)))
    finally:
        await coord.close()
    return out


def etcdctl(endpoint: str, *args: str, stdin: str = "", tls: Mapping[str, Path] | None = None) -> None:
    """etcdctl with a password on stdin only (never argv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    argv = ["etcdctl", "--endpoints", endpoint, "--command-timeout=5s", "--dial-timeout=3s"]
    if tls:
        argv += ["--cacert", str(tls["ca"]), "--cert", str(tls["cert"]), "--key", str(tls["key"])]
    proc = subprocess.run([*argv, *args], input=stdin, capture_output=True, text=True, timeout=15,
                          env={**env, "ETCDCTL_API": "3"}, check=False)
    assert proc.returncode == 0, f"etcdctl {args}: {proc.stderr}"


def enable_auth(endpoint: str, password: str, tls: Mapping[str, Path] | None = None) -> None:
    etcdctl(endpoint, "user", "add", "root", "--interactive=false", stdin=password + "\n", tls=tls)
    etcdctl(endpoint, "auth", "enable", tls=tls)


# -- results -----------------------------------------------------------------------------------

async def test_reads_equal(shared_etcd: EtcdServer, unique_cluster: str) -> None:
    prefix = f"/cbctl/{unique_cluster}/"
    grpc_c, gw = both([shared_etcd.client_url], timeout=3.0, probe_key=prefix)
    async with EtcdCoordinator([shared_etcd.client_url], timeout=3.0) as writer:
        await writer.put(prefix + "rollout", b'{"stage": 1}')
        await writer.commit(prefix + "rollout", b'{"stage": 2}', expected_revision=(await writer.get(prefix + "rollout")).mod_revision,  # type: ignore[union-attr]
                            also_put={prefix + "audit/1-a": b"x", prefix + "audit/2-b": b""})
        lease = await writer.grant_lease(30)
        await writer.put(prefix + "nodes/n1", '{"node_id": "n1", "h": "ü"}'.encode(), lease=lease)
        await writer.create(prefix + "lanes/lane-00", b'{"owner": "n1"}', lease=lease)
        await writer.put(prefix + "nodes/\udcff-raw", b"\x00\xff")  # a key that is not UTF-8
        await writer.put(f"/cbctl/{unique_cluster}0/outside", b"not under the prefix")
        reads = [("get", prefix + "rollout"), ("get", prefix + "missing"), ("get", prefix + "audit/2-b"),
                 ("list", prefix), ("list", prefix + "nodes/"), ("list", prefix + "nothing/"),
                 ("get", prefix + "lanes/lane-00")]
        expected = await outcome(grpc_c, reads)
        got = await outcome(gw, reads)
        assert got == expected
        assert gw.served_by == "gateway"
        assert got[1] is None and got[3] and got[6].lease == lease.id and got[6].create_revision > 0
        # The header revision: between two gRPC reads (the shared etcd may move meanwhile).
        async with EtcdCoordinator([shared_etcd.client_url], timeout=3.0, probe_key=prefix) as g:
            before = await g.current_revision()
            async with EtcdReadOnlyCoordinator([shared_etcd.client_url], timeout=3.0, probe_key=prefix) as r:
                mid = await r.current_revision()
            after = await g.current_revision()
        assert before <= mid <= after
        await writer.revoke_lease(lease)


async def test_read_only_refuses_writes(shared_etcd: EtcdServer) -> None:
    async with EtcdReadOnlyCoordinator([shared_etcd.client_url], timeout=3.0) as r:
        with pytest.raises(NotImplementedError, match="read-only"):
            await r.put("/cbctl/x", b"1")
        with pytest.raises(NotImplementedError, match="read-only"):
            r.watch("/cbctl/x")


# -- errors ------------------------------------------------------------------------------------

async def test_stopped_etcd_same_error(etcd: EtcdServer, tmp_path: Path, unique_cluster: str) -> None:
    url = etcd.client_url
    etcd.stop()
    for endpoints in ([url], [url, url.replace("127.0.0.1", "127.0.0.2")]):
        grpc_c, gw = both(endpoints, timeout=2.0)
        (exp,), (got,) = await outcome(grpc_c, [("current_revision", "")]), await outcome(gw, [("current_revision", "")])
        assert got[:2] == exp[:2] == ("BackendUnavailable", 4)
        if len(endpoints) == 1:
            assert got[2].startswith(f"etcd read revision at {url}: ") and exp[2].startswith(f"etcd read revision at {url}: ")
            assert "connection refused" in got[2].lower() and "connection refused" in exp[2].lower()
        else:
            assert got[2].startswith("etcd unreachable (2 endpoints tried): etcd read revision at ")
            assert exp[2].startswith("etcd unreachable (2 endpoints tried): etcd read revision at ")
            assert got[2].count("; etcd read revision at ") == exp[2].count("; etcd read revision at ") == 1
    # The command: exit 4, one line naming the operation and the member.
    cfg = write_config(tmp_path / "c.toml", cluster=unique_cluster, etcd=url, extra={"coordination": {"timeout": 2.0}})
    for args in (["stage", "status"], ["nodes"], ["lanes"]):
        r = cbctl_proc(cfg, *args, timeout=30)
        assert r.exit_code == 4, (args, r.stderr)
        assert r.stderr.startswith(f"cbctl: error: etcd read revision at {url}: "), r.stderr
        assert "Traceback" not in r.stderr


async def test_failover_to_live_member(shared_etcd: EtcdServer, etcd: EtcdServer, unique_cluster: str) -> None:
    dead = etcd.client_url
    etcd.stop()
    prefix = f"/cbctl/{unique_cluster}/"
    grpc_c, gw = both([dead, shared_etcd.client_url], timeout=3.0)
    reads = [("get", prefix + "rollout"), ("list", prefix)]
    assert await outcome(gw, reads) == await outcome(grpc_c, reads) == [None, []]
    assert gw.endpoints == [dead, shared_etcd.client_url]


async def test_auth_same_results_and_errors(etcd: EtcdServer, unique_cluster: str) -> None:
    url = etcd.client_url
    pw = f"pw-{uuid.uuid4().hex}-$'\""
    prefix = f"/cbctl/{unique_cluster}/"
    async with EtcdCoordinator([url], timeout=3.0) as w:
        await w.put(prefix + "rollout", b"{}")
    enable_auth(url, pw)
    reads = [("get", prefix + "rollout"), ("list", prefix)]
    cases: dict[str, dict[str, Any]] = {
        "right": {"username": "root", "password": Secret(pw, "test")},
        "wrong": {"username": "root", "password": Secret("not-it", "test")},
        "none": {},
        "unknown user": {"username": "nobody", "password": Secret(pw, "test")},
    }
    for name, creds in cases.items():
        grpc_c, gw = both([url], timeout=3.0, **creds)
        exp, got = await outcome(grpc_c, reads), await outcome(gw, reads)
        assert got == exp, name
        if name != "right":
            assert got[-1][0] == "AuthFailed" and got[-1][1] == 4, (name, got)
            assert pw not in got[-1][2]
    # An expired token (etcd: "invalid auth token") is renewed once, transparently.
    async with EtcdReadOnlyCoordinator([url], timeout=3.0, username="root", password=Secret(pw, "test")) as r:
        client = r._session._client(0)
        client.token = "expired.token"
        assert (await r.get(prefix + "rollout")) is not None
        assert client.token != "expired.token"


# -- TLS ---------------------------------------------------------------------------------------

class TlsEtcdServer(EtcdServer):
    """https only, client certificates required (as tests/integration/test_security.py's)."""

    def __init__(self, base_dir: Path, pki: Mapping[str, Path], **kwargs: Any) -> None:
        super().__init__(base_dir, extra_args=["--cert-file", str(pki["cert"]), "--key-file", str(pki["key"]),
                                               "--trusted-ca-file", str(pki["ca"]), "--client-cert-auth"], **kwargs)
        self.pki = pki

    @property
    def client_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def probe(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki["ca"]))
        ctx.load_cert_chain(str(self.pki["cert"]), str(self.pki["key"]))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
        with opener.open(f"{self.client_url}/health", timeout=0.5) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")


@pytest.fixture
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEtcdServer]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed")
    pki = make_test_pki(tmp_path_factory.mktemp("pki"))
    server = TlsEtcdServer(tmp_path_factory.mktemp("tls-etcd"), pki)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_tls_and_auth(tls_etcd: TlsEtcdServer, tmp_path: Path, unique_cluster: str) -> None:
    url, pki = tls_etcd.client_url, tls_etcd.pki
    prefix = f"/cbctl/{unique_cluster}/"
    files = {"ca_file": str(pki["ca"]), "cert_file": str(pki["cert"]), "key_file": str(pki["key"])}
    async with EtcdCoordinator([url], timeout=3.0, **files) as w:
        await w.put(prefix + "nodes/n1", b'{"node_id": "n1"}')
    reads = [("get", prefix + "nodes/n1"), ("list", prefix), ("get", prefix + "none")]

    grpc_c, gw = both([url], timeout=3.0, **files)
    assert await outcome(gw, reads) == await outcome(grpc_c, reads)
    assert gw.served_by == "gateway"

    # A server certificate we cannot verify: both fail with the TLS hint, exit 4.
    other = make_test_pki(tmp_path / "other")
    grpc_c, gw = both([url], timeout=3.0, ca_file=str(other["ca"]), cert_file=files["cert_file"],
                      key_file=files["key_file"])
    (exp,), (got,) = await outcome(grpc_c, reads), await outcome(gw, reads)
    assert got[:2] == exp[:2] == ("BackendUnavailable", 4)
    assert "TLS handshake failed" in got[2] and "TLS handshake failed" in exp[2]
    assert got[2].startswith(f"etcd read revision at {url}: ")

    # Auth on: etcd's gateway refuses a client certificate with a CommonName, so the read-only
    # coordinator serves through gRPC, with the same results and errors.
    pw = f"pw-{uuid.uuid4().hex}"
    enable_auth(url, pw, tls=pki)
    for creds in ({"username": "root", "password": Secret(pw, "t")}, {"username": "root", "password": Secret("x", "t")}):
        grpc_c, gw = both([url], timeout=3.0, **files, **creds)
        got = await outcome(gw, reads)
        assert got == await outcome(grpc_c, reads)
        assert gw.served_by == "grpc" or isinstance(got[-1], tuple)
    cfg = write_config(tmp_path / "c.toml", cluster=unique_cluster, etcd=url,
                       extra={"coordination": {"timeout": 3.0, "username": "root", "password-env": "CB_GW_PW",
                                               "tls": {"ca-file": files["ca_file"], "cert-file": files["cert_file"],
                                                       "key-file": files["key_file"]}}})
    r = cbctl_proc(cfg, "stage", "status", "-o", "json", env={"CB_GW_PW": pw}, timeout=30)
    assert r.exit_code == 0, r.stderr
    assert pw not in r.stdout + r.stderr


def test_errors_are_cbctl_errors() -> None:
    """The classes the comparisons above rely on (a rename would make them vacuous)."""
    assert issubclass(AuthFailed, BackendUnavailable) and BackendUnavailable.exit_code == 4
