"""`cbctl signal send`: deliver a signal to a workflow (routed to its lane owner, or queued)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cbctl.cli.common import OutputOpt, duration_option, emit, new_app, output_format, run, state

app = new_app("Send signals to workflows (routed to the lane owner per signals.routing, or queued).")


@app.callback()
def _group() -> None:
    """Send signals to workflows (routed to the lane owner per signals.routing, or queued)."""
    # A callback keeps `send` a subcommand: a one-command Typer app would collapse into it.


@app.command("send")
def send(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(help="Workflow id.")],
    name: Annotated[str, typer.Argument(help="Signal name.")],
    payload: Annotated[str | None, typer.Option("--payload", help="Signal payload as JSON (default {}).")] = None,
    timeout: Annotated[float, duration_option("--timeout", help="How long to find an owner that applies it (routed), e.g. 10s.")] = 10.0,
    signal_id: Annotated[
        str | None, typer.Option("--signal-id", help="Idempotency key (default: a new UUID); reuse it to retry safely.")
    ] = None,
    output: OutputOpt = None,
) -> None:
    """Send signal NAME to WORKFLOW.

    With signals.routing=all (or canary and the workflow's lane in canary.lanes) the signal goes
    by NATS request/reply to the node owning the workflow's lane, which applies it through the
    fencing guard and answers with the seq; if the lane moves meanwhile, the owner is looked up
    again and the request retried.  Otherwise it is queued on the lane stream for the owner.
    A workflow that does not exist (Redis holds no state or history for it) is refused: a signal
    does not start a workflow.

    Exit codes: 0 applied or queued; 1 no owner applied it within --timeout; 2 bad input
    (e.g. --payload is not JSON, no such workflow); 4 the coordination store, NATS or Redis is
    unreachable.
    """
    import json

    from cbctl.core.model.errors import BadInput

    st = state(ctx)
    fmt = output_format(ctx, output)

    async def body() -> dict[str, Any]:
        from cbctl.core.operator.signal_sender import send_signal

        if payload is None:
            value: Any = {}
        else:
            try:
                value = json.loads(payload)
            except json.JSONDecodeError as exc:
                raise BadInput(f"--payload: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        c = st.context()
        result = await send_signal(c, workflow, name, value, timeout=timeout,
                                   request_timeout=min(2.0, timeout), signal_id=signal_id, require_existing=True)
        return result.public()

    out = run(body)
    if fmt.structured:
        emit(fmt, out)
    elif out["route"] == "routed":
        what = "already applied" if out["result"] == "duplicate" else "applied"
        tries = f"{out['attempts']} attempt{'s' if out['attempts'] != 1 else ''}"
        typer.echo(f"signal {out['name']!r} (id {out['signal_id']}) routed to {out['node']}: {what} to "
                   f"{out['workflow_id']} as seq {out['seq']} (lane {out['lane']}, {tries})")
    else:
        typer.echo(f"signal {out['name']!r} (id {out['signal_id']}) queued on lane {out['lane']} for "
                   f"{out['workflow_id']} (signals.routing={out['routing']}); the lane owner applies it")
