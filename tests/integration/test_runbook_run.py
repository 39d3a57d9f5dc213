"""`cbctl runbook run` against a real etcd: steps run in-process, the run is recorded at
runbooks/<run-id>, a failing run is recorded as failed with its resume command, and a completed
declared drill is judged from the audit log (cbctl/core/operator/drills.py; more in test_drills.py)."""

from __future__ import annotations

import asyncio
import json
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.model.config import load_config
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.operator.drills import drill_verdicts
from cbctl.core.operator.runbook.store import list_runs
from cbctl.sandbox import free_port
from cbctl.core.model.times import rfc3339
from tests.helpers import cbctl_proc, cbctl_run, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LANES = [f"lane-{i:02d}" for i in range(4)]


@pytest.fixture
def cfg(tmp_path: Path, shared_etcd: Any, unique_cluster: str) -> Path:
    return write_config(tmp_path / "config.toml", cluster=unique_cluster, etcd=shared_etcd.client_url, lanes=LANES)


@pytest.fixture
def books(tmp_path: Path) -> Path:
    d = tmp_path / "runbooks"
    d.mkdir()
    return d


def book(d: Path, name: str, text: str) -> None:
    (d / f"{name}.yaml").write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")


def stored_runs(cfg: Path) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        ctx = load_config(str(cfg)).context(None)
        async with make_coordinator(ctx) as coord:
            return await list_runs(coord, ctx.cluster)

    return asyncio.run(read())


def drills(cfg: Path) -> dict[str, Any]:
    """Capability -> the verdict on its latest candidate drill (None: no candidate)."""
    async def read() -> dict[str, Any]:
        ctx = load_config(str(cfg)).context(None)
        async with make_coordinator(ctx) as coord:
            return await drill_verdicts(coord, ctx.cluster)

    return asyncio.run(read())


SMALL = """
name: small
summary: set a flag, show the status
vars:
  reason: {required: true}
steps:
  - run: cbctl flags set cluster.enabled=true --yes --no-wait --reason "{{reason}}"
    confirm: "Enable the cluster?"
  - run: cbctl stage status -o json
"""


def test_a_runbook_runs_cbctl_in_process_and_is_recorded(cfg: Path, books: Path) -> None:
    book(books, "small", SMALL)
    reason = "drill; $(touch /tmp/never) 'quoted'"
    r = cbctl_run(cfg, "runbook", "run", "small", "--dir", str(books), "--yes", "--var", f"reason={reason}",
                  "-o", "json")
    assert r.exit_code == 0, r.stderr
    out = r.json()  # stdout holds the run record alone; the steps' output went to stderr
    assert out["status"] == "completed"
    assert '"stage": 0' in r.stderr  # step 2's JSON, shown as progress
    assert "step 1/2 [run] cbctl flags set cluster.enabled=true" in r.stderr

    (rec,) = stored_runs(cfg)
    # The record is shown as stored, but its times in RFC 3339 UTC (stored: epoch seconds).
    times = sorted(k for k in rec if k.endswith("_at"))
    assert times and {k: v for k, v in rec.items() if k not in times} == {k: v for k, v in out.items() if k not in times}
    assert {k: out[k] for k in times} == {k: rfc3339(rec[k]) for k in times}
    assert rec["runbook"] == "small" and rec["kind"] == "procedure" and rec["from_step"] == 1
    assert rec["vars"] == {"reason": reason}
    assert "@" in rec["actor"]
    assert rec["started_at"] <= rec["finished_at"]
    assert [(s["index"], s["kind"], s["status"], s["exit_code"]) for s in rec["steps"]] == [
        (1, "run", "ok", 0), (2, "run", "ok", 0)]
    assert all(s["seconds"] >= 0 for s in rec["steps"])

    # The flag really changed, and the audit entry names the step's command and the literal reason.
    status = cbctl_run(cfg, "stage", "status", "-o", "json").json()
    assert status["flags"]["cluster.enabled"] is True
    (entry,) = cbctl_run(cfg, "stage", "history", "-o", "json").json()["entries"]
    assert entry["reason"] == reason
    assert entry["command"].startswith("cbctl flags set cluster.enabled=true")


