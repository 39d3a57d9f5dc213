"""prometheus on loopback, scraping targets from a file_sd file that can change live."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import InitVar, dataclass
from typing import Any

from cbctl.sandbox.services.base import HarnessError, Service, atomic_write, http_call

__all__ = ["PrometheusServer"]

Targets = Iterable[tuple[str, Mapping[str, str]]]


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


@dataclass(eq=False, repr=False, kw_only=True)
class PrometheusServer(Service):
    """prometheus scraping targets listed in a file_sd JSON file (changed live with
    :meth:`set_targets`), scrape and evaluation interval ``scrape_interval`` (default 1 s).

    ``targets`` are ("host:port", labels) pairs. Recording/alerting rules can be set with
    ``rules`` (YAML text) or :meth:`set_rules`.
    """

    binary = "prometheus"

    name: str = "prometheus"
    scrape_interval: float = 1.0
    evaluation_interval: float | None = None
    job_name: str = "cbctl"
    targets: InitVar[Targets] = ()
    rules: InitVar[str | None] = None

    def __post_init__(self, targets: Targets, rules: str | None) -> None:  # type: ignore[override]
        super().__post_init__()
        self.evaluation_interval = self.evaluation_interval or self.scrape_interval
        self.config_path = self.data_dir / "prometheus.yml"
        self.targets_path = self.data_dir / "targets.json"
        self.rules_path = self.data_dir / "rules.yml"
        self._targets = [(hp, dict(labels)) for hp, labels in targets]
        self._rules = rules

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def prepare(self) -> None:
        (self.data_dir / "tsdb").mkdir(exist_ok=True)
        interval = _duration(self.scrape_interval)
        # JSON is valid YAML; no YAML writer needed.
        conf = {
            "global": {"scrape_interval": interval,
                       "evaluation_interval": _duration(self.evaluation_interval or self.scrape_interval)},
            "rule_files": [str(self.rules_path)],
            "scrape_configs": [{
                "job_name": self.job_name,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                # file_sd watches the file (inotify); refresh_interval is only the fallback.
                "file_sd_configs": [{"files": [str(self.targets_path)], "refresh_interval": "1s"}],
            }],
        }
        self.config_path.write_text(json.dumps(conf, indent=2))
        self._write_targets()
        self._write_rules()

    def _write_targets(self) -> None:
        groups = [{"targets": [hp], "labels": labels} for hp, labels in self._targets]
        atomic_write(self.targets_path, json.dumps(groups, indent=2))

    def _write_rules(self) -> None:
        atomic_write(self.rules_path, self._rules if self._rules else "groups: []\n")

    def set_targets(self, targets: Targets) -> None:
        """Replace the scrape targets: ("host:port", labels) pairs. Prometheus picks the file
        up by itself (file_sd), but hands discovered targets to its scrapers at most every 5 s
        (hard-coded in Prometheus 2.42): a new target's first sample takes ~5-10 s, also right
        after start. Wait on :meth:`query`, never on a sleep."""
        self._targets = [(hp, dict(labels)) for hp, labels in targets]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_targets()

    def set_rules(self, rules_yaml: str) -> None:
        """Replace the rule file and tell a running Prometheus to reload (SIGHUP)."""
        self._rules = rules_yaml
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_rules()
        if self._pid is not None and self.is_running():
            os.kill(self._pid, signal.SIGHUP)

    def query(self, promql: str, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Instant query; returns ``data.result`` (a list of {"metric", "value"} for vectors)."""
        from urllib.parse import quote

        status, body = http_call(f"{self.url}/api/v1/query?query={quote(promql)}", timeout=timeout)
        if status != 200:
            raise HarnessError(f"{self.name}: query {promql!r} answered HTTP {status}: {body!r}")
        return list(json.loads(body)["data"]["result"])

    def active_targets_up(self) -> int:
        """How many active targets Prometheus reports as up (one probe; 0 on any error)."""
        try:
            status, body = http_call(f"{self.url}/api/v1/targets?state=active")
        except OSError:
            return 0
        if status != 200:
            return 0
        targets = json.loads(body).get("data", {}).get("activeTargets", [])
        return sum(1 for t in targets if t.get("health") == "up")

    def command(self) -> list[str]:
        return [
            "prometheus",
            "--config.file", str(self.config_path),
            "--storage.tsdb.path", str(self.data_dir / "tsdb"),
            "--web.listen-address", f"{self.host}:{self.port}",
        ]

    def probe(self) -> bool:
        status, _ = http_call(f"{self.url}/-/ready")
        return status == 200

    def extra_info(self) -> dict[str, Any]:
        return {"url": self.url, "targets": [hp for hp, _ in self._targets],
                "scrape_interval": self.scrape_interval}
