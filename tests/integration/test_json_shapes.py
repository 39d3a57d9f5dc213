"""The README's JSON shapes (section "Output and JSON") against the commands' real output, on a
real etcd (and Redis for `signal send`); and the output/duration/no-op rules of issue 13 that
need a store: no-op JSON, "no flag changes" never followed by an unexplained write, `flags diff`
on stdout, `stage history --limit/--since`, `signal send` to a workflow that does not exist, the
resume line of a runbook given by path.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import cbctl_run, write_config
from tests.support.controlplane import LANES, NO_METRIC_GATES, record_passing_preflight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

README = Path(__file__).resolve().parents[2] / "README.md"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")


# -- the shape grammar of the README ----------------------------------------------------------

def _split(text: str) -> list[str]:
    """Top-level comma-separated items of ``text`` (brackets nest)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur.strip())
    return items


def parse_shape(text: str) -> dict[str, tuple[bool, str, Any]]:
    """``key -> (optional, kind, children)``; kind: value, time, obj, list_obj, list, map."""
    out: dict[str, tuple[bool, str, Any]] = {}
    for item in _split(text):
        m = re.match(r"^([a-z0-9_]+)(\?)?(@)?(.*)$", item)
        assert m, item
        name, optional, time_, rest = m.group(1), bool(m.group(2)), bool(m.group(3)), m.group(4).strip()
        if rest == "{}":
            out[name] = (optional, "map", None)
        elif rest == "[]":
            out[name] = (optional, "list", None)
        elif rest.startswith("{"):
            out[name] = (optional, "obj", parse_shape(rest[1:-1]))
        elif rest.startswith("["):
            out[name] = (optional, "list_obj", parse_shape(rest[1:-1]))
        else:
            assert rest == "", item
            out[name] = (optional, "time" if time_ else "value", None)
    return out


def check_shape(data: Any, shape: dict[str, tuple[bool, str, Any]], where: str = "") -> None:
    assert isinstance(data, dict), f"{where}: not an object: {data!r}"
    undocumented = set(data) - set(shape)
    assert not undocumented, f"{where}: keys not in the README: {sorted(undocumented)}"
    for key, (optional, kind, children) in shape.items():
        if key not in data:
            assert optional, f"{where}: missing key {key!r}"
            continue
        value, at = data[key], f"{where}.{key}"
        if kind == "time":
            assert value is None or (isinstance(value, str) and RFC3339.match(value)), f"{at}: not RFC 3339: {value!r}"
        elif kind == "map":
            assert isinstance(value, dict), f"{at}: not a map"
        elif kind == "list":
            assert isinstance(value, list), f"{at}: not a list"
        elif kind == "obj":
            check_shape(value, children, at)
        elif kind == "list_obj":
            assert isinstance(value, list), f"{at}: not a list"
            for i, item in enumerate(value):
                check_shape(item, children, f"{at}[{i}]")


