"""Control-plane commands against a real etcd: stage, flags, rollback, history, config.

Every test gets its own cluster name (key prefix) on a shared etcd, so tests are isolated
without paying an etcd start each.
"""

from __future__ import annotations

import asyncio
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cbctl.core.model import keys
from cbctl.core.model.config import load_config
from cbctl.core.operator.controlplane import ControlPlane
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.model.errors import Conflict
from tests.helpers import cbctl_proc, cbctl_run, write_config
from tests.support.controlplane import LANES, NO_METRIC_GATES, record_passing_preflight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

@pytest.fixture
def cfg(tmp_path: Path, shared_etcd, unique_cluster: str) -> Path:
    path = write_config(tmp_path / "config.toml", cluster=unique_cluster, etcd=shared_etcd.client_url, lanes=LANES,
                        extra=NO_METRIC_GATES)
    record_passing_preflight(path)
    return path


def status(cfg: Path) -> dict:
    r = cbctl_run(cfg, "stage", "status", "-o", "json")
    assert r.exit_code == 0, r.stderr
    return r.json()


def history(cfg: Path) -> list[dict]:
    r = cbctl_run(cfg, "stage", "history", "-o", "json")
    assert r.exit_code == 0, r.stderr
    return r.json()["entries"]


def test_status_of_a_fresh_cluster_is_stage_0(cfg: Path) -> None:
    data = status(cfg)
    assert data["stage"] == 0
    assert data["revision"] == 0
    assert data["flags"]["cluster.enabled"] is False
    assert data["flags"]["ownership.guard"] == "off"
    assert data["rollbacks"] == {}
    assert data["canary"] == {"lanes": [], "subscribers": []}
    assert set(data) == {"stage", "revision", "flags", "rollbacks", "overrides", "canary"}
    assert data["overrides"] == []


def test_advance_writes_one_stage_and_audits_it(cfg: Path) -> None:
    r = cbctl_run(cfg, "stage", "advance", "--to", "1", "--yes", "--no-wait", "--reason", "start observing", "-o", "json")
    assert r.exit_code == 0, r.stderr
    out = r.json()
    assert out["from_stage"] == 0 and out["to_stage"] == 1
    assert "ownership.guard: off -> observe" not in r.stdout  # the diff goes to stderr, JSON alone on stdout
    assert "ownership.guard" in r.stderr
    data = status(cfg)
    assert data["stage"] == 1
    assert data["revision"] == out["revision"]
    assert data["flags"]["ownership.guard"] == "observe"
    assert data["flags"]["eventbus.publish"] == "shadow"
    assert data["flags"]["eventbus.bridge"] == "read-only"
    assert data["flags"]["cluster.enabled"] is True
    entries = history(cfg)
    assert len(entries) == 1
    e = entries[0]
    assert set(e) >= {"time", "actor", "command", "reason", "from_revision", "to_revision", "diff"}
    assert e["reason"] == "start observing"
    assert e["from_revision"] == 0 and e["to_revision"] == out["revision"]
    assert "@" in e["actor"]
    assert {"flag": "ownership.guard", "old": "off", "new": "observe"} in e["diff"]


def test_advance_to_current_is_a_noop_and_skipping_is_refused(cfg: Path) -> None:
    assert cbctl_run(cfg, "stage", "advance", "--yes", "--no-wait").exit_code == 0
    rev = status(cfg)["revision"]
    again = cbctl_run(cfg, "stage", "advance", "--to", "1", "--yes", "--no-wait")
    assert again.exit_code == 0
    assert "already at stage 1" in again.stderr
    skip = cbctl_run(cfg, "stage", "advance", "--to", "3", "--yes", "--no-wait")
    assert skip.exit_code == 2
    back = cbctl_run(cfg, "stage", "advance", "--to", "0", "--yes", "--no-wait")
    assert back.exit_code == 2
    assert status(cfg)["revision"] == rev
    assert len(history(cfg)) == 1


