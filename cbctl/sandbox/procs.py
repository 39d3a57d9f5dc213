"""Real etcd, nats-server, redis-server, prometheus and chronyd processes on loopback.

One code path for the test fixtures (``tests/conftest.py``) and ``cbctl sandbox``. Contracts
every service keeps:

- It listens on free loopback ports (chosen with :func:`free_port` unless given) and keeps
  everything it writes (config, data, log) under its own ``data_dir``.
- ``start`` refuses a port that already answers, starts the binary in its own session (so its
  own process group), sends stdout and stderr to ``log_path``, and returns only once a readiness
  probe against the server itself succeeds. If the process exits first or the deadline passes
  it raises :class:`HarnessError` carrying the tail of the log (and leaves nothing running).
- ``stop`` sends SIGTERM to the whole process group, then SIGKILL after a bounded wait; it is
  idempotent. ``kill``/``pause``/``resume`` are fault injection and never wait.
- Secrets (passwords, tokens) go into a mode-0600 config file, never into argv, so they do not
  show in ``ps``.
- Every wait is a condition polled under a deadline (:mod:`cbctl.sandbox.waiting`).

No typer/rich here: the CLI renders :meth:`Service.to_dict`.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.client import HTTPException
from pathlib import Path
from typing import Any

from cbctl.sandbox.waiting import wait_until

__all__ = [
    "HarnessError",
    "free_port",
    "port_answers",
    "Service",
    "EtcdServer",
    "EtcdCluster",
    "NatsServer",
    "RedisServer",
    "PrometheusServer",
    "ChronyServer",
    "stop_all",
    "group_members",
]

LOOPBACK = "127.0.0.1"


class HarnessError(Exception):
    """A sandbox service could not be started, probed or stopped.

    The message names the service and, when a process was involved, ends with the tail of its
    log file, so a failing test or ``cbctl sandbox up`` shows why without digging for the log.
    """


# ---------------------------------------------------------------------------------------------
# Ports

# Ports this process has handed out. The kernel may return the same ephemeral port to two
# consecutive bind(0) calls once the first socket is closed; remembering them keeps one harness
# (e.g. a 3-member cluster allocating 6 ports in a row) from colliding with itself.
_handed_out: set[tuple[str, int, int]] = set()


def free_port(host: str = LOOPBACK, *, udp: bool = False) -> int:
    """Return a port on ``host`` that nothing is bound to right now (TCP, or UDP if ``udp``).

    Contract: the port is not one this process handed out before. There is an unavoidable race
    with other processes between this call and the server's bind; :meth:`Service.start`
    detects the loss of that race (the port answers, or the server dies with EADDRINUSE).
    """
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    for _ in range(100):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        key = (host, port, kind)
        if key not in _handed_out:
            _handed_out.add(key)
            return port
    raise HarnessError(f"no free {'UDP' if udp else 'TCP'} port found on {host}")


def port_answers(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when a TCP connect to ``host:port`` succeeds (something is listening there)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # refused, unreachable, timed out: nobody answers
        return False


def _udp_port_in_use(host: str, port: int) -> bool:
    """True when a UDP bind to ``host:port`` fails with EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


# ---------------------------------------------------------------------------------------------
# Small HTTP helpers (stdlib only: cheap to import, and they ignore *_proxy variables, which
# would otherwise send loopback probes to a proxy).

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PROBE_ERRORS = (OSError, HTTPException, ValueError)  # URLError/HTTPError/timeout are OSError


def _http(url: str, *, data: bytes | None = None, timeout: float = 0.5) -> tuple[int, bytes]:
    """GET (or POST ``data`` as JSON) and return (status, body); HTTP errors are returned too."""
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


# ---------------------------------------------------------------------------------------------
# Processes

