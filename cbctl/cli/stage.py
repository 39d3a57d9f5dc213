"""`cbctl stage status|advance|history`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cbctl.cli import complete_values as cv
from cbctl.cli.common import (
    new_app,
    DryRunOpt,
    NoHeadersOpt,
    OutputOpt,
    ReasonOpt,
    TimeoutOpt,
    WaitOpt,
    YesOpt,
    command_line,
    duration_option,
    emit,
    err,
    fmt_value,
    output_format,
    print_table,
    run,
    state,
    with_coordinator,
)
from cbctl.cli.mutate import IgnoreMissingOpt
from cbctl.cli.watching import CountOpt, ForOpt, IntervalOpt, WatchOpt

app = new_app("Show and move the rollout stage (0 preflight, 1 observe-only, 2 partial, 3 full).")


def status_json(doc: Any, revision: int) -> dict[str, Any]:
    """The `stage status -o json` shape (a contract for scripts). ``overrides``: every flag not
    from the stage plan (manual overrides, pins, rollbacks) with the plan's value and its source."""
    from cbctl.core.operator.overrides import overridden

    return {
        "stage": doc.stage,
        "revision": revision,
        "flags": dict(doc.flags),
        "rollbacks": {k: dict(v) for k, v in doc.rollbacks.items()},
        "overrides": [o.public() for o in overridden(doc)],
        "canary": {"lanes": list(doc.canary_lanes), "subscribers": list(doc.canary_subscribers)},
    }


def _print_status(c: Any, doc: Any, revision: int) -> None:
    """The table view of `stage status`: each flag marked against the stage plan."""
    from cbctl.core.model.stages import STAGES
    from cbctl.core.operator.overrides import flag_sources

    print(f"context: {c.name}   cluster: {c.cluster}")
    print(f"stage:   {doc.stage} ({STAGES[doc.stage].name})   revision: {revision}")
    rows = []
    for src in sorted(flag_sources(doc), key=lambda s: s.name):
        mark = src.marker
        if mark and src.differs:
            mark += f" (plan: {fmt_value(src.plan)})"
        rows.append((src.name, fmt_value(src.value), mark or "-"))
    print_table("flags", ["flag", "value", "override"], rows)
    if doc.rollbacks:
        print_table(
            "rollback overrides",
            ["capability", "flags"],
            [(cap, ", ".join(f"{k}={fmt_value(v)}" for k, v in sorted(ov.items()))) for cap, ov in sorted(doc.rollbacks.items())],
        )
    else:
        print("rollback overrides: none")
    print(f"canary lanes: {fmt_value(list(doc.canary_lanes))}")
    print(f"canary subscribers: {fmt_value(list(doc.canary_subscribers))}")


@app.command("status")
def status(
    ctx: typer.Context,
    output: OutputOpt = None,
    no_headers: NoHeadersOpt = False,
    watch: WatchOpt = False,
    interval: IntervalOpt = 2.0,
    for_: ForOpt = None,
    count: CountOpt = None,
) -> None:
    """Stage, document revision, every flag (marked `manual`, `pinned` or `rollback:CAP` with the
    stage plan's value where it differs from the plan), active rollback overrides, canary sets.

    --watch: redraw on a terminal; elsewhere print the status again only when it changed (one
    JSON object per line with -o json). Stops on Ctrl-C, after --for or after --count snapshots.
    """
    from cbctl.cli.watching import Snapshot, show_snapshots
    from cbctl.core.operator.controlplane import ControlPlane

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    async def body() -> int:
        async def inner(c: Any, coord: Any) -> int:
            cp = ControlPlane(c, coord)

            async def take() -> Snapshot:
                doc, revision = await cp.read()
                data = status_json(doc, revision)
                return Snapshot(data, data, lambda: _print_status(c, doc, revision))

            return await show_snapshots(take, watch=watch, fmt=fmt, interval=interval, for_=for_, count=count)

        return await with_coordinator(st, inner, read_only=True)

    raise typer.Exit(run(body))


