"""`cbctl wait converged`: block until the cluster has converged, or say what is missing."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cbctl.cli.common import (
    OutputFormat,
    OutputOpt,
    duration_option,
    emit,
    err,
    new_app,
    output_format,
    run,
    state,
    with_coordinator,
)

app = new_app("Wait for a condition of the cluster (converged).")


@app.callback()
def group() -> None:
    """Wait for a condition of the cluster: `cbctl wait converged`."""


@app.command("converged")
def converged(
    ctx: typer.Context,
    timeout: Annotated[float, duration_option("--timeout", help="Give up after this long, e.g. 30s, 2m.")] = 120.0,
    interval: Annotated[float, duration_option("--interval", help="How often to look again, e.g. 2s.")] = 2.0,
    output: OutputOpt = None,
) -> None:
    """Wait until every expected node has applied the current revision and every gate of the
    current stage passes (the preflight gate and the stage's metric gates, judged as `stage
    advance` judges them).

    Progress goes to stderr (a live line on a terminal, one line per change elsewhere). Exit 0
    when converged; 1 on timeout, naming every node and gate still missing; 4 when the
    coordination store is unreachable. -o json/yaml prints the last look either way.
    """
    from cbctl.cli.progress import ProgressLine
    from cbctl.core.operator.converge import wait_converged

    st = state(ctx)
    fmt = output_format(ctx, output)

    async def body() -> int:
        async def inner(c: Any, coord: Any) -> Any:
            with ProgressLine() as line:
                return await wait_converged(c, coord, timeout=timeout, interval=interval,
                                            progress=lambda look: line.update(look.progress_line()))

        look = await with_coordinator(st, inner)
        if fmt.structured:
            emit(fmt, look.public())
        if look.ok:
            err(f"converged: stage {look.stage}, revision {look.revision}: {len(look.nodes.applied)} node(s) applied it, "
                f"{len(look.gates)} gate(s) pass ({look.elapsed:.1f}s)")
            return 0
        err(f"cbctl: error: not converged within {timeout:g}s (stage {look.stage}, revision {look.revision}); missing:")
        for line in look.missing():
            err(f"  {line}")
        return 1

    raise typer.Exit(run(body))
