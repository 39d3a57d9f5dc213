"""SIGINT and SIGTERM while ``cbctl runbook run`` runs (rules: docs/operator.md, Runbooks)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Interrupts:
    """SIGINT and SIGTERM while ``runbook run`` runs, shared by nested runs in this process.

    The first signal is remembered (:meth:`reason`) and, while a step is running, raised as
    ``KeyboardInterrupt`` into it so the step stops (a command maps that to its own exit code;
    the executor asks :meth:`reason` and records the step as interrupted). Between steps —
    while the run record is being written — a signal is only remembered, so the record is never
    left half-written; the executor stops before the next step. A third signal raises anyway
    (an escape hatch when writing the record hangs).
    """

    def __init__(self) -> None:
        self._reason: str | None = None
        self._count = 0
        self.depth: list[bool] = []  # per nested run: is one of its steps running?

    def reason(self) -> str | None:
        return self._reason

    def handle(self, signum: int, frame: Any) -> None:
        self._reason = self._reason or signal.Signals(signum).name
        self._count += 1
        if (self.depth and self.depth[-1]) or self._count >= 3:
            raise KeyboardInterrupt

    def step(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` wrapped so that a signal during it interrupts it."""
        def wrapped(*args: Any, **kwargs: Any) -> T:
            level = len(self.depth) - 1
            self.depth[level] = True
            try:
                # A signal that came after the executor's last look but before the line above was
                # only remembered: stop here, or the step would run to its end (a 2-minute
                # `sleep` step would ignore Ctrl-C).
                if self._reason is not None:
                    raise KeyboardInterrupt
                return fn(*args, **kwargs)
            finally:
                self.depth[level] = False

        return wrapped


_INTERRUPTS: Interrupts | None = None


@contextlib.contextmanager
def interrupt_guard() -> Iterator[Interrupts]:
    """Install the SIGINT/SIGTERM handlers for a run (the outermost run installs and restores
    them; a nested run in the same process shares them)."""
    global _INTERRUPTS
    outer = _INTERRUPTS is None
    if outer:
        _INTERRUPTS = Interrupts()
    guard = _INTERRUPTS
    assert guard is not None
    saved: dict[int, Any] = {}
    if outer and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, guard.handle)
    guard.depth.append(False)
    try:
        yield guard
    finally:
        guard.depth.pop()
        if outer:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            _INTERRUPTS = None
