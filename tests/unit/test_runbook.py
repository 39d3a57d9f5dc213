"""Runbooks: schema validation (FILE:LINE errors), literal variables, the executor's stop/resume
rules, and the shipped runbooks against the real command tree. No backend needed here; the
run records in the store are covered by tests/integration/test_runbook_run.py."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbctl.cli.common import AppState
from cbctl.cli.main import app
from cbctl.cli.runbook_steps import check_cbctl_argv, in_process_runner, validate_commands
from cbctl.core.model.errors import BackendUnavailable, BadInput
from cbctl.core.operator.runbook.executor import RunbookExecutor
from cbctl.core.operator.runbook.model import Expectation, RunbookError, parse_var_assignments, resolve_vars
from cbctl.core.operator.runbook.parser import default_runbooks_dir, load_all, load_runbook, parse_runbook

pytestmark = pytest.mark.timeout(60)

SHIPPED = ["preflight", "stage-1-observe", "stage-2-canary", "stage-3-full", "rollback-coordination",
           "rollback-event-bus", "rollback-consumers", "full-rollout"]
NASTY = "\"; rm -rf / $(touch {marker}) `touch {marker}` '"


def write(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / "runbooks"
    d.mkdir(exist_ok=True)
    p = d / f"{name}.yaml"
    p.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return p


def error_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, name: str = "x") -> str:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, name, text)
    with pytest.raises(RunbookError) as info:
        load_runbook(path.relative_to(tmp_path))
    return str(info.value)


GOOD = """
name: x
summary: a runbook
vars:
  reason: {required: true}
steps:
  - run: cbctl stage status
  - check: {promql: "max(event_bus_degraded)", expect: "== 0", within: 60s}
