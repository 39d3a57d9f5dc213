"""Reading metric samples: from an agent's /metrics over HTTP, from an in-process agent's
registry, from an :class:`~cbctl.core.model.metrics.AgentMetrics`."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from cbctl.core.agent.node import NodeAgent
from cbctl.core.model.metrics import AgentMetrics

__all__ = ["http_get", "metric", "metric_value", "sample"]


def http_get(address: str, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """GET http://address/path without proxies; (status, body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (0 if absent).

    ``labels`` (``'decision="deny"'``) must all match; labels it does not name (every series
    also carries ``cluster``, and some ``node``) are ignored.  Sums the matching samples.
    """
    want = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                total += s.value
                found = True
    return total if found else 0.0


def metric(agent: NodeAgent, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (others, e.g. the
    ``cluster`` label every series carries, are ignored); 0 when there is none."""
    total = 0.0
    for family in agent.metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def sample(m: AgentMetrics, name: str, **labels: str) -> float:
    """The one sample of ``name`` with exactly ``labels``; 0 when there is none."""
    return m.registry.get_sample_value(name, labels) or 0.0
