"""The agent's HTTP surface: ``/metrics``, ``/healthz``, ``/readyz`` (+ routes added by others).

Why aiohttp: it is asyncio-native (runs in the agent's own event loop, no thread to share state
with), it streams responses (``web.StreamResponse``: the Server-Sent Events endpoint of the
bridge is added to this same server), and it is maintained and already a dependency (nats-py
uses it).  The stdlib ``http.server`` would need a thread and cannot stream without blocking it.

Adding routes: call :meth:`AgentHttp.add_routes` (or ``agent.add_routes``) with
``aiohttp.web.RouteDef`` items *before* the server starts — aiohttp freezes the router when the
app starts.  The server knows only the node id, how to render the metrics and how to judge
readiness (passed in as arguments: it needs nothing else of the agent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

__all__ = ["AgentHttp", "Readiness"]

Readiness = Callable[[], tuple[bool, dict[str, bool]]]
"""``() -> (ready, checks)``: what ``/readyz`` reports (503 unless ready)."""


class AgentHttp:
    """One aiohttp server for one agent. ``port`` 0 picks a free port (see :attr:`bound`).

    ``render_metrics`` returns the Prometheus exposition of ``/metrics``; ``readiness`` is
    called for every ``/readyz``.  Both run in the event loop and must not block.
    """

    def __init__(self, node_id: str, render_metrics: Callable[[], bytes], readiness: Readiness,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.node_id = node_id
        self._render_metrics = render_metrics
        self._readiness = readiness
        self.host = host
        self.port = port
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    @property
    def router(self) -> web.UrlDispatcher:
        """The router, for adding routes before :meth:`start`."""
        return self.app.router

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Add routes; must happen before :meth:`start` (raises ``RuntimeError`` after)."""
        if self._runner is not None:
            raise RuntimeError("the agent's HTTP server is running: add routes before NodeAgent.start()")
        self.app.add_routes(list(routes))

    def on_startup(self, fn: Callable[[web.Application], Any]) -> None:
        """Register an aiohttp startup callback (before :meth:`start`)."""
        self.app.on_startup.append(fn)

    async def start(self) -> tuple[str, int]:
        """Bind and serve; return the (host, port) actually bound."""
        # access_log off: every Prometheus scrape would log a line at INFO.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        addr = runner.addresses[0]
        self.bound = (str(addr[0]), int(addr[1]))
        return self.bound

    async def stop(self) -> None:
        """Stop serving (idempotent); open streaming responses are closed."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- handlers --------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self._render_metrics()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node_id": self.node_id})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, checks = self._readiness()
        return web.json_response(
            {"ready": ready, "node_id": self.node_id, "checks": checks}, status=200 if ready else 503
        )