"""


# -- schema validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - run: cbctl stage status
              - rn: cbctl stage status
            """,
            "runbooks/x.yaml:5: step 2: unknown key 'rn' (expected one of: run, argv, check, confirm, description)",
            id="unknown-step-key",
        ),
        pytest.param(
            """
            name: x
            summary: s
            author: me
            steps: [{run: cbctl stage status}]
            """,
            "runbooks/x.yaml:3: runbook: unknown key 'author'",
            id="unknown-top-key",
        ),
        pytest.param(
            """
            summary: s
            steps: [{run: cbctl stage status}]
            """,
            "runbooks/x.yaml:1: missing required key 'name'",
            id="missing-name",
        ),
        pytest.param(
            """
            name: x
            steps: [{run: cbctl stage status}]
            """,
            "runbooks/x.yaml:1: missing required key 'summary'",
            id="missing-summary",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - run: cbctl stage status
                check: {promql: up, expect: "== 1"}
            """,
            "runbooks/x.yaml:5: step 1: has both 'run' and 'check'; a step does exactly one thing",
            id="two-kinds",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - confirm: "sure?"
            """,
            "runbooks/x.yaml:4: step 1: needs one of: run, argv, check",
            id="no-kind",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - check:
                  promql: max(event_bus_degraded)
                  expect: "== 0"
                  within: soon
            """,
            "runbooks/x.yaml:7: step 1: check.within: 'soon' is not a duration",
            id="bad-within",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - check: {promql: up, expect: "about 0", within: 10s}
            """,
            "runbooks/x.yaml:4: step 1: check.expect: 'about 0' is not a comparison",
            id="bad-expect",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - check:
                  promql: up
                  expect: 0
            """,
            "runbooks/x.yaml:6: step 1: check.expect: '0' is not a comparison",
            id="expect-not-a-string",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - check: {expect: "== 0"}
            """,
            "runbooks/x.yaml:4: step 1: check: missing required key 'promql'",
            id="check-without-promql",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - run: cbctl stage status
              - run: bash -c "cbctl stage status"
            """,
            "runbooks/x.yaml:5: step 2: run: only cbctl commands can be run (got 'bash')",
            id="run-not-cbctl",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - run: cbctl rollback event-bus --reason "{{reason}}"
            """,
            "runbooks/x.yaml:4: step 1: run: unknown variable 'reason' (declared: none)",
            id="undeclared-variable",
        ),
        pytest.param(
            """
            name: x
            summary: s
            vars: {reason: {required: true}}
            steps:
              - run: cbctl rollback event-bus --reason "{{ reason }"
            """,
            "runbooks/x.yaml:5: step 1: run: malformed placeholder",
            id="malformed-placeholder",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - run: cbctl rollback event-bus --reason "unterminated
            """,
            "runbooks/x.yaml:4: step 1: run: cannot split",
            id="unbalanced-quote",
        ),
        pytest.param(
            """
            name: y
            summary: s
            steps: [{run: cbctl stage status}]
            """,
            "runbooks/x.yaml:1: name 'y' does not match the file name 'x.yaml'",
            id="name-not-file-name",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - run: cbctl stage status
                run: cbctl flags get
            """,
            "runbooks/x.yaml:5: step 1: duplicate key 'run' (first on line 4)",
            id="duplicate-key",
        ),
        pytest.param(
            """
            name: x
            summary: s
            vars: {prog: {default: /bin/sh}}
            steps:
              - argv: ["{{prog}}", -c, "echo hi"]
            """,
            "runbooks/x.yaml:5: step 1: argv: the program (argv[0]) must be fixed",
            id="argv-program-variable",
        ),
        pytest.param(
            """
            name: x
            summary: s
            vars:
              reason: {required: true, default: because}
            steps: [{run: cbctl stage status}]
            """,
            "runbooks/x.yaml:4: var 'reason': a required variable cannot have a default",
            id="required-with-default",
        ),
        pytest.param(
            """
            name: x
            summary: s
            kind: drill
            steps: [{run: cbctl stage status}]
            """,
            "runbooks/x.yaml:3: kind: 'drill' is not one of: rollback, procedure",
            id="bad-kind",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps: []
            """,
            "runbooks/x.yaml:3: steps: must not be empty",
            id="no-steps",
        ),
        pytest.param(
            """
            name: x
            summary: s
            steps:
              - run: cbctl stage status
               - run: cbctl stage status
            """,
            "runbooks/x.yaml:5: not valid YAML",
            id="bad-yaml",
        ),
    ],
)
def test_bad_runbook_is_rejected_with_file_line_and_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    assert error_of(tmp_path, monkeypatch, text).startswith(expected)


def test_empty_and_non_mapping_texts() -> None:
    with pytest.raises(RunbookError, match="^w: empty file$"):
        parse_runbook("", where="w")
    with pytest.raises(RunbookError, match="^w:1: runbook: expected a mapping, got a list$"):
        parse_runbook("- run: cbctl stage status\n", where="w")


def test_bad_runbook_is_bad_input_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "x", "name: x\nsummary: s\nsteps:\n  - rn: cbctl stage status\n")
    with pytest.raises(BadInput) as info:
        load_runbook(path)
    assert info.value.exit_code == 2


def test_required_var_missing_names_the_declaration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rb = load_runbook(write(tmp_path, "x", GOOD).relative_to(tmp_path))
    with pytest.raises(RunbookError) as info:
        resolve_vars(rb, {})
    assert str(info.value) == "runbooks/x.yaml:4: var 'reason' is required; pass --var reason=VALUE"


def test_unknown_var_is_refused(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "x", GOOD))
    with pytest.raises(BadInput, match=r"--var reasn: runbook 'x' has no such variable \(declared: reason\)"):
        resolve_vars(rb, {"reason": "r", "reasn": "typo"})


def test_var_assignments() -> None:
    assert parse_var_assignments(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    for bad in (["novalue"], ["=v"], ["a b=1"]):
        with pytest.raises(BadInput):
            parse_var_assignments(bad)
    with pytest.raises(BadInput, match="given twice"):
        parse_var_assignments(["a=1", "a=2"])


def test_defaults_keep_their_text_and_kind_is_inferred_from_the_name(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "rollback-x", """
        name: rollback-x
        summary: s
        vars: {v: {default: 1.10}, w: null}
        steps: [{run: cbctl stage status}]
        """))
    assert rb.kind == "rollback"
    assert resolve_vars(rb, {}) == {"v": "1.10", "w": ""}
    assert load_runbook(write(tmp_path, "x", GOOD)).kind == "procedure"


@pytest.mark.parametrize(
    ("text", "value", "holds"),
    [("== 0", 0.0, True), ("== 0", 1.0, False), ("< 5", 4.9, True), (">= 0.99", 0.98, False),
     ("!= 0", float("nan"), False), ("<= -1e3", -1000.0, True)],
)
def test_expectation(text: str, value: float, holds: bool) -> None:
    assert Expectation.parse(text).holds(value) is holds


# -- the shipped runbooks --------------------------------------------------------------------


def test_every_shipped_runbook_validates() -> None:
    good, bad = load_all(default_runbooks_dir())
    assert [str(e) for e in bad] == []
    assert sorted(r.name for r in good) == sorted(SHIPPED)
    kinds = {r.name: r.kind for r in good}
    assert {n for n, k in kinds.items() if k == "rollback"} == {
        "rollback-coordination", "rollback-event-bus", "rollback-consumers"}


def _placeholder_values(rb) -> dict[str, str]:  # type: ignore[no-untyped-def]
    # "1" parses as every type our options take (ints, paths, text).
    return {name: spec.default if spec.default is not None else "1" for name, spec in rb.vars.items()}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_runbook_commands_parse_against_the_command_tree(name: str) -> None:
    rb = load_runbook(default_runbooks_dir() / f"{name}.yaml")
    validate_commands(rb, _placeholder_values(rb))  # follows `cbctl runbook run X` into X


def test_shipped_runbooks_follow_the_stage_plan() -> None:
    def runs(name: str) -> list[str]:
        rb = load_runbook(default_runbooks_dir() / f"{name}.yaml")
        return [s.source for s in rb.steps if s.kind == "run"]

    assert any(r.startswith("cbctl stage advance --to 1 ") and "--reason" in r for r in runs("stage-1-observe"))
    assert any("--to 2 --canary \"{{canary_file}}\"" in r for r in runs("stage-2-canary"))
    assert any(r.startswith("cbctl stage advance --to 3") for r in runs("stage-3-full"))
    for cap in ("coordination", "event-bus", "consumers"):
        steps = runs(f"rollback-{cap}")
        applied = [i for i, r in enumerate(steps) if r.startswith(f"cbctl rollback {cap} ") and "--clear" not in r]
        cleared = [i for i, r in enumerate(steps) if r.startswith(f"cbctl rollback {cap} --clear")]
        assert applied and cleared and applied[0] < cleared[0], steps
    assert "--schema-version \"{{schema_version}}\"" in " ".join(runs("rollback-consumers"))
    full = " ".join(runs("full-rollout"))
    order = [full.index(f"runbook run {n} ") for n in
             ("preflight", "stage-1-observe", "rollback-coordination", "stage-2-canary", "stage-3-full")]
    assert order == sorted(order)


def test_a_typo_in_a_run_line_fails_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for line, problem in [
        ("cbctl rollbak event-bus", "No such command 'rollbak'"),
        ("cbctl rollback evnt-bus", "'evnt-bus' is not one of"),
        ("cbctl stage advance --too 1", "No such option: --too"),
        ("cbctl stage", "cbctl stage needs a command"),
        ("cbctl stage status --help", "only shows help"),
    ]:
        rb = load_runbook(write(tmp_path, "x", f"name: x\nsummary: s\nsteps:\n  - run: cbctl stage status\n  - run: {line}\n")
                          .relative_to(tmp_path))
        with pytest.raises(RunbookError) as info:
            validate_commands(rb, {})
        assert str(info.value).startswith("runbooks/x.yaml:5: step 2: cbctl "), str(info.value)
        assert problem in str(info.value)


def test_a_nested_runbook_is_validated_too(tmp_path: Path) -> None:
    write(tmp_path, "inner", "name: inner\nsummary: s\nvars: {v: {required: true}}\nsteps:\n  - run: cbctl rollbak x\n")
    outer = load_runbook(write(tmp_path, "outer", f"""
        name: outer
        summary: s
        steps:
          - run: cbctl runbook run inner --dir {tmp_path / 'runbooks'} --yes --var v=1
        """))
    with pytest.raises(RunbookError, match=r"outer.yaml:4: step 1: .*inner.yaml:5: step 1: .*No such command 'rollbak'"):
        validate_commands(outer, {})
    missing = load_runbook(write(tmp_path, "outer2", f"""
        name: outer2
        summary: s
        steps:
          - run: cbctl runbook run inner --dir {tmp_path / 'runbooks'} --yes
        """))
    with pytest.raises(RunbookError, match=r"var 'v' is required"):
        validate_commands(missing, {})
    selfish = load_runbook(write(tmp_path, "loop", f"""
        name: loop
        summary: s
        steps:
          - run: cbctl runbook run loop --dir {tmp_path / 'runbooks'} --yes
        """))
    with pytest.raises(RunbookError, match="would run itself"):
        validate_commands(selfish, {})


def test_check_cbctl_argv_returns_the_parsed_command() -> None:
    ctx = check_cbctl_argv(["cbctl", "rollback", "consumers", "--schema-version", "2", "--yes"])
    assert ctx.command_path == "cbctl rollback"
    assert ctx.params["schema_version"] == 2


# -- the executor ----------------------------------------------------------------------------


class Recorder:
    """Stands in for the CLI's callables; records what the executor asked for."""

    def __init__(self, codes: dict[int, int] | None = None) -> None:
        self.argvs: list[list[str]] = []
        self.codes = codes or {}
        self.records: list[dict] = []
        self.lines: list[str] = []

    def run_cbctl(self, argv: Sequence[str]) -> int:
        self.argvs.append(list(argv))
        return self.codes.get(len(self.argvs), 0)


STEPS3 = """
name: three
summary: s
vars:
  reason: {required: true}
  token: {required: true, secret: true}
steps:
  - run: cbctl flags set signals.routing=canary --yes --reason "{{reason}}"
  - run: cbctl rollback event-bus --reason "{{reason}}" --yes
    confirm: "Disable the bridge because {{reason}}?"
  - run: cbctl stage status --context "{{token}}"
"""


def executor(rb, values, rec: Recorder, **kw) -> RunbookExecutor:  # type: ignore[no-untyped-def]
    return RunbookExecutor(rb, values, run_cbctl=rec.run_cbctl, announce=rec.lines.append,
                           record=rec.records.append, actor="tester@host", **kw)


def test_variable_values_are_one_literal_argv_element(tmp_path: Path) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    nasty = NASTY.format(marker=marker)
    rb = load_runbook(write(tmp_path, "three", STEPS3))
    rec = Recorder()
    result = executor(rb, resolve_vars(rb, {"reason": nasty, "token": "s3cr3t"}), rec).execute()
    assert result.status == "completed"
    assert rec.argvs[0] == ["cbctl", "flags", "set", "signals.routing=canary", "--yes", "--reason", nasty]
    assert rec.argvs[1] == ["cbctl", "rollback", "event-bus", "--reason", nasty, "--yes"]
    assert not marker.exists()


def test_a_value_that_looks_like_a_placeholder_is_not_expanded_again(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "three", STEPS3))
    rec = Recorder()
    executor(rb, {"reason": "{{token}}", "token": "t"}, rec).execute()
    assert rec.argvs[0][-1] == "{{token}}"


