"""Ctrl-C and SIGTERM during a real `cbctl runbook run` process (real etcd): the run record
ends `interrupted` at the step reached, with the exact resume command and the rollback it left
in place — and all of it is printed on stderr. Nothing is left `running`."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.model.config import load_config
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.operator.runbook.store import list_runs
from tests.helpers import CBCTL, cbctl_run, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def cfg(tmp_path: Path, shared_etcd: Any, unique_cluster: str) -> Path:
    path = write_config(tmp_path / "config.toml", cluster=unique_cluster, etcd=shared_etcd.client_url,
                        lanes=["lane-00"])
    r = cbctl_run(path, "flags", "set", "ownership.guard=observe", "--yes", "--no-wait", "--reason", "setup")
    assert r.exit_code == 0, r.stderr
    return path


def stored_runs(cfg: Path) -> dict[str, dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        ctx = load_config(str(cfg)).context(None)
        async with make_coordinator(ctx) as coord:
            return await list_runs(coord, ctx.cluster)

    return {r["runbook"]: r for r in asyncio.run(read())}


class Running:
    """`cbctl runbook run ...` as a real process, its stderr read line by line."""

    def __init__(self, cfg: Path, *args: str) -> None:
        env = {**os.environ, "CBCTL_CONFIG": str(cfg), "NO_COLOR": "1"}
        env.pop("CBCTL_CONTEXT", None)
        self.proc = subprocess.Popen([CBCTL, "runbook", "run", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.seen):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and self.lines.empty():
                raise AssertionError(f"{text!r} not seen; stderr so far:\n{''.join(self.seen)}")
            try:
                self.seen.append(self.lines.get(timeout=min(left, 0.5)))
            except queue.Empty:
                pass

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + 10
        # Drain what the pump thread still holds (it ends at EOF).
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.lines.get(timeout=0.2))
            except queue.Empty:
                if self.proc.stderr is None or self.proc.stderr.closed or self.lines.empty():
                    break
        return code, "".join(self.seen)


INNER = """
name: inner
summary: rolls back, then waits on something slow
steps:
  - run: cbctl rollback coordination --reason drill --yes --no-wait
  - argv: [sleep, "120"]
  - run: cbctl rollback coordination --clear --reason drill --yes --no-wait
"""
OUTER = """
name: outer
summary: runs inner in-process
steps:
  - run: cbctl stage status
  - run: cbctl runbook run inner --yes
  - run: cbctl stage status
