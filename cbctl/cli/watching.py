"""`--watch` of `stage status` and `nodes`: snapshots until Ctrl-C, `--for` or `--count`.

Contract: on a terminal with a table format the view is redrawn in place every interval (the
screen is cleared and the table printed again, like watch(1)); anywhere else a snapshot is
printed only when it changed (its ``key``, which holds no clock readings), as a table or as one
JSON object per line (a YAML document per snapshot), so a log or a pipe gets one snapshot per
change. ``count`` stops after that many snapshots printed; ``for_`` after that many seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from cbctl.cli.common import OutputFormat, duration_option, emit, emit_line

WatchOpt = Annotated[bool, typer.Option("--watch", "-w", help="Keep watching: redraw on a terminal, else print each change.")]
IntervalOpt = Annotated[float, duration_option("--interval", help="With --watch: how often to look, e.g. 2s.")]
ForOpt = Annotated[float | None, duration_option("--for", help="With --watch: stop after this long, e.g. 10m.")]
CountOpt = Annotated[int | None, typer.Option("--count", min=1, metavar="N", help="With --watch: stop after this many snapshots.")]


@dataclass
class Snapshot:
    """One look: ``key`` decides what a change is, ``data`` is the JSON/YAML item, ``render``
    prints the table view to stdout."""

    key: Any
    data: Any
    render: Callable[[], None]


async def watch_snapshots(take: Callable[[], Awaitable[Snapshot]], *, fmt: OutputFormat, interval: float,
                          for_: float | None = None, count: int | None = None) -> int:
    """Print snapshots from ``take`` (see the module contract); returns the exit code (0)."""
    import asyncio  # not at module level: the command modules that import this stay light
    live = not fmt.structured and sys.stdout.isatty()
    deadline = None if for_ is None else time.monotonic() + for_
    printed = 0
    last: Any = object()
    while True:
        snap = await take()
        if live or snap.key != last:
            last = snap.key
            if fmt.structured:
                emit_line(fmt, snap.data)
            else:
                if live:
                    sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: redraw in place
                elif printed:
                    print()
                snap.render()
                sys.stdout.flush()
            printed += 1
        if count is not None and printed >= count:
            return 0
        pause = interval
        if deadline is not None:
            pause = min(pause, deadline - time.monotonic())
            if pause <= 0:
                return 0
        await asyncio.sleep(pause)


async def show_snapshots(take: Callable[[], Awaitable[Snapshot]], *, watch: bool, fmt: OutputFormat,
                         interval: float, for_: float | None = None, count: int | None = None) -> int:
    """One snapshot (``emit`` in a structured format, else its table), or with ``watch`` the
    stream of :func:`watch_snapshots`; returns the exit code (0)."""
    if watch:
        return await watch_snapshots(take, fmt=fmt, interval=interval, for_=for_, count=count)
    snap = await take()
    if fmt.structured:
        emit(fmt, snap.data)
    else:
        snap.render()
    return 0
