"""Node registration in the coordination store: the leased record of each live agent, the
machine identity, refusals of a duplicate node id and conflict records (see docs/agent.md,
"Refuse-first start" and "The node record").

Contract: the record at ``keys.node(cluster, node_id)`` hangs on the node's lease and is created
with create-if-absent (:func:`register`).  A refused duplicate writes only a *leased* refusal
report at ``keys.refusal(cluster, node_id, instance_id)`` (:func:`record_refusal`) that expires
after :data:`REFUSAL_TTL` seconds, never anything of the holder's.  A node id seen on another
machine than last time (``keys.identity``) is recorded, unleased, at ``keys.conflict(cluster,
node_id, instance_id)`` with ``kind = "unstable-node-id"`` by the instance that holds the id;
:func:`clear_conflicts` removes such records once resolved.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cbctl.core.model import keys
from cbctl.core.backends.coord.base import Coordinator, Lease
from cbctl.core.model.errors import BadInput, Conflict
from cbctl.core.model.records import ConflictRecord, IdentityRecord, NodeRecord, RefusalRecord

log = logging.getLogger(__name__)

MACHINE_ID_FILE = "machine-id"
REFUSAL_TTL = 900.0
"""Seconds a refused duplicate start stays reported (:func:`record_refusal`)."""

__all__ = [
    "NodeIdConflict",
    "NodeView",
    "default_state_dir",
    "load_machine_id",
    "register",
    "record_conflict",
    "check_identity",
    "clear_conflicts",
    "holder_conflict",
    "peek_machine_id",
    "read_conflicts",
    "read_holder",
    "read_refusals",
    "record_refusal",
    "save_machine_id",
    "read_nodes",
    "validate_node_id",
]


class NodeIdConflict(Conflict):
    """The node id is held by another live instance; carries the holder's record."""

    def __init__(self, message: str, *, key: str, holder: NodeRecord) -> None:
        super().__init__(message, key=key)
        self.holder = holder


def validate_node_id(node_id: str) -> str:
    """Return ``node_id`` if usable in store keys, Redis consumer names and metric labels."""
    if not node_id or len(node_id) > 128 or any(c in node_id for c in "/: \t\n*>") or node_id in (".", ".."):
        raise BadInput(f"invalid node id {node_id!r}: non-empty, at most 128 characters, no '/', ':', '*', '>' or whitespace")
    return node_id


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/cbctl`` or ``~/.local/state/cbctl``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "cbctl"


def peek_machine_id(state_dir: Path) -> str | None:
    """The machine identity persisted in ``state_dir``, or None if there is none yet.

    Reads only: a start that may still be refused must not create the file.  Raises
    ``BadInput`` when the file is unreadable or not an identity.
    """
    path = state_dir / MACHINE_ID_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the machine identity: {exc.strerror}") from None
    if not text:
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise BadInput(f"{path}: not a machine identity (uuid): {text[:40]!r}") from None


def save_machine_id(state_dir: Path, machine_id: str) -> str:
    """Persist ``machine_id`` in ``state_dir`` unless one is there already; return the one kept.

    The file is written to a temporary name and renamed, so a crash never leaves a half id; two
    agents racing on first use may each write one, but both then read back the same winner.
    """
    path = state_dir / MACHINE_ID_FILE
    existing = peek_machine_id(state_dir)
    if existing is not None:
        return existing
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MACHINE_ID_FILE}.{os.getpid()}.tmp")
        tmp.write_text(str(uuid.UUID(machine_id)) + "\n", encoding="utf-8")
        if not path.exists():
            os.replace(tmp, path)
        else:
            tmp.unlink()
        return str(uuid.UUID(path.read_text(encoding="utf-8").strip()))
    except OSError as exc:
        raise BadInput(f"{state_dir}: cannot persist the machine identity: {exc.strerror}") from None