@app.command("advance")
def advance(
    ctx: typer.Context,
    to: Annotated[int | None, typer.Option("--to", help="Target stage; must be current+1 (current = no-op).")] = None,
    canary: Annotated[
        Path | None, typer.Option("--canary", help="Lanes file for stage 2: one lane id per line, # comments.",
                                   shell_complete=cv.files)
    ] = None,
    canary_subscribers: Annotated[
        Path | None, typer.Option("--canary-subscribers", help="Subscribers file for stage 2: one name per line.",
                                   shell_complete=cv.files)
    ] = None,
    reason: ReasonOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Advance despite failing gates (needs --reason; audited).")] = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 30.0,
    ignore_missing: IgnoreMissingOpt = None,
    gate_timeout: Annotated[
        float, duration_option("--gate-timeout", allow_zero=True,
                               help="While gates only lack data (stage entered too recently), wait up to this long "
                                    "(e.g. 2m) and re-evaluate; a failing gate still refuses at once. Default 0: no wait.")
    ] = 0.0,
    output: OutputOpt = None,
) -> None:
    """Move exactly one stage forward, showing the flag diff and asking first.

    Writes with compare-and-swap on the revision it showed: if the document changed meanwhile,
    exit 3 and nothing is written. --dry-run evaluates everything the real advance would (the
    lanes files, the preflight age, every gate) and exits 1 with the same report when the real
    advance would be refused.
    """
    from cbctl.cli.mutate import apply_plan, noop_result
    from cbctl.core.operator.controlplane import ControlPlane
    from cbctl.core.model.errors import BadInput, CheckFailed
    from cbctl.core.model.rollout import AlreadyAtStage
    from cbctl.core.operator.gate_eval import advance_gate_check
    from cbctl.core.model.lanesfile import parse_lanes_file

    st = state(ctx)
    fmt = output_format(ctx, output)

    async def body() -> int:
        if force and not reason:
            raise BadInput("--force needs --reason TEXT (it is recorded in the audit log)")
        gate_wait = gate_timeout
        c = st.context()
        lanes = parse_lanes_file(canary, c.lanes) if canary else None
        subs = parse_lanes_file(canary_subscribers, None) if canary_subscribers else None

        async def inner(c: Any, coord: Any) -> int:
            cp = ControlPlane(c, coord)
            try:
                plan = await cp.plan_advance(to, canary_lanes=lanes, canary_subscribers=subs, command=command_line(ctx))
            except AlreadyAtStage as exc:
                # A no-op prints its result like any other (JSON/YAML too), and writes nothing.
                err(str(exc))
                doc, revision = await cp.read()
                if fmt.structured:
                    emit(fmt, noop_result("stage", doc, revision, dry_run=dry_run))
                return 0
            gate_results: list[dict[str, Any]] = []
            if not plan.is_noop:
                # The same check for a dry run: it must refuse exactly what the advance refuses.
                try:
                    gate_results = await advance_gate_check(c, coord, plan, force=force, gate_timeout=gate_wait,
                                                            on_wait=err)
                except CheckFailed:
                    if dry_run:
                        err("dry run: the real advance would be refused; nothing written")
                    raise
                if dry_run:
                    passed = sum(1 for g in gate_results if g["outcome"] == "pass")
                    err(f"dry run: gates of stage {plan.old.stage}: {passed}/{len(gate_results)} pass"
                        + (" (--force: the real advance would override the others)" if passed < len(gate_results) else ""))
            return await apply_plan(
                cp,
                plan,
                output=fmt,
                reason=reason,
                yes=yes,
                dry_run=dry_run,
                wait=wait,
                timeout=timeout,
                question=f"Advance to stage {plan.new.stage}?",
                forced=force,
                gates=gate_results,
                ignore_missing=ignore_missing,
            )

        return await with_coordinator(st, inner)

    code = run(body)
    raise typer.Exit(code)


@app.command("history")
def history(
    ctx: typer.Context,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Only the newest N entries (shown oldest first).")] = None,
    since: Annotated[float | None, duration_option("--since", help="Only entries of the last DURATION, e.g. 1h, 30m, 7d.")] = None,
    output: OutputOpt = None,
    no_headers: NoHeadersOpt = False,
) -> None:
    """Every audited mutation: time, actor, command, reason, from/to revision, flag diff
    (-o wide adds the kind and the stages)."""
    import time

    from cbctl.core.operator.controlplane import ControlPlane

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    async def body() -> None:
        async def inner(c: Any, coord: Any) -> None:
            found = await ControlPlane(c, coord).history()
            if since is not None:
                cutoff = time.time() - since
                found = [e for e in found if e.time >= cutoff]
            if limit is not None:
                found = found[-limit:]
            entries = [e.public() for e in found]
            if fmt.structured:
                emit(fmt, {"entries": entries})
                return
            if not entries:
                err("no audited mutations" + (" in that range" if since is not None or limit is not None else " yet"))
                return
            rows = [
                (
                    e["time"], e["actor"], e["command"], e["reason"] or "-", f"{e['from_revision']}->{e['to_revision']}",
                    "; ".join(f"{d['flag']}: {fmt_value(d['old'])}->{fmt_value(d['new'])}" for d in e["diff"]) or "-",
                    e["kind"], f"{e['from_stage']}->{e['to_stage']}" if e.get("from_stage") is not None else "-",
                )
                for e in entries
            ]
            print_table("history", ["time", "actor", "command", "reason", "revision", "diff", "kind", "stage"], rows,
                        wide=("kind", "stage"))

        await with_coordinator(st, inner)

    run(body)
