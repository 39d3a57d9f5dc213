"""The one retry policy of cbctl: bounded exponential backoff, jitter, deadlines.

Three shapes cover the project's loops, all bounded (a cap on each delay, and a deadline or an
attempt limit or an explicit stop condition):

- :func:`retry_call`: call an async function again on the given exception types until it
  returns, the deadline passes or the attempts are used up; the last error is re-raised.
- :class:`Backoff`: the delay sequence of a long-lived loop that resumes after failures
  (watch streams, re-registration, subscribers): ``await b.pause()`` after a failure,
  ``b.reset()`` after a success, ``b.failed()`` says when a give-up window is spent.
- :func:`poll_until`: call a predicate until it returns a truthy value, within a deadline.

Why tenacity rather than stamina: stamina is a thin opinionated layer over tenacity whose
policy (attempts, timeout, jittered waits) is global and deliberately not tunable per call
site beyond a few knobs, and it has no "retry on result" shape; our loops need per-site caps,
jitter ranges and a poll shape, which tenacity's ``AsyncRetrying`` composes directly (stop,
wait, retry predicates, injectable ``sleep`` for tests) without a second dependency.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity
from tenacity.wait import wait_base

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[None]]

__all__ = ["Backoff", "BackoffPolicy", "poll_until", "retry_call"]


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Exponential delays: attempt ``n`` (1-based) waits ``min(cap, initial * multiplier**(n-1))``
    times a factor drawn uniformly from ``jitter`` (``(1.0, 1.0)`` = no jitter).

    The jitter is applied after the cap, so the longest delay is ``cap * jitter[1]``.
    ``jitter=(0.5, 1.0)`` is "equal jitter" (never below half the base, never above it).
    """

    initial: float
    cap: float
    multiplier: float = 2.0
    jitter: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        lo, hi = self.jitter
        if self.initial < 0 or self.cap < 0 or self.multiplier < 1 or not 0 <= lo <= hi:
            raise ValueError(f"invalid backoff policy {self!r}")

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt number ``attempt`` (1-based)."""
        base = min(self.cap, self.initial * self.multiplier ** max(attempt - 1, 0))
        lo, hi = self.jitter
        return base if lo == hi == 1.0 else base * random.uniform(lo, hi)

    def wait(self) -> wait_base:
        """This policy as a tenacity wait strategy."""
        return _PolicyWait(self)


class _PolicyWait(wait_base):
    def __init__(self, policy: BackoffPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return self.policy.delay(retry_state.attempt_number)


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    *,
    on: tuple[type[BaseException], ...],
    policy: BackoffPolicy,
    deadline: float | None = None,
    attempts: int | None = None,
    stop_when: Callable[[], bool] | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Await ``fn()`` until it returns; retry only on exceptions of the types in ``on``.

    Contract:
    - Any other exception (and ``asyncio.CancelledError``) propagates at once.
    - Gives up, re-raising the last error unchanged, when ``attempts`` calls have failed, when
      ``deadline`` seconds (monotonic, from the first call) have passed, or when ``stop_when()``
      is true after a failure. At least one of the three must be given: no unbounded retry.
    - A pause never runs past ``deadline``: it is shortened to what is left, and one last call
      is made at the deadline.
    - ``on_retry(exc, delay)`` is called before each pause (logging).
    """
    if deadline is None and attempts is None and stop_when is None:
        raise ValueError("retry_call needs a deadline, an attempt limit or a stop condition")
    stop: tenacity.stop.stop_base = tenacity.stop_never
    if attempts is not None:
        stop = stop | tenacity.stop_after_attempt(attempts)
    if deadline is not None:
        stop = stop | tenacity.stop_after_delay(deadline)
    if stop_when is not None:
        check = stop_when
        stop = stop | tenacity.stop.stop_when_event_set(_Flag(check))  # type: ignore[arg-type]
    wait: wait_base = policy.wait()
    if deadline is not None:
        wait = _until_deadline(wait, deadline)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc, state.next_action.sleep)

    retrying = tenacity.AsyncRetrying(
        sleep=sleep,
        stop=stop,
        wait=wait,
        retry=tenacity.retry_if_exception_type(on),
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(fn)


class _Flag:
    """Adapts a ``() -> bool`` to the ``is_set()`` tenacity's ``stop_when_event_set`` reads."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self._check = check

    def is_set(self) -> bool:
        return bool(self._check())


class _until_deadline(wait_base):  # noqa: N801 - named like tenacity's strategies
    """Shortens a wait so the next call happens no later than ``deadline`` after the first."""

    def __init__(self, inner: wait_base, deadline: float) -> None:
        self.inner, self.deadline = inner, deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        left = self.deadline - (time.monotonic() - retry_state.start_time)
        return max(0.0, min(self.inner(retry_state), left))


class Backoff:
    """The backoff state of one long-lived loop that resumes after failures.

    ``await pause()`` after each failure sleeps the policy's next delay; ``reset()`` after a
    success starts the sequence (and the failure window) over.  With ``give_up_after``,
    ``failed()`` records a failure and returns True once the loop has been failing without a
    success for that many seconds (the caller then raises its own error, naming
    :attr:`failing_for`).  ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        policy: BackoffPolicy,
        *,
        give_up_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.policy = policy
        self.give_up_after = give_up_after
        self._clock = clock
        self._sleep = sleep
        self._state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        self._wait = policy.wait()
        self._attempt = 0
        self._failing_since: float | None = None

    def reset(self) -> None:
        """A success: the next failure waits ``policy.initial`` again."""
        self._attempt = 0
        self._failing_since = None

    @property
    def failing_for(self) -> float:
        """Seconds since the first failure after the last success (0 when not failing)."""
        return 0.0 if self._failing_since is None else self._clock() - self._failing_since

    def failed(self) -> bool:
        """Record a failure; True when failing for ``give_up_after`` seconds or more."""
        if self._failing_since is None:
            self._failing_since = self._clock()
        return self.give_up_after is not None and self.failing_for >= self.give_up_after

    def next_delay(self) -> float:
        """The delay the next :meth:`pause` will sleep, advancing the sequence."""
        self._attempt += 1
        self._state.attempt_number = self._attempt
        return self._wait(self._state)

    async def pause(self) -> float:
        """Sleep the next delay of the sequence; returns it."""
        delay = self.next_delay()
        await self._sleep(delay)
        return delay


def _timeout_error(message: str, timeout: float, last: BaseException | None) -> TimeoutError:
    tail = f" (last error: {last!r})" if last is not None else ""
    return TimeoutError(f"{message} not reached within {timeout:g}s{tail}")


async def poll_until(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    interval: float = 0.02,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Call ``predicate`` (sync or async) until it returns a truthy value; return that value.

    Contract: raises ``TimeoutError`` whose text starts with ``message`` when no call returned a
    truthy value within ``timeout`` seconds (monotonic).  An exception of a type in ``ignore``
    counts as "not yet" (the last one is named in the ``TimeoutError``); any other propagates at
    once.  Pauses are ``interval`` seconds, never past the deadline; one call is made at it.
    A single awaited call is not cut off: give it its own timeout if it can hang.
    """

    last_error: list[BaseException] = []  # the last ignored error, named in the TimeoutError

    async def once() -> T | None:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except ignore as exc:
            last_error[:] = [exc]
            raise
        return value  # type: ignore[return-value]

    gave_up = object()
    retrying = tenacity.AsyncRetrying(
        sleep=sleep,
        stop=tenacity.stop_after_delay(timeout),
        wait=_until_deadline(tenacity.wait_fixed(interval), timeout),
        retry=tenacity.retry_if_exception_type(ignore) | tenacity.retry_if_result(lambda v: not v),
        retry_error_callback=lambda _state: gave_up,
    )
    result = await retrying(once)
    if result is gave_up:
        raise _timeout_error(message, timeout, last_error[0] if last_error else None)
    return result  # type: ignore[return-value]
