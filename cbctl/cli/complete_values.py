"""Tab-completion callbacks for option and argument values (``shell_complete=`` of click/typer).

Contract: every callback takes ``(ctx, param, incomplete)``, returns a list of
:class:`CompletionItem` (possibly empty) and never raises: completion runs on every TAB, and a
traceback in the shell is worse than no candidates. Sources and their cost:

* flag names and values: the flag table (cbctl/core/model/flags.py), no I/O;
* context names: the contexts file, read with :mod:`tomllib` alone (no validation, no backend);
* runbook names: file names in the runbooks directory, nothing parsed;
* files and directories: the shell's own path completion (``file``/``dir`` items);
* node ids and lane ids: the configured ones (``expected-nodes``, the lane inventory) plus one
  best-effort store read under :data:`STORE_BUDGET` seconds
  (cbctl/core/backends/coord/peek.py), returning nothing more on any error.

Only the standard library and click's completion item are imported here; everything else is
imported inside the callback that needs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from typer._click.shell_completion import CompletionItem

#: Seconds one store read may take during completion (connect + request + reply).
STORE_BUDGET = 0.1


def _items(values: Iterable[str], incomplete: str, helps: dict[str, str] | None = None) -> list[CompletionItem]:
    seen: set[str] = set()
    out = []
    for v in values:
        if v.startswith(incomplete) and v not in seen:
            seen.add(v)
            out.append(CompletionItem(v, help=(helps or {}).get(v)))
    return out


def _root_param(ctx: Any, name: str) -> Any:
    """A root option's value as parsed so far (``--config``/``--context`` before the command)."""
    try:
        return ctx.find_root().params.get(name)
    except Exception:  # noqa: BLE001 - completion never raises
        return None


def _raw_config(ctx: Any) -> tuple[dict[str, Any], str | None]:
    """The contexts file as TOML (unvalidated) and the selected context name; ``{}`` on error."""
    import tomllib

    explicit = _root_param(ctx, "config") or os.environ.get("CBCTL_CONFIG")
    path = Path(explicit or "~/.config/cbctl/config.toml").expanduser()  # DEFAULT_CONFIG_PATH
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, None
    name = _root_param(ctx, "context") or os.environ.get("CBCTL_CONTEXT") or raw.get("current-context")
    return raw, name if isinstance(name, str) else None


# -- paths -----------------------------------------------------------------------------------


def files(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """The shell's own file completion."""
    return [CompletionItem(incomplete, type="file")]


def dirs(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """The shell's own directory completion."""
    return [CompletionItem(incomplete, type="dir")]


# -- flags -----------------------------------------------------------------------------------


def flag_names(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """Flag names, with their one-line help."""
    from cbctl.core.model.flags import FLAGS

    return _items(FLAGS, incomplete, {n: s.help for n, s in FLAGS.items()})


def flag_assignments(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """``NAME=`` for each flag, then (after ``NAME=``) that flag's values.

    Enum and bool flags: their allowed values. ``canary.lanes``: lane ids (inventory and
    store), completed item by item after commas. Other list/int flags: nothing to offer.
    """
    from cbctl.core.model.flags import CANARY_LANES, FLAGS

    name, eq, value = incomplete.partition("=")
    if not eq:
        return _items((f"{n}=" for n in FLAGS), incomplete, {f"{n}=": s.help for n, s in FLAGS.items()})
    spec = FLAGS.get(name)
    if spec is None:
        return []
    if spec.kind == "bool":
        values: Iterable[str] = ("true", "false")
    elif spec.kind == "enum":
        values = spec.allowed
    elif name == CANARY_LANES:
        done, _, _ = value.rpartition(",")
        head = f"{done}," if done else ""
        taken = set(done.split(",")) if done else set()
        values = [head + lane for lane in lane_ids(ctx) if lane not in taken]
    else:
        return []
    return _items((f"{name}={v}" for v in values), incomplete)


# -- contexts and runbooks ---------------------------------------------------------------------


def context_names(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """Context names from the contexts file (``--config``, else CBCTL_CONFIG, else the default)."""
    raw, _ = _raw_config(ctx)
    contexts = raw.get("contexts")
    if not isinstance(contexts, dict):
        return []
    helps = {n: f"cluster {c.get('cluster')}" for n, c in contexts.items() if isinstance(c, dict) and c.get("cluster")}
    return _items(sorted(contexts), incomplete, helps)


def runbook_names(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """Runbook names (``*.yaml`` stems of ``--dir``, else the default directory); a path when
    the word looks like one (contains ``/`` or starts with ``.`` or ``~``)."""
    if "/" in incomplete or incomplete.startswith((".", "~")):
        return files(ctx, param, incomplete)
    directory = ctx.params.get("directory") if ctx is not None else None
    try:
        if directory is None:
            from cbctl.core.operator.runbook.parser import default_runbooks_dir

            directory = default_runbooks_dir()
        names = sorted(p.stem for p in Path(directory).glob("*.yaml"))
    except Exception:  # noqa: BLE001 - completion never raises
        return []
    return _items(names, incomplete)


# -- store-backed: node ids and lane ids -----------------------------------------------------


def _store_ids(ctx: Any, kind: str) -> list[str]:
    """Ids under ``/cbctl/<cluster>/<kind>/`` from one bounded store read; [] on any error."""
    raw, name = _raw_config(ctx)
    try:
        c = raw["contexts"][name]
        cluster = c["cluster"]
        from cbctl.core.backends.coord.peek import list_key_suffixes

        return list_key_suffixes(c.get("coordination") or {}, f"/cbctl/{cluster}/{kind}/", timeout=STORE_BUDGET)
    except Exception:  # noqa: BLE001 - completion never raises
        return []


def _configured(ctx: Any, key: str) -> list[str]:
    raw, name = _raw_config(ctx)
    try:
        c = raw["contexts"][name]
    except (KeyError, TypeError):
        return []
    if key == "lanes":
        if isinstance(c.get("lanes"), list):
            return [str(x) for x in c["lanes"]]
        count = c.get("lane-count")
        if not (isinstance(count, int) and 0 < count <= 4096):
            return []
        width = max(2, len(str(count - 1)))  # as cbctl/core/model/config.py lane_names
        return [f"lane-{i:0{width}d}" for i in range(count)]
    value = c.get(key)
    return [str(x) for x in value] if isinstance(value, list) else []


def node_ids(ctx: Any, param: Any = None, incomplete: str = "") -> list[CompletionItem]:
    """Live node ids (store) and expected ones (contexts file)."""
    return _items(sorted(set(_store_ids(ctx, "nodes")) | set(_configured(ctx, "expected-nodes"))), incomplete)


def lane_ids(ctx: Any) -> list[str]:
    """Lane ids: the context's inventory, plus lanes owned in the store."""
    return sorted(set(_configured(ctx, "lanes")) | set(_store_ids(ctx, "lanes")))


def lane_id_items(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """Lane ids as completion items."""
    return _items(lane_ids(ctx), incomplete)