def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of ``pid`` from /proc, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``.

    Zombies are excluded on purpose: in a container PID 1 may never reap orphans, so a dead
    child could otherwise look alive forever.
    """
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


# Services started with stop_at_exit=True and not yet stopped; stopped by an atexit hook so an
# interrupted test run or a crashed script does not leave servers behind.
_live: dict[int, "Service"] = {}


def stop_all(timeout: float = 5.0) -> None:
    """Stop every service this process started with ``stop_at_exit=True`` (atexit hook)."""
    for service in list(_live.values()):
        with contextlib.suppress(HarnessError):
            service.stop(timeout=timeout)


atexit.register(stop_all)


def _log_tail(path: Path, n: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except FileNotFoundError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-n:])


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (it may hold a secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, so a watcher (Prometheus file_sd) never reads half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Service:
    """One server process. Subclasses define the command line, the ports and the probe.

    Attributes (stable; other modules code against them): ``name``, ``host``, ``port``,
    ``pid`` (None when no process is held), ``data_dir``, ``log_path``.
    """

    #: executable looked up on PATH (and /usr/sbin, where Debian puts nats-server and chronyd)
    binary: str = ""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        name: str,
        host: str = LOOPBACK,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        wrapper: Sequence[str] = (),
        stop_at_exit: bool = True,
    ) -> None:
        """``base_dir/name`` becomes ``data_dir``. ``wrapper`` is prepended to argv (e.g.
        ``["faketime", "-f", "+30s"]``). With ``stop_at_exit`` the process is stopped when this
        Python process exits; ``cbctl sandbox up`` passes False so servers outlive the command.
        """
        self.name = name
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.data_dir = Path(base_dir) / name
        self.log_path = self.data_dir / f"{name}.log"
        self.extra_args = list(extra_args)
        self.wrapper = list(wrapper)
        self.stop_at_exit = stop_at_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None  # set for adopted processes (see attach) and own children
        self._log_fh: Any = None
        self._paused = False

    # -- to be provided by subclasses ---------------------------------------------------------

    def command(self) -> list[str]:
        """argv of the server (without ``wrapper``)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files into ``data_dir``; called before every start."""

    def probe(self) -> bool:
        """One readiness check against the server. May raise a network error (= not ready)."""
        raise NotImplementedError

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        """Every (host, port) this service listens on over TCP; checked before start."""
        return [(self.host, self.port)]

    def env(self) -> dict[str, str]:
        """Environment of the child."""
        return dict(os.environ)

    def extra_info(self) -> dict[str, Any]:
        """Service-specific keys for :meth:`to_dict` (URLs, extra ports). No secrets."""
        return {}

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._pid

    def _resolve_binary(self) -> str:
        path = shutil.which(self.binary) or shutil.which(self.binary, path="/usr/sbin:/sbin")
        if path is None:
            raise HarnessError(f"{self.name}: executable {self.binary!r} not found on PATH")
        return path

    def check_ports_free(self) -> None:
        """Raise :class:`HarnessError` if one of this service's ports already answers."""
        for host, port in self.tcp_endpoints():
            if port_answers(host, port):
                raise HarnessError(
                    f"{self.name}: port {host}:{port} already answers; refusing to start a second "
                    "server there"
                )

    def launch(self) -> None:
        """Start the process without waiting for readiness (see :meth:`wait_ready`).

        Used directly where several processes must be up before any becomes ready (an etcd
        cluster needs a quorum before /health is true).
        """
        if self.is_running():
            raise HarnessError(f"{self.name}: already running (pid {self._pid})")
        self._release()  # a previous process that died on its own
        self.check_ports_free()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # 0700: chronyd insists on it for its command socket, and config files may hold secrets.
        os.chmod(self.data_dir, 0o700)
        self.prepare()
        argv = [*self.wrapper, self._resolve_binary(), *self.command()[1:], *self.extra_args]
        self._log_fh = self.log_path.open("ab")
        self._log_fh.write(
            f"\n=== cbctl.sandbox {time.strftime('%Y-%m-%dT%H:%M:%S')}: {' '.join(argv)}\n".encode()
        )
        self._log_fh.flush()
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=self.env(),
                start_new_session=True,  # own process group: stop/kill/pause reach every child
            )
        except OSError as exc:
            self._release()
            raise HarnessError(f"{self.name}: cannot execute {argv[0]}: {exc}") from exc
        self._pid = self._proc.pid
        self._paused = False
        if self.stop_at_exit:
            _live[id(self)] = self

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``condition`` until true while the process lives.

        Raises :class:`HarnessError` with the log tail if the process exits first or the
        deadline passes; in both cases the process group is stopped before raising.
        """

        def check() -> bool:
            if not self.is_running():
                code = self._proc.returncode if self._proc is not None else None
                raise HarnessError(
                    f"{self.name}: process exited (code {code}) before {what}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            return condition()

        try:
            wait_until(check, timeout, interval=0.02, message=f"{self.name}: {what}")
        except HarnessError:
            self.stop(timeout=2.0)
            raise
        except TimeoutError as exc:
            tail = self.log_tail()
            self.stop(timeout=2.0)
            raise HarnessError(
                f"{self.name}: not {what} within {timeout:.1f} s; log {self.log_path}:\n{tail}"
            ) from exc

    def wait_ready(self, timeout: float = 15.0) -> "Service":
        """Poll the readiness probe until it succeeds; return self. Errors as :meth:`wait_for`."""
        self.wait_for(self.is_healthy, timeout, "ready")
        return self

    def start(self, timeout: float = 15.0) -> "Service":
        """Start and wait until ready (see the module contract); return self."""
        self.launch()
        return self.wait_ready(timeout)

    def attach(self, pid: int) -> "Service":
        """Adopt a running process group led by ``pid`` (started by an earlier cbctl process,
        e.g. ``cbctl sandbox up``), so ``stop``/``kill``/``pause``/``status`` work on it."""
        stat = _proc_stat(pid)
        if stat is None or stat[1] != pid:
            raise HarnessError(f"{self.name}: pid {pid} is not a running process group leader")
        self._proc = None
        self._pid = pid
        if self.stop_at_exit:
            _live[id(self)] = self
        return self

    def is_running(self) -> bool:
        """True while the process we started (or adopted) is alive (a stopped one counts)."""
        if self._proc is not None:
            return self._proc.poll() is None
        if self._pid is not None:
            stat = _proc_stat(self._pid)
            return stat is not None and stat[0] not in ("Z", "X")
        return False

    def is_healthy(self) -> bool:
        """One readiness probe, no waiting. False when not running or the probe fails."""
        if not self.is_running():
            return False
        try:
            return bool(self.probe())
        except (*_PROBE_ERRORS, HarnessError):
            return False

    def _send_stop(self) -> None:
        """First half of :meth:`stop`: SIGTERM to the group (SIGCONT too, so a paused group
        can act on it). Separate so a cluster can signal all members before waiting."""
        if self._pid is None:
            return
        _signal_group(self._pid, signal.SIGTERM)
        _signal_group(self._pid, signal.SIGCONT)
        self._paused = False

    def _group_gone(self) -> bool:
        if self._pid is None:
            return True
        if self._proc is not None:
            self._proc.poll()  # reap the leader so it does not linger as a zombie
        return not group_members(self._pid)

    def _finish_stop(self, deadline: float) -> None:
        """Second half of :meth:`stop`: wait until the group is gone, SIGKILL at ``deadline``."""
        if self._pid is None:
            return
        pgid = self._pid
        try:
            wait_until(self._group_gone, max(0.0, deadline - time.monotonic()), interval=0.02,
                       message=f"{self.name} exit after SIGTERM")
        except TimeoutError:
            _signal_group(pgid, signal.SIGKILL)
            try:
                wait_until(self._group_gone, 5.0, message=f"{self.name} exit after SIGKILL")
            except TimeoutError as exc:
                raise HarnessError(
                    f"{self.name}: process group {pgid} survived SIGKILL: {group_members(pgid)}"
                ) from exc
        self._release()

    def _release(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1.0)
        self._proc = None
        self._pid = None
        self._paused = False
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        _live.pop(id(self), None)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s; return once it is gone.

        Idempotent: stopping a stopped (or never started, or already killed) service is a no-op
        apart from releasing its handle.
        """
        self._send_stop()
        self._finish_stop(time.monotonic() + timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group and return at once (fault injection).

        The service keeps its ports and data dir; :meth:`restart` brings it back.
        """
        if self._pid is None:
            raise HarnessError(f"{self.name}: not running")
        _signal_group(self._pid, sig)

    def pause(self) -> None:
        """SIGSTOP the process group: the server keeps its sockets but answers nothing."""
        self.kill(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT the process group after :meth:`pause`."""
        self.kill(signal.SIGCONT)
        self._paused = False

    def restart(self, timeout: float = 15.0) -> "Service":
        """Stop (if needed) and start again on the same ports and data dir; return self."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the log file ("" if there is none yet)."""
        if self._log_fh is not None:
            self._log_fh.flush()
        return _log_tail(self.log_path, n)

    def to_dict(self) -> dict[str, Any]:
        """State for ``cbctl sandbox status`` and for re-attaching later. Never holds secrets."""
        running = self.is_running()
        return {
            "name": self.name,
            "kind": type(self).__name__,
            "pid": self._pid,
            "host": self.host,
            "port": self.port,
            "running": running,
            "paused": self._paused,
            "healthy": running and not self._paused and self.is_healthy(),
            "data_dir": str(self.data_dir),
            "log_path": str(self.log_path),
            **self.extra_info(),
        }

    def __enter__(self) -> "Service":
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.host}:{self.port} pid={self._pid}>"


