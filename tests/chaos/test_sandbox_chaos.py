"""`cbctl sandbox chaos ...`: each fault has the observable effect it claims, on a real sandbox.

One sandbox (3 nodes, lease TTL 3 s, cluster.enabled on) serves the module; every test leaves it
healthy again. Waits are conditions polled under deadlines (TTL + margin), never sleeps.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cbctl.sandbox import group_members, wait_until
from tests.helpers import CBCTL, cbctl_proc

pytestmark = pytest.mark.skipif(
    any(shutil.which(b) is None and shutil.which(b, path="/usr/sbin") is None
        for b in ("etcd", "nats-server", "redis-server", "prometheus", "chronyd")),
    reason="service binaries not installed (run `make setup`)",
)

TTL = 3.0
MARGIN = 7.0  # agent reconcile + CLI start-up on a loaded 2-core machine


class Sbx:
    def __init__(self, d: Path, cfg: Path) -> None:
        self.dir = d
        self.cfg = cfg

    def cli(self, *args: str, timeout: float = 60) -> Any:
        return cbctl_proc(self.cfg, *args, timeout=timeout)

    def state(self) -> dict[str, Any]:
        return json.loads((self.dir / "sandbox.json").read_text())

    def pid(self, name: str) -> int | None:
        return next(p["pid"] for p in self.state()["processes"] if p["name"] == name)

    def port(self, name: str) -> int:
        return int(next(p["args"]["port"] for p in self.state()["processes"] if p["name"] == name))

    def status(self) -> dict[str, dict[str, Any]]:
        res = self.cli("sandbox", "status", "-o", "json")
        return {r["name"]: r for r in res.json()["processes"]}

    def owners(self) -> collections.Counter[str | None]:
        res = self.cli("lanes", "-o", "json")
        assert res.exit_code == 0, res.stderr
        return collections.Counter(lane["owner"] for lane in res.json()["lanes"])

    def live_nodes(self) -> set[str]:
        res = self.cli("nodes", "-o", "json")
        assert res.exit_code == 0, res.stderr
        # `nodes` also lists expected nodes that are not live (state "missing"): not live.
        return {n["node_id"] for n in res.json()["nodes"] if n.get("state", "live") == "live"}

    def record(self, node: str) -> dict[str, Any] | None:
        """The node's registration record, read through etcd's JSON gateway."""
        from cbctl.core.model import keys

        key = base64.b64encode(keys.node("sandbox", node).encode()).decode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port('etcd')}/v3/kv/range",
                                     data=json.dumps({"key": key}).encode(),
                                     headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=2) as resp:
            kvs = json.loads(resp.read()).get("kvs") or []
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None

    def all_lanes_owned_by(self, nodes: set[str]) -> bool:
        owners = self.owners()
        return set(owners) == nodes


@pytest.fixture(scope="module")
def sbx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sbx]:
    base = tmp_path_factory.mktemp("sbx-chaos")
    s = Sbx(base / "sandbox", base / "config.toml")
    up = s.cli("sandbox", "up", "--nodes", "3", "--dir", str(s.dir), "--no-wait-scraped", timeout=90)
    assert up.exit_code == 0, up.stderr
    try:
        res = s.cli("flags", "set", "cluster.enabled=true", "--yes", "--reason", "chaos tests")
        assert res.exit_code == 0, res.stderr
        wait_until(lambda: s.all_lanes_owned_by({"node-1", "node-2", "node-3"}), 20, 0.3,
                   "every lane owned, by all three nodes")
        yield s
    finally:
        down = s.cli("sandbox", "down", "--dir", str(s.dir))
        assert down.exit_code == 0, down.stderr


def _healthy(s: Sbx, name: str) -> bool:
    return bool(s.status()[name]["healthy"])


@pytest.mark.timeout(60)
def test_kill_and_restore_nats(sbx: Sbx) -> None:
    pid, port = sbx.pid("nats"), sbx.port("nats")
    assert pid is not None
    res = sbx.cli("sandbox", "chaos", "kill-nats")
    assert res.exit_code == 0, res.stderr
    assert "SIGKILL nats" in res.stderr
    assert not group_members(pid)
    row = sbx.status()["nats"]
    assert row["healthy"] is False and row["pid"] is None and row["state"] == "dead"
    assert sbx.cli("sandbox", "status").exit_code == 1
    # A second kill cannot be done: says so, non-zero.
    assert sbx.cli("sandbox", "chaos", "kill-nats").exit_code == 1

    res = sbx.cli("sandbox", "chaos", "restore-nats")
    assert res.exit_code == 0, res.stderr
    row = sbx.status()["nats"]
    assert row["healthy"] is True and row["port"] == port and row["pid"] not in (None, pid)


@pytest.mark.timeout(60)
def test_kill_node_moves_its_lanes(sbx: Sbx) -> None:
    pid = sbx.pid("node-3")
    assert pid is not None
    res = sbx.cli("sandbox", "chaos", "kill-node", "node-3")
    assert res.exit_code == 0, res.stderr
    assert not group_members(pid)
    wait_until(lambda: sbx.all_lanes_owned_by({"node-1", "node-2"}), TTL + MARGIN, 0.3,
               "node-3's lanes re-owned by node-1 and node-2")
    assert "node-3" not in sbx.live_nodes()

    res = sbx.cli("sandbox", "chaos", "start-node", "node-3")
    assert res.exit_code == 0, res.stderr
    wait_until(lambda: sbx.all_lanes_owned_by({"node-1", "node-2", "node-3"}), TTL + MARGIN, 0.3,
               "node-3 owns lanes again")


@pytest.mark.timeout(60)
def test_pause_node_for_a_while(sbx: Sbx) -> None:
    pid = sbx.pid("node-2")
    assert pid is not None

    def state() -> str:
        return str(psutil.Process(pid).status())

    env = {**os.environ, "CBCTL_CONFIG": str(sbx.cfg), "NO_COLOR": "1"}
    # The pause must outlast one `sandbox status` (a CLI start plus probes: ~3 s with every core
    # busy), or the status below may see it resumed already.
    proc = subprocess.Popen([CBCTL, "sandbox", "chaos", "pause-node", "node-2", "--for", "8s"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: state() == psutil.STATUS_STOPPED, 10, 0.05, "node-2 stopped (T)")
        assert sbx.status()["node-2"]["state"] == "paused"
        out, errs = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, errs
    assert "SIGSTOP node-2" in errs and "SIGCONT node-2" in errs
    assert state() in (psutil.STATUS_SLEEPING, psutil.STATUS_RUNNING)
    wait_until(lambda: _healthy(sbx, "node-2"), 10, 0.2, "node-2 healthy after resume")
    wait_until(lambda: sbx.all_lanes_owned_by({"node-1", "node-2", "node-3"}), 3 * TTL + MARGIN, 0.3,
               "three owners again after the pause")


@pytest.mark.timeout(90)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft", path="/usr/sbin:/sbin") is None,
                    reason="partition-node needs root and nftables")
def test_partition_node_loses_lease_and_rejoins_after_heal(sbx: Sbx) -> None:
    res = sbx.cli("sandbox", "chaos", "partition-node", "node-1")
    assert res.exit_code == 0, res.stderr
    try:
        wait_until(lambda: sbx.record("node-1") is None, TTL + MARGIN, 0.2, "node-1's record gone (lease lost)")
        wait_until(lambda: sbx.all_lanes_owned_by({"node-2", "node-3"}), TTL + MARGIN, 0.3,
                   "node-1's lanes moved to node-2 and node-3")
        # The agent process itself is alive the whole time: only its packets are dropped.
        assert sbx.status()["node-1"]["state"] == "running"
    finally:
        heal = sbx.cli("sandbox", "chaos", "heal-node", "node-1")
    assert heal.exit_code == 0, heal.stderr
    assert "cbctl-sandbox" not in subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    wait_until(lambda: sbx.record("node-1") is not None, 20, 0.3, "node-1 registered again")
    wait_until(lambda: sbx.all_lanes_owned_by({"node-1", "node-2", "node-3"}), 20, 0.3, "node-1 owns lanes again")
    # Healing twice is refused with a reason.
    assert sbx.cli("sandbox", "chaos", "heal-node", "node-1").exit_code == 1


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("faketime") is None, reason="skew-node needs faketime")
def test_skew_node_shifts_its_clock(sbx: Sbx) -> None:
    res = sbx.cli("sandbox", "chaos", "skew-node", "node-2", "--offset", "2s")
    assert res.exit_code == 0, res.stderr
    try:
        pid = sbx.pid("node-2")
        assert pid is not None
        cmdline = psutil.Process(pid).cmdline()
        assert "faketime" in cmdline[0] and "+2s" in cmdline
        assert _healthy(sbx, "node-2")
        # The node's own heartbeat timestamp runs ~2 s ahead of ours.
        wait_until(lambda: sbx.record("node-2") is not None, 15, 0.2, "node-2 registered")

        def clock_offset_ms() -> float | None:
            rec = sbx.record("node-2") or {}
            off = (rec.get("clock") or {}).get("offset_ms")
            return float(off) if isinstance(off, (int, float)) else None

        # If the agent measures its clock (probes wired), the offset shows ~+2000 ms.
        try:
            off = wait_until(lambda: clock_offset_ms() is not None and clock_offset_ms(), 8, 0.3,
                             "node-2 clock offset reported")
        except TimeoutError:
            pytest.skip("the agent does not report clock offsets yet; faketime wrapper verified")
        assert off is not None and 1500 <= abs(off) <= 2500, off
    finally:
        res = sbx.cli("sandbox", "chaos", "skew-node", "node-2", "--offset", "0")
        assert res.exit_code == 0, res.stderr
    pid = sbx.pid("node-2")
    assert pid is not None and "faketime" not in " ".join(psutil.Process(pid).cmdline())


@pytest.mark.timeout(30)
def test_unknown_node_is_refused(sbx: Sbx) -> None:
    res = sbx.cli("sandbox", "chaos", "kill-node", "node-9")
    assert res.exit_code == 1
    assert "node-9" in res.stderr and "node-1" in res.stderr
