"""`cbctl sandbox up|status|down` against real processes: nothing left behind, nothing foreign
touched, a second `up` is a no-op, a failed `up` cleans up after itself."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import tomli_w

from cbctl.sandbox import HarnessError, cluster, group_members, state
from cbctl.sandbox.services.cbctl_procs import AgentProcess
from tests.helpers import cbctl_proc

pytestmark = pytest.mark.skipif(
    any(shutil.which(b) is None and shutil.which(b, path="/usr/sbin") is None
        for b in ("etcd", "nats-server", "redis-server", "prometheus", "chronyd")),
    reason="service binaries not installed (run `make setup`)",
)


def _alive(pid: int) -> bool:
    """A live (non-zombie) process with this pid exists."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def _procs_under(d: Path) -> list[int]:
    """Live processes whose working directory lies under ``d`` (what a sandbox would leave)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) and proc.cwd().startswith(str(d)):
                found.append(proc.pid)
        except psutil.Error:  # gone, or not ours to inspect
            continue
    return found


@pytest.fixture
def sbx(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(sandbox dir, config path) with a pre-existing foreign context; always `down` after."""
    d = tmp_path / "sandbox"
    cfg = tmp_path / "config.toml"
    cfg.write_bytes(tomli_w.dumps({"current-context": "prod", "contexts": {"prod": {"cluster": "prod"}}}).encode())
    yield d, cfg
    cbctl_proc(cfg, "sandbox", "down", "--dir", str(d), timeout=60)


@pytest.mark.timeout(120)
def test_up_status_down_leaves_nothing_behind(sbx: tuple[Path, Path]) -> None:
    d, cfg = sbx
    up = cbctl_proc(cfg, "sandbox", "up", "--nodes", "3", "--dir", str(d), "--no-wait-scraped", timeout=90)
    assert up.exit_code == 0, up.stderr
    state = json.loads((d / "sandbox.json").read_text())
    pids = {p["name"]: p["pid"] for p in state["processes"]}
    assert set(pids) == {"etcd", "nats", "redis", "prometheus", "chrony", "node-1", "node-2", "node-3", "loadgen",
                         "sub-node-1", "sub-node-2", "sub-node-3"}
    assert all(_alive(pid) for pid in pids.values())

    # The config: sandbox context written and current, the foreign one untouched.
    raw = tomllib.loads(cfg.read_text())
    assert raw["current-context"] == "sandbox"
    assert raw["contexts"]["prod"] == {"cluster": "prod"}
    sctx = raw["contexts"]["sandbox"]
    assert sctx["expected-nodes"] == ["node-1", "node-2", "node-3"]
    assert sctx["ntp-servers"] == [f"127.0.0.1:{state['processes'][4]['args']['port']}"]
    assert sctx["coordination"]["lease-ttl"] == 3

    # A second up: says so, exit 0, starts nothing.
    again = cbctl_proc(cfg, "sandbox", "up", "--dir", str(d), timeout=60)
    assert again.exit_code == 0, again.stderr
    assert "already running" in again.stderr
    assert {p["name"]: p["pid"] for p in json.loads((d / "sandbox.json").read_text())["processes"]} == pids

    # status -o json: every process with pid, port and health (dir found via the context).
    st = cbctl_proc(cfg, "sandbox", "status", "-o", "json")
    assert st.exit_code == 0, st.stderr
    rows = st.json()["processes"]
    assert [r["name"] for r in rows] == list(pids)
    for r in rows:
        assert {"name", "pid", "port", "healthy"} <= set(r)
        assert r["healthy"] is True and r["pid"] == pids[r["name"]]
    assert all(isinstance(r["port"], int) for r in rows if r["name"] != "loadgen" and not r["name"].startswith("sub-"))

    # A process the sandbox did not start survives `down`.
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        down = cbctl_proc(cfg, "sandbox", "down", "--dir", str(d), timeout=60)
        assert down.exit_code == 0, down.stderr
        for name, pid in pids.items():
            assert not _alive(pid), f"{name} (pid {pid}) survived down"
            assert not group_members(pid), f"{name}'s process group {pid} survived down"
        assert _procs_under(d) == []
        assert stranger.poll() is None, "down killed a process it did not start"
    finally:
        stranger.send_signal(signal.SIGKILL)
        stranger.wait()
    assert not (d / "sandbox.json").exists()
    # The context stays (documented); a second down is a no-op.
    assert "sandbox" in tomllib.loads(cfg.read_text())["contexts"]
    again = cbctl_proc(cfg, "sandbox", "down", "--dir", str(d))
    assert again.exit_code == 0 and "no sandbox" in again.stderr
    assert cbctl_proc(cfg, "sandbox", "status", "--dir", str(d)).exit_code == 1


@pytest.mark.timeout(60)
def test_recycled_pid_is_never_signalled(sbx: tuple[Path, Path]) -> None:
    """A state file whose pid now belongs to someone else: down leaves that process alone."""
    d, cfg = sbx
    d.mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        sb = state.Sandbox(dir=d.resolve(), processes=[
            state.SandboxProcess("RedisServer", "redis", {"port": 1}, pid=stranger.pid)])
        sb.save()
        assert not state.load_sandbox(d).any_alive()  # type: ignore[union-attr]
        assert cluster.down(d) == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.timeout(90)
def test_failed_up_stops_what_it_started(sbx: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent that cannot start: up raises with its log tail, and nothing is left running."""
    d, cfg = sbx
    before = cfg.read_bytes()
    original = AgentProcess.command

    def bad_command(self: AgentProcess) -> list[str]:
        return [*original(self), "--no-such-option"]

    monkeypatch.setattr(AgentProcess, "command", bad_command)
    with pytest.raises(HarnessError) as info:
        cluster.up(directory=d, nodes=2, config_path=cfg, wait_scraped=False, timeout=30)
    assert "node-1" in str(info.value) and "no-such-option" in str(info.value)
    assert not (d / "sandbox.json").exists()
    assert _procs_under(d) == []
    assert cfg.read_bytes() == before, "a failed up must leave the config as it was"