# ---------------------------------------------------------------------------------------------
# etcd

class EtcdServer(Service):
    """One etcd member (3.4 flags). ``client_url`` http://host:port, ``peer_url`` http://host:peer.

    ``extra_listen_hosts`` (e.g. a veth address 10.231.0.1) are added to the client listen and
    advertise URLs so a network namespace, which cannot reach the root namespace's 127.0.0.1,
    can connect. ``initial_cluster`` is ``name=peer_url,...``; alone by default.
    """

    binary = "etcd"

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        name: str = "etcd",
        host: str = LOOPBACK,
        port: int | None = None,
        peer_port: int | None = None,
        extra_listen_hosts: Sequence[str] = (),
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        extra_args: Sequence[str] = (),
        wrapper: Sequence[str] = (),
        stop_at_exit: bool = True,
    ) -> None:
        super().__init__(base_dir, name=name, host=host, port=port, extra_args=extra_args,
                         wrapper=wrapper, stop_at_exit=stop_at_exit)
        self.peer_port = peer_port if peer_port is not None else free_port(host)
        self.extra_listen_hosts = list(extra_listen_hosts)
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        # A unique token keeps members of two sandboxes from ever joining each other.
        self.cluster_token = cluster_token or f"cbctl-{uuid.uuid4().hex[:12]}"
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def client_urls(self) -> list[str]:
        """Every client URL: loopback first, then one per extra listen host."""
        return [self.client_url, *(f"http://{h}:{self.port}" for h in self.extra_listen_hosts)]

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        return [(self.host, self.port), (self.host, self.peer_port),
                *((h, self.port) for h in self.extra_listen_hosts)]

    def env(self) -> dict[str, str]:
        # etcd reads ETCD_* variables as flags and refuses a flag given both ways.
        return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}

    def command(self) -> list[str]:
        urls = ",".join(self.client_urls)
        return [
            "etcd",
            "--name", self.name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", urls,
            "--advertise-client-urls", urls,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-token", self.cluster_token,
            "--initial-cluster-state", "new",  # ignored once the data dir holds a WAL (restart)
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]

    def probe(self) -> bool:
        status, body = _http(f"{self.client_url}/health")
        return status == 200 and json.loads(body).get("health") == "true"

    def peer_serving(self) -> bool:
        """True once the member serves its peer API (GET /members), one probe."""
        try:
            return _http(f"{self.peer_url}/members", timeout=0.2)[0] == 200
        except _PROBE_ERRORS:
            return False

    def active_peers(self) -> int:
        """How many peers this member's transport counts as connected (from /metrics)."""
        _, body = _http(f"{self.client_url}/metrics", timeout=0.5)
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in body.decode().splitlines()
                   if line.startswith("etcd_network_active_peers{"))

    def status(self, timeout: float = 0.5) -> dict[str, Any]:
        """This member's /v3/maintenance/status (JSON gateway). Raises OSError when unreachable."""
        status, body = _http(f"{self.client_url}/v3/maintenance/status", data=b"{}", timeout=timeout)
        if status != 200:
            raise HarnessError(f"{self.name}: maintenance/status answered HTTP {status}: {body!r}")
        return json.loads(body)

    def extra_info(self) -> dict[str, Any]:
        return {"client_url": self.client_url, "client_urls": self.client_urls,
                "peer_url": self.peer_url, "peer_port": self.peer_port}