def test_argv_step_runs_a_program_without_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    out = tmp_path / "out.txt"
    nasty = NASTY.format(marker=marker)
    rb = load_runbook(write(tmp_path, "ext", f"""
        name: ext
        summary: s
        vars: {{v: {{required: true}}}}
        steps:
          - argv: ["{sys.executable}", -c, "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", "{out}", "{{{{v}}}}"]
        """))
    rec = Recorder()
    result = executor(rb, {"v": nasty}, rec).execute()
    assert result.status == "completed", result.steps
    assert out.read_text() == nasty
    assert not marker.exists()
    assert rec.argvs == []  # not a cbctl step


def test_in_process_runner_passes_values_literally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    nasty = NASTY.format(marker=marker)
    run_cbctl = in_process_runner(AppState())
    code = run_cbctl(["cbctl", "runbook", "show", "--dir", str(tmp_path), nasty])
    assert code == 2  # the name came through as one argument, quotes and all (read as a path: it has '/')
    assert f"cbctl: error: {nasty}: no such file" in capsys.readouterr().err
    assert not marker.exists()
    assert run_cbctl(["cbctl", "rollback", "nonsense"]) == 2  # usage error: shown, code returned
    assert run_cbctl(["cbctl", "completion", "bash"]) == 0


def test_a_failing_step_stops_the_run_and_names_the_resume_command(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "three", STEPS3))
    rec = Recorder(codes={2: 3})
    result = executor(rb, {"reason": "it broke; badly", "token": "s3cr3t"}, rec,
                      resume_prefix=["cbctl", "--context", "prod"]).execute()
    assert len(rec.argvs) == 2  # step 3 never ran
    assert result.status == "failed"
    assert [s.status for s in result.steps] == ["ok", "failed", "not-run"]
    assert result.steps[1].exit_code == 3
    assert result.failed_step is not None and result.failed_step.index == 2
    assert [s.index for s in result.done_steps] == [1]
    assert result.resume == (f"cbctl --context prod runbook run three --from-step 2 --resumes {result.run_id} "
                             "--var 'reason=it broke; badly' --var 'token=<secret>'")
    final = rec.records[-1]
    assert final["status"] == "failed" and final["resume"] == result.resume
    assert rec.records[0]["status"] == "running"
    # Secrets never reach the record, the announcements or the resume line.
    assert "s3cr3t" not in json.dumps(rec.records) + "\n".join(rec.lines) + result.resume


