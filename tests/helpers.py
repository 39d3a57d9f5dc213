"""Test helpers shared by the suites: config files (any contexts file; an agent's; an agent's
with the event bus) and running the CLI (in-process or as a process).

Helpers for agents, the store, the bus and metrics live in ``tests/support/`` (docs/testing.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

CBCTL = str(Path(sys.executable).parent / "cbctl")

#: Short leases for agents under test, so a fault shows within seconds (lease TTL and keep-alive, s).
TTL = 3.0
KEEPALIVE = 0.5


def write_config(
    path: Path,
    *,
    cluster: str,
    etcd: Sequence[str] | str | None = None,
    nats: Sequence[str] | str | None = None,
    redis: str | None = None,
    prometheus: str | None = None,
    lanes: Sequence[str] | None = None,
    lane_count: int | None = None,
    context: str = "test",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a contexts file in the contract format and return its path."""
    ctx: dict[str, Any] = {"cluster": cluster}
    if lanes is not None:
        ctx["lanes"] = list(lanes)
    elif lane_count is not None:
        ctx["lane-count"] = lane_count
    if etcd:
        ctx["coordination"] = {"backend": "etcd", "endpoints": [etcd] if isinstance(etcd, str) else list(etcd)}
    if nats:
        ctx["nats"] = {"servers": [nats] if isinstance(nats, str) else list(nats)}
    if redis:
        ctx["redis"] = {"url": redis}
    if prometheus:
        ctx["prometheus"] = {"url": prometheus}
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(ctx.get(key), dict):
            ctx[key].update(value)
        else:
            ctx[key] = value
    path.write_bytes(tomli_w.dumps({"current-context": context, "contexts": {context: ctx}}).encode())
    return path


def agent_config(path: Path, cluster: str, etcd_url: str | Sequence[str], redis_url: str, *,
                 lane_count: int = 8, ttl: float = TTL, keepalive: float = KEEPALIVE) -> Path:
    """A contexts file for agents under test (etcd + Redis, no NATS): short leases."""
    return write_config(
        path, cluster=cluster, etcd=etcd_url, redis=redis_url, lane_count=lane_count,
        extra={"coordination": {"lease-ttl": ttl, "keepalive-interval": keepalive, "timeout": 2.0}},
    )


def bus_config(path: Path, cluster: str, etcd_url: str, redis_url: str, nats_url: str | Sequence[str], *,
               lane_count: int = 4, duplicate_window: float | None = None, extra: dict[str, Any] | None = None) -> Path:
    """A contexts file for agents with the event bus: short leases, NATS connect timeout 1 s (a
    dead server shows fast); ``extra`` tables replace ours whole (``nats`` too)."""
    nats_table: dict[str, Any] = {"connect-timeout": 1.0}
    if duplicate_window is not None:
        nats_table["stream"] = {"duplicate-window": duplicate_window}
    return write_config(
        path, cluster=cluster, etcd=etcd_url, redis=redis_url, nats=nats_url, lane_count=lane_count,
        extra={"coordination": {"lease-ttl": TTL, "keepalive-interval": KEEPALIVE, "timeout": 2.0},
               "nats": nats_table, **(extra or {})},
    )


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def cbctl_proc(config: Path, *args: str, timeout: float = 60, env: Mapping[str, str] | None = None,
               input: str | None = None) -> Result:
    """Run the installed `cbctl` as a real process."""
    full_env = {**os.environ, "CBCTL_CONFIG": str(config), "NO_COLOR": "1", **(env or {})}
    full_env.pop("CBCTL_CONTEXT", None)
    proc = subprocess.run([CBCTL, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          input=input if input is not None else "", check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def cbctl_run(config: Path, *args: str, env: Mapping[str, str] | None = None) -> Result:
    """Run cbctl in-process through Typer's runner (stdout and stderr kept apart)."""
    from typer.testing import CliRunner

    from cbctl.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, list(args), env={"CBCTL_CONFIG": str(config), "NO_COLOR": "1", **(env or {})},
                           catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)
