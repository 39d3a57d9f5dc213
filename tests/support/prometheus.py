"""An exporter for a real Prometheus to scrape, and waiting on what Prometheus holds."""

from __future__ import annotations

from prometheus_client import start_http_server

from cbctl.core.backends.prometheus import PromClient
from cbctl.core.model.metrics import AgentMetrics
from cbctl.sandbox import free_port
from cbctl.sandbox.waiting import async_wait_until

__all__ = ["Exporter", "wait_samples", "wait_value"]


class Exporter:
    """One agent's metric registry (series labelled with ``cluster``) on a free loopback port."""

    def __init__(self, node: str, cluster: str) -> None:
        self.metrics = AgentMetrics(node, cluster=cluster)
        self.metrics.applied_revision.set(0)  # as an agent does once it has read the document
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.metrics.registry)
        self.hostport = f"127.0.0.1:{self.port}"
        self.node = node

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def wait_samples(url: str, metric: str, n: int, timeout: float = 20.0) -> None:
    """Until Prometheus holds at least ``n`` samples of ``metric`` in the last 5 s."""
    async with PromClient(url) as prom:
        async def enough() -> bool:
            v = await prom.query_value(f"min(count_over_time({metric}[5s]))")
            return v is not None and v >= n

        await async_wait_until(enough, timeout, interval=0.2, message=f"{n} samples of {metric}")


async def wait_value(url: str, expr: str, value: float, timeout: float = 20.0) -> None:
    """Until ``expr`` evaluates to ``value`` in Prometheus."""
    async with PromClient(url) as prom:
        async def seen() -> bool:
            return await prom.query_value(expr) == value

        await async_wait_until(seen, timeout, interval=0.2, message=f"{expr} == {value}")
