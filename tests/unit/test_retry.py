"""Unit tests of cbctl.core.backends.retry: delays, bounds, give-up, poll deadline.

Pauses go through an injected fake ``sleep`` that records the delay and sleeps nothing, except
in the deadline tests, which use real delays of a few milliseconds.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cbctl.core.backends.retry import Backoff, BackoffPolicy, poll_until, retry_call

pytestmark = pytest.mark.timeout(10)


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class Flaky:
    """Fails with ``exc`` the first ``n`` calls, then returns ``value``."""

    def __init__(self, n: int, exc: BaseException, value: str = "ok") -> None:
        self.n, self.exc, self.value, self.calls = n, exc, value, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.n:
            raise self.exc
        return self.value


def test_policy_delays_double_and_cap() -> None:
    p = BackoffPolicy(initial=0.05, cap=1.0)
    assert [p.delay(n) for n in range(1, 8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_policy_jitter_stays_in_range_after_cap() -> None:
    p = BackoffPolicy(initial=0.5, cap=1.0, jitter=(0.5, 1.5))
    for n in range(1, 6):
        base = min(1.0, 0.5 * 2 ** (n - 1))
        for _ in range(200):
            assert base * 0.5 <= p.delay(n) <= base * 1.5
    spread = {round(p.delay(3), 6) for _ in range(50)}
    assert len(spread) > 1  # jitter actually varies


@pytest.mark.parametrize("bad", [dict(initial=-1, cap=1), dict(initial=1, cap=1, multiplier=0.5),
                                 dict(initial=1, cap=1, jitter=(1.2, 0.8))])
def test_policy_rejects_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**bad)


async def test_retry_call_retries_listed_errors_then_returns() -> None:
    sleep = FakeSleep()
    fn = Flaky(3, ConnectionError("down"))
    seen: list[tuple[str, float]] = []
    out = await retry_call(fn, on=(ConnectionError,), policy=BackoffPolicy(0.01, 0.03), attempts=5,
                           sleep=sleep, on_retry=lambda e, d: seen.append((str(e), d)))
    assert out == "ok" and fn.calls == 4
    assert sleep.delays == [0.01, 0.02, 0.03]
    assert seen == [("down", 0.01), ("down", 0.02), ("down", 0.03)]


async def test_retry_call_gives_up_after_attempts_with_last_error() -> None:
    sleep = FakeSleep()
    fn = Flaky(10, ConnectionError("still down"))
    with pytest.raises(ConnectionError, match="still down"):
        await retry_call(fn, on=(ConnectionError,), policy=BackoffPolicy(0.01, 1), attempts=3, sleep=sleep)
    assert fn.calls == 3 and len(sleep.delays) == 2


async def test_retry_call_other_errors_propagate_at_once() -> None:
    fn = Flaky(1, KeyError("no"))
    with pytest.raises(KeyError):
        await retry_call(fn, on=(ConnectionError,), policy=BackoffPolicy(0.01, 1), attempts=5, sleep=FakeSleep())
    assert fn.calls == 1


async def test_retry_call_deadline_bounds_real_time() -> None:
    fn = Flaky(10**6, TimeoutError("slow"))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="slow"):
        await retry_call(fn, on=(TimeoutError,), policy=BackoffPolicy(0.005, 0.02), deadline=0.08)
    took = time.monotonic() - started
    assert 0.08 <= took < 2.0  # generous upper bound: the machine is shared
    assert fn.calls >= 3


async def test_retry_call_stop_when() -> None:
    fn = Flaky(10**6, ConnectionError("x"))
    with pytest.raises(ConnectionError):
        await retry_call(fn, on=(ConnectionError,), policy=BackoffPolicy(0.01, 1),
                         stop_when=lambda: fn.calls >= 4, sleep=FakeSleep())
    assert fn.calls == 4


async def test_retry_call_refuses_unbounded() -> None:
    with pytest.raises(ValueError):
        await retry_call(Flaky(0, ConnectionError()), on=(ConnectionError,), policy=BackoffPolicy(0.01, 1))


async def test_backoff_sequence_reset_and_give_up_window() -> None:
    now = [100.0]
    sleep = FakeSleep()
    b = Backoff(BackoffPolicy(0.1, 0.3), give_up_after=2.0, clock=lambda: now[0], sleep=sleep)
    assert b.failing_for == 0.0
    assert b.failed() is False
    for _ in range(4):
        await b.pause()
    assert sleep.delays == [0.1, 0.2, 0.3, 0.3]
    now[0] += 1.5
    assert b.failed() is False and b.failing_for == pytest.approx(1.5)
    now[0] += 0.5
    assert b.failed() is True
    b.reset()
    assert b.failing_for == 0.0 and b.failed() is False
    assert await b.pause() == 0.1


async def test_backoff_without_window_never_gives_up() -> None:
    now = [0.0]
    b = Backoff(BackoffPolicy(0.1, 0.3), clock=lambda: now[0], sleep=FakeSleep())
    b.failed()
    now[0] += 1e6
    assert b.failed() is False


async def test_poll_until_returns_value_and_awaits_async_predicates() -> None:
    calls = []

    async def pred() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    sleep = FakeSleep()
    assert await poll_until(pred, timeout=5, interval=0.01, sleep=sleep) == 3
    assert sleep.delays == [0.01, 0.01]


async def test_poll_until_times_out_naming_last_ignored_error() -> None:
    n = [0]

    def pred() -> bool:
        n[0] += 1
        if n[0] == 1:
            raise ConnectionError("refused")
        return False

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^ready not reached within 0.05s.*refused"):
        await poll_until(pred, timeout=0.05, interval=0.005, message="ready", ignore=(ConnectionError,))
    assert 0.05 <= time.monotonic() - started < 2.0
    assert n[0] >= 3


async def test_poll_until_unlisted_error_propagates() -> None:
    def pred() -> bool:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        await poll_until(pred, timeout=5, ignore=(ConnectionError,), sleep=FakeSleep())


async def test_poll_until_never_sleeps_past_deadline() -> None:
    # interval 10 s, timeout 0.3 s: without the cap the first pause alone would take 10 s.
    sleep_calls: list[float] = []

    async def real_sleep(d: float) -> None:
        sleep_calls.append(d)
        await asyncio.sleep(d)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await poll_until(lambda: False, timeout=0.3, interval=10.0, sleep=real_sleep)
    assert time.monotonic() - started < 2.0
    assert all(d <= 0.3 for d in sleep_calls)
