"""The drill rules (cbctl/core/operator/drills.py) on hand-made records, and the executor's part in them:
step revisions, the resumes link, and interrupts. The same rules run against a real etcd in
tests/integration/test_drills.py."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.model.audit import AuditEntry
from cbctl.core.operator.drills import chain_of, judge_run
from cbctl.core.operator.runbook.executor import RunbookExecutor
from cbctl.core.operator.runbook.parser import parse_runbook

pytestmark = pytest.mark.timeout(30)


def entry(rev: int, diff: list[dict[str, Any]], kind: str = "rollback") -> AuditEntry:
    return AuditEntry(time=0.0, actor="a", command="cbctl rollback", reason="r", kind=kind, from_revision=rev - 1,
                      to_revision=rev, diff=diff)


def step(index: int, status: str, revisions: list[int] | None = None) -> dict[str, Any]:
    return {"index": index, "status": status, "revisions": revisions}


def record(run_id: str, steps: list[dict[str, Any]], *, status: str = "completed", from_step: int = 1,
           resumes: str | None = None, drill: str | None = "coordination", sha: str = "x") -> dict[str, Any]:
    return {"run_id": run_id, "runbook": "rb", "status": status, "from_step": from_step, "resumes": resumes,
            "drill": drill, "runbook_sha256": sha, "steps": steps}


OFF = [{"flag": "ownership.guard", "old": "observe", "new": "off"}]
BACK = [{"flag": "ownership.guard", "old": "off", "new": "observe"}]
AUDIT = [entry(15, OFF), entry(35, BACK)]


def test_one_complete_run_with_rollback_and_restore_is_a_drill() -> None:
    rec = record("A", [step(1, "ok", [10, 20]), step(2, "ok", [20, 30]), step(3, "ok", [30, 40])])
    v = judge_run(rec, {"A": rec}, AUDIT, "coordination")
    assert v.ok and v.runs == ["A"]
    assert v.rollback == {"run": "A", "step": 1, "revision": 15, "command": "cbctl rollback", "diff": OFF}
    assert v.restore is not None and v.restore["step"] == 3 and v.restore["revision"] == 35


def test_a_write_outside_the_steps_windows_is_not_the_runs_own() -> None:
    # Someone else rolled back and restored between two saves that bracket no step of this run.
    rec = record("A", [step(1, "ok", [40, 50]), step(2, "ok", [50, 60])])
    assert not judge_run(rec, {"A": rec}, AUDIT, "coordination").ok


def test_a_lift_that_does_not_restore_the_old_value_is_not_a_restore() -> None:
    other = [{"flag": "ownership.guard", "old": "off", "new": "enforce"}]
    rec = record("A", [step(1, "ok", [10, 20]), step(2, "ok", [30, 40])])
    v = judge_run(rec, {"A": rec}, [entry(15, OFF), entry(35, other)], "coordination")
    assert not v.ok and "no later step restored" in v.reason


def test_a_flags_write_is_not_a_rollback() -> None:
    rec = record("A", [step(1, "ok", [10, 20]), step(2, "ok", [30, 40])])
    v = judge_run(rec, {"A": rec}, [entry(15, OFF, kind="flags"), entry(35, BACK)], "coordination")
    assert not v.ok and "no step changed" in v.reason


def test_chains() -> None:
    failed = record("A", [step(1, "ok", [10, 20]), step(2, "failed"), step(3, "not-run")], status="failed")
    resumed = record("B", [step(1, "skipped"), step(2, "ok", [25, 30]), step(3, "ok", [30, 40])], from_step=2,
                     resumes="A")
    by_id = {"A": failed, "B": resumed}
    v = judge_run(resumed, by_id, AUDIT, "coordination")
    assert v.ok and v.runs == ["A", "B"] and v.rollback["run"] == "A" and v.restore["run"] == "B"

    tail = record("C", [step(1, "skipped"), step(2, "skipped"), step(3, "ok", [30, 40])], from_step=3)
    assert "--from-step alone" in (chain_of(tail, by_id)[1] or "")
    # Resuming past the step the failed run stopped at leaves a hole: refused.
    skip = record("D", [step(1, "skipped"), step(2, "skipped"), step(3, "ok", [30, 40])], from_step=3, resumes="A")
    assert "after run A stopped at step 2" in (chain_of(skip, by_id)[1] or "")
    # A chain across two versions of the runbook file is no chain.
    other = record("E", [step(1, "skipped"), step(2, "ok", [25, 30]), step(3, "ok", [30, 40])], from_step=2,
                   resumes="A", sha="y")
    assert "another version" in (chain_of(other, {**by_id, "E": other})[1] or "")
    # Continuing a completed run is no chain either.
    done = record("F", [step(1, "ok", [1, 2]), step(2, "ok", [2, 3]), step(3, "ok", [3, 4])])
    again = record("G", [step(1, "skipped"), step(2, "ok", [25, 30]), step(3, "ok", [30, 40])], from_step=2,
                   resumes="F")
    assert "did not stop part-way" in (chain_of(again, {"F": done, "G": again})[1] or "")


def test_undeclared_runbooks_are_never_drills() -> None:
    rec = record("A", [step(1, "ok", [10, 20]), step(2, "ok", [30, 40])], drill=None)
    v = judge_run(rec, {"A": rec}, AUDIT, "coordination")
    assert not v.ok and "does not declare itself a drill" in v.reason


def test_consumers_rollback_must_move_consumers_to_an_older_version() -> None:
    pin = [{"flag": "consumers.schema_version", "old": 2, "new": 1}]
    unpin = [{"flag": "consumers.schema_version", "old": 1, "new": 2}]
    rec = record("A", [step(1, "ok", [10, 20]), step(2, "ok", [30, 40])], drill="consumers")
    assert judge_run(rec, {"A": rec}, [entry(15, pin), entry(35, unpin)], "consumers").ok
    # The same pair the other way round (an unpin first) is no rollback.
    assert not judge_run(rec, {"A": rec}, [entry(15, unpin), entry(35, pin)], "consumers").ok


BOOK = textwrap.dedent("""
    name: three
    summary: s
    drill: coordination
    steps:
      - run: cbctl stage status
      - run: cbctl stage status
      - run: cbctl stage status
    """).lstrip()


def test_executor_records_revisions_around_each_step_and_the_resumes_link() -> None:
    rb = parse_runbook(BOOK, where="three.yaml", expected_name="three")
    assert rb.drill == "coordination" and len(rb.sha256) == 64
    saved: list[dict[str, Any]] = []

    def rec(data: dict[str, Any]) -> int:
        saved.append(data)
        return 100 + 10 * len(saved)

    result = RunbookExecutor(rb, {}, run_cbctl=lambda argv: 0, record=rec, actor="a", from_step=2, resumes="R0",
                             cluster="c").execute()
    assert [s.revisions for s in result.steps] == [None, [110, 120], [120, 130]]
    final = saved[-1]
    assert final["resumes"] == "R0" and final["drill"] == "coordination" and final["cluster"] == "c"
    assert final["runbook_sha256"] == rb.sha256


def test_an_interrupt_reported_after_a_step_marks_it_interrupted_not_failed() -> None:
    rb = parse_runbook(BOOK, where="three.yaml", expected_name="three")
    flag: list[str] = []
    ran: list[Sequence[str]] = []

    def run_cbctl(argv: Sequence[str]) -> int:
        ran.append(argv)
        if len(ran) == 2:
            flag.append("SIGTERM")  # the handler fired; the command gave up with its own exit code
            return 130
        return 0

    looked: list[str] = []

    def overrides(r: Any) -> list[dict[str, Any]]:
        looked.append(r.run_id)
        return [{"capability": "coordination", "flags": {"ownership.guard": "off"}, "by_this_run": True,
                 "revision": 7}]

    result = RunbookExecutor(rb, {}, run_cbctl=run_cbctl, actor="a", interrupted=lambda: flag[0] if flag else None,
                             overrides=overrides).execute()
    assert result.status == "interrupted" and result.interrupted_by == "SIGTERM"
    assert [s.status for s in result.steps] == ["ok", "interrupted", "not-run"]
    assert result.steps[1].detail == "interrupted by SIGTERM (exit code 130)"
    assert result.resume is not None and f"--from-step 2 --resumes {result.run_id}" in result.resume
    assert looked == [result.run_id] and result.overrides and result.overrides[0]["by_this_run"]


def test_an_interrupt_between_steps_stops_before_the_next(tmp_path: Path) -> None:
    rb = parse_runbook(BOOK, where="three.yaml", expected_name="three")
    flag: list[str] = []

    def run_cbctl(argv: Sequence[str]) -> int:
        flag.append("SIGINT")  # arrives as the step finishes, after it succeeded
        return 0

    result = RunbookExecutor(rb, {}, run_cbctl=run_cbctl, actor="a", interrupted=lambda: flag[0] if flag else None
                             ).execute()
    assert [s.status for s in result.steps] == ["ok", "interrupted", "not-run"]
    assert result.steps[1].detail == "interrupted by SIGINT before it started"
    assert result.status == "interrupted" and "--from-step 2" in (result.resume or "")
