"""The main job end to end: `cbctl runbook run full-rollout` goes green on a real sandbox.

Preflight, stages 1..3 with their metric gates, a rollback drill per capability, a soak of
stage 3 under `watch --fail-on-breach`, then the exit criteria: the same path `make demo`
takes. Then a failing step stops the run and `--from-step` resumes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import cbctl_proc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    d = tmp_path / "sandbox"
    cfg = tmp_path / "config.toml"
    up = cbctl_proc(cfg, "sandbox", "up", "--nodes", "3", "--dir", str(d), timeout=120)
    try:
        assert up.exit_code == 0, up.stderr
        yield d, cfg
    finally:
        down = cbctl_proc(cfg, "sandbox", "down", "--dir", str(d), timeout=60)
        assert down.exit_code == 0, down.stderr


def test_full_rollout_runs_green_on_the_sandbox(sandbox: tuple[Path, Path]) -> None:
    d, cfg = sandbox
    run = cbctl_proc(
        cfg, "runbook", "run", "full-rollout", "--yes", "-o", "json",
        "--var", "reason=test suite", "--var", f"canary_file={d / 'canary-lanes.txt'}", "--var", "soak=20s",
        timeout=200,
    )
    assert run.exit_code == 0, run.stderr
    record = run.json()
    assert record["status"] == "completed"
    assert [s["status"] for s in record["steps"]] == ["ok"] * len(record["steps"]), record["steps"]

    status = cbctl_proc(cfg, "stage", "status", "-o", "json").json()
    assert status["stage"] == 3
    assert status["rollbacks"] == {}  # every drill lifted its override
    assert status["flags"]["eventbus.bridge"] == "streaming"

    history = cbctl_proc(cfg, "stage", "history", "-o", "json").json()["entries"]
    stages = [(e["from_stage"], e["to_stage"]) for e in history if e["kind"] == "stage"]
    assert stages == [(0, 1), (1, 2), (2, 3)]
    assert all(e["reason"] for e in history)

    criteria = cbctl_proc(cfg, "exit-criteria", "-o", "json")
    assert criteria.exit_code == 0, criteria.stdout + criteria.stderr
    assert {c["name"]: c["status"] for c in criteria.json()["criteria"]} == {
        "no-degraded": "pass", "ownership": "pass", "ordered-streaming": "pass", "rollback-runbooks": "pass"}
    # Each drill is proven by the audit log: the rollback step's revision and flag diff, and a
    # later step's revision that restored every flag it changed.
    (drills,) = [c["evidence"] for c in criteria.json()["criteria"] if c["name"] == "rollback-runbooks"]
    changed = {"rollback-coordination": "ownership.guard", "rollback-event-bus": "eventbus.bridge",
               "rollback-consumers": "consumers.schema_version"}
    for name, flag in changed.items():
        ev = drills[name]
        assert ev["drill"] is True and ev["runs"], ev
        assert ev["restore"]["revision"] > ev["rollback"]["revision"]
        (change,) = [d for d in ev["rollback"]["diff"] if d["flag"] == flag]
        (back,) = [d for d in ev["restore"]["diff"] if d["flag"] == flag]
        assert back["new"] == change["old"] and back["old"] == change["new"], ev
    assert [d for d in drills["rollback-consumers"]["rollback"]["diff"]
            if d["flag"] == "consumers.schema_version"] == [{"flag": "consumers.schema_version", "old": 2, "new": 1}]
    # The drill's dual-publish window is closed again.
    assert status["flags"]["eventbus.schema_versions"] == [1] and status["flags"]["consumers.schema_version"] == 1

    nodes = cbctl_proc(cfg, "nodes", "-o", "json").json()["nodes"]
    assert len(nodes) == 3 and all(n["lag"] == 0 for n in nodes)


def test_failing_step_stops_and_from_step_resumes(sandbox: tuple[Path, Path], tmp_path: Path) -> None:
    d, cfg = sandbox
    book = tmp_path / "books"
    book.mkdir()
    (book / "drill.yaml").write_text(
        "name: drill\n"
        "summary: stop at a failing step, then resume\n"
        "steps:\n"
        "  - run: cbctl flags set ownership.guard=observe --yes --no-wait --reason drill\n"
        "  - run: cbctl stage advance --to 3 --yes --no-wait\n"          # refused: not current+1
        "  - run: cbctl flags set eventbus.publish=shadow --yes --no-wait --reason drill\n"
    )
    first = cbctl_proc(cfg, "runbook", "run", "drill", "--dir", str(book), "--yes", "-o", "json")
    assert first.exit_code == 1
    rec = first.json()
    assert rec["status"] == "failed"
    assert [s["status"] for s in rec["steps"]][:2] == ["ok", "failed"]
    assert "--from-step 2" in first.stderr
    flags = cbctl_proc(cfg, "flags", "get", "-o", "json").json()["flags"]
    assert flags["ownership.guard"] == "observe" and flags["eventbus.publish"] == "off"

    resumed = cbctl_proc(cfg, "runbook", "run", "drill", "--dir", str(book), "--yes", "--from-step", "3", "-o", "json")
    assert resumed.exit_code == 0, resumed.stderr
    ran = [s for s in resumed.json()["steps"] if s["status"] == "ok"]
    assert [s["index"] for s in ran] == [3]
    assert cbctl_proc(cfg, "flags", "get", "eventbus.publish").stdout.strip() == "shadow"
    runs = json.loads(cbctl_proc(cfg, "runbook", "runs", "-o", "json").stdout)
    assert runs
