"""Watching, progress, overrides and explanations (issue 13 items 3 and 4) against a real etcd
and, for convergence, a real Prometheus scraping a real /metrics endpoint.

Node records, lane owner keys and conflicts are written into etcd in their stored shape
(cbctl/core/model/records.py), so a test controls exactly what a node reports; every wait is on
a condition under a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.backends.coord import make_coordinator
from cbctl.core.model import keys
from cbctl.core.model.config import load_config
from cbctl.core.model.records import ConflictRecord, LaneOwnerRecord, NodeRecord
from tests.helpers import CBCTL, cbctl_proc, cbctl_run, write_config
from tests.support.prometheus import Exporter, wait_samples
from tests.support.records import write_preflight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

LANES = [f"lane-{i:02d}" for i in range(4)]
NO_METRIC_GATES = {"gates": {"stages": {"1": [], "2": [], "3": []}}}


def put(cfg: Path, items: dict[str, bytes]) -> None:
    """Write keys into the context's store (no lease: records stay until deleted)."""
    ctx = load_config(cfg).context()

    async def body() -> None:
        coord = make_coordinator(ctx)
        await coord.connect()
        try:
            for key, value in items.items():
                await coord.put(key, value)
        finally:
            await coord.close()

    asyncio.run(body())


def node(cfg: Path, node_id: str, applied: int | None, **extra: Any) -> None:
    cluster = load_config(cfg).context().cluster
    rec = NodeRecord(node_id=node_id, host="h1", instance_id="i-" + node_id, applied_revision=applied,
                     heartbeat=time.time(), lanes=tuple(extra.pop("lanes", ())), extra=extra)
    put(cfg, {keys.node(cluster, node_id): rec.to_json()})


def status(cfg: Path) -> dict[str, Any]:
    r = cbctl_run(cfg, "stage", "status", "-o", "json")
    assert r.exit_code == 0, r.stderr
    return r.json()


def history(cfg: Path) -> list[dict[str, Any]]:
    r = cbctl_run(cfg, "stage", "history", "-o", "json")
    assert r.exit_code == 0, r.stderr
    return r.json()["entries"]


@pytest.fixture
def cfg(tmp_path: Path, shared_etcd: Any, unique_cluster: str) -> Path:
    path = write_config(tmp_path / "config.toml", cluster=unique_cluster, etcd=shared_etcd.client_url, lanes=LANES,
                        extra=NO_METRIC_GATES)
    asyncio.run(write_preflight(load_config(path).context()))
    return path


