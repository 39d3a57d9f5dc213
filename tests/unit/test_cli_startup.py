"""`cbctl --help` (and each group's --help) must not import the heavy clients.

Tab completion and --help run the program on every key press; aetcd/grpc, nats, redis,
prometheus_client, aiohttp and rich cost 100-600 ms together (measured; bench/cli_startup.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typing import Any

HEAVY = ["aetcd", "grpc", "nats", "redis", "prometheus_client", "aiohttp", "rich", "httpx", "pydantic"]

PROBE = """
import json, sys
from cbctl.cli.main import app
try:
    app(sys.argv[1:], prog_name="cbctl")
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["--help"], ["stage", "--help"], ["flags", "--help"], ["rollback", "--help"], ["config", "--help"]])
def test_help_imports_no_heavy_client(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True, timeout=30)
    assert "Usage:" in proc.stdout
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert loaded == [], f"cbctl {' '.join(args)} imported {loaded}"


def test_every_listed_command_loads() -> None:
    """The static command table and the real modules agree (a typo would break only at run time)."""
    from typer.testing import CliRunner

    from cbctl.cli.main import COMMANDS, app

    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output


# -- import budget of the paths that run per key press or per status look ----------------------

#: Never on the stage-status / nodes path (they read the store; they never talk to the bus,
#: Redis, Prometheus or Consul, nor parse runbooks). etcd is read through its JSON gateway
#: (cbctl/core/backends/coord/etcd_readonly.py): no gRPC client and no retry library either.
NOT_ON_READ_PATH = ["nats", "redis", "prometheus_client", "aiohttp", "httpx", "pydantic", "yaml", "consul",
                    "grpc", "aetcd", "tenacity"]
#: Never on the completion path: a TAB answers from tables, files and one HTTP read.
NOT_ON_TAB_PATH = HEAVY + ["aetcd", "tenacity", "yaml", "consul", "asyncio"]

IMPORTED = """
import json, sys
{code}
print(json.dumps(sorted(m for m in {mods!r} if m in sys.modules)), file=sys.stderr)
"""


def imported(code: str, mods: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Which of ``mods`` a fresh interpreter has loaded after running ``code``."""
    full = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("COMP_", "_CBCTL", "CBCTL_"))}
    proc = subprocess.run([sys.executable, "-c", IMPORTED.format(code=code, mods=mods)], capture_output=True,
                          text=True, timeout=30, env={**full, **(env or {})})
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("module", ["cbctl.cli.stage", "cbctl.cli.nodes", "cbctl.cli.flags", "cbctl.cli.complete_values"])
def test_command_modules_import_no_client(module: str) -> None:
    """Importing a command module (what `cbctl X --help` and a TAB do) loads no client library."""
    assert imported(f"import {module}", HEAVY + ["tenacity", "yaml", "consul"]) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["stage", "status"], ["nodes"], ["lanes"]])
def test_read_commands_import_only_the_store_client(tmp_path: Any, args: list[str]) -> None:
    """`stage status` / `nodes` against an unreachable etcd: whatever they load, it is not the bus,
    Redis, Prometheus, Consul or YAML."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'current-context = "t"\n[contexts.t]\ncluster = "t"\n[contexts.t.coordination]\n'
                   f'endpoints = ["http://127.0.0.1:{port}"]\ntimeout = 0.3\n')
    code = f"""
from cbctl.cli.main import app
try:
    app({args!r}, prog_name="cbctl")
except SystemExit:
    pass
"""
    assert imported(code, NOT_ON_READ_PATH, {"CBCTL_CONFIG": str(cfg)}) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("words", "cword"), [("cbctl flags set own", 3), ("cbctl stage advance --canary ", 4),
                                              ("cbctl --context ", 2), ("cbctl nodes ", 2)])
def test_tab_imports_no_client(words: str, cword: int) -> None:
    code = """
from cbctl.cli.main import run
try:
    run()
except SystemExit:
    pass
"""
    env = {"_CBCTL_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword),
           "CBCTL_CONFIG": "/nonexistent/cbctl.toml"}
    assert imported(code, NOT_ON_TAB_PATH, env) == []
