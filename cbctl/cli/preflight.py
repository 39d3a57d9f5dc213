"""`cbctl preflight`: can this cluster start (or keep) rolling out?"""

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


@app.command("preflight")
def preflight(
    ctx: typer.Context,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run only this check (repeatable): etcd, nats, redis, prometheus, credentials, "
                                    "nodes, node-ids, clock, lease-timing. A partial run is not recorded."),
    ] = None,
    skew_warn_ms: Annotated[float, duration_option("--skew-warn-ms", unit="ms", allow_zero=True,
                                                   help="Warn at this clock offset/spread, e.g. 50ms, 0.1s (a number is milliseconds).")] = 50.0,
    skew_fail_ms: Annotated[float, duration_option("--skew-fail-ms", unit="ms", allow_zero=True,
                                                   help="Fail at this clock offset/spread, e.g. 250ms, 1s (a number is milliseconds).")] = 250.0,
    check_timeout: Annotated[float, duration_option("--check-timeout", help="Deadline of each check, e.g. 5s, 500ms (a number is seconds).")] = 5.0,
    output: OutputOpt = None,
    no_headers: NoHeadersOpt = False,
) -> None:
    """Check every backend from here and from every node, node ids, clocks and lease timing.

    Exit 0 when nothing fails (warnings allowed), 1 when a check fails, 4 when the coordination
    store itself is unreachable. A full run is recorded; `stage advance` requires a recent pass.
    """
    from cbctl.core.model.audit import current_actor
    from cbctl.core.operator.preflight import record_preflight, run_preflight
    from cbctl.core.operator.preflight_report import PreflightOptions
    from cbctl.core.backends.coord import make_coordinator
    from cbctl.core.model.errors import BackendUnavailable

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    async def body() -> int:
        opts = PreflightOptions(
            only=frozenset(only) if only else None,
            skew_warn_ms=skew_warn_ms,
            skew_fail_ms=skew_fail_ms,
            check_timeout=check_timeout,
        )
        c = st.context()
        coord = make_coordinator(c)
        from cbctl.cli.progress import ProgressLine

        def told(name: str, rows: list[Any], done: int, total: int) -> None:
            # One line per finished check off a terminal, a live line on one; results on stdout.
            worst = next((s for s in ("fail", "warn") if any(r.status == s for r in rows)), "pass")
            line.update(f"preflight: {name} {worst} ({done}/{total})")

        try:
            with ProgressLine() as line:
                report = await run_preflight(c, coord, opts, progress=told)
            recorded = False
            if opts.only is None and report.store_unreachable is None:
                try:
                    await record_preflight(c, coord, report, actor=current_actor())
                    recorded = True
                except BackendUnavailable as exc:
                    report.store_unreachable = str(exc)
        finally:
            await coord.close()
        if fmt.structured:
            emit(fmt, report.to_dict())
        else:
            _table(report)
        if report.store_unreachable is not None:
            err(f"cbctl: error: the coordination store is unreachable: {report.store_unreachable}")
            return 4
        fails = sum(1 for r in report.checks if r.status == "fail")
        warns = sum(1 for r in report.checks if r.status == "warn")
        verdict = "passed" if report.ok else "FAILED"
        note = "recorded" if recorded else "not recorded (partial run)" if opts.only else "not recorded"
        err(f"preflight {verdict}: {len(report.checks)} checks, {fails} failed, {warns} warnings "
            f"in {report.elapsed:.2f}s; {note}")
        return 0 if report.ok else 1

    raise typer.Exit(run(body))


def _table(report: Any) -> None:
    rows = [(r.name, r.target, r.node or "-", r.status, r.detail) for r in report.checks]
    print_table(None, ["check", "target", "node", "status", "detail"], rows)