def test_stage_2_needs_canary_lanes_and_records_them(cfg: Path, tmp_path: Path) -> None:
    assert cbctl_run(cfg, "stage", "advance", "--yes", "--no-wait").exit_code == 0
    missing = cbctl_run(cfg, "stage", "advance", "--yes", "--no-wait")
    assert missing.exit_code == 2
    assert "canary" in missing.stderr
    lanes = tmp_path / "canary.txt"
    lanes.write_text("# canary set\nlane-01\n\nlane-03  # trailing comment\n")
    subs = tmp_path / "subs.txt"
    subs.write_text("dashboard-a\n")
    ok = cbctl_run(cfg, "stage", "advance", "--canary", str(lanes), "--canary-subscribers", str(subs), "--yes", "--no-wait")
    assert ok.exit_code == 0, ok.stderr
    data = status(cfg)
    assert data["stage"] == 2
    assert data["canary"] == {"lanes": ["lane-01", "lane-03"], "subscribers": ["dashboard-a"]}
    assert data["flags"]["ownership.guard"] == "canary"
    assert data["flags"]["signals.routing"] == "canary"
    assert data["flags"]["eventbus.publish"] == "on"


BAD_LANES = {
    "unknown": ("lane-01\nlane-99\n", ["{f}:2: unknown lane 'lane-99'"]),
    "duplicate": ("lane-01\nlane-02\nlane-01\n", ["{f}:3: duplicate lane 'lane-01'"]),
    "empty": ("# nothing here\n\n", ["{f}"]),
    "several": ("lane-01\nlane-77\nlane-01\nbogus\n", ["{f}:2:", "{f}:3:", "{f}:4:"]),
}


@pytest.mark.parametrize("case", sorted(BAD_LANES))
def test_bad_lanes_files_exit_2_and_write_nothing(cfg: Path, tmp_path: Path, case: str) -> None:
    assert cbctl_run(cfg, "stage", "advance", "--yes", "--no-wait").exit_code == 0
    rev = status(cfg)["revision"]
    content, expected = BAD_LANES[case]
    f = tmp_path / f"{case}.txt"
    f.write_text(content)
    r = cbctl_run(cfg, "stage", "advance", "--canary", str(f), "--yes", "--no-wait")
    assert r.exit_code == 2
    for fragment in expected:
        assert fragment.format(f=f) in r.stderr
    assert status(cfg)["revision"] == rev


@pytest.mark.parametrize("content", [b"lane-01\n\xff\xfelane-02\n", b"lane-01\x00\x00\x01binary"])
def test_non_utf8_and_binary_lanes_files_exit_2(cfg: Path, tmp_path: Path, content: bytes) -> None:
    assert cbctl_run(cfg, "stage", "advance", "--yes", "--no-wait").exit_code == 0
    rev = status(cfg)["revision"]
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    r = cbctl_run(cfg, "stage", "advance", "--canary", str(f), "--yes", "--no-wait")
    assert r.exit_code == 2
    assert str(f) in r.stderr
    assert status(cfg)["revision"] == rev


def test_dry_run_and_missing_confirmation_write_nothing(cfg: Path) -> None:
    dry = cbctl_run(cfg, "stage", "advance", "--dry-run", "-o", "json")
    assert dry.exit_code == 0
    assert dry.json()["dry_run"] is True and dry.json()["revision"] is None
    assert status(cfg)["revision"] == 0
    # No terminal to ask on and no --yes: refuse (exit 2), write nothing.
    ask = cbctl_proc(cfg, "stage", "advance", "--no-wait")
    assert ask.exit_code == 2
    assert "--yes" in ask.stderr
    assert status(cfg)["revision"] == 0


def test_concurrent_commits_from_one_revision_record_exactly_one(cfg: Path) -> None:
    ctx = load_config(cfg).context()

    async def race() -> list[object]:
        coord_a, coord_b = make_coordinator(ctx), make_coordinator(ctx)
        await coord_a.connect()
        await coord_b.connect()
        try:
            a, b = ControlPlane(ctx, coord_a), ControlPlane(ctx, coord_b)
            plan_a = await a.plan_advance(1)
            plan_b = await b.plan_advance(1)
            assert plan_a.base_revision == plan_b.base_revision
            return await asyncio.gather(
                a.commit(plan_a, reason="a"), b.commit(plan_b, reason="b"), return_exceptions=True
            )
        finally:
            await coord_a.close()
            await coord_b.close()

    results = asyncio.run(race())
    conflicts = [r for r in results if isinstance(r, Conflict)]
    written = [r for r in results if isinstance(r, int)]
    assert len(conflicts) == 1 and len(written) == 1
    assert len(history(cfg)) == 1