def test_from_step_skips_the_steps_before_it(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "three", STEPS3))
    rec = Recorder()
    result = executor(rb, {"reason": "r", "token": "t"}, rec, from_step=2).execute()
    assert [a[1] for a in rec.argvs] == ["rollback", "stage"]
    assert [s.status for s in result.steps] == ["skipped", "ok", "ok"]
    assert result.status == "completed" and result.from_step == 2 and result.resume is None
    with pytest.raises(BadInput, match="--from-step 4: runbook 'three' has steps 1..3"):
        executor(rb, {"reason": "r", "token": "t"}, rec, from_step=4)


def test_confirmation_is_asked_per_step_and_no_aborts(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "three", STEPS3))
    rec = Recorder()
    asked: list[str] = []

    def confirm(question: str) -> bool:
        asked.append(question)
        return len(asked) < 2

    result = executor(rb, {"reason": "the bus", "token": "t"}, rec, confirm=confirm).execute()
    assert asked == ["Run step 1/3?", "Disable the bridge because the bus?"]
    assert len(rec.argvs) == 1
    assert result.status == "aborted"
    assert [s.status for s in result.steps] == ["ok", "declined", "not-run"]
    assert "--from-step 2" in (result.resume or "")


def test_keyboard_interrupt_aborts_and_is_recorded(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "three", STEPS3))
    rec = Recorder()

    def run_cbctl(argv: Sequence[str]) -> int:
        raise KeyboardInterrupt

    result = RunbookExecutor(rb, {"reason": "r", "token": "t"}, run_cbctl=run_cbctl, record=rec.records.append,
                             actor="a").execute()
    assert result.status == "interrupted" and result.steps[0].status == "interrupted"
    assert rec.records[-1]["status"] == "interrupted"
    assert result.resume is not None and "--from-step 1 --resumes" in result.resume


