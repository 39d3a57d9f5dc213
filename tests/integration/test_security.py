"""Security against real servers: etcd user/password auth and TLS client certificates, NATS
user/password and TLS, and no secret ever in any output, log, audit entry or command line.

Every server is started by ``cbctl.sandbox`` on free loopback ports; the TLS material is made
by the test (:func:`cbctl.sandbox.tls.make_test_pki`). Passwords reach the servers through
stdin (etcdctl) or a mode-0600 config file (nats-server), never through an argv, so the
command-line check of every process below also holds for the test's own helper processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from cbctl.core.model import keys
from cbctl.core.backends.nats.connect import connect_nats
from cbctl.core.backends.nats.stream import ensure_stream
from cbctl.core.model.config import NatsConfig, Secret, SecretRef, StreamConfig, TLSConfig, default_stream_name
from cbctl.core.backends.coord.etcd import EtcdCoordinator
from cbctl.sandbox import EtcdServer, NatsServer
from cbctl.sandbox.tls import make_test_pki
from tests.helpers import CBCTL, Result, cbctl_proc, write_config

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("etcdctl") is None or shutil.which("openssl") is None,
                       reason="etcdctl and openssl are needed (run `make setup`)"),
]

ETCD_PW_VAR = "CB_ETCD_PW"
NATS_PW_VAR = "CB_NATS_PW"
NATS_USER = "ops"


def _secret(kind: str) -> str:
    # Distinctive, and with characters a careless quoting/formatting step would mangle.
    return f"{kind}-S3cr3t-{uuid.uuid4().hex[:16]}-$&'\"x"


def _core(secret: str) -> str:
    """The part of a :func:`_secret` that survives any escaping (JSON, TOML, repr): grep for this."""
    return secret.split("-$", 1)[0]


# -- helpers -------------------------------------------------------------------------------------

def etcdctl(endpoint: str, *args: str, stdin: str = "", tls: Mapping[str, Path] | None = None) -> str:
    """Run etcdctl against ``endpoint``; a password goes through ``stdin``, never argv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    argv = ["etcdctl", "--endpoints", endpoint, "--command-timeout=5s", "--dial-timeout=3s"]
    if tls:
        argv += ["--cacert", str(tls["ca"]), "--cert", str(tls["cert"]), "--key", str(tls["key"])]
    proc = subprocess.run([*argv, *args], input=stdin, capture_output=True, text=True, timeout=15,
                          env={**env, "ETCDCTL_API": "3"}, check=False)
    assert proc.returncode == 0, f"etcdctl {args}: {proc.stderr}"
    return proc.stdout


def enable_etcd_auth(endpoint: str, root_password: str, tls: Mapping[str, Path] | None = None) -> None:
    """Create ``root`` (password read from stdin) and turn authentication on, for real."""
    etcdctl(endpoint, "user", "add", "root", "--interactive=false", stdin=root_password + "\n", tls=tls)
    etcdctl(endpoint, "auth", "enable", tls=tls)


