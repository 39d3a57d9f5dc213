"""`cbctl watch` against a real Prometheus scraping a real /metrics endpoint: the snapshot's
values are what the exporter exposed; thresholds, verdicts, --fail-on-breach, --for, and a
Prometheus that is down."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import cbctl_run, write_config
from tests.support.prometheus import Exporter, wait_samples, wait_value

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def exporter(unique_cluster: str) -> Iterator[Exporter]:
    e = Exporter("node-a", unique_cluster)
    yield e
    e.stop()


@pytest.fixture
def cfg(tmp_path: Path, shared_etcd, prometheus, unique_cluster: str) -> Path:
    return write_config(tmp_path / "config.toml", cluster=unique_cluster, etcd=shared_etcd.client_url,
                        prometheus=prometheus.url, lanes=["lane-00"],
                        extra={"gates": {"window": "5s", "min-samples": 2, "rate-window": "5s"}})


def snapshot(cfg: Path, *args: str) -> tuple[int, dict, str]:
    r = cbctl_run(cfg, "watch", "--once", "-o", "json", *args)
    return r.exit_code, (json.loads(r.stdout) if r.stdout.strip() else {}), r.stderr


def test_once_json_reports_what_the_exporter_exposed(cfg: Path, prometheus, exporter: Exporter) -> None:
    m = exporter.metrics
    m.outbox_depth.set(7)
    m.bridge_delivered.labels(origin="remote")
    prometheus.set_targets([(exporter.hostport, {"node": exporter.node})])
    asyncio.run(wait_samples(prometheus.url, "event_bus_outbox_depth", 2))
    m.publish.labels(status="error").inc(4)
    asyncio.run(wait_value(prometheus.url, 'sum(event_bus_publish_total{status="error"})', 4))

    code, data, err = snapshot(cfg, "--stage", "2", "--points", "5", "--interval", "1s")
    assert code == 0, err
    assert set(data) == {"stage", "time", "metrics", "ok"}
    assert data["stage"] == 2
    by = {x["name"]: x for x in data["metrics"]}
    for x in data["metrics"]:
        assert {"name", "query", "value", "rate", "threshold", "verdict"} <= set(x)
    assert by["outbox-depth"]["value"] == 7
    assert by["outbox-depth"]["verdict"] == "fail" and by["outbox-depth"]["threshold"] == "<= 0"
    assert by["degraded"]["value"] == 0 and by["degraded"]["verdict"] == "pass"
    assert by["publish-errors"]["value"] >= 4 and by["publish-errors"]["verdict"] == "fail"
    assert by["publish-errors"]["rate"] > 0
    assert by["ownership-changes"]["verdict"] == "info" and by["ownership-changes"]["value"] is None
    assert by["publish-ok"]["verdict"] == "info"
    assert len(by["degraded"]["trend"]) == 5
    assert data["ok"] is False

    code, _, err = snapshot(cfg, "--stage", "2", "--fail-on-breach")
    assert code == 1


def test_current_stage_is_read_from_the_store_and_for_bounds_the_run(cfg: Path, prometheus, exporter) -> None:
    prometheus.set_targets([(exporter.hostport, {"node": exporter.node})])
    # 3 samples by now: the snapshot judges at the last complete scrape, one interval earlier.
    asyncio.run(wait_samples(prometheus.url, "event_bus_degraded", 3))
    # ... and rollout-lag looks 3 s further back (two scrapes + 1 s): history that old.
    asyncio.run(wait_value(prometheus.url, "min(count_over_time(event_bus_degraded[8s])) >= bool 7", 1))
    code, data, err = snapshot(cfg)
    assert code == 0, err
    assert data["stage"] == 0 and data["ok"] is True, data

    # --for bounds the run; 6 s so that two snapshots fit also when one takes 2-3 s on a loaded
    # machine (seen at load average 7 on 2 cores with 2 s).
    started = time.monotonic()
    r = cbctl_run(cfg, "watch", "--for", "6s", "--interval", "200ms", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert time.monotonic() - started < 6 + 15  # bounded: the last snapshot may start just before 6 s
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) >= 2 and all(x["stage"] == 0 for x in lines)

    r = cbctl_run(cfg, "watch", "--once", "--stage", "1")  # table rendering
    assert r.exit_code == 0, r.stderr
    assert "degraded" in r.stdout and "verdict" in r.stdout


def test_prometheus_down_exits_4(cfg: Path, prometheus) -> None:
    prometheus.stop()
    code, _, err = snapshot(cfg, "--stage", "1")
    assert code == 4 and "prometheus" in err


def test_bad_durations_are_usage_errors(cfg: Path) -> None:
    r = cbctl_run(cfg, "watch", "--once", "--stage", "1", "--interval", "fast")
    assert r.exit_code == 2 and "--interval" in r.stderr and "'fast'" in r.stderr