def load_machine_id(state_dir: Path) -> str:
    """The machine identity persisted in ``state_dir`` (created on first use)."""
    return peek_machine_id(state_dir) or save_machine_id(state_dir, str(uuid.uuid4()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def holder_is_dead_local(holder: NodeRecord, *, machine_id: str, host: str) -> bool:
    """True when the record was left by a dead process of *this* machine (a crash + restart):
    the caller may wait for its lease to expire instead of refusing to start."""
    pid = holder.pid
    return (
        holder.machine_id == machine_id
        and holder.host == host
        and pid is not None
        and pid != os.getpid()
        and not _pid_alive(pid)
    )


async def register(coord: Coordinator, cluster: str, node_id: str, record: NodeRecord, lease: Lease) -> int:
    """Create the node record attached to ``lease`` if absent; return its revision.

    Raises :class:`NodeIdConflict` (with the holder's record) when the key exists, and
    ``BackendUnavailable`` when the store cannot be reached.
    """
    key = keys.node(cluster, node_id)
    try:
        return await coord.create(key, record.to_json(), lease=lease)
    except Conflict:
        holder = await read_holder(coord, cluster, node_id)
        raise holder_conflict(node_id, key, holder or NodeRecord()) from None


def holder_conflict(node_id: str, key: str, holder: NodeRecord) -> NodeIdConflict:
    """The refusal for ``node_id`` held by ``holder`` (its record), naming host and instance."""
    return NodeIdConflict(
        f"node id {node_id!r} is already registered by a live instance: host {_or_unknown(holder.host)}, "
        f"instance {_or_unknown(holder.instance_id)}, pid {_or_unknown(holder.pid)} "
        f"(since {_fmt_time(holder.started_at)}); refusing to start a second one",
        key=key,
        holder=holder,
    )


async def read_holder(coord: Coordinator, cluster: str, node_id: str) -> NodeRecord | None:
    """The record currently registered under ``node_id`` (an empty record if unreadable), or None."""
    kv = await coord.get(keys.node(cluster, node_id))
    if kv is None:
        return None
    try:
        return NodeRecord.from_json(kv.value)
    except ValueError:
        return NodeRecord()


async def record_refusal(coord: Coordinator, cluster: str, node_id: str, instance_id: str, info: RefusalRecord,
                         *, ttl: float = REFUSAL_TTL) -> None:
    """Report a refused duplicate start on a lease of its own that expires after ``ttl`` s.

    ``info`` carries the kind, the refused start and its holder; node id, instance, ``at`` and
    ``expires_in`` are set here.  Touches none of the holder's keys and is not a conflict record
    (docs/agent.md).  The lease is never kept alive, so the report disappears by itself.  Raises
    ``BackendUnavailable``.
    """
    lease = await coord.grant_lease(ttl)
    body = replace(info, node_id=node_id, instance_id=instance_id, at=time.time(), expires_in=ttl)
    await coord.put(keys.refusal(cluster, node_id, instance_id), body.to_json(), lease=lease)


async def read_refusals(coord: Coordinator, cluster: str) -> dict[str, list[dict[str, Any]]]:
    """Refused duplicate starts of the last :data:`REFUSAL_TTL` seconds, by node id, oldest first.

    Each is read through :class:`RefusalRecord` and given in its stored shape (``to_dict``: every
    field present); undecodable or non-object values are skipped.
    """
    found: dict[str, list[RefusalRecord]] = {}
    prefix = keys.refusals_prefix(cluster)
    for kv in await coord.list(prefix):
        try:
            rec = RefusalRecord.from_json(kv.value, require_object=True)
        except ValueError:
            continue
        found.setdefault(kv.key[len(prefix):].split("/", 1)[0], []).append(rec)
    return {node_id: [r.to_dict() for r in sorted(items, key=lambda r: r.at or 0)]
            for node_id, items in found.items()}


async def clear_conflicts(coord: Coordinator, cluster: str, node_id: str | None = None) -> list[str]:
    """Delete the conflict records (of ``node_id``, or all); return the keys deleted."""
    prefix = keys.conflicts_prefix(cluster) + (f"{node_id}/" if node_id else "")
    deleted = []
    for kv in await coord.list(prefix):
        if await coord.delete(kv.key, expected_revision=kv.mod_revision):
            deleted.append(kv.key)
    return deleted


async def record_conflict(coord: Coordinator, cluster: str, node_id: str, instance_id: str, info: ConflictRecord) -> None:
    """Leave a conflict record for preflight / ``cbctl nodes`` (unleased, see the module doc).

    ``info`` carries the kind and its evidence; node id, instance and ``at`` are set here.
    """
    body = replace(info, node_id=node_id, instance_id=instance_id, at=time.time())
    await coord.put(keys.conflict(cluster, node_id, instance_id), body.to_json())


async def check_identity(
    coord: Coordinator, cluster: str, node_id: str, *, machine_id: str, host: str, instance_id: str
) -> IdentityRecord | None:
    """Record which machine runs ``node_id``; if it was another machine before, record an
    "unstable-node-id" conflict and return the previous identity (else None)."""
    key = keys.identity(cluster, node_id)
    previous: IdentityRecord | None = None
    kv = await coord.get(key)
    if kv is not None:
        try:
            previous = IdentityRecord.from_json(kv.value, require_object=True)
        except ValueError:
            previous = None
    now = time.time()
    moved = previous is not None and previous.machine_id != machine_id
    if previous is not None and moved:
        log.warning(
            "node id %s moved from machine %s (host %s) to machine %s (host %s): unstable node id",
            node_id, previous.machine_id, previous.host, machine_id, host,
        )
        await record_conflict(
            coord, cluster, node_id, instance_id,
            ConflictRecord(kind="unstable-node-id", extra={
                "host": host,
                "machine_id": machine_id,
                "previous_host": previous.host,
                "previous_machine_id": previous.machine_id,
            }),
        )
    first_seen = previous.first_seen if previous is not None and not moved else None
    await coord.put(key, IdentityRecord(node_id=node_id, machine_id=machine_id, host=host,
                                        first_seen=now if first_seen is None else first_seen, last_seen=now).to_json())
    return previous if moved else None


async def read_conflicts(coord: Coordinator, cluster: str) -> dict[str, list[ConflictRecord]]:
    """Every recorded conflict, grouped by node id, oldest first (an undecodable one reads as
    ``kind="unreadable"``; a non-object value is skipped)."""
    out: dict[str, list[ConflictRecord]] = {}
    prefix = keys.conflicts_prefix(cluster)
    for kv in await coord.list(prefix):
        node_id = kv.key[len(prefix):].split("/", 1)[0]
        try:
            decoded = json.loads(kv.value)
        except ValueError:
            decoded = {"kind": "unreadable"}
        if isinstance(decoded, dict):
            out.setdefault(node_id, []).append(ConflictRecord.from_dict(decoded))
    for items in out.values():
        items.sort(key=lambda r: r.at or 0)
    return out


@dataclass(frozen=True)
class NodeView:
    """One row of ``cbctl nodes`` (also its JSON item, via :meth:`public`)."""

    node_id: str
    host: str | None
    instance_id: str | None
    applied_revision: int | None
    lag: int | None
    lanes: int
    heartbeat: float | None
    conflicts: int
    live: bool
    http: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "host": self.host,
            "instance_id": self.instance_id,
            "applied_revision": self.applied_revision,
            "lag": self.lag,
            "lanes": self.lanes,
            "heartbeat": self.heartbeat,
            "conflicts": self.conflicts,
        }


async def read_nodes(coord: Coordinator, cluster: str) -> tuple[list[NodeView], int]:
    """Every live node, plus node ids that only have conflicts; and the current rollout revision.

    ``lag`` is how many rollout document versions the node is behind (transitions in the audit
    log made since the revision it applied; 0 when current).  Node ids with conflicts but no live
    record are listed with ``live=False`` and no instance.
    """
    rollout_kv = await coord.get(keys.rollout(cluster))
    current = rollout_kv.mod_revision if rollout_kv is not None else 0
    audit_prefix = keys.audit_prefix(cluster)
    # Audit keys are keyed by the revision each transition replaced; the one replacing `current`
    # is not there yet, so "revisions a node still has to apply" = entries with from >= applied.
    transitions = []
    for kv in await coord.list(audit_prefix):
        try:
            # `<from-revision>-<unique id>` (see keys.audit)
            transitions.append(int(kv.key[len(audit_prefix):].split("-", 1)[0]))
        except ValueError:
            continue
    conflicts = await read_conflicts(coord, cluster)
    views: list[NodeView] = []
    prefix = keys.nodes_prefix(cluster)
    seen: set[str] = set()
    for kv in await coord.list(prefix):
        node_id = kv.key[len(prefix):]
        try:
            rec = NodeRecord.from_json(kv.value, require_object=True)
        except ValueError:
            continue
        seen.add(node_id)
        applied = rec.applied_revision
        if applied is None:
            lag = None
        elif applied >= current:
            lag = 0
        else:
            lag = max(1, sum(1 for t in transitions if applied <= t < current))
        views.append(
            NodeView(
                node_id=node_id,
                host=rec.host,
                instance_id=rec.instance_id,
                applied_revision=applied,
                lag=lag,
                lanes=len(rec.lanes),
                heartbeat=float(rec.heartbeat) if rec.heartbeat is not None else None,
                conflicts=len(conflicts.get(node_id, [])),
                live=True,
                http=rec.http,
            )
        )
    for node_id, items in sorted(conflicts.items()):
        if node_id not in seen:
            views.append(NodeView(node_id, None, None, None, None, 0, None, len(items), live=False))
    views.sort(key=lambda v: v.node_id)
    return views, current


def _or_unknown(value: object) -> str:
    return "?" if value is None else str(value)


def _fmt_time(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
