"""A subscriber of the bridge: :class:`Subscription`, and :class:`SubscriberLagged`.

Contract: per workflow a subscription yields strictly increasing seqs; with ``after_seq`` it
first yields the replay its owner produces, then live events, with no gap and no repeat; a
replay that fails raises ``BackendUnavailable`` and is tried afresh on the next call; once
dropped for lagging it raises :class:`SubscriberLagged` (docs/event-bus.md, "Subscribers").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from cbctl.core.model.errors import CbctlError
from cbctl.core.model.events import Event

__all__ = ["SubscriberLagged", "Subscription", "SubscriptionOwner"]


class SubscriptionOwner(Protocol):
    """What a :class:`Subscription` needs of the bridge that made it."""

    def _remove(self, sub: Subscription) -> None: ...

    async def _replay(self, sub: Subscription) -> list[Event]: ...


class SubscriberLagged(CbctlError):
    """A subscriber fell too far behind and was dropped; resubscribe with ``after_seq``."""

    exit_code = 1

    def __init__(self, name: str, workflow_id: str | None, last_seq: int | None) -> None:
        super().__init__(
            f"subscriber {name!r} fell behind and was dropped (last seq {last_seq} of workflow {workflow_id!r})"
        )
        self.name = name
        self.workflow_id = workflow_id
        self.last_seq = last_seq


_CLOSED = object()
_LAGGED = object()


class Subscription:
    """Async iterator of events for one subscriber. Create with :meth:`~cbctl.core.agent.bus.bridge.Bridge.subscribe`."""

    def __init__(self, bridge: SubscriptionOwner, workflow_id: str | None, name: str, after_seq: int | None,
                 max_queue: int) -> None:
        self.workflow_id = workflow_id
        self.name = name
        self.after_seq = after_seq
        self._bridge = bridge
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._max_queue = max_queue
        self._replay: list[Event] | None = None
        self._replay_task: asyncio.Task[list[Event]] | None = None
        self._replay_upto: int | None = None  # live events at or below this seq were replayed
        self._last_seq: int | None = after_seq  # last seq handed to the consumer (one workflow)
        self._closed = False
        self._lagged = False

    @property
    def last_seq(self) -> int | None:
        """The last seq this subscription yielded (single-workflow subscriptions)."""
        return self._last_seq

    def _offer(self, ev: Event) -> bool:
        if self._closed or self._lagged:
            return False
        if self._queue.qsize() >= self._max_queue:
            # Blocking the bridge for one slow subscriber would stall every other one.
            self._lagged = True
            self._queue.put_nowait(_LAGGED)
            self._bridge._remove(self)
            return False
        self._queue.put_nowait(ev)
        return True

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._replay is None and self.after_seq is not None and self.workflow_id is not None:
            # The replay runs as its own task: a read back from the stream can outlast the
            # caller's timeout (next(keepalive)), and cancelling it would restart it from scratch
            # on every call, never finishing.
            if self._replay_task is None:
                self._replay_task = asyncio.ensure_future(self._bridge._replay(self))
            task = self._replay_task
            try:
                replay = await asyncio.shield(task)
            finally:
                if task.done():
                    self._replay_task = None  # a failed replay is tried afresh on the next call
            self._replay = list(reversed(replay))  # pop() from the end = oldest first
        while True:
            if self._replay:
                ev = self._replay.pop()
            else:
                item = await self._queue.get()
                if item is _CLOSED:
                    self._queue.put_nowait(_CLOSED)  # keep raising on further calls
                    raise StopAsyncIteration
                if item is _LAGGED:
                    raise SubscriberLagged(self.name, self.workflow_id, self._last_seq)
                assert isinstance(item, Event)
                ev = item
            if self.workflow_id is not None and self._last_seq is not None and ev.seq <= self._last_seq:
                continue  # already yielded by the replay
            if self.workflow_id is not None:
                self._last_seq = ev.seq
            return ev

    async def next(self, timeout: float | None = None) -> Event:
        """The next event, or ``asyncio.TimeoutError`` after ``timeout`` seconds."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    def pending(self) -> int:
        """Events queued and not yet taken."""
        return self._queue.qsize() + len(self._replay or ())

    def close(self) -> None:
        """Stop receiving; iteration ends after what is already queued."""
        if not self._closed:
            self._closed = True
            self._bridge._remove(self)
            self._queue.put_nowait(_CLOSED)
            task, self._replay_task = self._replay_task, None
            if task is not None:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # mark a failure retrieved: nobody is left to be told