def test_a_failing_run_is_recorded_as_failed_with_the_resume_command(cfg: Path, books: Path) -> None:
    book(books, "breaks", """
        name: breaks
        summary: the second step fails (consumers rollback without --schema-version)
        vars: {reason: {required: true}}
        steps:
          - run: cbctl stage status
          - run: cbctl rollback consumers --yes --no-wait --reason "{{reason}}"
          - run: cbctl flags set cluster.enabled=true --yes --no-wait
        """)
    r = cbctl_run(cfg, "runbook", "run", "breaks", "--dir", str(books), "--yes", "--var", "reason=why not")
    assert r.exit_code == 1
    (rec,) = stored_runs(cfg)
    resume = (f"cbctl --config {cfg} runbook run breaks --from-step 2 --resumes {rec['run_id']} --dir {books} "
              "--var 'reason=why not'")
    assert f"resume with: {resume}" in r.stderr
    assert "failed at step 2: cbctl rollback consumers" in r.stderr
    assert "already done: 1" in r.stderr

    (rec,) = stored_runs(cfg)
    assert rec["status"] == "failed"
    assert [(s["status"], s["exit_code"]) for s in rec["steps"]] == [("ok", 0), ("failed", 2), ("not-run", None)]
    assert rec["resume"] == resume
    # Step 3 did not run.
    assert cbctl_run(cfg, "stage", "status", "-o", "json").json()["flags"]["cluster.enabled"] is False

    # Resuming after the fix runs only from step 2 (the fixed runbook now pins consumers).
    book(books, "breaks", """
        name: breaks
        summary: fixed
        vars: {reason: {required: true}}
        steps:
          - run: cbctl stage status
          - run: cbctl rollback consumers --schema-version 1 --yes --no-wait --reason "{{reason}}"
          - run: cbctl flags set cluster.enabled=true --yes --no-wait
        """)
    again = cbctl_run(cfg, "runbook", "run", "breaks", "--dir", str(books), "--yes", "--var", "reason=why not",
                      "--from-step", "2", "-o", "json")
    assert again.exit_code == 0, again.stderr
    assert [s["status"] for s in again.json()["steps"]] == ["skipped", "ok", "ok"]
    assert len(stored_runs(cfg)) == 2


def test_a_completed_declared_drill_is_proven_and_a_failed_one_is_not(cfg: Path, books: Path) -> None:
    book(books, "rollback-event-bus", """
        name: rollback-event-bus
        summary: bridge off, source local, then lift
        drill: event-bus
        vars: {reason: {required: true}}
        steps:
          - run: cbctl rollback event-bus --reason "{{reason}}" --yes --no-wait
          - run: cbctl stage status
          - run: cbctl rollback event-bus --clear --reason "{{reason}}" --yes --no-wait
        """)
    book(books, "rollback-coordination", """
        name: rollback-coordination
        summary: fails half-way
        drill: coordination
        steps:
          - run: cbctl rollback coordination --yes --no-wait
          - run: cbctl rollback coordination --schema-version 3 --yes --no-wait
        """)
    # Stage 0 has the bridge off and the guard off: turn them on so the rollbacks change something.
    setup = cbctl_run(cfg, "flags", "set", "eventbus.bridge=read-only", "ownership.guard=observe", "--yes",
                      "--no-wait")
    assert setup.exit_code == 0, setup.stderr
    ok = cbctl_run(cfg, "runbook", "run", "rollback-event-bus", "--dir", str(books), "--yes", "--var", "reason=drill")
    assert ok.exit_code == 0, ok.stderr
    assert "drill of event-bus: proven" in ok.stderr
    bad = cbctl_run(cfg, "runbook", "run", "rollback-coordination", "--dir", str(books), "--yes")
    assert bad.exit_code == 1

    found = drills(cfg)
    assert found["event-bus"].ok and found["event-bus"].rollback["step"] == 1
    assert found["coordination"] is None  # a failed run is no candidate at all
    assert found["consumers"] is None
    status = cbctl_run(cfg, "stage", "status", "-o", "json").json()
    assert "event-bus" not in status["rollbacks"]  # cleared by the last step
    assert "coordination" in status["rollbacks"]  # the failed run's step 1 stays done
    assert "rollback left in place: coordination (ownership.guard=off), applied by this run" in bad.stderr

    listed = cbctl_run(cfg, "runbook", "runs", "-o", "json")
    assert listed.exit_code == 0
    # Run ids start with the start time (1 s resolution), so two runs in one second may list either way.
    assert sorted((r["runbook"], r["status"]) for r in listed.json()["runs"]) == [
        ("rollback-coordination", "failed"), ("rollback-event-bus", "completed")]


