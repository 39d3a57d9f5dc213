"""The CLI's output layer, durations, debug logging and the small things of issue 13 that need
no store: plain tables off a TTY, --no-headers, -o wide/yaml, RFC 3339 times, snake_case keys,
the Duration option type, -v/--debug, runbook errors (every one, with FILE:LINE), `runbook show`
checking command lines, the plural of "steps run", and `events tail` stopping at its start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cbctl.cli import common
from cbctl.cli.common import OutputFormat, duration_option, emit, print_table, snake_keys
from cbctl.core.model.times import rfc3339

pytestmark = pytest.mark.timeout(60)


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    from cbctl.cli.main import app

    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", **(env or {})}, catch_exceptions=False)


# -- tables -------------------------------------------------------------------------------------

def render(capsys: pytest.CaptureFixture[str], fmt: OutputFormat = OutputFormat.table, no_headers: bool = False,
           **kwargs: Any) -> tuple[str, str]:
    token = common._RENDER.set((fmt, no_headers))
    try:
        long = "x" * 200
        print_table("my title", ["name", "value", "extra"], [("a", long, "E1"), ("bb", "v", "E2")], wide=("extra",),
                    **kwargs)
    finally:
        common._RENDER.reset(token)
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_off_a_tty_a_table_is_plain_whole_and_aligned(capsys: pytest.CaptureFixture[str]) -> None:
    out, err = render(capsys)
    lines = out.splitlines()
    assert lines[0].split() == ["name", "value"]  # the wide-only column is left out
    assert "x" * 200 in out and "…" not in out and "│" not in out
    assert lines[1].startswith("a   ") and lines[2].startswith("bb  ")  # aligned on the longest cell
    assert err.strip() == "my title"  # the title is a message: stderr


def test_no_headers_and_wide(capsys: pytest.CaptureFixture[str]) -> None:
    out, err = render(capsys, no_headers=True)
    assert [line.split()[0] for line in out.splitlines()] == ["a", "bb"] and err == ""
    out, _ = render(capsys, OutputFormat.wide)
    assert out.splitlines()[0].split() == ["name", "value", "extra"] and "E2" in out


def test_plain_tables_do_not_import_rich() -> None:
    import subprocess
    import sys

    code = ("import sys; from cbctl.cli.common import print_table; print_table('t', ['a'], [('1',)]); "
            "print('rich' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert done.stderr.strip().endswith("False") and done.stdout.split() == ["a", "1"]


def test_yaml_carries_the_json_data(capsys: pytest.CaptureFixture[str]) -> None:
    data = {"a_b": [1, {"c": None}], "when": datetime(2026, 1, 2, tzinfo=timezone.utc), "p": Path("/x")}
    emit(OutputFormat.json, data)
    as_json = json.loads(capsys.readouterr().out)
    emit(OutputFormat.yaml, data)
    assert yaml.safe_load(capsys.readouterr().out) == as_json


def test_times_and_keys() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(0.9996) == "1970-01-01T00:00:01.000Z"
    assert rfc3339(1.25) == "1970-01-01T00:00:01.250Z"
    assert rfc3339(None) is None
    assert snake_keys({"current-context": "x", "contexts": {"a": {"lane-count": 2, "l": [{"k-v": 1}]}}}) == {
        "current_context": "x", "contexts": {"a": {"lane_count": 2, "l": [{"k_v": 1}]}}}


# -- durations ------------------------------------------------------------------------------------

def duration_app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def main(timeout: Annotated[float, duration_option("--timeout", help="t")] = 30.0,
             gate: Annotated[float, duration_option("--gate", allow_zero=True, help="g")] = 0.0) -> None:
        print(json.dumps([timeout, gate]))

    return app


@pytest.mark.parametrize(("given", "seconds"), [("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1h30m", 5400.0),
                                                 ("500ms", 0.5), ("5", 5.0), ("2.5", 2.5)])
def test_every_time_option_takes_durations_and_plain_seconds(given: str, seconds: float) -> None:
    r = CliRunner().invoke(duration_app(), ["--timeout", given])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [seconds, 0.0]


def test_the_default_and_an_allowed_zero() -> None:
    r = CliRunner().invoke(duration_app(), ["--gate", "0s"])
    assert json.loads(r.stdout) == [30.0, 0.0]


@pytest.mark.parametrize("args", [
    ["stage", "advance", "--timeout", "-5"],
    ["stage", "advance", "--timeout", "0"],
    ["stage", "advance", "--gate-timeout", "-1m"],
    ["flags", "set", "a=b", "--timeout", "soon"],
    ["rollback", "coordination", "--timeout", "0s"],
    ["signal", "send", "wf", "go", "--timeout", "-1"],
    ["preflight", "--check-timeout", "0"],
    ["watch", "--interval", "0"],
    ["watch", "--for", "-10m"],
    ["exit-criteria", "--window", "0"],
    ["events", "tail", "--for", "-1s"],
    ["stage", "history", "--since", "0"],
    ["sandbox", "up", "--timeout", "0"],
    ["sandbox", "chaos", "pause-node", "node-1", "--for", "-3s"],
])
def test_a_meaningless_duration_exits_2_naming_the_option(args: list[str], tmp_path: Path) -> None:
    r = cli(*args, env={"CBCTL_CONFIG": str(tmp_path / "none.toml")})
    assert r.exit_code == 2, r.output
    option = next(a for a in args if a.startswith("--"))
    assert f"'{option}'" in r.stderr and ("positive duration" in r.stderr or "expected a duration" in r.stderr)


# -- -v/--debug --------------------------------------------------------------------------------

def test_debug_logs_cbctl_records_to_stderr_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("cbctl")
    before = (list(logger.handlers), logger.level)
    try:
        common.setup_logging(True)
        common.setup_logging(True)  # idempotent: one handler
        assert sum(getattr(h, "_cbctl_debug", False) for h in logger.handlers) == 1
        logging.getLogger("cbctl.core.model").debug("connecting to %s", "http://user:hunter2@127.0.0.1:2379")
        err = capsys.readouterr().err
        assert "DEBUG cbctl.core.model: connecting to http://" in err and "hunter2" not in err
    finally:
        logger.handlers[:] = before[0]
        logger.setLevel(before[1])


def test_debug_is_a_root_option() -> None:
    r = cli("-v", "--help")
    assert r.exit_code == 0 and "--debug" in r.stdout and "--no-headers" in r.stdout


# -- runbooks -----------------------------------------------------------------------------------

def test_runbook_validation_reports_every_error_with_its_line(tmp_path: Path) -> None:
    from cbctl.core.operator.runbook.model import RunbookErrors
    from cbctl.core.operator.runbook.parser import load_runbook

    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        name: bad
        summary: three problems
        colour: red
        steps:
          - run: cbctl stage status
          - rn: cbctl stage status
          - check: {promql: up, expect: "=="}
        """))
    with pytest.raises(RunbookErrors) as info:
        load_runbook(path)
    lines = str(info.value).splitlines()
    # step 2: its unknown key, and then that it has nothing to do
    assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in lines] == ["3", "6", "6", "7"]
    assert all(line.startswith(f"{tmp_path}/bad.yaml:") or line.startswith("bad.yaml:") or "bad.yaml:" in line
               for line in lines)
    assert "unknown key 'colour'" in lines[0] and "unknown key 'rn'" in lines[1] and "step 3" in lines[3]
    r = cli("runbook", "show", str(path))
    assert r.exit_code == 2 and len([x for x in r.stderr.splitlines() if "bad.yaml:" in x]) == 4