class EtcdCluster:
    """``size`` etcd members on loopback forming one cluster (default 3).

    Members are named ``{name}0..`` and live in ``base_dir/{name}N``. ``start`` launches all
    members first and then waits for each (a member is healthy only once there is a quorum).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        size: int = 3,
        name: str = "etcd",
        host: str = LOOPBACK,
        extra_listen_hosts: Sequence[str] = (),
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        stop_at_exit: bool = True,
    ) -> None:
        token = f"cbctl-{uuid.uuid4().hex[:12]}"
        self.members: list[EtcdServer] = [
            EtcdServer(base_dir, name=f"{name}{i}", host=host,
                       extra_listen_hosts=extra_listen_hosts, cluster_token=token,
                       heartbeat_ms=heartbeat_ms, election_ms=election_ms,
                       stop_at_exit=stop_at_exit)
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of all members (loopback), in member order."""
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 15.0) -> "EtcdCluster":
        """Launch the members one after another, then wait until each is healthy; return self.

        Each member is launched only once the previous one serves its peer API. Why: on first
        bootstrap etcd 3.4 asks every other peer URL whether it is already a member, with a 1 s
        timeout; a peer whose port is bound but not yet served swallows that whole second, so
        launching all at once costs 1-2 s, launching in turn ~0.3 s.
        On failure every member is stopped and :class:`HarnessError` is raised.
        """
        deadline = time.monotonic() + timeout
        try:
            for m in self.members:
                m.launch()
                m.wait_for(m.peer_serving, max(0.1, deadline - time.monotonic()), "serving peers")
            for m in self.members:
                m.wait_ready(max(0.1, deadline - time.monotonic()))
        except HarnessError:
            self.stop(timeout=2.0)
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop all members: followers first (in parallel), then the leader; idempotent.

        Why this order: a leader that gets SIGTERM tries to hand leadership to a follower its
        transport still counts as active; if that follower is stopping too, the hand-over waits
        ~6 s before giving up. A leader that has seen its followers go (checked on its
        etcd_network_active_peers metric) skips the hand-over and exits in milliseconds.
        """
        deadline = time.monotonic() + timeout
        leader = self.find_leader()
        groups = [[m for m in self.members if m is not leader], [leader] if leader else []]
        errors = []
        for group in groups:
            if group and group[0] is leader and leader.is_running():
                # The leader must notice that its followers are gone, else it still tries to
                # hand over leadership. Best effort: on timeout stop it anyway.
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: leader.active_peers() == 0, 2.0, interval=0.01,
                               message="etcd leader sees no peers", ignore=_PROBE_ERRORS)
            for m in group:
                m._send_stop()
            for m in group:
                try:
                    m._finish_stop(deadline)
                except HarnessError as exc:
                    errors.append(str(exc))
        if errors:
            raise HarnessError("; ".join(errors))

    def find_leader(self) -> EtcdServer | None:
        """The running member that says it is the leader, or None. One round of probes.

        A member counts only if its own member_id equals the leader it reports, so followers
        still naming a dead leader are ignored; among several claimants the highest raft term
        wins (a stale leader cut off from the others keeps an older term).
        """
        best: tuple[int, EtcdServer] | None = None
        for m in self.members:
            if not m.is_running():
                continue
            try:
                st = m.status(timeout=0.3)
            except (*_PROBE_ERRORS, HarnessError):
                continue
            header = st.get("header", {})
            if header.get("member_id") and header.get("member_id") == st.get("leader"):
                term = int(st.get("raftTerm", header.get("raft_term", 0)))
                if best is None or term > best[0]:
                    best = (term, m)
        return best[1] if best else None

    def leader(self) -> EtcdServer:
        """The current leader; raises :class:`HarnessError` if no member claims leadership."""
        found = self.find_leader()
        if found is None:
            raise HarnessError("etcd cluster: no member reports itself as leader")
        return found

    def wait_for_leader(self, timeout: float = 5.0, exclude: EtcdServer | None = None) -> EtcdServer:
        """Poll until a leader other than ``exclude`` exists; return it. TimeoutError otherwise."""

        def probe() -> EtcdServer | None:
            found = self.find_leader()
            return found if found is not None and found is not exclude else None

        return wait_until(probe, timeout, interval=0.05, message="etcd cluster leader")

    def is_healthy(self) -> bool:
        """True when every member is running and healthy."""
        return all(m.is_healthy() for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"name": "etcd-cluster", "endpoints": self.endpoints,
                "members": [m.to_dict() for m in self.members]}

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# NATS

class NatsServer(Service):
    """nats-server with JetStream (default on), configured by a generated JSON config file.

    ``url`` is nats://host:port; ``monitor_url`` http://host:monitor_port. Credentials
    (``user``/``password`` or ``token``) live only in the mode-0600 config file. ``tls`` is a
    mapping with ``cert``, ``key`` and optional ``ca`` paths (``verify`` to require client
    certificates). With ``extra_listen_hosts`` the client port listens on all interfaces
    (nats-server binds one address only) while monitoring stays on ``host``.

    ``max_file_store`` is a ceiling, not an allocation: JetStream reserves each stream's
    ``max_bytes`` against it when the stream is created, while the disk holds only what is
    stored.  Event streams carry a ``max_bytes`` limit (1 GiB by default) and the tests create
    one stream per cluster on a shared server, so the default ceiling is 1 TiB.
    """

    binary = "nats-server"

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        name: str = "nats",
        host: str = LOOPBACK,
        port: int | None = None,
        monitor_port: int | None = None,
        jetstream: bool = True,
        store_dir: str | os.PathLike[str] | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: Mapping[str, Any] | None = None,
        extra_listen_hosts: Sequence[str] = (),
        max_memory_store: int = 256 * 1024 * 1024,
        max_file_store: int = 1 << 40,
        extra_args: Sequence[str] = (),
        wrapper: Sequence[str] = (),
        stop_at_exit: bool = True,
    ) -> None:
        super().__init__(base_dir, name=name, host=host, port=port, extra_args=extra_args,
                         wrapper=wrapper, stop_at_exit=stop_at_exit)
        if token and (user or password):
            raise HarnessError(f"{name}: give either user/password or token, not both")
        if (user is None) != (password is None):
            raise HarnessError(f"{name}: user and password go together")
        self.monitor_port = monitor_port if monitor_port is not None else free_port(host)
        self.jetstream = jetstream
        self.store_dir = Path(store_dir) if store_dir is not None else self.data_dir / "jetstream"
        self.user = user
        self.password = password
        self.token = token
        self.tls = dict(tls) if tls else None
        self.extra_listen_hosts = list(extra_listen_hosts)
        self.max_memory_store = max_memory_store
        self.max_file_store = max_file_store
        self.config_path = self.data_dir / "nats.conf"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def urls(self) -> list[str]:
        """Client URLs: loopback first, then one per extra listen host."""
        return [self.url, *(f"nats://{h}:{self.port}" for h in self.extra_listen_hosts)]

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        return [(self.host, self.port), (self.host, self.monitor_port),
                *((h, self.port) for h in self.extra_listen_hosts)]

    def prepare(self) -> None:
        listen_host = "0.0.0.0" if self.extra_listen_hosts else self.host
        conf: dict[str, Any] = {
            "server_name": self.name,
            "listen": f"{listen_host}:{self.port}",
            "http": f"{self.host}:{self.monitor_port}",
        }
        if self.jetstream:
            conf["jetstream"] = {"store_dir": str(self.store_dir),
                                 "max_memory_store": self.max_memory_store,
                                 "max_file_store": self.max_file_store}
        if self.user is not None:
            conf["authorization"] = {"user": self.user, "password": self.password}
        elif self.token is not None:
            conf["authorization"] = {"token": self.token}
        if self.tls:
            tls_conf: dict[str, Any] = {"cert_file": str(self.tls["cert"]),
                                        "key_file": str(self.tls["key"])}
            if self.tls.get("ca"):
                tls_conf["ca_file"] = str(self.tls["ca"])
            if self.tls.get("verify"):
                tls_conf["verify"] = True
            conf["tls"] = tls_conf
        # nats-server's config syntax is a superset of JSON, and JSON escaping handles any
        # character a password may contain.
        _write_private(self.config_path, json.dumps(conf, indent=2))

    def command(self) -> list[str]:
        return ["nats-server", "-c", str(self.config_path)]

    def probe(self) -> bool:
        query = "?js-enabled-only=true" if self.jetstream else ""
        status, _ = _http(f"{self.monitor_url}/healthz{query}")
        return status == 200

    def extra_info(self) -> dict[str, Any]:
        return {"url": self.url, "urls": self.urls, "monitor_port": self.monitor_port,
                "monitor_url": self.monitor_url, "jetstream": self.jetstream,
                "auth": "user" if self.user else ("token" if self.token else None),
                "tls": bool(self.tls)}


# ---------------------------------------------------------------------------------------------
# Redis

def _redis_quote(value: str) -> str:
    """Quote a value for redis.conf (sdssplitargs syntax)."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return '"' + "".join(out) + '"'


