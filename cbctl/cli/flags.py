"""`cbctl flags get|set|unset|diff`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cbctl.cli import complete_values as cv
from cbctl.cli.common import (
    new_app,
    DryRunOpt,
    NoHeadersOpt,
    OutputFormat,
    OutputOpt,
    ReasonOpt,
    TimeoutOpt,
    WaitOpt,
    YesOpt,
    command_line,
    emit,
    fmt_value,
    output_format,
    print_table,
    err,
    run,
    show_diff,
    state,
    with_coordinator,
)
from cbctl.cli.mutate import IgnoreMissingOpt

app = new_app("Read and set individual rollout flags (validated, audited, compare-and-swap).")


@app.command("get")
def get(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="One flag name; all flags when omitted.", shell_complete=cv.flag_names)] = None,
    output: OutputOpt = None,
    no_headers: NoHeadersOpt = False,
) -> None:
    """Show the effective value of one flag or of all flags (-o wide adds the stage plan's value)."""
    from cbctl.core.operator.controlplane import ControlPlane
    from cbctl.core.model.errors import BadInput
    from cbctl.core.model.flags import FLAGS

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    async def body() -> None:
        if name is not None and name not in FLAGS:
            raise BadInput(f"unknown flag {name!r} (known: {', '.join(sorted(FLAGS))})")

        async def inner(c: Any, coord: Any) -> None:
            doc, revision = await ControlPlane(c, coord).read()
            flags = {name: doc.flags[name]} if name else dict(doc.flags)
            if fmt.structured:
                emit(fmt, {"revision": revision, "flags": flags})
            elif name and fmt is not OutputFormat.wide:
                print(fmt_value(flags[name]))
            else:
                print_table(f"flags (revision {revision})", ["flag", "value", "allowed", "source"],
                            [(k, fmt_value(v), FLAGS[k].allowed_text, _source(doc, k)) for k, v in sorted(flags.items())],
                            wide=("source",))

        await with_coordinator(st, inner)

    run(body)


def _source(doc: Any, name: str) -> str:
    """Where a flag's effective value comes from: a rollback override, a manual pin or the plan
    (judged once, by cbctl.core.operator.overrides)."""
    from cbctl.core.operator.overrides import SOURCE_MANUAL, SOURCE_ROLLBACK, flag_sources

    src = next(s for s in flag_sources(doc) if s.name == name)
    if src.source == SOURCE_ROLLBACK:
        return f"rollback {src.capability}"
    return "manual" if src.source == SOURCE_MANUAL else f"stage {doc.stage}"


@app.command("set")
def set_(
    ctx: typer.Context,
    assignments: Annotated[list[str], typer.Argument(help="NAME=VALUE pairs, e.g. ownership.guard=observe.", shell_complete=cv.flag_assignments)],
    reason: ReasonOpt = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 30.0,
    ignore_missing: IgnoreMissingOpt = None,
    output: OutputOpt = None,
) -> None:
    """Set flags explicitly (overrides the stage plan until the next stage transition)."""
    from cbctl.cli.mutate import apply_plan
    from cbctl.core.operator.controlplane import ControlPlane
    from cbctl.core.model.flags import parse_flag_assignments

    st = state(ctx)
    fmt = output_format(ctx, output)

    async def body() -> int:
        parsed = parse_flag_assignments(assignments)

        async def inner(c: Any, coord: Any) -> int:
            cp = ControlPlane(c, coord)
            plan = await cp.plan_flags(parsed, command=command_line(ctx))
            return await apply_plan(cp, plan, output=fmt, reason=reason, yes=yes, dry_run=dry_run, wait=wait,
                                    timeout=timeout, question="Set these flags?", ignore_missing=ignore_missing)

        return await with_coordinator(st, inner)

    raise typer.Exit(run(body))


@app.command("unset")
def unset(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Flags whose manual override to drop.",
                                               shell_complete=cv.flag_names)],
    reason: ReasonOpt = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 30.0,
    ignore_missing: IgnoreMissingOpt = None,
    output: OutputOpt = None,
) -> None:
    """Drop manual overrides (`flags set`): the flags return to the stage plan. Validated,
    audited and written by compare-and-swap like `flags set`; a flag without a manual override
    changes nothing (exit 0, nothing written). A rollback's flags are lifted with
    `cbctl rollback CAP --clear`, not here."""
    from cbctl.cli.mutate import apply_plan
    from cbctl.core.operator.controlplane import ControlPlane

    st = state(ctx)
    fmt = output_format(ctx, output)

    async def body() -> int:
        async def inner(c: Any, coord: Any) -> int:
            cp = ControlPlane(c, coord)
            plan = await cp.plan_unset(names, command=command_line(ctx))
            if plan.is_noop:
                without = [n for n in names if n not in plan.old.manual]
                err(f"no manual override of {', '.join(without)} (see `cbctl stage status`)")
            return await apply_plan(cp, plan, output=fmt, reason=reason, yes=yes, dry_run=dry_run, wait=wait,
                                    timeout=timeout, question="Drop these overrides?", ignore_missing=ignore_missing)

        return await with_coordinator(st, inner)

    raise typer.Exit(run(body))


@app.command("diff")
def diff(
    ctx: typer.Context,
    stage: Annotated[int, typer.Option("--stage", help="Stage to compare the current flags with.")],
    canary: Annotated[
        Path | None, typer.Option("--canary", help="Lanes file: the canary lanes stage 2 would use.", shell_complete=cv.files)
    ] = None,
    output: OutputOpt = None,
) -> None:
    """What moving to stage N would change (nothing is written). The diff is the result: stdout."""
    from cbctl.core.operator.controlplane import ControlPlane
    from cbctl.core.model.lanesfile import parse_lanes_file

    st = state(ctx)
    fmt = output_format(ctx, output)

    async def body() -> None:
        async def inner(c: Any, coord: Any) -> None:
            lanes = parse_lanes_file(canary, c.lanes) if canary else None
            doc, revision, changes = await ControlPlane(c, coord).stage_diff(stage, canary_lanes=lanes)
            if fmt.structured:
                emit(fmt, {"from_stage": doc.stage, "to_stage": stage, "revision": revision,
                           "diff": [{"flag": ch.name, "old": ch.old, "new": ch.new} for ch in changes]})
            elif not changes:
                err(f"no flag changes from stage {doc.stage} to stage {stage}")
            else:
                show_diff(changes, stream=sys.stdout)

        await with_coordinator(st, inner)

    run(body)