class Lines:
    """A started `cbctl` process whose stdout and stderr lines are read as they come."""

    def __init__(self, cfg: Path, *args: str) -> None:
        env = {**os.environ, "CBCTL_CONFIG": str(cfg), "NO_COLOR": "1"}
        env.pop("CBCTL_CONTEXT", None)
        self.proc = subprocess.Popen([CBCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, stdin=subprocess.DEVNULL)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        self.out_lines: list[str] = []
        self.err_lines: list[str] = []
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, q=q: [q.put(line.rstrip("\n")) for line in s], daemon=True).start()

    def wait_line(self, which: str, pred: Any, timeout: float = 20.0) -> str:
        """The first new line on ``which`` (out/err) for which ``pred`` holds."""
        q, seen = (self.out, self.out_lines) if which == "out" else (self.err, self.err_lines)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching line on std{which}; seen: {seen}")
            try:
                line = q.get(timeout=remaining)
            except queue.Empty:
                continue
            seen.append(line)
            if pred(line):
                return line

    def finish(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        for q, seen in ((self.out, self.out_lines), (self.err, self.err_lines)):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    seen.append(q.get(timeout=0.2))
                except queue.Empty:
                    break
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# -- flags unset ----------------------------------------------------------------------------------


def test_flags_unset_is_audited_and_a_noop_writes_nothing(cfg: Path) -> None:
    assert cbctl_run(cfg, "stage", "advance", "--to", "1", "--yes", "--no-wait").exit_code == 0
    assert cbctl_run(cfg, "flags", "set", "signals.routing=all", "--yes", "--no-wait", "--reason", "try").exit_code == 0
    assert status(cfg)["flags"]["signals.routing"] == "all"

    dry = cbctl_run(cfg, "flags", "unset", "signals.routing", "--dry-run", "-o", "json")
    assert dry.exit_code == 0, dry.stderr
    assert dry.json()["dry_run"] is True and dry.json()["revision"] is None
    assert status(cfg)["flags"]["signals.routing"] == "all"

    before = len(history(cfg))
    r = cbctl_run(cfg, "flags", "unset", "signals.routing", "--yes", "--no-wait", "--reason", "back to plan", "-o", "json")
    assert r.exit_code == 0, r.stderr
    out = r.json()
    assert out["changed"] is True and out["diff"] == [{"flag": "signals.routing", "old": "all", "new": "off"}]
    data = status(cfg)
    assert data["flags"]["signals.routing"] == "off" and data["revision"] == out["revision"]
    entries = history(cfg)
    assert len(entries) == before + 1
    last = entries[-1]
    assert "flags unset" in last["command"] and last["reason"] == "back to plan" and last["kind"] == "flags"
    assert last["diff"] == [{"flag": "signals.routing", "old": "all", "new": "off"}]

    # Nothing left to unset: a no-op prints its JSON, writes nothing, exits 0.
    again = cbctl_run(cfg, "flags", "unset", "signals.routing", "--yes", "--no-wait", "-o", "json")
    assert again.exit_code == 0, again.stderr
    assert again.json()["changed"] is False and again.json()["written"] is False
    assert status(cfg)["revision"] == data["revision"] and len(history(cfg)) == before + 1
    assert "nothing written" in again.stderr and "written: revision" not in again.stderr

    bad = cbctl_run(cfg, "flags", "unset", "signals.routng", "--yes", "--no-wait")
    assert bad.exit_code == 2 and "did you mean 'signals.routing'" in bad.stderr


# -- stage status marks ----------------------------------------------------------------------------


def test_stage_status_marks_manual_overrides_and_rollbacks(cfg: Path) -> None:
    assert cbctl_run(cfg, "stage", "advance", "--to", "1", "--yes", "--no-wait").exit_code == 0
    assert status(cfg)["overrides"] == []
    assert cbctl_run(cfg, "flags", "set", "signals.routing=all", "--yes", "--no-wait", "--reason", "r").exit_code == 0
    assert cbctl_run(cfg, "rollback", "event-bus", "--yes", "--no-wait", "--reason", "r").exit_code == 0
    data = status(cfg)
    marks = {o["flag"]: o for o in data["overrides"]}
    assert marks["signals.routing"] == {"flag": "signals.routing", "value": "all", "plan": "off", "source": "manual",
                                        "capability": None, "differs": True}
    assert marks["eventbus.bridge"]["source"] == "rollback" and marks["eventbus.bridge"]["capability"] == "event-bus"
    assert (marks["eventbus.bridge"]["plan"], marks["eventbus.bridge"]["value"]) == ("read-only", "off")
    assert set(marks) == {"signals.routing", "eventbus.bridge", "stream.source"}

    table = cbctl_run(cfg, "stage", "status")
    assert table.exit_code == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines() if line.strip()}
    assert "manual" in rows["signals.routing"] and "off" in rows["signals.routing"]  # the plan value is shown
    assert "rollback:event-bus" in rows["eventbus.bridge"]
    assert "manual" not in rows["ownership.guard"] and "rollback" not in rows["ownership.guard"]


# -- nodes describe ---------------------------------------------------------------------------------