def test_two_operator_processes_racing_record_one_transition(cfg: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cbctl_proc(cfg, "stage", "advance", "--to", "1", "--yes", "--no-wait"), range(2)))
    codes = sorted(r.exit_code for r in results)
    # One writes; the other either lost the CAS (3) or saw stage 1 already (0, no-op).
    assert codes in ([0, 0], [0, 3]), [(r.exit_code, r.stderr) for r in results]
    assert sum("written: revision" in r.stderr for r in results) == 1
    assert len(history(cfg)) == 1
    assert status(cfg)["stage"] == 1


def test_flags_set_get_diff(cfg: Path) -> None:
    bad = cbctl_run(cfg, "flags", "set", "ownership.guard=sometimes", "--yes", "--no-wait")
    assert bad.exit_code == 2
    assert "sometimes" in bad.stderr
    unknown = cbctl_run(cfg, "flags", "set", "no.such.flag=1", "--yes", "--no-wait")
    assert unknown.exit_code == 2
    assert status(cfg)["revision"] == 0
    ok = cbctl_run(cfg, "flags", "set", "ownership.guard=observe", "eventbus.publish=shadow", "--reason", "try", "--yes", "--no-wait")
    assert ok.exit_code == 0, ok.stderr
    got = cbctl_run(cfg, "flags", "get", "ownership.guard")
    assert got.exit_code == 0 and got.stdout.strip() == "observe"
    all_flags = cbctl_run(cfg, "flags", "get", "-o", "json").json()
    assert all_flags["flags"]["eventbus.publish"] == "shadow"
    entries = history(cfg)
    assert entries[-1]["reason"] == "try"
    assert {d["flag"] for d in entries[-1]["diff"]} == {"ownership.guard", "eventbus.publish"}
    diff = cbctl_run(cfg, "flags", "diff", "--stage", "1", "-o", "json")
    assert diff.exit_code == 0, diff.stderr
    changed = {d["flag"] for d in diff.json()["diff"]}
    assert "cluster.enabled" in changed and "eventbus.bridge" in changed
    assert status(cfg)["revision"] == ok_revision(entries)


def ok_revision(entries: list[dict]) -> int:
    return entries[-1]["to_revision"]


def test_rollbacks_touch_only_their_capability(cfg: Path, tmp_path: Path) -> None:
    lanes = tmp_path / "c.txt"
    lanes.write_text("lane-00\n")
    for args in (["stage", "advance"], ["stage", "advance", "--canary", str(lanes)], ["stage", "advance"]):
        assert cbctl_run(cfg, *args, "--yes", "--no-wait").exit_code == 0
    full = status(cfg)["flags"]
    assert full["eventbus.bridge"] == "streaming" and full["ownership.guard"] == "enforce"

    def changed_by(*args: str) -> dict:
        before = status(cfg)["flags"]
        r = cbctl_run(cfg, "rollback", *args, "--yes", "--no-wait", "--reason", "drill")
        assert r.exit_code == 0, r.stderr
        after = status(cfg)["flags"]
        return {k: after[k] for k in after if after[k] != before[k]}

    assert changed_by("event-bus") == {"eventbus.bridge": "off", "stream.source": "local"}
    assert changed_by("coordination") == {"ownership.guard": "off"}
    # Migrate consumers to schema v2 (publishing v2 only), then roll them back to v1: consumers
    # are pinned to 1 and both versions are published again (the dual-publish window).
    migrate = cbctl_run(cfg, "flags", "set", "eventbus.schema_versions=2", "consumers.schema_version=2", "--yes", "--no-wait")
    assert migrate.exit_code == 0, migrate.stderr
    assert changed_by("consumers", "--schema-version", "1") == {
        "consumers.schema_version": 1, "eventbus.schema_versions": [1, 2]}
    too_new = cbctl_run(cfg, "rollback", "consumers", "--schema-version", "3", "--yes", "--no-wait")
    assert too_new.exit_code == 2
    data = status(cfg)
    assert set(data["rollbacks"]) == {"event-bus", "coordination", "consumers"}
    assert changed_by("event-bus", "--clear") == {"eventbus.bridge": "streaming", "stream.source": "canonical"}
    assert status(cfg)["flags"]["ownership.guard"] == "off"  # the other override is untouched
    assert cbctl_run(cfg, "rollback", "consumers", "--yes", "--no-wait").exit_code == 2  # needs --schema-version
    assert [e["reason"] for e in history(cfg)][-2:] == ["drill"] * 2


