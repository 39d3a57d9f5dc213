"""A sandbox's recorded state (``DIR/sandbox.json``), its lock, and the ownership check.

Contracts: the state file records each process (kind, name, role, pid, constructor args) so a
later command can rebuild its :class:`~cbctl.sandbox.services.base.Service`; a recorded pid
is re-attached only when :func:`owns` says it is still the process we started (so a recycled
pid is never signalled); ``DIR/.lock`` (flock) serialises up/down/chaos in one directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from cbctl.sandbox.services.base import HarnessError, Service, leads_live_group, process_status
from cbctl.sandbox.services.cbctl_procs import CONTEXT_NAME, AgentProcess, LoadGenerator, Subscriber
from cbctl.sandbox.services.chrony import ChronyServer
from cbctl.sandbox.services.etcd import EtcdServer
from cbctl.sandbox.services.nats import NatsServer
from cbctl.sandbox.services.prometheus import PrometheusServer
from cbctl.sandbox.services.redis import RedisServer

__all__ = [
    "KINDS",
    "Sandbox",
    "SandboxProcess",
    "build_service",
    "default_sandbox_dir",
    "load_sandbox",
    "locked",
    "owns",
    "process_state",
]

STATE_FILE = "sandbox.json"
AGENT_CONFIG = "agent-config.toml"
CANARY_FILE = "canary-lanes.txt"
LOCK_FILE = ".lock"
STATE_VERSION = 1

# kind (class name) -> class; the state file names kinds, never arbitrary classes.
KINDS: dict[str, type[Service]] = {
    cls.__name__: cls
    for cls in (EtcdServer, NatsServer, RedisServer, PrometheusServer, ChronyServer, AgentProcess, LoadGenerator,
                Subscriber)
}


def default_sandbox_dir() -> Path:
    """``$XDG_STATE_HOME/cbctl/sandbox`` or ``~/.local/state/cbctl/sandbox``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "cbctl" / "sandbox"


@dataclass
class SandboxProcess:
    """One recorded process: enough to rebuild its Service and re-attach to it safely."""

    kind: str
    name: str
    args: dict[str, Any]
    pid: int | None = None
    role: str = "service"  # service | agent | loadgen | subscriber

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "role": self.role, "pid": self.pid, "args": self.args}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SandboxProcess:
        return cls(kind=str(data["kind"]), name=str(data["name"]), args=dict(data.get("args") or {}),
                   pid=data.get("pid"), role=str(data.get("role", "service")))


@dataclass
class Sandbox:
    """The state file's content. ``processes`` in start order."""

    dir: Path
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    config_path: str | None = None
    context: str = CONTEXT_NAME
    nodes: list[str] = field(default_factory=list)
    lane_count: int = 16
    created_at: float = field(default_factory=time.time)
    processes: list[SandboxProcess] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def agent_config_path(self) -> Path:
        return self.dir / AGENT_CONFIG

    @property
    def canary_path(self) -> Path:
        return self.dir / CANARY_FILE

    def process(self, name: str) -> SandboxProcess:
        for p in self.processes:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.processes)
        raise KeyError(f"no process {name!r} in the sandbox (known: {known})")

    def agent(self, node: str) -> SandboxProcess:
        """The agent process of ``node``; ``KeyError`` naming the known nodes otherwise."""
        for p in self.processes:
            if p.role == "agent" and p.name == node:
                return p
        raise KeyError(f"no node {node!r} in the sandbox (nodes: {', '.join(self.nodes) or 'none'})")

    def service(self, name: str) -> Service:
        """The Service of ``name``, attached to its process when that is still ours."""
        return build_service(self, self.process(name))

    def any_alive(self) -> bool:
        return any(owns(self, p) for p in self.processes)

    def save(self) -> None:
        data = {
            "version": STATE_VERSION, "id": self.id, "dir": str(self.dir), "config_path": self.config_path,
            "context": self.context, "nodes": self.nodes, "lane_count": self.lane_count,
            "created_at": self.created_at, "processes": [p.to_json() for p in self.processes],
        }
        tmp = self.state_path.with_name(f".{STATE_FILE}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.state_path)

    def update_pid(self, name: str, pid: int | None, **args: Any) -> None:
        """Record a new pid (and changed constructor args) for ``name`` and save."""
        proc = self.process(name)
        proc.pid = pid
        proc.args.update(args)
        self.save()


def load_sandbox(directory: str | os.PathLike[str] | None = None) -> Sandbox | None:
    """The sandbox recorded in ``directory`` (default :func:`default_sandbox_dir`), or None.

    Raises :class:`HarnessError` when the state file exists but cannot be read.
    """
    d = Path(directory).expanduser() if directory is not None else default_sandbox_dir()
    path = d / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{path}: cannot read the sandbox state: {exc}") from exc
    if data.get("version") != STATE_VERSION:
        raise HarnessError(f"{path}: unknown state version {data.get('version')!r}")
    return Sandbox(
        dir=d.resolve(), id=str(data.get("id", "")), config_path=data.get("config_path"),
        context=str(data.get("context", CONTEXT_NAME)), nodes=list(data.get("nodes", [])),
        lane_count=int(data.get("lane_count", 16)), created_at=float(data.get("created_at", 0.0)),
        processes=[SandboxProcess.from_json(p) for p in data.get("processes", [])],
    )


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``DIR/.lock`` exclusively (blocks while another up/down/chaos runs in DIR)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _base_of(sb: Sandbox, proc: SandboxProcess) -> Path:
    sub = proc.args.get("_base")
    return sb.dir / sub if sub else sb.dir


def build_service(sb: Sandbox, proc: SandboxProcess, *, attach: bool = True) -> Service:
    """Rebuild ``proc``'s Service (same ports, dirs, args); attach it when the pid is ours."""
    args = {k: v for k, v in proc.args.items() if not k.startswith("_")}
    if proc.kind == "PrometheusServer" and "targets" in args:
        args["targets"] = [(hp, labels) for hp, labels in args["targets"]]
    cls = KINDS.get(proc.kind)
    if cls is None:
        raise HarnessError(f"{sb.state_path}: unknown process kind {proc.kind!r}")
    svc = cls(_base_of(sb, proc), name=proc.name, stop_at_exit=False, **args)
    if attach and proc.pid is not None and owns(sb, proc):
        svc.attach(proc.pid)
    return svc


def owns(sb: Sandbox, proc: SandboxProcess) -> bool:
    """Is the recorded pid still the process we started?

    It must be alive, lead its own process group, have our data dir as its working directory
    (every process is started there; none of them changes it) and name its program in its
    command line. A recycled pid fails these, so it is never signalled. (The data dir is not
    always in argv: redis-server rewrites its process title.)
    """
    if proc.pid is None or not leads_live_group(proc.pid):
        return False
    cls = KINDS.get(proc.kind)
    program = "cbctl" if proc.role in ("agent", "loadgen", "subscriber") else (cls.binary if cls is not None else "")
    try:
        ps = psutil.Process(proc.pid)
        if ps.cwd() != str(_base_of(sb, proc) / proc.name):
            return False
        return bool(program) and program in " ".join(ps.cmdline())
    except psutil.Error:  # gone, or not ours to inspect
        return False


def process_state(sb: Sandbox, proc: SandboxProcess) -> str:
    """``running``, ``paused`` (SIGSTOP) or ``dead`` (gone, or the pid is no longer ours)."""
    if not owns(sb, proc):
        return "dead"
    assert proc.pid is not None
    return "paused" if process_status(proc.pid) == psutil.STATUS_STOPPED else "running"