class RedisServer(Service):
    """redis-server configured by a generated file; ``url`` is redis://host:port/0.

    Persistent by default, as production must be: ``appendonly yes`` with ``appendfsync
    everysec`` (the AOF in the data dir, which a restart keeps), so a restart keeps the fences,
    seqs and applied markers (preflight fails on a Redis without AOF, see
    :func:`cbctl.core.operator.preflight.check_redis`).  ``appendonly=False`` (a restart starts empty) and
    ``appendfsync`` (``always`` / ``everysec`` / ``no``) exist for tests of exactly those
    settings.  RDB snapshots are off.  ``requirepass`` goes only into the mode-0600 config file.
    """

    binary = "redis-server"

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        name: str = "redis",
        host: str = LOOPBACK,
        port: int | None = None,
        extra_bind_hosts: Sequence[str] = (),
        requirepass: str | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        wrapper: Sequence[str] = (),
        stop_at_exit: bool = True,
    ) -> None:
        super().__init__(base_dir, name=name, host=host, port=port, extra_args=extra_args,
                         wrapper=wrapper, stop_at_exit=stop_at_exit)
        self.extra_bind_hosts = list(extra_bind_hosts)
        self.requirepass = requirepass
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync {appendfsync!r}: must be always, everysec or no")
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.config_path = self.data_dir / "redis.conf"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def password(self) -> str | None:
        return self.requirepass

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        return [(self.host, self.port), *((h, self.port) for h in self.extra_bind_hosts)]

    def prepare(self) -> None:
        lines = [
            f"bind {' '.join([self.host, *self.extra_bind_hosts])}",
            f"port {self.port}",
            "daemonize no",
            'logfile ""',
            # Explicit bind addresses already restrict access; protected mode would also refuse
            # clients from a network namespace when there is no password.
            "protected-mode no",
            f"dir {_redis_quote(str(self.data_dir))}",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
        ]
        if self.requirepass is not None:
            lines.append(f"requirepass {_redis_quote(self.requirepass)}")
        _write_private(self.config_path, "\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return ["redis-server", str(self.config_path)]

    def client(self, **kwargs: Any) -> Any:
        """A ``redis.Redis`` client for this server (password applied). Imported lazily."""
        import redis

        kwargs.setdefault("password", self.requirepass)
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def probe(self) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # redis-py >= 6 retries 3 times with exponential backoff by default, which turns one
        # probe of a paused server into seconds; a probe must be a single attempt.
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def extra_info(self) -> dict[str, Any]:
        return {"url": self.url, "bind": [self.host, *self.extra_bind_hosts],
                "auth": self.requirepass is not None}


# ---------------------------------------------------------------------------------------------
# Prometheus

def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class PrometheusServer(Service):
    """prometheus scraping targets listed in a file_sd JSON file (changed live with
    :meth:`set_targets`), scrape and evaluation interval ``scrape_interval`` (default 1 s).

    Recording/alerting rules can be set with ``rules`` (YAML text) or :meth:`set_rules`.
    """

    binary = "prometheus"

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        name: str = "prometheus",
        host: str = LOOPBACK,
        port: int | None = None,
        scrape_interval: float = 1.0,
        evaluation_interval: float | None = None,
        job_name: str = "cbctl",
        targets: Iterable[tuple[str, Mapping[str, str]]] = (),
        rules: str | None = None,
        extra_args: Sequence[str] = (),
        wrapper: Sequence[str] = (),
        stop_at_exit: bool = True,
    ) -> None:
        super().__init__(base_dir, name=name, host=host, port=port, extra_args=extra_args,
                         wrapper=wrapper, stop_at_exit=stop_at_exit)
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval or scrape_interval
        self.job_name = job_name
        self.config_path = self.data_dir / "prometheus.yml"
        self.targets_path = self.data_dir / "targets.json"
        self.rules_path = self.data_dir / "rules.yml"
        self._targets = [(hp, dict(labels)) for hp, labels in targets]
        self._rules = rules

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def prepare(self) -> None:
        (self.data_dir / "tsdb").mkdir(exist_ok=True)
        interval = _duration(self.scrape_interval)
        # JSON is valid YAML; no YAML writer needed.
        conf = {
            "global": {"scrape_interval": interval,
                       "evaluation_interval": _duration(self.evaluation_interval)},
            "rule_files": [str(self.rules_path)],
            "scrape_configs": [{
                "job_name": self.job_name,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                # file_sd watches the file (inotify); refresh_interval is only the fallback.
                "file_sd_configs": [{"files": [str(self.targets_path)], "refresh_interval": "1s"}],
            }],
        }
        self.config_path.write_text(json.dumps(conf, indent=2))
        self._write_targets()
        self._write_rules()

    def _write_targets(self) -> None:
        groups = [{"targets": [hp], "labels": labels} for hp, labels in self._targets]
        _atomic_write(self.targets_path, json.dumps(groups, indent=2))

    def _write_rules(self) -> None:
        _atomic_write(self.rules_path, self._rules if self._rules else "groups: []\n")

    def set_targets(self, targets: Iterable[tuple[str, Mapping[str, str]]]) -> None:
        """Replace the scrape targets: ("host:port", labels) pairs. Prometheus picks the file
        up by itself (file_sd), but hands discovered targets to its scrapers at most every 5 s
        (hard-coded in Prometheus 2.42): a new target's first sample takes ~5-10 s, also right
        after start. Wait on :meth:`query`, never on a sleep."""
        self._targets = [(hp, dict(labels)) for hp, labels in targets]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_targets()

    def set_rules(self, rules_yaml: str) -> None:
        """Replace the rule file and tell a running Prometheus to reload (SIGHUP)."""
        self._rules = rules_yaml
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_rules()
        if self._pid is not None and self.is_running():
            os.kill(self._pid, signal.SIGHUP)

    def query(self, promql: str, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Instant query; returns ``data.result`` (a list of {"metric", "value"} for vectors)."""
        from urllib.parse import quote

        status, body = _http(f"{self.url}/api/v1/query?query={quote(promql)}", timeout=timeout)
        if status != 200:
            raise HarnessError(f"{self.name}: query {promql!r} answered HTTP {status}: {body!r}")
        return json.loads(body)["data"]["result"]

    def command(self) -> list[str]:
        return [
            "prometheus",
            "--config.file", str(self.config_path),
            "--storage.tsdb.path", str(self.data_dir / "tsdb"),
            "--web.listen-address", f"{self.host}:{self.port}",
        ]

    def probe(self) -> bool:
        status, _ = _http(f"{self.url}/-/ready")
        return status == 200

    def extra_info(self) -> dict[str, Any]:
        return {"url": self.url, "targets": [hp for hp, _ in self._targets],
                "scrape_interval": self.scrape_interval}


# ---------------------------------------------------------------------------------------------
# chrony

class ChronyServer(Service):
    """chronyd serving NTP on ``host``:``port`` (UDP) from its own clock, never touching the
    system clock (-x). ``offset_seconds`` runs it under ``faketime`` so it serves a clock that
    is off by that much (clock-skew tests).

    The command socket is ``data_dir/chronyd.sock`` (``chronyc -h PATH tracking`` works), so
    several servers never share /run/chrony. As root, ``user root`` stops chronyd from dropping
    to _chrony (which cannot write our root-owned dir); as non-root, ``-U`` lets it start.
    """

    binary = "chronyd"

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        name: str = "chrony",
        host: str = LOOPBACK,
        port: int | None = None,
        stratum: int = 8,
        offset_seconds: float | None = None,
        extra_args: Sequence[str] = (),
        stop_at_exit: bool = True,
    ) -> None:
        wrapper: list[str] = []
        if offset_seconds:
            faketime = shutil.which("faketime")
            if faketime is None:
                raise HarnessError(f"{name}: offset_seconds needs the faketime executable")
            wrapper = [faketime, "-f", f"{offset_seconds:+f}s"]
        super().__init__(base_dir, name=name, host=host,
                         port=port if port is not None else free_port(host, udp=True),
                         extra_args=extra_args, wrapper=wrapper, stop_at_exit=stop_at_exit)
        self.stratum = stratum
        self.offset_seconds = offset_seconds
        self.config_path = self.data_dir / "chrony.conf"
        self.command_socket = self.data_dir / "chronyd.sock"

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        return []  # NTP is UDP; see check_ports_free

    def check_ports_free(self) -> None:
        if _udp_port_in_use(self.host, self.port):
            raise HarnessError(f"{self.name}: UDP port {self.host}:{self.port} is already in use; "
                               "refusing to start a second server there")

    def prepare(self) -> None:
        lines = [
            f"port {self.port}",
            f"bindaddress {self.host}",
            f"local stratum {self.stratum}",
            f"allow {self.host}",
            "cmdport 0",  # no UDP command port; the Unix socket below remains
            f"bindcmdaddress {self.command_socket}",
            f"pidfile {self.data_dir / 'chronyd.pid'}",
            f"driftfile {self.data_dir / 'chrony.drift'}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        argv = ["chronyd", "-x", "-d", "-f", str(self.config_path)]
        if os.geteuid() != 0:
            argv.append("-U")  # allow start as non-root (no clock control is needed with -x)
        return argv

    def probe(self) -> bool:
        import ntplib

        try:
            ntplib.NTPClient().request(self.host, port=self.port, version=4, timeout=0.3)
        except ntplib.NTPException:  # no answer within the timeout
            return False
        return True

    def ntp_offset(self, timeout: float = 1.0) -> float:
        """Offset (s) of this server's clock against ours, from one SNTP query."""
        import ntplib

        try:
            return float(ntplib.NTPClient().request(self.host, port=self.port, version=4,
                                                    timeout=timeout).offset)
        except ntplib.NTPException as exc:
            raise HarnessError(f"{self.name}: no NTP answer from {self.host}:{self.port}") from exc

    def extra_info(self) -> dict[str, Any]:
        return {"protocol": "udp", "ntp": f"{self.host}:{self.port}",
                "offset_seconds": self.offset_seconds,
                "command_socket": str(self.command_socket)}