def test_wait_with_no_agents_returns_at_once(cfg: Path) -> None:
    r = cbctl_run(cfg, "stage", "advance", "--yes", "--wait", "--timeout", "5", "-o", "json")
    assert r.exit_code == 0, r.stderr
    wait = r.json()["wait"]
    assert {k: wait[k] for k in ("applied", "pending", "missing", "ignored")} == {
        "applied": [], "pending": [], "missing": [], "ignored": []}


def test_unreachable_store_exits_4(tmp_path: Path, unique_cluster: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_config(tmp_path / "c.toml", cluster=unique_cluster, etcd=f"http://127.0.0.1:{port}",
                       extra={"coordination": {"timeout": 1.0}})
    r = cbctl_proc(cfg, "stage", "status", timeout=30)
    assert r.exit_code == 4, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr


def test_config_commands_never_show_a_secret(tmp_path: Path, shared_etcd, unique_cluster: str) -> None:
    secret = "s3cr3t-value-never-printed"
    cfg = tmp_path / "config.toml"
    env = {"CB_NATS_PW": secret}
    r = cbctl_run(cfg, "config", "set-context", "prod", "--etcd", shared_etcd.client_url, "--cluster", unique_cluster,
                  "--nats", "nats://127.0.0.1:4222", "--nats-user", "ops", "--nats-password-env", "CB_NATS_PW", "--use",
                  env=env)
    assert r.exit_code == 0, r.stderr
    assert (cfg.stat().st_mode & 0o077) == 0
    for args in (["config", "view"], ["config", "view", "-o", "json"], ["config", "get-contexts"], ["stage", "status"]):
        out = cbctl_run(cfg, *args, env=env)
        assert out.exit_code == 0, out.stderr
        assert secret not in out.stdout + out.stderr
    view = cbctl_run(cfg, "config", "view", "-o", "json").json()
    assert view["contexts"]["prod"]["nats"]["password_env"] == "CB_NATS_PW"  # JSON keys are snake_case
    # A literal secret in a hand-edited file is redacted by view and refused as configuration.
    text = cfg.read_text().replace('password-env = "CB_NATS_PW"', f'password = "{secret}"')
    cfg.write_text(text)
    view = cbctl_run(cfg, "config", "view")
    assert secret not in view.stdout + view.stderr
    refused = cbctl_run(cfg, "stage", "status")
    assert refused.exit_code == 2
    assert secret not in refused.stdout + refused.stderr
    assert "password-env" in refused.stderr


def test_use_context_and_unknown_context(tmp_path: Path, shared_etcd, unique_cluster: str) -> None:
    cfg = write_config(tmp_path / "c.toml", cluster=unique_cluster, etcd=shared_etcd.client_url)
    assert cbctl_run(cfg, "config", "set-context", "other", "--etcd", shared_etcd.client_url).exit_code == 0
    assert cbctl_run(cfg, "config", "use-context", "other").exit_code == 0
    assert load_config(cfg).current_context == "other"
    bad = cbctl_run(cfg, "config", "use-context", "nope")
    assert bad.exit_code == 2 and "nope" in bad.stderr
    wrong = cbctl_run(cfg, "--context", "missing", "stage", "status")
    assert wrong.exit_code == 2 and "missing" in wrong.stderr
    contexts = cbctl_run(cfg, "config", "get-contexts", "-o", "json").json()
    assert {c["name"] for c in contexts["contexts"]} == {"test", "other"}
    assert contexts["current"] == "other"


def test_history_reads_back_what_the_store_holds(cfg: Path) -> None:
    assert cbctl_run(cfg, "stage", "advance", "--yes", "--no-wait", "--reason", "r1").exit_code == 0
    ctx = load_config(cfg).context()

    async def raw() -> list[dict]:
        coord = make_coordinator(ctx)
        await coord.connect()
        try:
            return [json.loads(kv.value) for kv in await coord.list(keys.audit_prefix(ctx.cluster))]
        finally:
            await coord.close()

    stored = asyncio.run(raw())
    assert len(stored) == 1 and stored[0]["reason"] == "r1"