def test_nodes_describe_shows_record_probes_lanes_and_conflicts(cfg: Path) -> None:
    cluster = load_config(cfg).context().cluster
    node(cfg, "node-1", 0, lanes=["lane-01"], probes={"redis": {"ok": True, "detail": "PONG"}})
    put(cfg, {
        keys.lane(cluster, "lane-01"): LaneOwnerRecord(lane="lane-01", owner="node-1", instance_id="i-node-1",
                                                       since=time.time()).to_json(),
        keys.lane(cluster, "lane-02"): LaneOwnerRecord(lane="lane-02", owner="node-2", since=time.time()).to_json(),
        keys.conflict(cluster, "node-1", "i-old"): ConflictRecord(node_id="node-1", instance_id="i-old", at=time.time(),
                                                                  kind="unstable-node-id").to_json(),
    })
    r = cbctl_run(cfg, "nodes", "describe", "node-1", "-o", "json")
    assert r.exit_code == 0, r.stderr
    data = r.json()
    assert data["node_id"] == "node-1" and data["state"] == "live"
    assert data["record"]["host"] == "h1" and data["record"]["heartbeat"].endswith("Z")
    assert data["probes"] == {"redis": {"ok": True, "detail": "PONG"}}
    assert [ln["lane"] for ln in data["lanes"]] == ["lane-01"] and isinstance(data["lanes"][0]["token"], int)
    assert [c["kind"] for c in data["conflicts"]] == ["unstable-node-id"]

    table = cbctl_run(cfg, "nodes", "describe", "node-1")
    assert table.exit_code == 0, table.stderr
    for text in ("node-1", "lane-01", "unstable-node-id", "redis"):
        assert text in table.stdout
    missing = cbctl_run(cfg, "nodes", "describe", "node-9")
    assert missing.exit_code == 2 and "node-9" in missing.stderr


# -- watch modes (off a terminal: one snapshot per change) --------------------------------------------


def test_stage_status_watch_prints_one_snapshot_per_change(cfg: Path) -> None:
    w = Lines(cfg, "stage", "status", "--watch", "--interval", "200ms", "--count", "2", "--for", "60s", "-o", "json")
    try:
        first = json.loads(w.wait_line("out", lambda line: line.startswith("{")))
        assert first["stage"] == 0
        # Several intervals pass without a change: still one snapshot.
        time.sleep(1.0)  # not synchronisation: the window in which no second line may appear
        assert w.out.empty()
        assert cbctl_run(cfg, "stage", "advance", "--to", "1", "--yes", "--no-wait").exit_code == 0
        assert w.finish() == 0
    finally:
        w.kill()
    snaps = [json.loads(line) for line in w.out_lines if line.startswith("{")]
    assert [s["stage"] for s in snaps] == [0, 1]


def test_nodes_watch_prints_one_snapshot_per_change(cfg: Path) -> None:
    node(cfg, "node-1", 0)
    w = Lines(cfg, "nodes", "--watch", "--interval", "200ms", "--count", "2", "--for", "60s", "-o", "json")
    try:
        first = json.loads(w.wait_line("out", lambda line: line.startswith("{")))
        assert [n["node_id"] for n in first["nodes"]] == ["node-1"]
        node(cfg, "node-1", 0)  # a heartbeat only: not a change
        time.sleep(1.0)  # not synchronisation: the window in which no second line may appear
        assert w.out.empty()
        node(cfg, "node-2", 0)
        assert w.finish() == 0
    finally:
        w.kill()
    snaps = [json.loads(line) for line in w.out_lines if line.startswith("{")]
    assert [[n["node_id"] for n in s["nodes"]] for s in snaps] == [["node-1"], ["node-1", "node-2"]]


# -- progress off a terminal ---------------------------------------------------------------------------


def test_wait_progress_names_the_node_waited_for_one_line_per_change(cfg: Path) -> None:
    rev = status(cfg)["revision"]
    node(cfg, "node-1", 10**9)  # far ahead: has applied whatever is written next
    node(cfg, "node-2", rev)
    w = Lines(cfg, "flags", "set", "signals.routing=off", "--yes", "--reason", "r", "--timeout", "30s")
    try:
        line = w.wait_line("err", lambda s: "1/2 applied; waiting for node-2" in s)
        new_rev = int(line.split("revision ", 1)[1].split(":", 1)[0])
        node(cfg, "node-2", new_rev)
        assert w.finish() == 0
    finally:
        w.kill()
    progress = [s for s in w.err_lines if s.startswith(f"revision {new_rev}: ")]
    assert progress[0] == f"revision {new_rev}: 1/2 applied; waiting for node-2"
    assert len(progress) == len(set(progress))  # one line per change, never the same line twice
    assert any("applied by 2/2" in s for s in w.err_lines)


