"""`cbctl watch`: the checklist's metrics for the current stage, live."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cbctl.cli.common import (
    NoHeadersOpt,
    OutputOpt,
    command_app,
    duration_option,
    emit,
    emit_line,
    err,
    output_format,
    print_table,
    run,
    state,
)

if TYPE_CHECKING:
    from cbctl.core.operator.watch import WatchRow

app = command_app()  # a single command

SPARK = "▁▂▃▄▅▆▇█"
VERDICT_STYLE = {"pass": "green", "fail": "bold red", "no-data": "yellow", "info": "dim"}


def sparkline(values: list[float | None]) -> str:
    """Unicode sparkline; a gap (no sample) is a space. Flat series sit on the baseline."""
    real = [v for v in values if v is not None]
    if not real:
        return ""
    lo, hi = min(real), max(real)
    span = hi - lo
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        else:
            out.append(SPARK[0] if span == 0 else SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))])
    return "".join(out)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.3g}"


def snapshot_json(stage: int, rows: list[WatchRow], at: float) -> dict[str, Any]:
    """The `watch --once -o json` shape (a contract). ``ok``: no threshold broken and every
    judged metric has data."""
    return {
        "stage": stage,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
        "metrics": [r.to_dict() for r in rows],
        "ok": all(r.verdict in ("pass", "info") for r in rows),
    }


def _title(stage: int, rows: list[WatchRow], at: float, interval: float) -> str:
    ok = all(r.verdict in ("pass", "info") for r in rows)
    return (f"stage {stage} · {time.strftime('%H:%M:%S', time.localtime(at))} · every {interval:g}s · "
            f"{'OK' if ok else 'ATTENTION'}")


def _table(stage: int, rows: list[WatchRow], at: float, interval: float) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=_title(stage, rows, at, interval), title_justify="left")
    for col, kw in (("metric", {}), ("value", {"justify": "right"}), ("rate/s", {"justify": "right"}),
                    ("trend", {}), ("threshold", {}), ("verdict", {})):
        table.add_column(col, **kw)
    for r in rows:
        table.add_row(r.name, _fmt(r.value), _fmt(r.rate), sparkline(r.trend), r.threshold or "-",
                      Text(r.verdict, style=VERDICT_STYLE.get(r.verdict, "")))
    return table


@app.command("watch")
def watch(
    ctx: typer.Context,
    stage: Annotated[int | None, typer.Option("--stage", help="Stage whose metrics to show (default: the current stage).")] = None,
    interval: Annotated[float, duration_option("--interval", help="Refresh period, e.g. 2s, 500ms, 1m.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="One snapshot, then exit.")] = False,
    for_: Annotated[float | None, duration_option("--for", help="Stop after this long, e.g. 10m.")] = None,
    fail_on_breach: Annotated[bool, typer.Option("--fail-on-breach", help="Exit 1 as soon as a threshold is broken.")] = False,
    points: Annotated[int, typer.Option("--points", help="Trend length (samples).")] = 20,
    output: OutputOpt = None,
    no_headers: NoHeadersOpt = False,
) -> None:
    """Value, rate, trend, threshold and verdict of the metrics the checklist names for a stage.

    A live dashboard on a terminal; otherwise one table (or one JSON object per line, one YAML
    document per refresh) per refresh. Exit 1 with --fail-on-breach when a threshold breaks, 4
    when Prometheus is down.
    """
    from cbctl.core.model.errors import BadInput

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    async def body() -> int:
        from cbctl.core.model.gate_settings import gate_config
        from cbctl.core.operator.watch import watch_snapshot
        from cbctl.core.backends.prometheus import PromClient
        from cbctl.core.model.stages import STAGES

        step = interval
        total = for_
        if points < 1:
            raise BadInput(f"--points: must be >= 1, got {points}")
        from cbctl.cli.common import with_coordinator
        from cbctl.core.operator.controlplane import ControlPlane
        from cbctl.core.model.errors import BackendUnavailable
        from cbctl.core.operator.instant import stage_entry

        c = st.context()
        cfg = gate_config(c)
        if stage is not None and not 0 <= stage < len(STAGES):
            raise BadInput(f"--stage: must be 0..{len(STAGES) - 1}, got {stage}")

        async def read_stage(cc: Any, coord: Any) -> tuple[int, float | None]:
            # The stage shown and when it was entered: windows never reach back before it
            # (the same bound `stage advance` applies to the same stage's gates).
            doc_stage = (await ControlPlane(cc, coord).read())[0].stage
            shown = doc_stage if stage is None else stage
            return shown, (await stage_entry(coord, cc, shown) if shown == doc_stage else None)

        try:
            current, since = await with_coordinator(st, read_stage)
        except BackendUnavailable:
            if stage is None:
                raise
            err(f"cbctl: warning: the coordination store is unreachable; stage {stage}'s windows are not cut at its entry")
            current, since = stage, None

        deadline = None if total is None else time.monotonic() + total
        live_tty = not fmt.structured and not once and sys.stdout.isatty()
        async with PromClient(c.prometheus.url) as prom:
            if live_tty:
                return await _live(c, current, cfg, prom, step, points, deadline, fail_on_breach, since)
            while True:
                at = time.time()
                rows = await watch_snapshot(c, current, points=points, step=step, cfg=cfg, prom=prom, since=since)
                data = snapshot_json(current, rows, at)
                if fmt.structured:
                    if once:
                        emit(fmt, data)
                    else:  # one object per line (a YAML document each), so a consumer can read a stream
                        emit_line(fmt, data)
                elif sys.stdout.isatty():
                    from rich.console import Console

                    Console(markup=False, highlight=False).print(_table(current, rows, at, step))
                else:  # plain, never cut to 80 columns
                    print_table(_title(current, rows, at, step),
                                ["metric", "value", "rate/s", "trend", "threshold", "verdict"],
                                [(r.name, _fmt(r.value), _fmt(r.rate), sparkline(r.trend), r.threshold or "-", r.verdict)
                                 for r in rows])
                breached = any(r.verdict == "fail" for r in rows)
                if fail_on_breach and breached:
                    err("cbctl: threshold breached: " + ", ".join(r.name for r in rows if r.verdict == "fail"))
                    return 1
                if once:
                    return 0 if data["ok"] or not fail_on_breach else 1
                if deadline is not None and time.monotonic() >= deadline:
                    return 0
                await _sleep_until(step, deadline)

    raise typer.Exit(run(body))


async def _sleep_until(step: float, deadline: float | None) -> None:
    import asyncio

    wait = step if deadline is None else max(0.0, min(step, deadline - time.monotonic()))
    await asyncio.sleep(wait)


async def _live(c: Any, stage: int, cfg: Any, prom: Any, step: float, points: int, deadline: float | None,
                fail_on_breach: bool, since: float | None) -> int:
    """rich.live on stdout, refreshed every ``step``. Ctrl-C ends it (exit 130 via ``run``)."""
    from rich.console import Console
    from rich.live import Live

    from cbctl.core.operator.watch import watch_snapshot

    console = Console(markup=False, highlight=False)  # honours NO_COLOR by itself
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            at = time.time()
            rows = await watch_snapshot(c, stage, points=points, step=step, cfg=cfg, prom=prom, since=since)
            live.update(_table(stage, rows, at, step), refresh=True)
            if fail_on_breach and any(r.verdict == "fail" for r in rows):
                err("cbctl: threshold breached: " + ", ".join(r.name for r in rows if r.verdict == "fail"))
                return 1
            if deadline is not None and time.monotonic() >= deadline:
                return 0
            await _sleep_until(step, deadline)
