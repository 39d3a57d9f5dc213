"""`cbctl agent run|load`: run a node agent; enqueue the demo workload."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cbctl.cli import complete_values as cv
from cbctl.cli.common import (
    OutputFormat,
    OutputOpt,
    duration_option,
    emit_json,
    err,
    new_app,
    output_format,
    run,
    state,
)

if TYPE_CHECKING:
    from cbctl.core.agent.hooks import TaskHandler

app = new_app("Run the node agent, or enqueue a demo workload for agents to process.")


@app.command("run")
def run_agent(
    ctx: typer.Context,
    node_id: Annotated[str, typer.Option("--node-id", help="This node's id (unique in the cluster).")],
    handler: Annotated[
        str | None, typer.Option("--handler", help="Task handler: 'demo' (the demo lifecycle workload). Required.")
    ] = None,
    http_port: Annotated[int, typer.Option("--http-port", help="Port of /metrics /healthz /readyz; 0 = a free port.")] = 0,
    http_host: Annotated[str, typer.Option("--http-host", help="Address the HTTP server binds to.")] = "127.0.0.1",
    advertise_host: Annotated[
        str | None, typer.Option("--advertise-host", help="Host written into the record's 'http' (default: the bind address).")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", shell_complete=cv.dirs, help="Where the machine identity is kept (default ~/.local/state/cbctl).")
    ] = None,
    lease_ttl: Annotated[
        float | None, duration_option("--lease-ttl", help="Lease TTL, e.g. 10s, 1m (a number is seconds; default: coordination.lease-ttl).")
    ] = None,
    keepalive: Annotated[
        float | None, duration_option("--keepalive", help="Keep-alive interval, e.g. 2s, 500ms (a number is seconds); * 3 must be <= TTL.")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
    log_format: Annotated[
        str, typer.Option("--log-format", metavar="text|json",
                          help="Log lines as text, or as one JSON object per line (time, level, logger, message, exception).")
    ] = "text",
    no_bus: Annotated[
        bool, typer.Option("--no-bus", help="Do not attach the event bus (publisher, outbox, bridge, SSE endpoints) or signal routing.")
    ] = False,
) -> None:
    """Run a node agent until SIGTERM/SIGINT: register, apply flags live, own lanes, process tasks,
    publish lifecycle events (outbox in the state dir while NATS is down) and stream them (SSE).

    The agent runs the task handler named by --handler; the only built-in one is 'demo' (what
    `cbctl agent load` enqueues).  A service runs its own handler through the Python API:
    NodeAgent(context, node_id, handler=...).

    Exit codes: 0 after a graceful stop (lease revoked, lanes freed); 2 bad settings (also no
    --handler); 3 the node
    id is held by another live instance; 4 a backend is unreachable at start, or NATS refused
    the credentials (an unreachable NATS is not fatal: the agent starts degraded).
    """
    import asyncio
    import logging
    import signal
    import sys

    from cbctl.core.agent.node import NodeAgent
    from cbctl.core.model.errors import BadInput

    from cbctl.core.agent.log_format import LOG_FORMATS, configure_logging

    task_handler = _handler(handler)
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        err(f"cbctl: error: --log-level {log_level!r}: use debug, info, warning or error")
        raise typer.Exit(2)
    if log_format not in LOG_FORMATS:
        err(f"cbctl: error: --log-format {log_format!r}: use {' or '.join(LOG_FORMATS)}")
        raise typer.Exit(2)
    configure_logging(sys.stderr, level, log_format)
    st = state(ctx)

    async def body() -> None:
        c = st.context()
        if not 0 <= http_port <= 65535:
            raise BadInput(f"--http-port {http_port}: must be 0..65535")
        agent = NodeAgent(
            c, node_id, handler=task_handler, http_host=http_host, http_port=http_port, advertise_host=advertise_host,
            state_dir=state_dir, lease_ttl=lease_ttl, keepalive_interval=keepalive,  # validated by NodeAgent
        )
        if not no_bus:
            from cbctl.core.agent.bus.attach import attach_bus
            from cbctl.core.agent.signals import attach_signals

            attach_bus(agent)  # canonical events: publisher, outbox, bridge, SSE
            attach_signals(agent)  # signal routing to lane owners (NATS request/reply)
        loop = asyncio.get_running_loop()

        signalled: list[bool] = []

        def on_signal() -> None:
            if not signalled:
                signalled.append(True)
                _exit_watchdog(agent.stop_timeout + 1.5)
            agent.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await agent.run()

    run(body)


HANDLERS = ("demo",)
"""What ``--handler`` accepts."""


def _handler(name: str | None) -> TaskHandler:
    """The task handler ``--handler`` names; exit 2 with what to plug in when none or unknown."""
    if name == "demo":
        from cbctl.core.agent.workload import lifecycle_handler

        return lifecycle_handler
    if name is None:
        err("cbctl: error: agent run needs a task handler: pass --handler demo to run the demo lifecycle "
            "workload, or run your service's own handler with the Python API: "
            "NodeAgent(context, node_id, handler=...) (cbctl.core.agent.node)")
    else:
        err(f"cbctl: error: --handler {name!r}: use one of {', '.join(HANDLERS)}, or run your own handler "
            "with the Python API: NodeAgent(context, node_id, handler=...) (cbctl.core.agent.node)")
    raise typer.Exit(2)


def _exit_watchdog(after: float) -> None:
    """Backstop of the 10 s stop promise: end the process ``after`` seconds from now.

    The agent's stop is bounded by itself; what is left after it is asyncio's shutdown, which
    waits for every task it cancels, and a task stuck in a library call against a frozen server
    could hold the process there.  A daemon timer thread (it runs even if the loop is stuck)
    then exits 0 — the lease was revoked or the log said it gave up — with a message.
    """
    import os
    import sys
    import threading

    def fire() -> None:
        sys.stderr.write(f"cbctl: agent shutdown still waiting on a library call after {after:g}s; exiting now\n")
        sys.stderr.flush()
        os._exit(0)

    timer = threading.Timer(after, fire)
    timer.daemon = True
    timer.start()


@app.command("load")
def load(
    ctx: typer.Context,
    workflows: Annotated[int, typer.Option("--workflows", help="Number of workflows to enqueue.")] = 100,
    rate: Annotated[float, typer.Option("--rate", help="Workflows per second; 0 = as fast as possible.")] = 0.0,
    tasks_per_workflow: Annotated[int, typer.Option("--tasks-per-workflow", help="Tasks per workflow.")] = 3,
    fail_rate: Annotated[float, typer.Option("--fail-rate", help="Share of tasks whose first attempt fails (retried).")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="RNG seed: the same seed gives the same workload.")] = 1,
    prefix: Annotated[str, typer.Option("--prefix", help="Workflow id prefix.")] = "wf",
    output: OutputOpt = None,
) -> None:
    """Enqueue demo workflows whose tasks go created -> started -> completed (or failed ->
    retried -> started -> completed) on the lanes; the agents apply the transitions."""
    from cbctl.core.model.errors import BadInput

    st = state(ctx)
    fmt = output_format(ctx, output)

    async def body() -> dict[str, Any]:
        from cbctl.core.backends.redis.client import redis_client_for
        from cbctl.core.backends.redis.queue import LaneQueue
        from cbctl.core.agent.workload import generate

        if workflows < 0 or tasks_per_workflow < 1 or rate < 0 or not 0 <= fail_rate <= 1:
            raise BadInput("--workflows >= 0, --tasks-per-workflow >= 1, --rate >= 0 and 0 <= --fail-rate <= 1")
        c = st.context()
        redis = redis_client_for(c, 0)
        try:
            queue = LaneQueue(redis, c.cluster, c.lanes)
            report = await generate(queue, workflows=workflows, rate=rate, tasks_per_workflow=tasks_per_workflow,
                                    fail_rate=fail_rate, seed=seed, prefix=prefix)
        finally:
            await redis.aclose()
        return report.public()

    summary = run(body)
    if fmt is OutputFormat.json:
        emit_json(summary)
    else:
        err(f"enqueued {summary['workflows']} workflows ({summary['messages']} task transitions) "
            f"in {summary['elapsed']:.2f}s")