def test_a_record_failure_after_start_does_not_stop_the_run(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "three", STEPS3))
    rec = Recorder()
    calls = 0

    def record(data: dict) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise BackendUnavailable("etcd down")

    result = RunbookExecutor(rb, {"reason": "r", "token": "t"}, run_cbctl=rec.run_cbctl, record=record,
                             actor="a").execute()
    assert result.status == "completed" and len(rec.argvs) == 3
    assert result.record_error == "etcd down"

    def record_down(data: dict) -> None:
        raise BackendUnavailable("etcd down")

    with pytest.raises(BackendUnavailable):  # at start: nothing has run
        RunbookExecutor(rb, {"reason": "r", "token": "t"}, run_cbctl=rec.run_cbctl, record=record_down,
                        actor="a").execute()
    assert len(rec.argvs) == 3


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


CHECK = """
name: chk
summary: s
steps:
  - check: {promql: "max(event_bus_degraded)", expect: "== 0", within: 60s, interval: 10s}
  - run: cbctl stage status
"""


def test_check_polls_until_the_expectation_holds(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "chk", CHECK))
    answers = iter([[], [1.0, 0.0], [0.0, 0.0]])
    queries: list[str] = []

    def query(q: str) -> list[float]:
        queries.append(q)
        return next(answers)

    t = FakeTime()
    rec = Recorder()
    result = executor(rb, {}, rec, query=query, monotonic=t.monotonic, sleep=t.sleep).execute()
    assert result.status == "completed"
    assert queries == ["max(event_bus_degraded)"] * 3
    assert t.sleeps == [10.0, 10.0]
    assert result.steps[0].exit_code == 0