"""


def write_books(tmp_path: Path) -> Path:
    d = tmp_path / "books"
    d.mkdir()
    (d / "inner.yaml").write_text(textwrap.dedent(INNER).lstrip(), encoding="utf-8")
    (d / "outer.yaml").write_text(textwrap.dedent(OUTER).lstrip(), encoding="utf-8")
    return d


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_step_ends_the_run_interrupted_with_resume_and_override(cfg: Path, tmp_path: Path,
                                                                          sig: signal.Signals, code: int) -> None:
    books = write_books(tmp_path)
    run = Running(cfg, "outer", "--dir", str(books), "--yes")
    try:
        run.wait_for("step 2/3 [argv] sleep 120")  # the nested run's slow step has started
    finally:
        run.proc.send_signal(sig)  # to cbctl itself only: its handler must stop the step
    exit_code, stderr = run.finish()
    assert exit_code == code, stderr
    name = sig.name

    recs = stored_runs(cfg)
    inner, outer = recs["inner"], recs["outer"]
    # Both records ended; none stays "running".
    assert inner["status"] == outer["status"] == "interrupted"
    assert inner["interrupted_by"] == outer["interrupted_by"] == name
    assert [s["status"] for s in inner["steps"]] == ["ok", "interrupted", "not-run"]
    assert [s["status"] for s in outer["steps"]] == ["ok", "interrupted", "not-run"]
    # The exact resume commands, printed and recorded.
    assert inner["resume"] == (f"cbctl --config {cfg} runbook run inner --from-step 2 --resumes {inner['run_id']} "
                               f"--dir {books}")
    assert outer["resume"] == (f"cbctl --config {cfg} runbook run outer --from-step 2 --resumes {outer['run_id']} "
                               f"--dir {books}")
    assert f"resume with: {inner['resume']}" in stderr
    assert f"resume with: {outer['resume']}" in stderr
    assert f"runbook inner: interrupted by {name} at step 2: sleep 120" in stderr
    assert f"runbook outer: interrupted by {name} at step 2:" in stderr
    # The override the run applied stays in place, and says so (record and stderr).
    (override,) = outer["overrides"]
    assert override["capability"] == "coordination" and override["by_this_run"] is True
    assert override["flags"] == {"ownership.guard": "off"}
    assert "rollback left in place: coordination (ownership.guard=off), applied by this run" in stderr
    assert f"lift it with: cbctl --config {cfg} rollback coordination --clear --reason REASON" in stderr
    status = cbctl_run(cfg, "stage", "status", "-o", "json").json()
    assert status["rollbacks"] == {"coordination": {"ownership.guard": "off"}}

    # Resuming the inner run with the printed line finishes it (sleep replaced by a quick step).
    (books / "inner.yaml").write_text(textwrap.dedent(INNER).lstrip().replace('"120"', '"0"'), encoding="utf-8")
    resumed = cbctl_run(cfg, "runbook", "run", "inner", "--from-step", "2", "--resumes", inner["run_id"],
                        "--dir", str(books), "--yes")
    # The runbook file changed since the stopped run: refused (a chain is one runbook version).
    assert resumed.exit_code == 2 and "changed since that run" in resumed.stderr


def test_a_signal_during_a_check_poll_stops_the_check(cfg: Path, tmp_path: Path, prometheus: Any) -> None:
    path = write_config(tmp_path / "prom.toml", cluster=load_config(str(cfg)).context(None).cluster,
                        etcd=load_config(str(cfg)).context(None).coordination.endpoints[0],
                        prometheus=prometheus.url, lanes=["lane-00"])
    books = tmp_path / "books"
    books.mkdir()
    (books / "waits.yaml").write_text(textwrap.dedent("""
        name: waits
        summary: a check that never holds
        steps:
          - check: {promql: "vector(1)", expect: "== 0", within: 120s, interval: 1s}
          - run: cbctl stage status
        """).lstrip(), encoding="utf-8")
    run = Running(path, "waits", "--dir", str(books), "--yes")
    try:
        run.wait_for("step 1/2 [check]")
    finally:
        run.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    exit_code, stderr = run.finish()
    assert exit_code == 143, stderr
    assert time.monotonic() - started < 30  # not the check's 120 s
    rec = stored_runs(path)["waits"]
    assert rec["status"] == "interrupted" and rec["steps"][0]["status"] == "interrupted"
    assert rec["overrides"] == [] and "rollback overrides in force: none" in stderr
    assert "--from-step 1 --resumes" in rec["resume"]


WAITING = """
name: waiting
summary: a rollback that waits for agents (none here, so the wait ends at once), then a slow step
steps:
  - run: cbctl rollback coordination --reason drill --yes --timeout 5
  - argv: [sleep, "120"]
  - run: cbctl rollback coordination --clear --reason drill --yes --no-wait
"""


def test_sigterm_after_a_step_that_waited_still_ends_the_run_interrupted(cfg: Path, tmp_path: Path) -> None:
    """`--wait` installs its own SIGTERM handler for the wait; afterwards the run's handler must
    be back (the event loop's removal resets SIGTERM to the default action, which would kill the
    run with no record, no resume line and the rollback left in place without a word)."""
    d = tmp_path / "books"
    d.mkdir()
    (d / "waiting.yaml").write_text(textwrap.dedent(WAITING).lstrip(), encoding="utf-8")
    run = Running(cfg, "waiting", "--dir", str(d), "--yes")
    try:
        run.wait_for("step 2/3 [argv] sleep 120")
    finally:
        run.proc.send_signal(signal.SIGTERM)
    exit_code, stderr = run.finish()
    assert exit_code == 143, stderr
    rec = stored_runs(cfg)["waiting"]
    assert rec["status"] == "interrupted" and rec["interrupted_by"] == "SIGTERM"
    assert [s["status"] for s in rec["steps"]] == ["ok", "interrupted", "not-run"]
    assert "rollback left in place: coordination (ownership.guard=off), applied by this run" in stderr