def test_runbook_show_checks_the_command_lines(tmp_path: Path) -> None:
    path = tmp_path / "typos.yaml"
    path.write_text(textwrap.dedent("""\
        name: typos
        summary: two bad command lines, one good one with a variable
        vars: {stage: {required: true}}
        steps:
          - run: cbctl stage advnce --to 1
          - run: cbctl stage advance --to {{stage}} --yes
          - run: cbctl flags get --colour
        """))
    r = cli("runbook", "show", str(path), "-o", "json")
    assert r.exit_code == 2
    errors = json.loads(r.stdout)["errors"]
    assert len(errors) == 2 and ":5: step 1:" in errors[0] and ":7: step 3:" in errors[1]
    assert all("typos.yaml" in e for e in errors)
    good = tmp_path / "good.yaml"
    good.write_text("name: good\nsummary: s\nvars: {n: {required: true}}\nsteps:\n  - run: cbctl stage advance --to {{n}}\n")
    assert cli("runbook", "show", str(good)).exit_code == 0  # a variable without a value is no error


def test_shipped_runbooks_show_cleanly() -> None:
    r = cli("runbook", "list", "-o", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["errors"] == []
    for book in json.loads(r.stdout)["runbooks"]:
        shown = cli("runbook", "show", book["name"], "-o", "json")
        assert shown.exit_code == 0, shown.stderr
        assert json.loads(shown.stdout)["errors"] == []


@pytest.mark.parametrize(("done", "text"), [(1, "(1 step run)"), (2, "(2 steps run)")])
def test_completed_says_step_or_steps(done: int, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cbctl.cli.runbook_render import report
    from cbctl.core.model.records import RunRecord, StepOutcome

    steps = [StepOutcome(index=i, kind="run", text="cbctl stage status", status="ok") for i in range(1, done + 1)]
    report(RunRecord(run_id="r1", runbook="x", kind="procedure", actor="a@b", started_at=1.0, from_step=1, vars={},
                     steps=steps, status="completed"))
    assert text in capsys.readouterr().err


def test_runbook_help_names_the_shipped_directory() -> None:
    r = cli("runbook", "run", "--help")
    assert "project's runbooks" not in r.stdout and "cbctl/runbooks/" in r.stdout


# -- events tail: -n and stopping at the start ----------------------------------------------------

def fake_stream(events: list[dict[str, Any]], tail_gap: float = 0.0) -> Any:
    async def subscribe(*args: Any, **kwargs: Any) -> Any:
        from cbctl.core.operator.sse_client import StreamEvent

        for i, ev in enumerate(events):
            if tail_gap and i == len(events) - 1:
                await asyncio.sleep(tail_gap)
            yield StreamEvent(ev)
        if kwargs.get("follow"):
            await asyncio.sleep(0.1)

    return subscribe


def event(seq: int, when: datetime) -> dict[str, Any]:
    return {"workflow_id": "wf", "seq": seq, "type": "t", "node_id": "n", "lane": "l",
            "occurred_at": when.isoformat().replace("+00:00", "Z")}


def run_tail(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], events: list[dict[str, Any]], *,
             follow: bool, count: int | None, tail_gap: float = 0.0) -> list[int]:
    from cbctl.cli import events as events_cmd
    from cbctl.core.operator import sse_client

    monkeypatch.setattr(sse_client, "subscribe_events", fake_stream(events, tail_gap))
    monkeypatch.setattr(events_cmd, "IDLE_SECONDS", 0.2)
    code = asyncio.run(events_cmd._stream("n", "127.0.0.1:1", "wf", "s", 0, follow, None, OutputFormat.json,
                                          count=count))
    assert code == 0
    return [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]


def test_tail_without_follow_stops_at_what_existed(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    old, new = datetime.now(timezone.utc) - timedelta(minutes=1), datetime.now(timezone.utc) + timedelta(minutes=1)
    busy = [event(1, old), event(2, old), event(3, new)] + [event(4 + i, new) for i in range(10_000)]
    assert run_tail(monkeypatch, capsys, busy, follow=False, count=None) == [1, 2]
    assert run_tail(monkeypatch, capsys, busy, follow=False, count=1) == [2]


def test_tail_n_with_follow_prints_the_last_n_then_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    old, new = datetime.now(timezone.utc) - timedelta(minutes=1), datetime.now(timezone.utc) + timedelta(minutes=1)
    stream = [event(i, old) for i in range(1, 6)] + [event(6, new), event(7, new)]
    assert run_tail(monkeypatch, capsys, stream, follow=True, count=2) == [4, 5, 6, 7]
    # A replay followed by silence: the last N are printed once the stream is idle.
    quiet = [event(1, old), event(2, old), event(3, new)]
    assert run_tail(monkeypatch, capsys, quiet, follow=True, count=1, tail_gap=0.5) == [2, 3]


def test_tail_count_must_be_positive() -> None:
    r = cli("events", "tail", "-n", "0")
    assert r.exit_code == 2 and "-n" in r.stderr
