"""`cbctl config view|get-contexts|use-context|set-context`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cbctl.cli import complete_values as cv
from cbctl.cli.common import (
    NoHeadersOpt,
    OutputOpt,
    emit,
    err,
    new_app,
    output_format,
    print_table,
    run_sync,
    snake_keys,
    state,
)

app = new_app("Contexts file (~/.config/cbctl/config.toml; env CBCTL_CONFIG).")


@app.command("view")
def view(ctx: typer.Context, output: OutputOpt = None) -> None:
    """Print the contexts file with anything secret-looking redacted (it holds only references).

    As TOML (the file's own kebab-case keys) by default; -o json/yaml give the same data with
    snake_case keys, like every other JSON of cbctl. The file is validated as it is loaded (a
    credential inside a URL is refused there, exit 2); URL userinfo is redacted here as well, as a
    second line of defence."""
    from cbctl.core.model.redaction import redacted

    st = state(ctx)
    fmt = output_format(ctx, output)

    def body() -> None:
        cfg = st.config()
        data = redacted(cfg.raw)
        if fmt.structured:
            emit(fmt, snake_keys(data))
        else:
            import tomli_w

            print(f"# {cfg.path}")
            print(tomli_w.dumps(data), end="")

    run_sync(body)


@app.command("get-contexts")
def get_contexts(ctx: typer.Context, output: OutputOpt = None, no_headers: NoHeadersOpt = False) -> None:
    """List contexts; the current one is marked. URL userinfo is never shown."""
    from cbctl.core.model.redaction import redact_url

    st = state(ctx)
    fmt = output_format(ctx, output, no_headers)

    def body() -> None:
        cfg = st.config(missing_ok=True)
        rows = []
        for name in cfg.context_names():
            raw = cfg.raw["contexts"][name]
            rows.append({
                "name": name,
                "current": name == cfg.current_context,
                "cluster": raw.get("cluster", name),
                "backend": raw.get("coordination", {}).get("backend", "etcd"),
                "endpoints": [redact_url(str(e)) for e in raw.get("coordination", {}).get("endpoints", [])],
            })
        if fmt.structured:
            emit(fmt, {"current": cfg.current_context, "contexts": rows})
        else:
            print_table(None, ["current", "name", "cluster", "backend", "endpoints"],
                        [("*" if r["current"] else "", r["name"], r["cluster"], r["backend"], ",".join(r["endpoints"])) for r in rows])

    run_sync(body)


@app.command("use-context")
def use_context(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Context to make current.", shell_complete=cv.context_names)]) -> None:
    """Make NAME the current context."""
    from cbctl.core.model.errors import ConfigError

    st = state(ctx)

    def body() -> None:
        cfg = st.config()
        if name not in cfg.context_names():
            raise ConfigError(f"{cfg.path}: context {name!r} is not defined (known: {', '.join(cfg.context_names()) or 'none'})")
        cfg.raw["current-context"] = name
        cfg.save()
        err(f"current context: {name}")

    run_sync(body)


@app.command("set-context")
def set_context(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Context name (created or updated).", shell_complete=cv.context_names)],
    cluster: Annotated[str | None, typer.Option("--cluster", help="Cluster name (key prefix /cbctl/<cluster>/).")] = None,
    etcd: Annotated[list[str] | None, typer.Option("--etcd", help="etcd endpoint URL (repeat for several).")] = None,
    consul: Annotated[str | None, typer.Option("--consul", help="Consul URL (sets backend = consul).")] = None,
    nats: Annotated[list[str] | None, typer.Option("--nats", help="NATS server URL (repeat for several).")] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL (no credentials in it).")] = None,
    prometheus: Annotated[str | None, typer.Option("--prometheus", help="Prometheus base URL.")] = None,
    lane_count: Annotated[int | None, typer.Option("--lane-count", help="Lanes lane-00..lane-(N-1).")] = None,
    nats_user: Annotated[str | None, typer.Option("--nats-user", help="NATS user name.")] = None,
    nats_password_env: Annotated[str | None, typer.Option("--nats-password-env", help="Name of the env var holding the NATS password.")] = None,
    nats_creds_file: Annotated[str | None, typer.Option("--nats-creds-file", help="Path of a NATS .creds file.", shell_complete=cv.files)] = None,
    etcd_user: Annotated[str | None, typer.Option("--etcd-user", help="etcd user name.")] = None,
    etcd_password_env: Annotated[str | None, typer.Option("--etcd-password-env", help="Name of the env var holding the etcd password.")] = None,
    use: Annotated[bool, typer.Option("--use/--no-use", help="Also make it the current context.")] = False,
) -> None:
    """Create or update a context. Secrets are given by reference only (env var name or file)."""
    from cbctl.core.model.config import parse_context

    st = state(ctx)

    def body() -> None:
        cfg = st.config(missing_ok=True)
        contexts = cfg.raw.setdefault("contexts", {})
        table: dict[str, Any] = dict(contexts.get(name, {}))
        if cluster:
            table["cluster"] = cluster
        if lane_count is not None:
            table.pop("lanes", None)
            table["lane-count"] = lane_count
        coord = dict(table.get("coordination", {}))
        if etcd:
            coord.update(backend="etcd", endpoints=list(etcd))
        if consul:
            coord.update(backend="consul", endpoints=[consul])
        if etcd_user:
            coord["username"] = etcd_user
        if etcd_password_env:
            coord["password-env"] = etcd_password_env
        if coord:
            table["coordination"] = coord
        n = dict(table.get("nats", {}))
        if nats:
            n["servers"] = list(nats)
        if nats_user:
            n["user"] = nats_user
        if nats_password_env:
            n["password-env"] = nats_password_env
        if nats_creds_file:
            n["creds-file"] = nats_creds_file
        if n:
            table["nats"] = n
        if redis:
            table["redis"] = {**table.get("redis", {}), "url": redis}
        if prometheus:
            table["prometheus"] = {**table.get("prometheus", {}), "url": prometheus}
        # Validate before writing: a bad context is never saved.
        parse_context(name, table, where=f"context {name}")
        contexts[name] = table
        if use or not cfg.current_context:
            cfg.raw["current-context"] = name
        cfg.save()
        err(f"context {name!r} saved to {cfg.path}" + (" (current)" if cfg.raw.get("current-context") == name else ""))

    run_sync(body)
