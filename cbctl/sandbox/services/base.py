"""The process contract every sandbox service keeps, and the helpers the services share.

:class:`Service` is one server process on loopback: free ports (:func:`free_port` unless
given), everything it writes under ``data_dir``, its own process group, a readiness probe that
``start`` waits on under a deadline, ``stop`` = SIGTERM then SIGKILL to the group (idempotent),
``kill``/``pause``/``resume`` for fault injection, secrets only in mode-0600 files. Failures
raise :class:`HarnessError` with the log tail. Process facts come from psutil. The contract in
prose, and how the test fixtures use it: docs/testing.md.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, ClassVar

import psutil

from cbctl.sandbox.waiting import wait_until

__all__ = [
    "LOOPBACK",
    "PROBE_ERRORS",
    "HarnessError",
    "Service",
    "atomic_write",
    "free_port",
    "group_members",
    "http_call",
    "leads_live_group",
    "port_answers",
    "process_status",
    "stop_all",
    "udp_port_in_use",
    "write_private",
]

LOOPBACK = "127.0.0.1"


class HarnessError(Exception):
    """A sandbox service could not be started, probed or stopped.

    The message names the service and, when a process was involved, ends with the tail of its
    log file, so a failing test or ``cbctl sandbox up`` shows why without digging for the log.
    """


# -- ports ------------------------------------------------------------------------------------

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


def udp_port_in_use(host: str, port: int) -> bool:
    """True when a UDP bind to ``host:port`` fails with EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


# -- HTTP probes (stdlib only: cheap to import, and the opener ignores *_proxy variables, which
# would otherwise send loopback probes to a proxy) ---------------------------------------------

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
#: what a probe of a server that is not (yet) serving may raise; URLError/timeout are OSError
PROBE_ERRORS: tuple[type[BaseException], ...] = (OSError, HTTPException, ValueError)


def http_call(url: str, *, data: bytes | None = None, timeout: float = 0.5) -> tuple[int, bytes]:
    """GET (or POST ``data`` as JSON) and return (status, body); HTTP errors are returned too.

    Raises one of :data:`PROBE_ERRORS` when there is no HTTP answer.
    """
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


# -- process facts (psutil) -------------------------------------------------------------------

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def process_status(pid: int) -> str | None:
    """psutil's status of ``pid`` (e.g. ``psutil.STATUS_STOPPED``), None if there is none."""
    try:
        return str(psutil.Process(pid).status())
    except psutil.NoSuchProcess:
        return None


def leads_live_group(pid: int) -> bool:
    """True when ``pid`` is alive (not a zombie) and leads its own process group."""
    if process_status(pid) in (None, *_GONE):
        return False
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``.

    Zombies are excluded on purpose: in a container PID 1 may never reap orphans, so a dead
    child could otherwise look alive forever.
    """
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
        except ProcessLookupError:  # exited since pids() listed it
            continue
        if process_status(pid) not in (None, *_GONE):
            members.append(pid)
    return members


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


# Services started with stop_at_exit=True and not yet stopped; stopped by an atexit hook so an
# interrupted test run or a crashed script does not leave servers behind.
_live: dict[int, Service] = {}


def stop_all(timeout: float = 5.0) -> None:
    """Stop every service this process started with ``stop_at_exit=True`` (atexit hook)."""
    for service in list(_live.values()):
        with contextlib.suppress(HarnessError):
            service.stop(timeout=timeout)


atexit.register(stop_all)


# -- files ------------------------------------------------------------------------------------

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


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (it may hold a secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, so a watcher (Prometheus file_sd) never reads half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the service ------------------------------------------------------------------------------

@dataclass(eq=False, repr=False, kw_only=True)
class Service:
    """One server process. Subclasses are dataclasses too: they add their own fields (the
    common ones below are never relisted) and define the command line, the ports and the probe.

    Constructor: ``Service(base_dir, *, name, host, port, extra_args, wrapper, stop_at_exit)``;
    ``base_dir/name`` becomes ``data_dir``; ``port`` None means a free port (UDP when the class
    says ``udp``); ``wrapper`` is prepended to argv (e.g. ``["faketime", "-f", "+30s"]``); with
    ``stop_at_exit`` the process is stopped when this Python process exits (``cbctl sandbox up``
    passes False so servers outlive the command).

    Attributes (stable; other modules code against them): ``name``, ``host``, ``port`` (an int
    once constructed), ``pid`` (None when no process is held), ``data_dir``, ``log_path``.
    Instances compare by identity.
    """

    #: executable looked up on PATH (and /usr/sbin, where Debian puts nats-server and chronyd)
    binary: ClassVar[str] = ""
    #: the service's port is UDP (free_port picks a UDP port)
    udp: ClassVar[bool] = False

    base_dir: str | os.PathLike[str] = field(kw_only=False)
    name: str
    host: str = LOOPBACK
    port: int | None = None
    extra_args: Sequence[str] = ()
    wrapper: Sequence[str] = ()
    stop_at_exit: bool = True

    def __post_init__(self) -> None:
        if self.port is None:
            self.port = free_port(self.host, udp=self.udp)
        self.data_dir = Path(self.base_dir) / self.name
        self.log_path = self.data_dir / f"{self.name}.log"
        self.extra_args = list(self.extra_args)
        self.wrapper = list(self.wrapper)
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
        assert self.port is not None
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

    def wait_ready(self, timeout: float = 15.0) -> Service:
        """Poll the readiness probe until it succeeds; return self. Errors as :meth:`wait_for`."""
        self.wait_for(self.is_healthy, timeout, "ready")
        return self

    def start(self, timeout: float = 15.0) -> Service:
        """Start and wait until ready (see the module contract); return self."""
        self.launch()
        return self.wait_ready(timeout)

    def attach(self, pid: int) -> Service:
        """Adopt a running process group led by ``pid`` (started by an earlier cbctl process,
        e.g. ``cbctl sandbox up``), so ``stop``/``kill``/``pause``/``status`` work on it."""
        if not leads_live_group(pid):
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
            return process_status(self._pid) not in (None, *_GONE)
        return False

    def is_healthy(self) -> bool:
        """One readiness probe, no waiting. False when not running or the probe fails."""
        if not self.is_running():
            return False
        try:
            return bool(self.probe())
        except (*PROBE_ERRORS, HarnessError):
            return False

    def send_stop(self) -> None:
        """First half of :meth:`stop`: SIGTERM to the group (SIGCONT too, so a paused group
        can act on it). Separate so that several services can be signalled before waiting."""
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

    def finish_stop(self, deadline: float) -> None:
        """Second half of :meth:`stop`: wait until the group is gone, SIGKILL at ``deadline``
        (monotonic clock)."""
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
        self.send_stop()
        self.finish_stop(time.monotonic() + timeout)

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

    def restart(self, timeout: float = 15.0) -> Service:
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

    def __enter__(self) -> Service:
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.host}:{self.port} pid={self._pid}>"
