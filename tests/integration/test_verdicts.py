"""Verdicts an operator can believe, on a real sandbox (etcd, NATS, Redis, Prometheus scraping
three real agents):

* a burst of revisions, then the soak watch started at once, does not breach rollout-lag, and
  a verdict computed live equals the same evaluation repeated later (settled instant);
* a second context on the same backends but another cluster judges nothing from the first
  cluster's series;
* a dry-run advance is refused exactly like the real one;
* an expected node that is not live fails --wait (named), is listed by `nodes`, and
  --ignore-missing is the audited way past.
"""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from cbctl.core.model.config import load_config
from cbctl.core.backends.coord import make_coordinator
from cbctl.core.operator.gate_eval import evaluate_rules
from cbctl.core.model.gate_settings import gate_config
from cbctl.core.operator.instant import evaluation_instant, stage_entry
from cbctl.core.backends.prometheus import PromClient
from cbctl.sandbox.waiting import async_wait_until
from tests.helpers import cbctl_proc, cbctl_run
from tests.support.records import write_preflight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A sandbox, plus contexts `other` (cluster other, no agents) and `expect9` (the sandbox
    cluster, expecting a node-9 that never runs) in the same config file."""
    tmp = tmp_path_factory.mktemp("verdicts")
    d, cfg = tmp / "sandbox", tmp / "config.toml"
    up = cbctl_proc(cfg, "sandbox", "up", "--nodes", "3", "--dir", str(d), timeout=150)
    try:
        assert up.exit_code == 0, up.stderr
        raw = tomllib.loads(cfg.read_text())
        base = raw["contexts"]["sandbox"]
        raw["contexts"]["other"] = {**base, "cluster": "other", "expected-nodes": []}
        raw["contexts"]["expect9"] = {**base, "expected-nodes": [*base["expected-nodes"], "node-9"]}
        fd = os.open(cfg, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "wb") as fh:
            tomli_w.dump(raw, fh)
        yield cfg
    finally:
        down = cbctl_proc(cfg, "sandbox", "down", "--dir", str(d), timeout=60)
        assert down.exit_code == 0, down.stderr


def ctx_of(cfg: Path, name: str = "sandbox"):
    return load_config(cfg).context(name)


async def rollout_lag(ctx, inst=None):
    """(instant, rollout-lag result) of stage 1, evaluated as `stage advance` / `watch` do."""
    cfg = gate_config(ctx)
    rule = cfg.rules["rollout-lag"]
    coord = make_coordinator(ctx)
    await coord.connect()
    try:
        since = await stage_entry(coord, ctx, 1)
    finally:
        await coord.close()
    async with PromClient(ctx.prometheus.url) as prom:
        inst = inst or await evaluation_instant(ctx, prom, since=since, stage=1)
        (res,) = await evaluate_rules(ctx, [rule], cfg, inst=inst, prom=prom)
    return inst, res


def test_burst_then_soak_watch_does_not_breach(sandbox: Path) -> None:
    cfg = sandbox
    ctx = ctx_of(cfg)
    asyncio.run(write_preflight(ctx, ok=True))
    r = cbctl_proc(cfg, "stage", "advance", "--to", "1", "--yes", "--reason", "verdicts")
    assert r.exit_code == 0, r.stderr

    async def lag_passes() -> bool:
        return (await rollout_lag(ctx))[1].outcome == "pass"

    asyncio.run(async_wait_until(lag_passes, 60, interval=0.5, message="rollout-lag judged and passing"))

    # The burst: 12 revisions as fast as the CLI writes them; live verdicts taken meanwhile.
    seen = []
    for i in range(12):
        args = ["rollback", "coordination", "--yes", "--no-wait", "--reason", "burst"] + (["--clear"] if i % 2 else [])
        w = cbctl_run(cfg, *args)
        if w.exit_code == 4:  # etcd slow to answer on a loaded machine: the write is not under test
            w = cbctl_run(cfg, *args)
        assert w.exit_code == 0, w.stderr
        seen.append(asyncio.run(rollout_lag(ctx)))

    # The soak watch, started at once (as full-rollout does after stage 3).
    soak = cbctl_proc(cfg, "watch", "--for", "12s", "--interval", "1s", "--fail-on-breach", "-o", "json", timeout=90)
    lines = [json.loads(x) for x in soak.stdout.splitlines() if x.strip()]
    verdicts = [m["verdict"] for x in lines for m in x["metrics"] if m["name"] == "rollout-lag"]
    assert soak.exit_code == 0, (soak.stderr, verdicts)
    assert "fail" not in verdicts and verdicts[-1] == "pass", verdicts

    # One rule at one instant gives one verdict, whoever asks and whenever: re-evaluate the
    # instants taken during the burst now that every scrape has long landed.
    for inst, live in seen:
        _, later = asyncio.run(rollout_lag(ctx, inst))
        assert (later.outcome, later.value) == (live.outcome, live.value), (inst, live.line(), later.line())
    assert all(res.outcome != "fail" for _, res in seen), [res.line() for _, res in seen]


def test_other_cluster_judges_nothing_from_the_sandbox_series(sandbox: Path) -> None:
    cfg = sandbox
    r = cbctl_proc(cfg, "--context", "other", "watch", "--once", "--stage", "1", "-o", "json")
    data = json.loads(r.stdout)
    judged = {m["name"]: m["verdict"] for m in data["metrics"] if m["verdict"] != "info"}
    assert judged and set(judged.values()) == {"no-data"}, judged
    assert all('cluster="other"' in m["query"] for m in data["metrics"])
    # The sandbox itself is judged from the same Prometheus.
    mine = cbctl_proc(cfg, "--context", "sandbox", "watch", "--once", "--stage", "1", "-o", "json")
    assert {m["verdict"] for m in json.loads(mine.stdout)["metrics"]} & {"pass", "fail"}

    crit = cbctl_proc(cfg, "--context", "other", "exit-criteria", "--window", "10s", "-o", "json")
    by = {c["name"]: c["status"] for c in json.loads(crit.stdout)["criteria"]}
    assert crit.exit_code == 1 and by["no-degraded"] == "no-data" and by["ordered-streaming"] == "no-data", by


def test_dry_run_is_refused_like_the_real_advance(sandbox: Path) -> None:
    cfg = sandbox
    dry = cbctl_proc(cfg, "--context", "other", "stage", "advance", "--to", "1", "--dry-run", "--yes")
    real = cbctl_proc(cfg, "--context", "other", "stage", "advance", "--to", "1", "--yes", "--no-wait", "--reason", "x")
    assert dry.exit_code == 1 and real.exit_code == 1, (dry.stderr, real.stderr)
    assert "preflight" in dry.stderr and "nothing written" in dry.stderr
    report = [x for x in real.stderr.splitlines() if x.startswith("  preflight:")]
    assert report and report[0].split("->")[1].split(":")[0] in dry.stderr
    status = cbctl_proc(cfg, "--context", "other", "stage", "status", "-o", "json")
    assert status.json()["stage"] == 0  # neither wrote


def test_expected_node_not_live_fails_the_wait_unless_ignored(sandbox: Path) -> None:
    cfg = sandbox
    r = cbctl_proc(cfg, "--context", "expect9", "flags", "set", "ownership.guard=observe", "--yes", "--reason", "t",
                   "--timeout", "3")
    assert r.exit_code == 1, r.stderr
    assert "node-9 (expected, not live)" in r.stderr and "--ignore-missing" in r.stderr

    nodes = cbctl_proc(cfg, "--context", "expect9", "nodes", "-o", "json").json()
    assert nodes["missing"] == ["node-9"]
    assert {n["node_id"]: n["state"] for n in nodes["nodes"]}["node-9"] == "missing"

    bad = cbctl_proc(cfg, "--context", "expect9", "flags", "set", "ownership.guard=off", "--yes", "--reason", "t",
                     "--ignore-missing", "node-77")
    assert bad.exit_code == 2 and "node-77" in bad.stderr

    ok = cbctl_proc(cfg, "--context", "expect9", "flags", "set", "ownership.guard=off", "--yes", "--reason", "t",
                    "--ignore-missing", "node-9", "--timeout", "20")
    assert ok.exit_code == 0, ok.stderr
    assert "node-9 not live, ignored by --ignore-missing" in ok.stderr
    last = cbctl_proc(cfg, "stage", "history", "-o", "json").json()["entries"][-1]
    assert last["ignore_missing"] == ["node-9"]