def documented() -> dict[str, dict[str, tuple[bool, str, Any]]]:
    text = README.read_text()
    block = text.split("The shapes (", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    shapes = {}
    for line in block.splitlines():
        command, shape = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        shapes[command] = parse_shape(shape)
    return shapes


def test_the_readme_shapes_parse() -> None:
    shapes = documented()
    assert "stage status" in shapes and "nodes" in shapes
    assert shapes["nodes"]["nodes"][2]["heartbeat"] == (False, "time", None)


# -- real output --------------------------------------------------------------------------------

@pytest.fixture
def cfg(tmp_path: Path, shared_etcd: Any, shared_redis: Any, unique_cluster: str) -> Path:
    path = write_config(tmp_path / "config.toml", cluster=unique_cluster, etcd=shared_etcd.client_url, lanes=LANES,
                        redis=shared_redis.url, prometheus="http://127.0.0.1:9",
                        extra={**NO_METRIC_GATES, "expected-nodes": ["node-x"]})
    record_passing_preflight(path)
    return path


def out(cfg: Path, *args: str, codes: tuple[int, ...] = (0,)) -> Any:
    r = cbctl_run(cfg, *args)
    assert r.exit_code in codes, (args, r.exit_code, r.stderr)
    return r.json()


def test_every_documented_shape_matches_real_output(cfg: Path, tmp_path: Path, shared_redis: Any,
                                                    unique_cluster: str) -> None:
    shapes = documented()
    mutation = shapes["stage advance|flags set|rollback"]
    checked: set[str] = set()

    def check(command: str, data: Any) -> None:
        check_shape(data, shapes[command], command)
        checked.add(command)

    check("stage status", out(cfg, "stage", "status", "-o", "json"))
    written = out(cfg, "stage", "advance", "--to", "1", "--yes", "--no-wait", "-o", "json")
    check_shape(written, mutation, "stage advance")
    assert written["changed"] is True and written["written"] is True
    noop = out(cfg, "stage", "advance", "--to", "1", "--yes", "-o", "json")  # nothing to do: still JSON
    check_shape(noop, mutation, "stage advance (no-op)")
    assert (noop["changed"], noop["written"], noop["revision"]) == (False, False, written["revision"])
    waited = out(cfg, "flags", "set", "signals.routing=off", "--yes", "--timeout", "1s", "-o", "json", codes=(1,))
    check_shape(waited, mutation, "flags set --wait")
    assert waited["wait"]["missing"] == ["node-x"]  # expected, not live: the wait fails (exit 1), JSON still printed
    again = out(cfg, "flags", "set", "signals.routing=off", "--yes", "-o", "json")
    check_shape(again, mutation, "flags set (no-op)")
    assert (again["changed"], again["written"]) == (False, False)
    check("stage advance|flags set|rollback",
          out(cfg, "rollback", "coordination", "--dry-run", "--reason", "x", "-o", "json"))
    check("stage history", out(cfg, "stage", "history", "-o", "json"))
    check("flags get", out(cfg, "flags", "get", "-o", "json"))
    check("flags diff", out(cfg, "flags", "diff", "--stage", "0", "-o", "json"))
    nodes = out(cfg, "nodes", "-o", "json")
    assert nodes["nodes"] and nodes["missing"] == ["node-x"]  # an item to check
    check("nodes", nodes)
    check("lanes", out(cfg, "lanes", "-o", "json"))
    view = out(cfg, "config", "view", "-o", "json")
    check("config view", view)
    check("config get-contexts", out(cfg, "config", "get-contexts", "-o", "json"))
    check("preflight", out(cfg, "preflight", "--only", "etcd", "-o", "json", codes=(0, 1)))
    check("exit-criteria", out(cfg, "exit-criteria", "--window", "10m", "-o", "json", codes=(1, 4)))
    check("runbook list", out(cfg, "runbook", "list", "-o", "json"))
    check("runbook show", out(cfg, "runbook", "show", "rollback-coordination", "-o", "json"))
    check("runbook run --dry-run", out(cfg, "runbook", "run", "rollback-coordination", "--dry-run", "--var", "reason=r", "-o", "json"))
    book = tmp_path / "look.yaml"
    book.write_text("name: look\nsummary: look at the stage\nsteps:\n  - run: cbctl stage status\n")
    run = out(cfg, "runbook", "run", str(book), "--yes", "-o", "json")
    check("runbook run", run)
    assert RFC3339.match(run["started_at"]) and RFC3339.match(run["finished_at"])
    check("runbook runs", out(cfg, "runbook", "runs", "-o", "json"))

    import redis

    client = redis.Redis.from_url(shared_redis.url)
    try:
        client.hset(f"cb:{unique_cluster}:wf:wf-shape", mapping={"seq": 1})
    finally:
        client.close()
    check("signal send", out(cfg, "signal", "send", "wf-shape", "go", "-o", "json"))

    # YAML is the same data.
    as_yaml = cbctl_run(cfg, "stage", "status", "-o", "yaml")
    assert as_yaml.exit_code == 0 and yaml.safe_load(as_yaml.stdout) == out(cfg, "stage", "status", "-o", "json")

    needs_agents = {"watch --once", "events tail (per line)", "sandbox status"}
    assert checked | needs_agents == set(shapes), set(shapes) - checked - needs_agents


def _keys(data: Any) -> list[str]:
    if isinstance(data, dict):
        return [k for k in data] + [k for v in data.values() for k in _keys(v)]
    if isinstance(data, list):
        return [k for v in data for k in _keys(v)]
    return []


def test_config_view_json_keys_are_snake_case(cfg: Path) -> None:
    view = out(cfg, "config", "view", "-o", "json")
    assert all("-" not in k for k in _keys(view)), _keys(view)
    assert "current_context" in view and "expected_nodes" in next(iter(view["contexts"].values()))
    toml = cbctl_run(cfg, "config", "view")
    assert "current-context" in toml.stdout  # the file's own spelling in its own format


def test_a_noop_writes_nothing_and_a_pin_says_what_it_writes(cfg: Path) -> None:
    # At stage 0 ownership.guard is off by the plan: the first set records a pin (the document
    # changes, no flag value does), and says so instead of "no flag changes" + "written".
    first = cbctl_run(cfg, "flags", "set", "ownership.guard=off", "--yes", "--no-wait")
    assert first.exit_code == 0, first.stderr
    assert "no flag changes\n" not in first.stderr
    assert "the document records: manual pin ownership.guard=off" in first.stderr
    assert "written: revision" in first.stderr
    rev = out(cfg, "stage", "status", "-o", "json")["revision"]
    entries = len(out(cfg, "stage", "history", "-o", "json")["entries"])
    second = cbctl_run(cfg, "flags", "set", "ownership.guard=off", "--yes", "--no-wait")
    assert second.exit_code == 0, second.stderr
    assert "nothing written" in second.stderr and "written: revision" not in second.stderr
    assert out(cfg, "stage", "status", "-o", "json")["revision"] == rev  # verified: nothing written
    assert len(out(cfg, "stage", "history", "-o", "json")["entries"]) == entries


def test_flags_diff_result_goes_to_stdout(cfg: Path) -> None:
    r = cbctl_run(cfg, "flags", "diff", "--stage", "1")
    assert r.exit_code == 0, r.stderr
    assert "ownership.guard" in r.stdout and "off -> observe" in r.stdout
    assert "ownership.guard" not in r.stderr


def test_history_limit_and_since(cfg: Path) -> None:
    assert cbctl_run(cfg, "stage", "advance", "--yes", "--no-wait").exit_code == 0
    assert cbctl_run(cfg, "flags", "set", "signals.routing=off", "--yes", "--no-wait").exit_code == 0
    every = out(cfg, "stage", "history", "-o", "json")["entries"]
    assert len(every) == 2
    assert out(cfg, "stage", "history", "--limit", "1", "-o", "json")["entries"] == every[-1:]
    assert out(cfg, "stage", "history", "--since", "1h", "-o", "json")["entries"] == every
    assert out(cfg, "stage", "history", "--since", "1ms", "-o", "json")["entries"] == []
    bad = cbctl_run(cfg, "stage", "history", "--since", "-1h")
    assert bad.exit_code == 2 and "--since" in bad.stderr


def test_plain_tables_off_a_tty_are_whole(cfg: Path) -> None:
    assert cbctl_run(cfg, "stage", "advance", "--yes", "--no-wait", "--reason", "r" * 150).exit_code == 0
    table = cbctl_run(cfg, "stage", "history")
    assert table.exit_code == 0
    assert "r" * 150 in table.stdout and "…" not in table.stdout
    assert table.stdout.splitlines()[0].split()[:3] == ["time", "actor", "command"]
    rows = cbctl_run(cfg, "stage", "history", "--no-headers")
    assert len(rows.stdout.splitlines()) == 1 and rows.stdout.startswith("20")
    wide = cbctl_run(cfg, "stage", "history", "-o", "wide")
    assert "kind" in wide.stdout.splitlines()[0] and "0->1" in wide.stdout


def test_signal_to_a_workflow_that_does_not_exist_is_refused(cfg: Path, shared_redis: Any,
                                                             unique_cluster: str) -> None:
    r = cbctl_run(cfg, "signal", "send", "no-such-wf", "go")
    assert r.exit_code == 2, r.stderr
    assert "does not exist" in r.stderr and "nothing sent" in r.stderr and "seq" not in r.stdout
    import redis

    client = redis.Redis.from_url(shared_redis.url)
    try:  # nothing queued on any lane, no workflow created
        assert not client.keys(f"cb:{unique_cluster}:*")
    finally:
        client.close()


def test_resume_line_names_the_runbook_file_given_by_path(cfg: Path, tmp_path: Path) -> None:
    book = tmp_path / "books" / "stops.yaml"
    book.parent.mkdir()
    book.write_text(textwrap.dedent("""\
        name: stops
        summary: fails at step 2
        steps:
          - run: cbctl stage status
          - argv: ["false"]
        """))
    r = cbctl_run(cfg, "runbook", "run", str(book), "--yes")
    assert r.exit_code == 1, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("resume with: "))
    assert str(book.resolve()) in line and "--from-step 2" in line
