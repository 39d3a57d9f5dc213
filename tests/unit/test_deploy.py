"""deploy/: the generated Prometheus rules, their promtool tests and the Grafana dashboard are
current and follow the gate table; promtool accepts and passes them; the systemd unit verifies
and keeps its hardening.

The dashboard's queries against a real Prometheus: tests/integration/test_deploy_queries.py.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cbctl.cli import manpage
from cbctl.core.agent.node import NodeAgent
from cbctl.core.backends.prometheus import scope_selectors
from cbctl.core.model.gate_settings import RULES
from cbctl.core.operator import deploy_gen

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "cbctl-agent.service"
PROMTOOL = shutil.which("promtool")


def test_generated_files_are_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, content in deploy_gen.expected_files().items():
        assert (DEPLOY / name).read_text(encoding="utf-8") == content, f"deploy/{name} is stale: run make deploy"
    assert deploy_gen.main(["--check", str(DEPLOY)]) == 0
    deploy_gen.main([str(tmp_path)])
    rules = tmp_path / deploy_gen.RULES_FILE
    rules.write_text(rules.read_text().replace("> 0", "> 1"))
    assert deploy_gen.main(["--check", str(tmp_path)]) == 1
    assert "cbctl-rules.yml: stale; run make deploy" in capsys.readouterr().err


def test_rules_follow_the_gate_table() -> None:
    doc = yaml.safe_load((DEPLOY / deploy_gen.RULES_FILE).read_text())
    records = {r["record"]: r["expr"] for r in doc["groups"][0]["rules"]}
    alerts = {a["alert"]: a for a in doc["groups"][1]["rules"]}
    assert len(records) == len(RULES)
    for rule in RULES.values():
        rec = deploy_gen.record_name(rule)
        # The gate's own query, at the default window, grouped per cluster.
        assert records[rec] == deploy_gen.per_cluster(rule.query(600.0, 15.0))
        assert "by (cluster)" in records[rec]
        if rule.threshold is None:
            assert deploy_gen.alert_name(rule) not in alerts
            continue
        alert = alerts[deploy_gen.alert_name(rule)]
        m = re.fullmatch(rf"{re.escape(rec)} (\S+) (\S+)", alert["expr"])
        assert m, alert["expr"]
        op, threshold = m.groups()
        assert float(threshold) == rule.threshold
        # The alert fires exactly when the gate's comparison does not hold.
        for value in (rule.threshold - 1, rule.threshold, rule.threshold + 0.05, rule.threshold + 1):
            fires = {">": value > float(threshold), ">=": value >= float(threshold),
                     "<": value < float(threshold), "<=": value <= float(threshold)}[op]
            assert fires == (not {"<=": value <= rule.threshold, "<": value < rule.threshold}[rule.op])
        assert alert["labels"]["gate"] == rule.name


def test_dashboard_has_one_panel_per_rule_with_its_queries() -> None:
    dash = json.loads((DEPLOY / deploy_gen.DASHBOARD_FILE).read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) == len(RULES)
    by_title = {p["title"].split(" ")[0]: p for p in panels}
    assert set(by_title) == set(RULES)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for name, rule in RULES.items():
        exprs = [t["expr"] for t in by_title[name]["targets"]]
        assert exprs[0] == scope_selectors(deploy_gen.rule_expr(rule), {"cluster": "$cluster"})
        assert len(exprs) == (2 if rule.rate_expr else 1)
        assert all('cluster="$cluster"' in e for e in exprs)
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "cluster"]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_promtool_check_rules() -> None:
    proc = subprocess.run([PROMTOOL, "check", "rules", str(DEPLOY / deploy_gen.RULES_FILE)], capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(RULES) + sum(r.threshold is not None for r in RULES.values())} rules found" in proc.stdout


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_promtool_test_rules_passes_and_catches_a_wrong_threshold(tmp_path: Path) -> None:
    proc = subprocess.run([PROMTOOL, "test", "rules", str(DEPLOY / deploy_gen.RULES_TEST_FILE)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The same tests against rules with one threshold raised out of reach must fail.
    for name in (deploy_gen.RULES_FILE, deploy_gen.RULES_TEST_FILE):
        shutil.copy(DEPLOY / name, tmp_path / Path(name).name)
    rules = tmp_path / Path(deploy_gen.RULES_FILE).name
    rules.write_text(rules.read_text().replace("cbctl_gate_outages:10m > 0", "cbctl_gate_outages:10m > 1e9"))
    proc = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / Path(deploy_gen.RULES_TEST_FILE).name)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "CbctlGateOutages" in proc.stdout + proc.stderr


def _directives(text: str) -> dict[str, list[str]]:
    """Key -> every value (a unit may repeat a key)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", value)
    assert m, value
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_unit_is_hardened_and_outlives_the_agent_stop() -> None:
    d = _directives(UNIT.read_text())
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "StateDirectory": "cbctl", "ReadWritePaths": "/var/lib/cbctl", "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "Restart": "on-failure",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], (key, d.get(key))
    assert "@system-service" in d["SystemCallFilter"]
    exec_start = d["ExecStart"][0]
    assert "agent run" in exec_start and "--handler ${CBCTL_HANDLER}" in exec_start
    assert "--state-dir ${STATE_DIRECTORY}" in exec_start
    assert not re.search(r"password|token|secret|creds", exec_start, re.I)  # secrets: credentials, not argv
    assert d["LoadCredential"] and d["EnvironmentFile"] == ["/etc/cbctl/agent.env"]
    # The agent's stop budget plus the backstop of cbctl/cli/agent.py (stop_timeout + 1.5 s).
    agent_stop = inspect.signature(NodeAgent.__init__).parameters["stop_timeout"].default + 1.5
    assert _seconds(d["TimeoutStopSec"][0]) > agent_stop


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    cbctl_bin = Path(shutil.which("cbctl") or Path(__import__("sys").executable).parent / "cbctl")
    assert cbctl_bin.exists()
    text = UNIT.read_text()
    assert "ExecStart=/opt/cbctl/bin/cbctl " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("ExecStart=/opt/cbctl/bin/cbctl ", f"ExecStart={cbctl_bin} "))
    # Documentation=man:cbctl(1) is checked too: the page the package ships.
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "MANPATH": str(manpage.shipped_path().parent.parent),
           "SYSTEMD_LOG_COLOR": "0"}
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    # A misspelt directive is only a warning for systemd: the empty stderr above is what catches it.
    unit.write_text(unit.read_text().replace("UMask=0077", "UMask=0077\nProtectSystm=strict"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          env=env, cwd=tmp_path, check=False)
    assert "Unknown key 'ProtectSystm'" in proc.stderr
    unit.write_text(text.replace("ExecStart=/opt/cbctl/bin/cbctl ", f"ExecStart={cbctl_bin} "))
    # Exposure score (0 safe .. 10 exposed); 2.0 leaves room only for the network a node needs.
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
