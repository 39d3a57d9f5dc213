"""`cbctl --help` (and each group's --help) must not import the heavy clients.

Tab completion and --help run the program on every key press; aetcd/grpc, nats, redis,
prometheus_client, aiohttp and rich cost 100-600 ms together (measured; bench/cli_startup.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
