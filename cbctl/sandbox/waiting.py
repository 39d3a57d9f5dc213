"""Polling a condition under a deadline: the only way the sandbox and the tests wait.

A fixed ``sleep`` is never used as synchronization: it is either too short on a loaded machine
(flaky) or too long everywhere else (slow). Instead a condition is polled every ``interval``
seconds until it holds or ``timeout`` seconds have passed, measured on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["wait_until", "async_wait_until"]


def _timeout_error(message: str, timeout: float, last_error: BaseException | None) -> TimeoutError:
    text = f"{message} (not true after {timeout:.2f} s)"
    if last_error is not None:
        text += f"; last error: {type(last_error).__name__}: {last_error}"
    return TimeoutError(text)


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    message: str = "condition",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate()`` until it returns a truthy value; return that value.

    Contract:
    - ``predicate`` is called at least once, even with ``timeout <= 0``.
    - Raises ``TimeoutError`` whose text starts with ``message`` when no call returned a truthy
      value within ``timeout`` seconds (monotonic clock).
    - An exception raised by ``predicate`` propagates at once, unless it is an instance of one of
      ``ignore``: then it counts as "not yet" and the last such error is named in the
      ``TimeoutError``.
    - Between calls it sleeps ``interval`` seconds, never past the deadline.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as exc:  # the caller declared these transient
            last_error = exc
        else:
            if value:
                return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(message, timeout, last_error)
        time.sleep(min(interval, remaining))


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,
    interval: float = 0.02,
    message: str = "condition",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """The asyncio form of :func:`wait_until`; same contract.

    ``predicate`` may be a plain function or a coroutine function (its result is awaited).
    A single call of an async predicate is not cut off at the deadline: give the awaited
    operation its own timeout if it can hang.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except ignore as exc:  # the caller declared these transient
            last_error = exc
        else:
            if value:
                return value  # type: ignore[return-value]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(message, timeout, last_error)
        await asyncio.sleep(min(interval, remaining))
