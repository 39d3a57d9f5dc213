"""Unit tests of the operator's watching, progress and explanation parts (issue 13 items 3 and 4):
flag sources against the stage plan, wait/convergence progress lines, ``explain`` from the code's
own tables, runbook check progress, preflight per-check progress and the agent's JSON log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from cbctl.core.model import flags as f
from cbctl.core.model.errors import BackendUnavailable, BadInput, CheckFailed
from cbctl.core.model.gate_settings import RULES, STAGE_GATES
from cbctl.core.model.metric_names import ALL_METRICS
from cbctl.core.model.records import NodeRecord
from cbctl.core.model.rollout import apply_rollback, initial_document, plan_advance, set_flags, unset_flags
from cbctl.core.model.stages import STAGES
from cbctl.core.operator import converge
from cbctl.core.operator.controlplane import WaitResult, applied_state
from cbctl.core.operator.converge import Convergence, wait_converged
from cbctl.core.operator.explain import explain, known_names, summary
from cbctl.core.operator.gate_eval import GateResult
from cbctl.core.operator.overrides import flag_sources, manual_overrides, overridden, plan_flags

# -- overrides --------------------------------------------------------------------------------


def stage1() -> Any:
    return plan_advance(initial_document(), 1)


def test_plain_stage_has_every_flag_from_the_plan() -> None:
    doc = stage1()
    sources = flag_sources(doc)
    assert [s.name for s in sources] == list(f.FLAG_NAMES)
    assert all(s.source == "plan" and not s.differs and s.marker == "" for s in sources)
    assert overridden(doc) == []
    assert plan_flags(doc) == doc.flags


def test_manual_override_rollback_and_pin_are_told_apart() -> None:
    doc = set_flags(stage1(), {f.SIGNALS_ROUTING: f.ROUTING_ALL, f.CLUSTER_ENABLED: True})  # second one: a pin
    doc = apply_rollback(doc, "event-bus")
    by = {s.name: s for s in flag_sources(doc)}
    assert (by[f.SIGNALS_ROUTING].source, by[f.SIGNALS_ROUTING].plan, by[f.SIGNALS_ROUTING].value) == ("manual", "off", "all")
    assert by[f.SIGNALS_ROUTING].marker == "manual" and by[f.SIGNALS_ROUTING].differs
    assert by[f.CLUSTER_ENABLED].marker == "pinned" and not by[f.CLUSTER_ENABLED].differs
    assert by[f.EVENTBUS_BRIDGE].source == "rollback" and by[f.EVENTBUS_BRIDGE].capability == "event-bus"
    assert by[f.EVENTBUS_BRIDGE].marker == "rollback:event-bus"
    assert (by[f.EVENTBUS_BRIDGE].plan, by[f.EVENTBUS_BRIDGE].value) == (f.BRIDGE_READ_ONLY, f.BRIDGE_OFF)
    assert by[f.STREAM_SOURCE].source == "rollback" and not by[f.STREAM_SOURCE].differs  # plan is local too
    assert {s.name for s in overridden(doc)} == {f.SIGNALS_ROUTING, f.CLUSTER_ENABLED, f.EVENTBUS_BRIDGE, f.STREAM_SOURCE}
    assert by[f.SIGNALS_ROUTING].public() == {"flag": f.SIGNALS_ROUTING, "value": "all", "plan": "off",
                                              "source": "manual", "capability": None, "differs": True}
    assert manual_overrides(doc) == {f.CLUSTER_ENABLED: True, f.SIGNALS_ROUTING: "all"}
    # unset drops the manual override: back to the plan
    back = {s.name: s for s in flag_sources(unset_flags(doc, [f.SIGNALS_ROUTING]))}
    assert back[f.SIGNALS_ROUTING].source == "plan" and back[f.SIGNALS_ROUTING].value == "off"


def test_rollback_over_a_manual_override_shows_the_shadowed_value() -> None:
    doc = apply_rollback(set_flags(stage1(), {f.OWNERSHIP_GUARD: f.GUARD_ENFORCE}), "coordination")
    guard = next(s for s in flag_sources(doc) if s.name == f.OWNERSHIP_GUARD)
    assert (guard.source, guard.value, guard.shadowed_manual, guard.plan) == ("rollback", "off", "enforce", "observe")


def test_canary_sets_are_plan_inputs_not_overrides() -> None:
    doc = plan_advance(stage1(), 2, canary_lanes=["lane-01"])
    assert all(s.source == "plan" for s in flag_sources(doc))


# -- wait progress ----------------------------------------------------------------------------


def rec(applied: int | None) -> NodeRecord:
    return NodeRecord(node_id="n", applied_revision=applied)


def test_applied_state_and_progress_line() -> None:
    nodes = {"node-1": rec(12), "node-2": rec(11), "node-4": rec(None)}
    res = applied_state(12, nodes, ["node-1", "node-3", "node-5"], excused=["node-5"])
    assert (res.applied, res.pending, res.missing, res.ignored) == (["node-1"], ["node-2", "node-4"], ["node-3"], ["node-5"])
    assert res.total == 4 and not res.ok
    assert res.progress_line() == "revision 12: 1/4 applied; waiting for node-2, node-4, node-3 (expected, not live)"
    done = applied_state(12, {"node-1": rec(13)}, ["node-1"])
    assert done.ok and done.progress_line() == "revision 12: 1/1 applied"
    assert applied_state(12, nodes, []).progress_line() == applied_state(12, dict(nodes), []).progress_line()


# -- convergence ------------------------------------------------------------------------------


def gate(name: str, outcome: str, detail: str = "d") -> GateResult:
    return GateResult(name, outcome, 0.0, "<= 0", detail)  # type: ignore[arg-type]


def look(ok_nodes: bool, gates_ok: bool) -> Convergence:
    nodes = applied_state(7, {"node-1": rec(7), "node-2": rec(7 if ok_nodes else 6)}, ["node-1", "node-2"])
    gates = [gate("preflight", "pass"), gate("degraded", "pass" if gates_ok else "no-data", "no series")]
    return Convergence(1, 7, nodes, gates)


def test_convergence_says_what_is_missing() -> None:
    bad = look(False, False)
    assert not bad.ok
    assert bad.missing() == ["node node-2 has not applied revision 7", "gate degraded: no-data: no series"]
    assert bad.progress_line() == "stage 1, revision 7: 1/2 applied; waiting for node-2; gates 1/2 pass (degraded no-data)"
    data = bad.public()
    assert data["converged"] is False and data["nodes"]["pending"] == ["node-2"] and data["stage_name"] == "observe-only"
    good = look(True, True)
    assert good.ok and good.missing() == [] and good.progress_line().endswith("2/2 applied; gates 2/2 pass")


def test_wait_converged_returns_when_converged(monkeypatch: pytest.MonkeyPatch) -> None:
    looks = iter([look(False, True), look(True, False), look(True, True)])
    seen: list[str] = []

    async def fake(ctx: Any, coord: Any, cfg: Any = None) -> Convergence:
        return next(looks)

    monkeypatch.setattr(converge, "check_converged", fake)
    res = asyncio.run(wait_converged(None, None, timeout=10, interval=0.01,  # type: ignore[arg-type]
                                     progress=lambda c: seen.append(c.progress_line())))
    assert res.ok and len(seen) == 3 and seen[0] != seen[1]


def test_wait_converged_times_out_with_the_last_look(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake(ctx: Any, coord: Any, cfg: Any = None) -> Convergence:
        return look(False, True)

    monkeypatch.setattr(converge, "check_converged", fake)
    res = asyncio.run(wait_converged(None, None, timeout=0.2, interval=0.05))  # type: ignore[arg-type]
    assert not res.ok and res.missing() == ["node node-2 has not applied revision 7"]
    assert 0.15 <= res.elapsed < 5


def test_wait_converged_first_look_too_slow_and_bad_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    async def slow(ctx: Any, coord: Any, cfg: Any = None) -> Convergence:
        await asyncio.sleep(5)
        raise AssertionError("not reached")

    monkeypatch.setattr(converge, "check_converged", slow)
    with pytest.raises(CheckFailed, match="did not finish"):
        asyncio.run(wait_converged(None, None, timeout=0.1))  # type: ignore[arg-type]
    with pytest.raises(BadInput):
        asyncio.run(wait_converged(None, None, timeout=0))  # type: ignore[arg-type]


# -- explain ----------------------------------------------------------------------------------


def test_explain_flag_comes_from_the_flag_table_and_the_stage_plan() -> None:
    (e,) = explain(f.OWNERSHIP_GUARD)
    assert e.kind == "flag" and e.meaning == f.FLAGS[f.OWNERSHIP_GUARD].help
    data = e.public()
    assert data["allowed_values"] == list(f.GUARD_VALUES)
    assert [s["value"] for s in data["stages"]] == [s.flags[f.OWNERSHIP_GUARD] for s in STAGES]
    assert data["set_by"][0] == {"stage": 1, "value": f.GUARD_OBSERVE}
    assert [r["capability"] for r in data["rollbacks"]] == ["coordination"]
    assert explain(f.SCHEMA_VERSIONS)[0].public()["override_persists"] is True


def test_explain_metric_uses_the_exporters_help_and_the_gate_table() -> None:
    from prometheus_client import CollectorRegistry

    from cbctl.core.model.metrics import AgentMetrics

    (e,) = explain("redis_lane_ownership_decision_total")
    assert e.meaning == AgentMetrics("x", CollectorRegistry()).lane_decisions._documentation
    data = e.public()
    assert data["type"] == "counter" and data["labels"] == ["decision", "cluster"]
    assert data["label_values"] == {"decision": ["allow", "deny", "would_deny"]}
    assert "deny-rate" in data["gates"] and data["stages"] == [2, 3]
    # one metric name being a prefix of another does not make the shorter one "read" by its gates
    assert explain("event_bus_publish_total")[0].public()["gates"] == ["publish-ok", "publish-buffered", "publish-errors"]


def test_explain_gate_uses_the_rule_table() -> None:
    (e,) = explain("publish-errors")
    data = e.public()
    assert e.meaning == RULES["publish-errors"].description
    assert (data["op"], data["threshold"], data["expr"]) == ("<=", 0.0, RULES["publish-errors"].expr)
    assert data["gate_of_stages"] == [s for s, names in STAGE_GATES.items() if "publish-errors" in names]
    assert explain("publish-ok")[0].public()["threshold"] is None


def test_explain_knows_every_flag_metric_and_gate_and_suggests_on_a_typo() -> None:
    names = known_names()
    assert len(names) == len(f.FLAGS) + len(ALL_METRICS) + len(RULES)
    assert len(summary()) == len(names) and all(row["meaning"] for row in summary())
    for _, name in names:
        assert explain(name)
    with pytest.raises(BadInput, match="did you mean 'ownership.guard'"):
        explain("ownership.gaurd")


# -- runbook check progress --------------------------------------------------------------------


def test_check_progress_is_told_each_poll_that_did_not_hold() -> None:
    from cbctl.core.operator.runbook.executor import RunbookExecutor
    from cbctl.core.operator.runbook.parser import parse_runbook

    rb = parse_runbook("name: c\nsummary: s\nsteps:\n  - check: {promql: up, expect: '== 0', within: 60s, interval: 1s}\n",
                       where="c.yaml", expected_name="c")
    answers = iter([[], [2.0], [2.0], [0.0]])
    polls: list[Any] = []
    now = [0.0]
    ex = RunbookExecutor(rb, {}, run_cbctl=lambda argv: 0, query=lambda q: next(answers), check_progress=polls.append,
                         monotonic=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    record = ex.execute()
    assert record.status == "completed"
    assert [p.state for p in polls] == ["no data", "last value 2", "last value 2"]
    assert polls[0].line() == "step 1/1 check: no data, want == 0; 60s left"
    assert polls[2].remaining == 58 and polls[2].polls == 3


# -- preflight progress ------------------------------------------------------------------------


class DownCoord:
    """A coordinator whose store cannot be reached."""

    def __getattr__(self, name: str) -> Any:
        async def down(*args: Any, **kwargs: Any) -> Any:
            raise BackendUnavailable("store down")

        return down


def test_preflight_tells_each_check_as_it_finishes(tmp_path: Path) -> None:
    from cbctl.core.model.config import load_config
    from cbctl.core.operator.preflight import run_preflight
    from cbctl.core.operator.preflight_report import PreflightOptions
    from tests.helpers import write_config

    path = write_config(tmp_path / "c.toml", cluster="c1", etcd="http://127.0.0.1:9", lane_count=2)
    ctx = load_config(str(path)).context(None)
    seen: list[tuple[str, int, int]] = []
    report = asyncio.run(run_preflight(ctx, DownCoord(), PreflightOptions(only=frozenset({"credentials", "nodes", "clock"})),
                                       progress=lambda name, rows, done, total: seen.append((name, done, total))))
    assert sorted(n for n, _, _ in seen) == ["clock", "credentials", "nodes"]
    assert [(d, t) for _, d, t in seen] == [(1, 3), (2, 3), (3, 3)]
    assert report.store_unreachable


# -- agent JSON logs ---------------------------------------------------------------------------


def test_json_log_lines() -> None:
    from cbctl.core.agent.log_format import JsonLogFormatter, configure_logging

    stream = io.StringIO()
    configure_logging(stream, logging.INFO, "json")
    configure_logging(stream, logging.INFO, "json")  # twice: still one handler of ours
    log = logging.getLogger("cbctl.test.json")
    try:
        log.info("connect to %s\nsecond line", "redis://user:hunter2@127.0.0.1:6379/0")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        log.debug("not shown")
    finally:
        root = logging.getLogger()
        for h in list(root.handlers):
            if h.get_name() == "cbctl-agent-log":
                root.removeHandler(h)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["level"] == "info" and first["logger"] == "cbctl.test.json"
    assert first["message"].endswith("second line") and "hunter2" not in lines[0]
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert second["level"] == "error" and "ValueError: boom" in second["exception"] and "Traceback" in second["exception"]
    with pytest.raises(ValueError):
        configure_logging(sys.stderr, logging.INFO, "xml")
    assert JsonLogFormatter().format(logging.LogRecord("x", logging.WARNING, "p", 1, "m", None, None)).startswith("{")