def cbctl_exact(config: Path, *args: str, env: Mapping[str, str] | None = None, unset: tuple[str, ...] = (),
                timeout: float = 40) -> Result:
    """Like :func:`tests.helpers.cbctl_proc`, but ``unset`` variables are removed from the
    child's environment (to test a secret reference whose variable is not set)."""
    full = {**os.environ, "CBCTL_CONFIG": str(config), "NO_COLOR": "1", **(env or {})}
    for name in (*unset, "CBCTL_CONTEXT"):
        full.pop(name, None)
    proc = subprocess.run([CBCTL, *args], capture_output=True, text=True, timeout=timeout, env=full,
                          stdin=subprocess.DEVNULL, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_failure(r: Result, code: int, *, mentions: tuple[str, ...] = ()) -> None:
    out = r.stdout + r.stderr
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in out, out
    for word in mentions:
        assert word.lower() in r.stderr.lower(), (word, r.stderr)


def etcd_dump(endpoint: str, root_password: str) -> list[tuple[str, bytes]]:
    """Every key and value in the store (as root), through the product's own coordinator."""

    async def body() -> list[tuple[str, bytes]]:
        coord = EtcdCoordinator([endpoint], timeout=5.0, username="root", password=Secret(root_password, "test"))
        async with coord:
            return [(kv.key, kv.value) for kv in await coord.list("/")]

    return asyncio.run(body())


def create_stream(server: NatsServer, password: str, tls: Mapping[str, Path] | None = None, *, cluster: str) -> None:
    """``cluster``'s event stream, as preflight expects it (an agent creates it in a real cluster)."""
    cfg = NatsConfig(servers=(server.url,), user=NATS_USER, password=SecretRef(env=NATS_PW_VAR),
                     tls=TLSConfig(str(tls["ca"]), str(tls["cert"]), str(tls["key"])) if tls else TLSConfig(),
                     stream=StreamConfig(name=default_stream_name(cluster)))

    async def body() -> None:
        nc = await connect_nats(cfg, name="test-setup", reconnect=False)
        try:
            await ensure_stream(nc.jetstream(), cfg.stream, cluster=cluster)
        finally:
            await nc.close()

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(NATS_PW_VAR, password)
        asyncio.run(body())


def nats_rows(r: Result) -> list[dict[str, Any]]:
    return [c for c in json.loads(r.stdout)["checks"] if c["name"] == "nats"]


# -- TLS etcd ------------------------------------------------------------------------------------

class TlsEtcdServer(EtcdServer):
    """An etcd member serving clients over https only, requiring a client certificate signed by
    ``pki["ca"]``. The readiness probe presents the same certificate."""

    def __init__(self, base_dir: Path, pki: Mapping[str, Path], **kwargs: Any) -> None:
        super().__init__(base_dir, extra_args=[
            "--cert-file", str(pki["cert"]), "--key-file", str(pki["key"]),
            "--trusted-ca-file", str(pki["ca"]), "--client-cert-auth",
        ], **kwargs)
        self.pki = pki

    @property
    def client_url(self) -> str:  # client_urls, the listen and advertise URLs follow
        return f"https://{self.host}:{self.port}"

    def probe(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki["ca"]))
        ctx.load_cert_chain(str(self.pki["cert"]), str(self.pki["key"]))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=ctx))
        with opener.open(f"{self.client_url}/health", timeout=0.5) as resp:
            return json.loads(resp.read()).get("health") == "true"


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second, unrelated CA: its certificates must be refused."""
    return make_test_pki(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[TlsEtcdServer]:
    server = TlsEtcdServer(tmp_path_factory.mktemp("tls-etcd"), pki)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _nats(base: Path, **kwargs: Any) -> Iterator[NatsServer]:
    if shutil.which("nats-server") is None and shutil.which("nats-server", path="/usr/sbin") is None:
        pytest.skip("nats-server is not installed")
    server = NatsServer(base, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- 1. etcd user/password -----------------------------------------------------------------------

def test_etcd_password_auth(etcd: EtcdServer, tmp_path: Path, unique_cluster: str) -> None:
    pw = _secret("etcd")
    enable_etcd_auth(etcd.client_url, pw)
    cfg = write_config(tmp_path / "c.toml", cluster=unique_cluster, etcd=etcd.client_url,
                       extra={"coordination": {"username": "root", "password-env": ETCD_PW_VAR, "timeout": 3.0}})

    ok = cbctl_proc(cfg, "stage", "status", "-o", "json", env={ETCD_PW_VAR: pw}, timeout=30)
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)  # a real answer from the store
    pre = cbctl_proc(cfg, "preflight", "--only", "etcd", "-o", "json", env={ETCD_PW_VAR: pw}, timeout=30)
    assert pre.exit_code == 0, pre.stdout + pre.stderr

    wrong = cbctl_proc(cfg, "stage", "status", env={ETCD_PW_VAR: "not-the-password"}, timeout=30)
    assert_clean_failure(wrong, 4, mentions=("auth",))
    assert "unreachable" not in wrong.stderr.lower(), wrong.stderr
    assert "not-the-password" not in wrong.stdout + wrong.stderr

    # Authentication really is on: no credentials at all is refused the same way.
    anon = write_config(tmp_path / "anon.toml", cluster=unique_cluster, etcd=etcd.client_url,
                        extra={"coordination": {"timeout": 3.0}})
    assert_clean_failure(cbctl_proc(anon, "stage", "status", timeout=30), 4, mentions=("auth",))

    # The file form of the reference works the same way (first line of a 0600 file).
    pw_file = tmp_path / "etcd.pw"
    pw_file.write_text(pw + "\n")
    pw_file.chmod(0o600)
    by_file = write_config(tmp_path / "file.toml", cluster=unique_cluster, etcd=etcd.client_url,
                           extra={"coordination": {"username": "root", "password-file": str(pw_file)}})
    r = cbctl_proc(by_file, "stage", "status", timeout=30)
    assert r.exit_code == 0, r.stderr
    assert _core(pw) not in r.stdout + r.stderr

    # The variable the reference names is not set: bad input (exit 2) naming it, nothing sent.
    assert_clean_failure(cbctl_exact(cfg, "stage", "status", unset=(ETCD_PW_VAR,)), 2, mentions=(ETCD_PW_VAR,))


# -- 2. etcd TLS client certificates -------------------------------------------------------------

def test_etcd_tls_client_certificates(tls_etcd: TlsEtcdServer, pki: dict[str, Path], other_pki: dict[str, Path],
                                      tmp_path: Path, unique_cluster: str) -> None:
    url = tls_etcd.client_url
    assert url.startswith("https://")

    def config(name: str, tls: dict[str, str]) -> Path:
        return write_config(tmp_path / f"{name}.toml", cluster=unique_cluster, etcd=url,
                            extra={"coordination": {"timeout": 3.0, "tls": tls}})

    full = config("full", {"ca-file": str(pki["ca"]), "cert-file": str(pki["cert"]), "key-file": str(pki["key"])})
    ok = cbctl_proc(full, "stage", "status", timeout=30)
    assert ok.exit_code == 0, ok.stderr
    pre = cbctl_proc(full, "preflight", "--only", "etcd", "-o", "json", timeout=30)
    assert pre.exit_code == 0, pre.stdout + pre.stderr

    # The server demands a client certificate: a client with only the CA is turned away.
    no_cert = config("nocert", {"ca-file": str(pki["ca"])})
    assert_clean_failure(cbctl_proc(no_cert, "stage", "status", timeout=30), 4, mentions=("TLS",))
    # A certificate from another CA is refused too, and so is a server we cannot verify.
    foreign = config("foreign", {"ca-file": str(pki["ca"]), "cert-file": str(other_pki["cert"]),
                                 "key-file": str(other_pki["key"])})
    assert_clean_failure(cbctl_proc(foreign, "stage", "status", timeout=30), 4, mentions=("TLS",))
    untrusted = config("untrusted", {"ca-file": str(other_pki["ca"]), "cert-file": str(pki["cert"]),
                                     "key-file": str(pki["key"])})
    assert_clean_failure(cbctl_proc(untrusted, "stage", "status", timeout=30), 4, mentions=("TLS",))
    # Plain http against the TLS port is not silently accepted either.
    plain = write_config(tmp_path / "plain.toml", cluster=unique_cluster, etcd=url.replace("https", "http"),
                         extra={"coordination": {"timeout": 2.0}})
    assert_clean_failure(cbctl_proc(plain, "stage", "status", timeout=30), 4)

    # Client certificates and user/password together (the production shape).
    pw = _secret("etcdtls")
    enable_etcd_auth(url, pw, tls=pki)
    tls = {"ca-file": str(pki["ca"]), "cert-file": str(pki["cert"]), "key-file": str(pki["key"])}
    both = write_config(tmp_path / "both.toml", cluster=unique_cluster, etcd=url,
                        extra={"coordination": {"timeout": 3.0, "tls": tls, "username": "root",
                                                "password-env": ETCD_PW_VAR}})
    ok = cbctl_proc(both, "stage", "status", env={ETCD_PW_VAR: pw}, timeout=30)
    assert ok.exit_code == 0, ok.stderr
    bad = cbctl_proc(both, "stage", "status", env={ETCD_PW_VAR: "not-the-password"}, timeout=30)
    assert_clean_failure(bad, 4, mentions=("auth",))
    # The certificate alone no longer suffices: etcd maps its CN to a user that does not exist.
    assert_clean_failure(cbctl_proc(full, "stage", "status", timeout=30), 4, mentions=("permission denied",))


# -- 3. NATS user/password and TLS ---------------------------------------------------------------

@pytest.fixture
def nats_pw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, str]]:
    pw = _secret("nats")
    for server in _nats(tmp_path_factory.mktemp("nats-pw"), user=NATS_USER, password=pw):
        yield server, pw


@pytest.fixture
def nats_tls(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[tuple[NatsServer, str]]:
    """TLS required, client certificates verified, and a user/password on top."""
    pw = _secret("natstls")
    for server in _nats(tmp_path_factory.mktemp("nats-tls"), user=NATS_USER, password=pw,
                        tls={**pki, "verify": True}):
        yield server, pw


def _nats_config(path: Path, etcd_url: str, cluster: str, server: NatsServer, nats: dict[str, Any]) -> Path:
    return write_config(path, cluster=cluster, etcd=etcd_url, nats=server.url,
                        extra={"nats": {"user": NATS_USER, "password-env": NATS_PW_VAR, **nats}})


def _tls(pki: Mapping[str, Path], *, client: bool = True) -> dict[str, Any]:
    t = {"ca-file": str(pki["ca"])}
    if client:
        t |= {"cert-file": str(pki["cert"]), "key-file": str(pki["key"])}
    return {"tls": t}


def test_nats_user_password(nats_pw: tuple[NatsServer, str], shared_etcd: EtcdServer, tmp_path: Path,
                            unique_cluster: str) -> None:
    server, pw = nats_pw
    create_stream(server, pw, cluster=unique_cluster)
    cfg = _nats_config(tmp_path / "c.toml", shared_etcd.client_url, unique_cluster, server, {})

    ok = cbctl_proc(cfg, "preflight", "--only", "nats", "-o", "json", env={NATS_PW_VAR: pw}, timeout=30)
    assert ok.exit_code == 0, ok.stdout + ok.stderr
    rows = nats_rows(ok)
    assert rows and all(r["status"] != "fail" for r in rows), rows
    assert any(r["detail"].startswith("connected") for r in rows), rows

    bad = cbctl_proc(cfg, "preflight", "--only", "nats", "-o", "json", env={NATS_PW_VAR: "wrong-pw"}, timeout=30)
    assert_clean_failure(bad, 1)
    (row,) = nats_rows(bad)
    assert row["status"] == "fail" and row["detail"].startswith("auth:"), row
    assert "unreachable" not in row["detail"]
    assert "wrong-pw" not in bad.stdout + bad.stderr

    unset = write_config(tmp_path / "nouser.toml", cluster=unique_cluster, etcd=shared_etcd.client_url,
                         nats=server.url)
    anon = cbctl_proc(unset, "preflight", "--only", "nats", "-o", "json", timeout=30)
    assert_clean_failure(anon, 1)
    assert nats_rows(anon)[0]["detail"].startswith("auth:"), nats_rows(anon)


def test_nats_tls(nats_tls: tuple[NatsServer, str], pki: dict[str, Path], other_pki: dict[str, Path],
                  shared_etcd: EtcdServer, tmp_path: Path, unique_cluster: str) -> None:
    server, pw = nats_tls
    create_stream(server, pw, pki, cluster=unique_cluster)

    def run(name: str, nats: dict[str, Any], password: str = pw) -> Result:
        cfg = _nats_config(tmp_path / f"{name}.toml", shared_etcd.client_url, unique_cluster, server, nats)
        return cbctl_proc(cfg, "preflight", "--only", "nats", "-o", "json", env={NATS_PW_VAR: password}, timeout=30)

    ok = run("ok", _tls(pki))
    assert ok.exit_code == 0, ok.stdout + ok.stderr
    assert all(r["status"] != "fail" for r in nats_rows(ok)), nats_rows(ok)

    # Right TLS, wrong password: an auth failure, not a TLS or reachability problem.
    bad = run("badpw", _tls(pki), password="wrong-pw")
    assert_clean_failure(bad, 1)
    (row,) = nats_rows(bad)
    assert row["status"] == "fail" and row["detail"].startswith("auth:"), row

    # The server verifies client certificates: without one the connection is refused.
    r = run("nocert", _tls(pki, client=False))
    assert_clean_failure(r, 1)
    (row,) = nats_rows(r)
    assert row["status"] == "fail" and "auth:" not in row["detail"], row


def test_nats_tls_untrusted_server_fails_promptly(nats_tls: tuple[NatsServer, str], other_pki: dict[str, Path],
                                                  shared_etcd: EtcdServer, tmp_path: Path,
                                                  unique_cluster: str) -> None:
    """A server certificate we cannot verify (wrong CA, or no [nats.tls] at all, so the system
    CAs) is a prompt TLS failure, not a check timeout."""
    server, pw = nats_tls
    for name, nats in (("untrusted", _tls(other_pki)), ("plain", {})):
        cfg = _nats_config(tmp_path / f"{name}.toml", shared_etcd.client_url, unique_cluster, server, nats)
        t0 = time.monotonic()
        r = cbctl_proc(cfg, "preflight", "--only", "nats", "--check-timeout", "4", "-o", "json",
                       env={NATS_PW_VAR: pw}, timeout=30)
        elapsed = time.monotonic() - t0
        assert_clean_failure(r, 1)
        (row,) = nats_rows(r)
        assert row["status"] == "fail", (name, row)
        assert _core(pw) not in r.stdout + r.stderr
        assert "TLS" in row["detail"] and elapsed < 3.5, (name, round(elapsed, 2), row)


# -- 4. secrets never leak ------------------------------------------------------------------------

def test_secrets_never_leak(etcd: EtcdServer, nats_pw: tuple[NatsServer, str], tmp_path: Path,
                            unique_cluster: str) -> None:
    nats_server, nats_secret = nats_pw
    etcd_secret = _secret("etcd")
    enable_etcd_auth(etcd.client_url, etcd_secret)
    create_stream(nats_server, nats_secret, cluster=unique_cluster)
    wrong_etcd, wrong_nats = _secret("wrongetcd"), _secret("wrongnats")
    # Grep for the escaping-proof core of each value; the wrong ones must not show either.
    secrets = {name: _core(v) for name, v in (("etcd", etcd_secret), ("nats", nats_secret),
                                               ("wrong etcd", wrong_etcd), ("wrong nats", wrong_nats))}
    env = {ETCD_PW_VAR: etcd_secret, NATS_PW_VAR: nats_secret, "CBCTL_ACTOR": "security-test@host"}
    cfg = tmp_path / "config.toml"
    results: list[tuple[tuple[str, ...], Result]] = []

    def cb(*args: str, expect: int | None = 0, extra_env: Mapping[str, str] | None = None,
           unset: tuple[str, ...] = ()) -> Result:
        r = cbctl_exact(cfg, *args, env={**env, **(extra_env or {})}, unset=unset)
        results.append((args, r))
        if expect is not None:
            assert r.exit_code == expect, (args, r.exit_code, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        return r

    cb("config", "set-context", "sec", "--cluster", unique_cluster, "--etcd", etcd.client_url,
       "--etcd-user", "root", "--etcd-password-env", ETCD_PW_VAR,
       "--nats", nats_server.url, "--nats-user", NATS_USER, "--nats-password-env", NATS_PW_VAR,
       "--redis", "redis://127.0.0.1:1/0", "--prometheus", "http://127.0.0.1:1", "--use")
    assert (cfg.stat().st_mode & 0o077) == 0
    view = cb("config", "view", "-o", "json").stdout
    assert json.loads(view)["contexts"]["sec"]["coordination"]["password_env"] == ETCD_PW_VAR
    cb("config", "view")
    cb("config", "get-contexts")
    cb("stage", "status")
    cb("stage", "status", "-o", "json")
    cb("preflight", "--only", "etcd", "--only", "nats")
    cb("preflight", "--only", "etcd", "--only", "nats", "-o", "json")
    # A full preflight fails (no redis/prometheus here) but is recorded in the store.
    cb("preflight", "--check-timeout", "2", "-o", "json", expect=1)
    cb("preflight", "--check-timeout", "2", expect=1)
    cb("stage", "advance", "--to", "1", "--force", "--reason", "security test", "--yes", "--no-wait")
    cb("stage", "history", "-o", "json")
    cb("stage", "history")
    cb("flags", "get")
    cb("flags", "get", "-o", "json")
    cb("stage", "status")
    # Failing runs: wrong secrets, then a missing one.
    wrong = cb("stage", "status", expect=4, extra_env={ETCD_PW_VAR: wrong_etcd})
    assert "auth" in wrong.stderr.lower()
    cb("stage", "advance", "--to", "2", "--force", "--reason", "must fail", "--yes", "--no-wait", expect=4,
       extra_env={ETCD_PW_VAR: wrong_etcd})
    nats_bad = cb("preflight", "--only", "nats", "-o", "json", expect=1, extra_env={NATS_PW_VAR: wrong_nats})
    assert nats_rows(nats_bad)[0]["detail"].startswith("auth:")
    cb("preflight", "--only", "nats", expect=1, extra_env={NATS_PW_VAR: wrong_nats})
    cb("stage", "status", expect=2, unset=(ETCD_PW_VAR,))
    cb("preflight", "--only", "nats", expect=1, unset=(NATS_PW_VAR,))

    # Everything cbctl printed, on both streams.
    for args, r in results:
        for name, value in secrets.items():
            assert value not in r.stdout, (name, args, "stdout")
            assert value not in r.stderr, (name, args, "stderr")

    # Everything in the store: audit entries, rollout document, preflight record.
    store = etcd_dump(etcd.client_url, etcd_secret)
    audit = [v for k, v in store if k.startswith(keys.audit_prefix(unique_cluster))]
    assert audit, [k for k, _ in store]  # the advance above was audited
    entries = [json.loads(v) for v in audit]
    assert any(e.get("reason") == "security test" and e.get("forced") for e in entries), entries
    stored = {k for k, _ in store}
    assert {keys.rollout(unique_cluster), keys.preflight_last(unique_cluster)} <= stored, stored
    for key, value in store:
        for name, secret in secrets.items():
            assert secret.encode() not in value and secret not in key, (name, key)

    # Files: the contexts file (references only), every server log and config.
    files = [cfg, etcd.log_path, nats_server.log_path, *tmp_path.rglob("*.log")]
    for f in files:
        text = f.read_bytes()
        for name, secret in secrets.items():
            assert secret.encode() not in text, (name, str(f))
    # The one place the NATS password is: mode 0600, and a positive control for the grep above.
    assert (nats_server.config_path.stat().st_mode & 0o077) == 0
    assert secrets["nats"].encode() in nats_server.config_path.read_bytes()

    # No command line of any process, the servers above all, carries a secret.
    for pid in (etcd.pid, nats_server.pid):
        assert pid is not None
        assert psutil.Process(pid).cmdline()  # really the running server
    for proc in psutil.process_iter():
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
        for name, secret in secrets.items():
            assert secret not in cmdline, (name, proc.pid, cmdline)