def test_nested_runbooks_record_each_run(cfg: Path, books: Path) -> None:
    book(books, "inner", """
        name: inner
        summary: one flag
        vars: {reason: {required: true}}
        steps:
          - run: cbctl flags set cluster.enabled=true --yes --no-wait --reason "{{reason}}"
        """)
    book(books, "outer", """
        name: outer
        summary: runs inner
        vars: {reason: {required: true}}
        steps:
          - run: 'cbctl runbook run inner --yes --var "reason=outer: {{reason}}"'
          - run: cbctl stage status
        """)
    r = cbctl_run(cfg, "runbook", "run", "outer", "--dir", str(books), "--yes", "--var", "reason=x y")
    assert r.exit_code == 0, r.stderr
    recs = {rec["runbook"]: rec for rec in stored_runs(cfg)}
    assert set(recs) == {"inner", "outer"}
    assert recs["inner"]["vars"] == {"reason": "outer: x y"}
    assert all(rec["status"] == "completed" for rec in recs.values())


def test_as_a_real_process_and_secrets_stay_out_of_the_record(cfg: Path, books: Path) -> None:
    book(books, "secretive", """
        name: secretive
        summary: a secret variable
        vars:
          token: {required: true, secret: true}
        steps:
          - run: cbctl flags get cluster.enabled
          - run: cbctl rollback nonsense --token "{{token}}"
        """)
    token = f"tok-{uuid.uuid4().hex}"
    # Validation runs before anything: the typo in step 2 is caught and nothing is recorded.
    r = cbctl_proc(cfg, "runbook", "run", "secretive", "--dir", str(books), "--yes", "--var", f"token={token}")
    assert r.exit_code == 2
    assert "secretive.yaml:7: step 2: cbctl rollback nonsense --token '<secret>': No such option: --token" in r.stderr
    assert token not in r.stderr
    assert stored_runs(cfg) == []

    book(books, "secretive", """
        name: secretive
        summary: a secret variable
        vars:
          token: {required: true, secret: true}
        steps:
          - run: cbctl flags get cluster.enabled
          - run: cbctl flags set canary.subscribers={{token}} --yes --no-wait
          - run: cbctl rollback consumers --yes --no-wait
        """)
    r = cbctl_proc(cfg, "runbook", "run", "secretive", "--dir", str(books), "--yes", "--var", f"token={token}")
    assert r.exit_code == 1, r.stderr
    (rec,) = stored_runs(cfg)
    assert rec["status"] == "failed"
    assert token not in json.dumps(rec)
    assert rec["vars"] == {"token": "<secret>"}
    assert rec["steps"][1]["text"] == "cbctl flags set 'canary.subscribers=<secret>' --yes --no-wait"
    assert "--var 'token=<secret>'" in r.stderr
    assert "step 2/3 [run] cbctl flags set 'canary.subscribers=<secret>' --yes --no-wait" in r.stderr
    (entry,) = cbctl_run(cfg, "stage", "history", "-o", "json").json()["entries"]
    assert entry["command"] == "cbctl flags set canary.subscribers=<secret> --yes --no-wait"


def test_store_unreachable_runs_nothing(tmp_path: Path, books: Path) -> None:
    dead = write_config(tmp_path / "dead.toml", cluster="dead", etcd=f"http://127.0.0.1:{free_port()}", lanes=LANES)
    book(books, "small", SMALL)
    r = cbctl_run(dead, "runbook", "run", "small", "--dir", str(books), "--yes", "--var", "reason=x")
    assert r.exit_code == 4, r.stderr
    assert "step 1/2" not in r.stderr


def test_check_steps_query_a_real_prometheus(tmp_path: Path, books: Path, shared_etcd: Any, prometheus: Any,
                                             unique_cluster: str) -> None:
    cfg = write_config(tmp_path / "prom.toml", cluster=unique_cluster, etcd=shared_etcd.client_url,
                       prometheus=prometheus.url, lanes=LANES)
    book(books, "checks", """
        name: checks
        summary: one check holds, the next never does
        steps:
          - check: {promql: "vector(0)", expect: "== 0"}
          - check: {promql: "vector(1)", expect: "== 0", within: 2s, interval: 500ms}
          - run: cbctl stage status
        """)
    r = cbctl_run(cfg, "runbook", "run", "checks", "--dir", str(books), "--yes")
    assert r.exit_code == 1, r.stderr
    assert "vector(1) == 0 did not hold within 2s (last value 1)" in r.stderr
    (rec,) = stored_runs(cfg)
    assert [(s["status"], s["exit_code"]) for s in rec["steps"]] == [("ok", 0), ("failed", 1), ("not-run", None)]
    assert rec["steps"][1]["seconds"] >= 2.0