def test_preflight_progress_one_line_per_check(cfg: Path) -> None:
    r = cbctl_proc(cfg, "preflight", "--only", "credentials", "--only", "lease-timing", "--only", "nodes")
    lines = [s for s in r.stderr.splitlines() if s.startswith("preflight: ")]
    assert len(lines) == 3, r.stderr
    assert {s.split()[1] for s in lines} == {"credentials", "lease-timing", "nodes"}
    assert [s.rsplit("(", 1)[1] for s in lines] == ["1/3)", "2/3)", "3/3)"]


# -- wait converged (real Prometheus) ---------------------------------------------------------------------


@pytest.fixture
def exporter(unique_cluster: str) -> Iterator[Exporter]:
    e = Exporter("node-a", unique_cluster)
    yield e
    e.stop()


@pytest.fixture
def prom_cfg(tmp_path: Path, shared_etcd: Any, prometheus: Any, unique_cluster: str) -> Path:
    gates = {"window": "5s", "min-samples": 3, "stages": {"1": ["degraded"], "2": [], "3": []}}
    path = write_config(tmp_path / "config.toml", cluster=unique_cluster, etcd=shared_etcd.client_url,
                        prometheus=prometheus.url, lanes=LANES, extra={"gates": gates, "expected-nodes": ["node-a"]})
    asyncio.run(write_preflight(load_config(path).context()))
    return path


def test_wait_converged_both_outcomes(prom_cfg: Path, prometheus: Any, exporter: Exporter) -> None:
    assert cbctl_run(prom_cfg, "stage", "advance", "--to", "1", "--yes", "--no-wait").exit_code == 0
    rev = status(prom_cfg)["revision"]

    # node-a (expected) is not live, and the degraded gate has no data yet: not converged.
    r = cbctl_proc(prom_cfg, "wait", "converged", "--timeout", "2s", "--interval", "500ms", "-o", "json")
    assert r.exit_code == 1, r.stderr
    assert "node node-a (expected) is not live" in r.stderr and "gate degraded: no-data" in r.stderr
    look = r.json()
    assert look["converged"] is False and look["nodes"]["missing"] == ["node-a"]
    progress = [s for s in r.stderr.splitlines() if s.startswith("stage 1, revision")]
    assert progress and len(progress) == len(set(progress))  # off a terminal: one line per change

    prometheus.set_targets([(exporter.hostport, {"node": exporter.node})])
    node(prom_cfg, "node-a", rev)
    asyncio.run(wait_samples(prometheus.url, "event_bus_degraded", 3))
    ok = cbctl_proc(prom_cfg, "wait", "converged", "--timeout", "45s", "--interval", "500ms", "-o", "json")
    assert ok.exit_code == 0, ok.stderr
    data = ok.json()
    assert data["converged"] is True and data["nodes"]["applied"] == ["node-a"]
    assert {g["name"]: g["outcome"] for g in data["gates"]} == {"preflight": "pass", "degraded": "pass"}
    assert "converged: stage 1" in ok.stderr

    bad = cbctl_proc(prom_cfg, "wait", "converged", "--timeout", "-5")
    assert bad.exit_code == 2


# -- explain and the agent's JSON logs ------------------------------------------------------------------


def test_explain_from_the_tables(cfg: Path) -> None:
    r = cbctl_run(cfg, "explain", "ownership.guard", "-o", "json")
    assert r.exit_code == 0, r.stderr
    (item,) = r.json()["items"]
    assert item["kind"] == "flag" and item["allowed_values"] == ["off", "observe", "canary", "enforce"]
    table = cbctl_run(cfg, "explain", "deny-rate")
    assert table.exit_code == 0 and "<= 0.1" in table.stdout and "gate of stages" in table.stdout
    assert cbctl_run(cfg, "explain", "nonsense").exit_code == 2
