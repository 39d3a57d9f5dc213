"""A real SSE subscriber (httpx) of an agent's event endpoints, reading in the background."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx

from cbctl.core.operator.sse_client import SseParser

__all__ = ["SseReader"]


class SseReader:
    """A real SSE subscriber in the background: ``events`` (parsed JSON, in arrival order),
    ``ids`` (SSE ids), ``ends`` (``event: end`` payloads), ``status``/``error_body``."""

    def __init__(self, address: str, path: str, subscriber: str, *, after: int | None = None) -> None:
        params: dict[str, Any] = {"subscriber": subscriber}
        if after is not None:
            params["after"] = after
        self.url = f"http://{address}{path}"
        self.params = params
        self.events: list[dict[str, Any]] = []
        self.received_at: list[float] = []
        self.ids: list[str] = []
        self.ends: list[dict[str, Any]] = []
        self.status: int | None = None
        self.error_body: Any = None
        self.opened = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> SseReader:
        """Connect; returns once the response's status is known (10 s)."""
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.opened.wait(), 10)
        return self

    async def _run(self) -> None:
        parser = SseParser()
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None), trust_env=False) as client:
            async with client.stream("GET", self.url, params=self.params) as resp:
                self.status = resp.status_code
                if resp.status_code != 200:
                    self.error_body = json.loads(await resp.aread())
                    self.opened.set()
                    return
                self.opened.set()
                async for line in resp.aiter_lines():
                    msg = parser.feed(line)
                    if msg is None or msg.comment is not None:
                        continue
                    if msg.event == "end":
                        self.ends.append(json.loads(msg.data))
                        continue
                    self.events.append(json.loads(msg.data))
                    self.received_at.append(time.time())
                    self.ids.append(msg.id or "")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task

    async def wait_done(self, timeout: float) -> None:
        """Until the server ends the stream (``timeout`` s)."""
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    def by_workflow(self) -> dict[str, list[int]]:
        """workflow id -> seqs received, in arrival order."""
        out: dict[str, list[int]] = {}
        for e in self.events:
            out.setdefault(e["workflow_id"], []).append(e["seq"])
        return out
