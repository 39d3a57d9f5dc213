"""`cbctl rollback coordination|event-bus|consumers` (and `--clear`)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from cbctl.cli.common import (
    command_app,
    DryRunOpt,
    OutputOpt,
    ReasonOpt,
    TimeoutOpt,
    WaitOpt,
    YesOpt,
    command_line,
    output_format,
    run,
    state,
    with_coordinator,
)
from cbctl.cli.mutate import IgnoreMissingOpt


class Capability(str, Enum):
    coordination = "coordination"
    event_bus = "event-bus"
    consumers = "consumers"


app = command_app()  # a single command


@app.command("rollback")
def rollback(
    ctx: typer.Context,
    capability: Annotated[Capability, typer.Argument(help="coordination: guard off; event-bus: bridge off, source local; consumers: pin consumers to --schema-version.")],
    schema_version: Annotated[int | None, typer.Option("--schema-version", help="consumers only: the version to pin consumers to (dual-publish kept).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Lift this capability's override (back to the stage plan).")] = False,
    reason: ReasonOpt = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 30.0,
    ignore_missing: IgnoreMissingOpt = None,
    output: OutputOpt = None,
) -> None:
    """Roll one capability back, independent of the stage; touches only its own flags."""
    from cbctl.cli.mutate import apply_plan
    from cbctl.core.operator.controlplane import ControlPlane
    from cbctl.core.model.errors import BadInput

    st = state(ctx)
    fmt = output_format(ctx, output)
    cap = capability.value

    async def body() -> int:
        if cap == "consumers" and not clear and schema_version is None:
            raise BadInput("rollback consumers needs --schema-version N")
        if cap != "consumers" and schema_version is not None:
            raise BadInput(f"--schema-version applies to 'consumers' only, not {cap!r}")

        async def inner(c: Any, coord: Any) -> int:
            cp = ControlPlane(c, coord)
            plan = await cp.plan_rollback(cap, schema_version=schema_version, clear=clear, command=command_line(ctx))
            verb = "Lift the" if clear else "Apply the"
            return await apply_plan(cp, plan, output=fmt, reason=reason, yes=yes, dry_run=dry_run, wait=wait,
                                    timeout=timeout, question=f"{verb} {cap} rollback on all nodes?",
                                    ignore_missing=ignore_missing)

        return await with_coordinator(st, inner)

    raise typer.Exit(run(body))