def test_check_fails_after_within_and_stops(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "chk", CHECK))
    t = FakeTime()
    rec = Recorder()
    result = executor(rb, {}, rec, query=lambda q: [1.0], monotonic=t.monotonic, sleep=t.sleep).execute()
    assert result.status == "failed" and rec.argvs == []
    assert t.now - 1000.0 == 60.0
    assert result.steps[0].detail == "max(event_bus_degraded) == 0 did not hold within 60s (last value 1)"
    assert "--from-step 1" in (result.resume or "")


def test_check_unreachable_prometheus_and_bad_query(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "chk", CHECK))
    t = FakeTime()

    def down(q: str) -> list[float]:
        raise BackendUnavailable("prometheus: connection refused")

    result = executor(rb, {}, Recorder(), query=down, monotonic=t.monotonic, sleep=t.sleep).execute()
    assert result.steps[0].exit_code == 4 and "Prometheus unreachable" in result.steps[0].detail

    def bad(q: str) -> list[float]:
        raise BadInput("prometheus rejected query: parse error")

    t2 = FakeTime()
    result = executor(rb, {}, Recorder(), query=bad, monotonic=t2.monotonic, sleep=t2.sleep).execute()
    assert result.steps[0].exit_code == 2 and t2.sleeps == []  # no point waiting


# -- the CLI without a store -----------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args), env={"NO_COLOR": "1"}, catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_dry_run_shows_substituted_steps_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    nasty = NASTY.format(marker=marker)
    code, out, err = cli("runbook", "run", "rollback-event-bus", "--dry-run", "--var", f"reason={nasty}", "-o", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["dry_run"] is True
    assert data["steps"][1]["text"].startswith("cbctl rollback event-bus --reason ")
    assert "dry run: nothing run, nothing recorded" in err
    assert not marker.exists()


def test_run_refuses_missing_vars_and_bad_from_step(tmp_path: Path) -> None:
    code, _, err = cli("runbook", "run", "rollback-event-bus", "--yes")
    assert code == 2 and "var 'reason' is required; pass --var reason=VALUE" in err
    code, _, err = cli("runbook", "run", "rollback-event-bus", "--yes", "--var", "reason=x", "--from-step", "99")
    assert code == 2 and "--from-step 99" in err
    code, _, err = cli("runbook", "run", "no-such-runbook", "--yes")
    assert code == 2 and "no runbook 'no-such-runbook'" in err


def test_run_without_a_terminal_needs_yes() -> None:
    code, _, err = cli("runbook", "run", "preflight")
    assert code == 2 and "pass --yes" in err


def test_list_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = cli("runbook", "list", "-o", "json")
    assert code == 0, err
    assert sorted(r["name"] for r in json.loads(out)["runbooks"]) == sorted(SHIPPED)
    code, out, _ = cli("runbook", "show", "rollback-event-bus", "-o", "json")
    assert code == 0 and json.loads(out)["kind"] == "rollback"
    # A bad file is listed as an error with FILE:LINE, and the exit code says so.
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "good", "name: good\nsummary: s\nsteps: [{run: cbctl stage status}]\n")
    write(tmp_path, "bad", "name: bad\nsummary: s\nsteps:\n  - rn: x\n")
    monkeypatch.setenv("CBCTL_RUNBOOKS_DIR", str(tmp_path / "runbooks"))
    code, out, err = cli("runbook", "list", "-o", "json")
    assert code == 2
    assert [r["name"] for r in json.loads(out)["runbooks"]] == ["good"]
    assert "runbooks/bad.yaml:4: step 1: unknown key 'rn'" in err


def test_a_signal_just_before_a_step_starts_stops_that_step() -> None:
    """The race the interrupt test hit under load: the signal lands after the step was
    announced but before it is marked running; the step must not run to its end."""
    import signal

    from cbctl.core.operator.runbook.interrupts import Interrupts

    guard = Interrupts()
    guard.depth.append(False)
    guard.handle(signal.SIGINT, None)  # between steps: only remembered
    assert guard.reason() == "SIGINT"
    ran: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        guard.step(lambda: ran.append(1))()
    assert ran == [] and guard.depth == [False]
