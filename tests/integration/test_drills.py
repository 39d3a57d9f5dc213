"""Rollback drills against a real etcd: what `cbctl exit-criteria` accepts as proof that a
capability's rollback works (cbctl/core/operator/drills.py).

Each test runs real `cbctl runbook run` commands (in-process) that really write the rollout
document and its audit log, then asks the exit criterion. Prometheus is deliberately absent:
the rollback-runbooks criterion reads only the coordination store.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cbctl.sandbox import free_port
from tests.helpers import cbctl_run, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LANES = ["lane-00", "lane-01"]

# A declared coordination drill: roll back, a step that fails until a marker file exists (a
# real recorded failure), lift.
DRILL = """
name: {name}
summary: coordination drill with a gate in the middle
drill: coordination
vars:
  marker: {{required: true}}
steps:
  - run: cbctl rollback coordination --reason drill --yes --no-wait
  - argv: [test, -e, "{{{{marker}}}}"]
  - run: cbctl stage status
  - run: cbctl rollback coordination --clear --reason drill --yes --no-wait
"""


@pytest.fixture
def cfg(tmp_path: Path, shared_etcd: Any, unique_cluster: str) -> Path:
    path = write_config(tmp_path / "config.toml", cluster=unique_cluster, etcd=shared_etcd.client_url, lanes=LANES,
                        prometheus=f"http://127.0.0.1:{free_port()}")
    # Stage 0 has the guard off already: observe, so that the rollback has something to change.
    r = cbctl_run(path, "flags", "set", "ownership.guard=observe", "--yes", "--no-wait", "--reason", "setup")
    assert r.exit_code == 0, r.stderr
    return path


@pytest.fixture
def books(tmp_path: Path) -> Path:
    d = tmp_path / "books"
    d.mkdir()
    return d


def book(d: Path, name: str, text: str) -> None:
    (d / f"{name}.yaml").write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")


def runbooks_criterion(cfg: Path) -> dict[str, Any]:
    r = cbctl_run(cfg, "exit-criteria", "-o", "json")
    assert r.exit_code in (1, 4), r.stdout + r.stderr  # no Prometheus: never ok here (4: unreachable)
    (crit,) = [c for c in r.json()["criteria"] if c["name"] == "rollback-runbooks"]
    return crit


def run_book(cfg: Path, books: Path, name: str, *args: str) -> Any:
    return cbctl_run(cfg, "runbook", "run", name, "--dir", str(books), "--yes", *args)


def resume_args(stderr: str) -> list[str]:
    """The options of the printed `resume with:` line after the runbook name."""
    m = re.search(r"resume with: .* runbook run \S+ (.*)$", stderr, re.M)
    assert m, stderr
    import shlex

    return [a for a in shlex.split(m.group(1)) if a]


def test_a_chain_resumed_from_a_recorded_failure_is_a_drill(cfg: Path, books: Path, tmp_path: Path) -> None:
    book(books, "rollback-coordination", DRILL.format(name="rollback-coordination"))
    marker = tmp_path / "marker"
    first = run_book(cfg, books, "rollback-coordination", "--var", f"marker={marker}")
    assert first.exit_code == 1, first.stderr
    assert "failed at step 2" in first.stderr
    # A stopped run names what it left in place, and how to lift it.
    assert "rollback left in place: coordination (ownership.guard=off), applied by this run (revision" in first.stderr
    assert "lift it with: cbctl --config" in first.stderr and "rollback coordination --clear" in first.stderr
    args = resume_args(first.stderr)
    assert "--from-step" in args and args[args.index("--from-step") + 1] == "2" and "--resumes" in args
    failed_id = args[args.index("--resumes") + 1]

    marker.write_text("")
    second = cbctl_run(cfg, "runbook", "run", "rollback-coordination", *args, "--yes", "-o", "json")
    assert second.exit_code == 0, second.stderr
    assert second.json()["resumes"] == failed_id
    assert "drill of coordination: proven" in second.stderr

    crit = runbooks_criterion(cfg)
    ev = crit["evidence"]["rollback-coordination"]
    assert ev["drill"] is True, ev
    assert ev["runs"] == [failed_id, second.json()["run_id"]]
    # The evidence is the audit log: the rollback written by step 1 of the failed run, the lift
    # by step 4 of the resumed one, with their revisions and flag diffs.
    assert ev["rollback"]["run"] == failed_id and ev["rollback"]["step"] == 1
    assert ev["rollback"]["diff"] == [{"flag": "ownership.guard", "old": "observe", "new": "off"}]
    assert ev["restore"]["step"] == 4 and ev["restore"]["diff"] == [
        {"flag": "ownership.guard", "old": "off", "new": "observe"}]
    assert ev["restore"]["revision"] > ev["rollback"]["revision"]
    history = {e["to_revision"]: e for e in cbctl_run(cfg, "stage", "history", "-o", "json").json()["entries"]}
    assert history[ev["rollback"]["revision"]]["command"].startswith("cbctl rollback coordination")
    assert "--clear" in history[ev["restore"]["revision"]]["command"]
    # The other two capabilities were never drilled: the criterion still fails, naming them.
    assert crit["status"] == "fail"
    assert crit["evidence"]["rollback-event-bus"] == "no record"
    assert "event-bus, consumers" in crit["evidence"]["reason"]


def test_a_tail_run_with_from_step_is_not_a_drill(cfg: Path, books: Path, tmp_path: Path) -> None:
    book(books, "rollback-coordination", DRILL.format(name="rollback-coordination"))
    marker = tmp_path / "marker"
    marker.write_text("")
    # The issue's exploit: only the last step(s), no stopped run to continue.
    tail = run_book(cfg, books, "rollback-coordination", "--var", f"marker={marker}", "--from-step", "3")
    assert tail.exit_code == 0, tail.stderr
    assert "recorded, but not a drill" in tail.stderr
    assert "drill of coordination: NOT proven" in tail.stderr
    ev = runbooks_criterion(cfg)["evidence"]["rollback-coordination"]
    assert ev["drill"] is False and "--from-step alone" in ev["reason"], ev

    # --resumes of a run that completed is refused before anything runs.
    full = run_book(cfg, books, "rollback-coordination", "--var", f"marker={marker}", "-o", "json")
    assert full.exit_code == 0, full.stderr
    refused = run_book(cfg, books, "rollback-coordination", "--var", f"marker={marker}", "--from-step", "3",
                       "--resumes", full.json()["run_id"])
    assert refused.exit_code == 2 and "only a run that stopped" in refused.stderr
    # The full run itself is the drill.
    ev = runbooks_criterion(cfg)["evidence"]["rollback-coordination"]
    assert ev["drill"] is True and ev["runs"] == [full.json()["run_id"]], ev


def test_a_runbook_named_like_a_drill_without_the_declaration_is_not_one(cfg: Path, books: Path) -> None:
    book(books, "rollback-consumers", """
        name: rollback-consumers
        summary: one harmless step
        steps:
          - run: cbctl stage status
        """)
    r = run_book(cfg, books, "rollback-consumers")
    assert r.exit_code == 0, r.stderr
    ev = runbooks_criterion(cfg)["evidence"]["rollback-consumers"]
    assert ev["drill"] is False and "does not declare itself a drill" in ev["reason"], ev


def test_a_declared_drill_whose_rollback_changed_nothing_is_not_one(cfg: Path, books: Path) -> None:
    # Consumers already read schema 1: pinning them to 1 writes no change (the old shipped drill).
    book(books, "my-consumers-drill", """
        name: my-consumers-drill
        summary: pins to the current version
        drill: consumers
        steps:
          - run: cbctl rollback consumers --schema-version 1 --reason drill --yes --no-wait
          - run: cbctl rollback consumers --clear --reason drill --yes --no-wait
        """)
    r = run_book(cfg, books, "my-consumers-drill")
    assert r.exit_code == 0, r.stderr
    assert "drill of consumers: NOT proven" in r.stderr
    ev = runbooks_criterion(cfg)["evidence"]["rollback-consumers"]
    assert ev["drill"] is False and "no step changed the consumers flags" in ev["reason"], ev

    # The same drill inside a dual-publish window (consumers on v2) really pins and unpins: proven.
    w = cbctl_run(cfg, "flags", "set", "eventbus.schema_versions=1,2", "consumers.schema_version=2", "--yes",
                  "--no-wait", "--reason", "window")
    assert w.exit_code == 0, w.stderr
    r = run_book(cfg, books, "my-consumers-drill", "-o", "json")
    assert r.exit_code == 0, r.stderr
    ev = runbooks_criterion(cfg)["evidence"]["rollback-consumers"]
    assert ev["drill"] is True and ev["runs"] == [r.json()["run_id"]], ev
    assert {"flag": "consumers.schema_version", "old": 2, "new": 1} in ev["rollback"]["diff"]


def test_a_rollback_never_lifted_is_not_a_drill(cfg: Path, books: Path) -> None:
    book(books, "half", """
        name: half
        summary: rolls back, never lifts
        drill: coordination
        steps:
          - run: cbctl rollback coordination --reason drill --yes --no-wait
          - run: cbctl stage status
        """)
    r = run_book(cfg, books, "half")
    assert r.exit_code == 0, r.stderr
    ev = runbooks_criterion(cfg)["evidence"]["rollback-coordination"]
    assert ev["drill"] is False and "no later step restored" in ev["reason"], ev
    assert ev["rollback"]["step"] == 1
