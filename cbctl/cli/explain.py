"""`cbctl explain [NAME]`: what a flag, metric or gate means, from the tables the code uses."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cbctl.cli.common import command_app, OutputOpt, emit, output_format, print_table, run_sync, state

app = command_app()  # a single command


def explain_names(ctx: Any, param: Any, incomplete: str) -> list[Any]:
    """Tab completion: every flag, metric and built-in gate name (pure tables, no backend)."""
    from typer._click.shell_completion import CompletionItem

    from cbctl.core.model.flags import FLAGS
    from cbctl.core.model.gate_settings import RULES
    from cbctl.core.model.metric_names import ALL_METRICS

    items = [(n, "flag") for n in FLAGS] + [(n, "metric") for n in ALL_METRICS] + [(n, "gate") for n in RULES]
    return [CompletionItem(n, help=kind) for n, kind in items if n.startswith(incomplete)]


def _gate_config(st: Any) -> Any:
    """The current context's gate table when a contexts file exists (its [gates] overrides
    apply), else None: the built-in tables."""
    from cbctl.core.model.config import config_path
    from cbctl.core.model.gate_settings import gate_config

    if not config_path(st.config_path).exists():
        return None
    return gate_config(st.context())


@app.command("explain")
def explain(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="A flag, metric or gate name; all of them when omitted.",
                                               shell_complete=explain_names)] = None,
    output: OutputOpt = None,
) -> None:
    """The meaning, the allowed values and where it comes from: for a flag the value each stage
    sets and the rollbacks that hold it; for a metric the exporter's help, its labels and the
    gates that read it; for a gate its expression, threshold, window and the stages it guards
    (with the current context's [gates] overrides). Exit 2 for an unknown name."""
    from cbctl.core.operator import explain as ex

    st = state(ctx)
    fmt = output_format(ctx, output)

    def body() -> None:
        cfg = _gate_config(st)
        if name is None:
            rows = ex.summary(cfg)
            if fmt.structured:
                emit(fmt, {"items": rows})
            else:
                print_table(None, ["kind", "name", "meaning"], [(r["kind"], r["name"], r["meaning"]) for r in rows])
            return
        found = ex.explain(name, cfg)
        if fmt.structured:
            emit(fmt, {"items": [e.public() for e in found]})
            return
        for i, e in enumerate(found):
            if i:
                print()
            print(f"{e.kind} {e.name}: {e.meaning}")
            width = max(len(label) for label, _ in e.facts)
            for label, text in e.facts:
                print(f"  {label + ':':<{width + 1}} {text}")

    run_sync(body)
