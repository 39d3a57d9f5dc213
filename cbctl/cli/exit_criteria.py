"""`cbctl exit-criteria`: is the rollout done? Each criterion with its evidence."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cbctl.cli.common import (
    NoHeadersOpt,
    OutputOpt,
    command_app,
    duration_option,
    emit,
    err,
    output_format,
    print_table,
    run,
    state,
)

app = command_app()  # a single command


@app.command("exit-criteria")
def exit_criteria(
    ctx: typer.Context,
    window: Annotated[float | None, duration_option("--window", help="How far back the evidence must reach, e.g. 24h, 10m (default: the context's [exit-criteria] window, else 24h).")] = None,
    output: OutputOpt = None,
    no_headers: NoHeadersOpt = False,
) -> None:
    """No degraded mode (with data for the whole window on every node), no ownership conflicts or
    stale-fencing attempts, ordered cross-node streaming, and every rollback runbook drilled.

    Exit 0 only when every criterion passes; missing evidence fails closed (exit 1); exit 4 when
    the coordination store or Prometheus is unreachable.
    """
    from cbctl.core.model.durations import parse_duration

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    async def body() -> int:
        from cbctl.cli.common import with_coordinator
        from cbctl.core.operator.criteria import evaluate

        async def inner(c: Any, coord: Any) -> Any:
            if window is not None:
                seconds = window
            else:
                configured = c.extra.get("exit-criteria", {}).get("window", "24h")
                seconds = parse_duration(str(configured), what=f"contexts.{c.name}.exit-criteria.window")
            return await evaluate(c, coord, seconds)

        report = await with_coordinator(st, inner)
        if fmt.structured:
            emit(fmt, report.to_dict())
        else:
            rows = [
                (cr.name, cr.status, cr.evidence.get("reason", ""),
                 "; ".join(f"{k}={v}" for k, v in cr.evidence.items() if k != "reason"))
                for cr in report.criteria
            ]
            print_table(f"exit criteria over {report.window}", ["criterion", "status", "why", "evidence"], rows)
        if report.prometheus_error is not None:
            err(f"cbctl: error: prometheus is unreachable: {report.prometheus_error}")
            return 4
        passed = sum(1 for cr in report.criteria if cr.status == "pass")
        err(f"exit criteria {'met' if report.ok else 'NOT met'}: {passed}/{len(report.criteria)} pass")
        return 0 if report.ok else 1

    raise typer.Exit(run(body))
