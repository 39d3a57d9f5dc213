"""The sandbox's own cbctl processes: node agents, the load generator, standing subscribers.

They run the ``cbctl`` script of the running interpreter's environment (the same code as the
command that started them), always with the context they are handed (``CBCTL_CONTEXT`` and
``CBCTL_CONFIG`` of the caller's shell are dropped).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbctl.sandbox.services.base import HarnessError, Service, http_call

__all__ = ["CONTEXT_NAME", "AgentProcess", "CbctlProcess", "LoadGenerator", "Subscriber",
           "cbctl_executable"]

#: the context ``cbctl sandbox up`` writes, and the one its processes run with by default
CONTEXT_NAME = "sandbox"


def cbctl_executable() -> str:
    """The ``cbctl`` script of the running interpreter's environment (not whatever PATH finds:
    the agents must run the same code as the command that started them)."""
    candidate = Path(sys.executable).parent / "cbctl"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("cbctl")
    if found is None:
        raise HarnessError(f"cbctl executable not found next to {sys.executable} nor on PATH")
    return found


@dataclass(eq=False, repr=False, kw_only=True)
class CbctlProcess(Service):
    """A ``cbctl`` command run as a service with ``--config config_path --context context``.

    Without a port of its own (``port=0``, nothing checked before start) unless a subclass
    says otherwise; healthy while alive unless a subclass probes more.
    """

    binary = "cbctl"

    port: int | None = 0
    config_path: str
    context: str = CONTEXT_NAME

    def _resolve_binary(self) -> str:
        return cbctl_executable()

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        return []

    def cbctl_argv(self, *args: str) -> list[str]:
        """``["cbctl", "--config", ..., "--context", ..., *args]``."""
        return ["cbctl", "--config", self.config_path, "--context", self.context, *args]

    def env(self) -> dict[str, str]:
        # The process must use exactly the context we hand it, whatever the caller's shell says.
        env = {k: v for k, v in os.environ.items() if k not in ("CBCTL_CONTEXT", "CBCTL_CONFIG")}
        env["NO_COLOR"] = "1"
        return env

    def probe(self) -> bool:
        return True  # alive is all we can say


@dataclass(eq=False, repr=False, kw_only=True)
class AgentProcess(CbctlProcess):
    """``cbctl agent run`` for one node; ready when ``GET /healthz`` answers 200.

    ``gid`` (root only) runs it with that real/effective group id and no supplementary groups,
    so nftables can match its packets (``meta skgid``). ``clock_offset`` (seconds) runs it under
    ``faketime -f +Xs``: its wall clock is off by that much.
    """

    port: int | None = None
    gid: int | None = None
    clock_offset: float | None = None
    lease_ttl: float | None = None
    keepalive: float | None = None

    def __post_init__(self) -> None:
        wrapper: list[str] = []
        if self.gid is not None:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise HarnessError(f"{self.name}: a group id for partitions needs setpriv (util-linux)")
            wrapper += [setpriv, f"--regid={self.gid}", "--clear-groups"]
        if self.clock_offset:
            faketime = shutil.which("faketime")
            if faketime is None:
                raise HarnessError(f"{self.name}: a clock offset needs the faketime executable")
            wrapper += [faketime, "-f", f"{self.clock_offset:+g}s"]
        self.wrapper = [*wrapper, *self.wrapper]
        super().__post_init__()
        self.state_dir = self.data_dir / "state"

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        assert self.port is not None
        return [(self.host, self.port)]

    def prepare(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        argv = self.cbctl_argv("agent", "run", "--handler", "demo",
                               "--node-id", self.name, "--http-port", str(self.port), "--state-dir", str(self.state_dir))
        if self.lease_ttl is not None:
            argv += ["--lease-ttl", f"{self.lease_ttl:g}"]
        if self.keepalive is not None:
            argv += ["--keepalive", f"{self.keepalive:g}"]
        return argv

    def probe(self) -> bool:
        status, _ = http_call(f"http://{self.host}:{self.port}/healthz")
        return status == 200

    def extra_info(self) -> dict[str, Any]:
        return {"url": f"http://{self.host}:{self.port}", "gid": self.gid, "clock_offset": self.clock_offset}


@dataclass(eq=False, repr=False, kw_only=True)
class LoadGenerator(CbctlProcess):
    """A long-running ``cbctl agent load`` at ``rate`` workflows/s. No port; healthy while alive
    (the agents' metrics show the work)."""

    name: str = "loadgen"
    rate: float = 20.0
    workflows: int = 100_000_000

    def command(self) -> list[str]:
        return self.cbctl_argv("agent", "load", "--workflows", str(self.workflows), "--rate", f"{self.rate:g}",
                               "--prefix", "sbx")

    def extra_info(self) -> dict[str, Any]:
        return {"rate": self.rate}


@dataclass(eq=False, repr=False, kw_only=True)
class Subscriber(CbctlProcess):
    """A standing streaming subscriber on one node: ``cbctl events tail --follow --quiet``.

    It asks every second until the rollout lets it in (bridge ``streaming``, or it is a canary
    subscriber), then receives every workflow's updates from that node's bridge — the
    cross-node deliveries that ``cbctl exit-criteria`` looks for. No port; healthy while alive.
    """

    node: str

    def command(self) -> list[str]:
        return self.cbctl_argv("events", "tail", "--node", self.node, "--subscriber", self.name, "--follow",
                               "--quiet")

    def extra_info(self) -> dict[str, Any]:
        return {"node": self.node}
