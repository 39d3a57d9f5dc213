"""deploy/ against a real Prometheus (the harness's): the generated rule file loads and every
rule evaluates without error, and every Grafana panel query runs through the HTTP API with
status success, scoped to the dashboard's cluster.

The data is a static exposition of every metric of the gate table for two clusters, served on
loopback and scraped each second.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from cbctl.core.model.gate_settings import RULES
from cbctl.core.operator import deploy_gen
from cbctl.sandbox.services.base import http_call
from cbctl.sandbox.services.prometheus import PrometheusServer
from cbctl.sandbox.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OURS = "deploy-test"
OTHER = "other-cluster"


def _exposition() -> bytes:
    """Every series the table selects, for both clusters and two instances (value 1)."""
    lines = []
    for rule in RULES.values():
        for cluster in (OURS, OTHER):
            for inst in ("a", "b"):
                lines.append(deploy_gen.series(rule.metric, cluster, inst).replace('instance="', 'node="') + " 1")
    return ("\n".join(dict.fromkeys(lines)) + "\n").encode()


@pytest.fixture
def exporter() -> Iterator[str]:
    body = _exposition()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def prom(prometheus: PrometheusServer, exporter: str) -> PrometheusServer:
    """The harness's Prometheus, scraping the exporter, with the generated rule file loaded."""
    prometheus.set_rules((DEPLOY / deploy_gen.RULES_FILE).read_text())
    prometheus.set_targets([(exporter, {})])
    return prometheus


def _api(prom: PrometheusServer, path: str) -> dict[str, Any]:
    status, body = http_call(f"{prom.url}{path}", timeout=5.0)
    doc = json.loads(body)
    assert status == 200 and doc.get("status") == "success", (path, status, body[:500])
    return doc


def test_generated_rules_load_and_evaluate_without_error(prom: PrometheusServer) -> None:
    groups = yaml.safe_load((DEPLOY / deploy_gen.RULES_FILE).read_text())["groups"]
    expected = {g["name"]: len(g["rules"]) for g in groups}

    def evaluated() -> list[dict[str, Any]] | None:
        groups = _api(prom, "/api/v1/rules")["data"]["groups"]
        if {g["name"]: len(g["rules"]) for g in groups} != expected:
            return None
        rules = [r for g in groups for r in g["rules"]]
        errors = [(r["name"], r.get("lastError")) for r in rules if r.get("health") == "err"]
        assert not errors, errors  # an evaluation error fails at once
        return rules if all(r.get("health") == "ok" for r in rules) else None

    rules = wait_until(evaluated, timeout=30, interval=0.5, message="every generated rule evaluated")
    assert len(rules) == sum(expected.values())


def test_every_panel_query_succeeds_scoped_to_the_cluster(prom: PrometheusServer) -> None:
    dash = json.loads((DEPLOY / deploy_gen.DASHBOARD_FILE).read_text())
    # Scraped at least twice, so counters have an increase.
    def scraped_twice() -> bool:
        result = prom.query(f'min(count_over_time(event_bus_degraded{{cluster="{OURS}"}}[1m]))')
        return bool(result) and float(result[0]["value"][1]) >= 2

    wait_until(scraped_twice, timeout=30, interval=0.5, message="two scrapes of the exporter")
    queries = [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]
    assert len(queries) >= len(RULES)
    # The $cluster variable: Grafana turns label_values(METRIC, cluster) into the label values API.
    variable = dash["templating"]["list"][1]["query"]["query"]
    metric = variable.removeprefix("label_values(").split(",")[0]
    values = _api(prom, f"/api/v1/label/cluster/values?match[]={quote(metric)}")["data"]
    assert sorted(values) == sorted([OURS, OTHER])
    for title, expr in queries:
        doc = _api(prom, "/api/v1/query?query=" + quote(expr.replace("$cluster", OURS)))
        for sample in doc["data"]["result"]:
            assert sample["metric"].get("cluster") == OURS, (title, sample)  # never another cluster's
    # The gauge panel sees our cluster's data (and only ours).
    degraded = [e for t, e in queries if t.startswith("degraded")][0]
    result = _api(prom, "/api/v1/query?query=" + quote(degraded.replace("$cluster", OURS)))["data"]["result"]
    assert [(s["metric"], s["value"][1]) for s in result] == [({"cluster": OURS}, "1")]
