"""Time options of `agent run` (--lease-ttl, --keepalive) and preflight (--skew-warn-ms,
--skew-fail-ms) take durations like every other time option (cbctl/cli/common.py `Duration`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from typer.testing import CliRunner

from cbctl.cli.common import duration_option
from cbctl.core.model.errors import BadInput


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    from cbctl.cli.main import app

    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", **(env or {})}, catch_exceptions=False)


def ms_app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def main(skew: Annotated[float, duration_option("--skew-ms", unit="ms", allow_zero=True, help="s")] = 50.0) -> None:
        print(json.dumps(skew))

    return app


@pytest.mark.parametrize(("given", "ms"), [("50", 50.0), ("2.5", 2.5), ("50ms", 50.0), ("0.1s", 100.0), ("1s", 1000.0),
                                           ("0", 0.0), (None, 50.0)])
def test_a_millisecond_option_takes_a_duration_and_a_plain_number_of_ms(given: str | None, ms: float) -> None:
    r = CliRunner().invoke(ms_app(), [] if given is None else ["--skew-ms", given])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == pytest.approx(ms)


@pytest.mark.parametrize("given", ["-5", "-1s", "soon"])
def test_a_millisecond_option_refuses_negative_and_garbage(given: str) -> None:
    r = CliRunner().invoke(ms_app(), ["--skew-ms", given])
    assert r.exit_code == 2 and "'--skew-ms'" in r.output


def config(tmp_path: Path) -> dict[str, str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text('current-context = "t"\n[contexts.t]\ncluster = "t"\n[contexts.t.coordination]\n'
                   'endpoints = ["http://127.0.0.1:1"]\n')
    return {"CBCTL_CONFIG": str(cfg)}


def test_agent_lease_options_reach_the_agent_in_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class FakeAgent:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            seen.update(kwargs)
            raise BadInput("stop here")  # exit 2 before anything starts

    monkeypatch.setattr("cbctl.core.agent.node.NodeAgent", FakeAgent)
    r = cli("agent", "run", "--node-id", "node-1", "--handler", "demo", "--lease-ttl", "1m", "--keepalive", "500ms",
            env=config(tmp_path))
    assert r.exit_code == 2 and "stop here" in r.stderr, r.output
    assert seen["lease_ttl"] == 60.0 and seen["keepalive_interval"] == 0.5


@pytest.mark.parametrize("args", [["--lease-ttl", "0"], ["--lease-ttl", "-10s"], ["--keepalive", "0s"],
                                  ["--keepalive", "-1"], ["--lease-ttl", "soon"]])
def test_agent_meaningless_lease_durations_exit_2_naming_the_option(args: list[str], tmp_path: Path) -> None:
    r = cli("agent", "run", "--node-id", "node-1", "--handler", "demo", *args, env=config(tmp_path))
    assert r.exit_code == 2, r.output
    assert f"'{args[0]}'" in r.stderr and ("positive duration" in r.stderr or "expected a duration" in r.stderr)


def test_preflight_skew_thresholds_take_durations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_options(**kwargs: Any) -> Any:
        seen.update(kwargs)
        raise BadInput("stop here")

    monkeypatch.setattr("cbctl.core.operator.preflight_report.PreflightOptions", fake_options)
    r = cli("preflight", "--skew-warn-ms", "0.1s", "--skew-fail-ms", "300", env=config(tmp_path))
    assert r.exit_code == 2 and "stop here" in r.stderr, r.output
    assert seen["skew_warn_ms"] == pytest.approx(100.0) and seen["skew_fail_ms"] == 300.0
    r = cli("preflight", "--skew-fail-ms", "-5ms", env=config(tmp_path))
    assert r.exit_code == 2 and "'--skew-fail-ms'" in r.stderr
