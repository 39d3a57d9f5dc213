"""Typed records stored in the coordination store, each with ONE parse and ONE serialise.

Contract: ``to_json()`` gives exactly the bytes the writers store today (compact JSON, keys
sorted, see the key layout in cbctl/core/model/keys.py); ``from_dict()`` is as lenient as the
readers have always been: a field that is missing or of the wrong type reads as ``None`` (an
empty tuple for lists), unknown keys are kept in ``extra`` and written back. Pure, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="_Record")


def dump(obj: Any) -> bytes:
    """The store's JSON encoding of a record: compact, keys sorted, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num(v: Any) -> float | int | None:
    # Kept as stored (an int stays an int), so re-serialising gives the same bytes.
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _str_tuple(v: Any) -> tuple[str, ...]:
    return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else ()


@dataclass(frozen=True)
class _Record:
    """Base: field conversion table, extra keys, dict/JSON round trip."""

    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True)
    _CONVERT: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def from_dict(cls: type[R], data: object) -> R:
        """Parse a decoded record; a non-object reads as an empty record (all ``None``)."""
        d = data if isinstance(data, Mapping) else {}
        names = [f.name for f in fields(cls) if f.name != "extra"]
        values = {n: cls._CONVERT[n](d.get(n)) for n in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**values, extra=extra)

    @classmethod
    def from_json(cls: type[R], raw: bytes | str, *, require_object: bool = False) -> R:
        """Decode and parse; raises ``ValueError`` for bytes that are not JSON (as readers expect).

        ``require_object``: also raise ``ValueError("not a JSON object")`` for JSON that is not
        an object (readers that report or skip such a record instead of reading it as empty).
        """
        decoded = json.loads(raw)
        if require_object and not isinstance(decoded, Mapping):
            raise ValueError("not a JSON object")
        return cls.from_dict(decoded)

    def to_dict(self) -> dict[str, Any]:
        """The stored shape: extra keys first, then the fields (the fields win, as in the writers)."""
        out = dict(self.extra)
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_json(self) -> bytes:
        return dump(self.to_dict())


@dataclass(frozen=True)
class NodeRecord(_Record):
    """A live agent's record at ``keys.node(cluster, node_id)``, on the agent's lease.

    Written by the agent's session (cbctl/core/agent/session.py); ``extra`` carries
    ``probes``/``clock`` (preflight probes) and any other ``extra_record_fields``.
    """

    node_id: str | None = None
    machine_id: str | None = None  # uuid persisted in --state-dir
    instance_id: str | None = None  # random per process start
    host: str | None = None
    pid: int | None = None
    version: str | None = None
    started_at: float | None = None
    lease: str | None = None  # lease id (hex) the record hangs on
    session: int | None = None  # 1 + re-registrations after a lost lease
    applied_revision: int | None = None
    cluster_enabled: bool | None = None
    guard: str | None = None  # the ownership.guard value applied
    lanes: tuple[str, ...] = ()
    heartbeat: float | None = None
    http: str | None = None

    _CONVERT: ClassVar[Mapping[str, Any]] = {
        "node_id": _str, "machine_id": _str, "instance_id": _str, "host": _str, "pid": _int, "version": _str,
        "started_at": _num, "lease": _str, "session": _int, "applied_revision": _int, "cluster_enabled": _bool,
        "guard": _str, "lanes": _str_tuple, "heartbeat": _num, "http": _str,
    }

    @property
    def probes(self) -> Mapping[str, Any] | None:
        """The preflight reachability report (``extra["probes"]``), None when absent or not an object."""
        v = self.extra.get("probes")
        return v if isinstance(v, Mapping) else None

    @property
    def clock(self) -> Mapping[str, Any] | None:
        """The clock-offset report (``extra["clock"]``), None when absent or not an object."""
        v = self.extra.get("clock")
        return v if isinstance(v, Mapping) else None


@dataclass(frozen=True)
class LaneOwnerRecord(_Record):
    """The owner key of a lane at ``keys.lane(cluster, lane)`` (cbctl/core/agent/ownership.py);
    its create_revision is the fencing token, not a field."""

    lane: str | None = None
    owner: str | None = None
    instance_id: str | None = None
    since: float | None = None

    _CONVERT: ClassVar[Mapping[str, Any]] = {"lane": _str, "owner": _str, "instance_id": _str, "since": _num}


def lane_owner_in(raw: bytes | None) -> str | None:
    """The owner's node id in a lane owner key's value (``raw``; None = no key): None when the
    lane is free, the value is not JSON, or it names no owner. The one reading of "who owns
    this lane" shared by the agent's signal router and ``cbctl signal send``."""
    if raw is None:
        return None
    try:
        owner = LaneOwnerRecord.from_json(raw).owner
    except ValueError:
        return None
    return owner or None


@dataclass(frozen=True)
class ConflictRecord(_Record):
    """A conflict at ``keys.conflict(cluster, node_id, instance_id)`` (unleased evidence).

    ``kind`` ``"unstable-node-id"`` carries host, machine_id, previous_host and
    previous_machine_id in ``extra``; a reader shows an undecodable one as ``kind="unreadable"``.
    """

    node_id: str | None = None
    instance_id: str | None = None
    at: float | None = None
    kind: str | None = None

    _CONVERT: ClassVar[Mapping[str, Any]] = {"node_id": _str, "instance_id": _str, "at": _num, "kind": _str}


@dataclass(frozen=True)
class RefusalRecord(_Record):
    """A refused duplicate start at ``keys.refusal(cluster, node_id, instance_id)``, on a lease
    of its own that expires after ``expires_in`` seconds (``kind="duplicate-node-id"``)."""

    node_id: str | None = None
    instance_id: str | None = None
    at: float | None = None
    expires_in: float | None = None
    kind: str | None = None
    host: str | None = None
    pid: int | None = None
    holder_instance_id: str | None = None
    holder_host: str | None = None
    holder_pid: int | None = None

    _CONVERT: ClassVar[Mapping[str, Any]] = {
        "node_id": _str, "instance_id": _str, "at": _num, "expires_in": _num, "kind": _str, "host": _str,
        "pid": _int, "holder_instance_id": _str, "holder_host": _str, "holder_pid": _int,
    }


@dataclass(frozen=True)
class IdentityRecord(_Record):
    """Which machine runs a node id, at ``keys.identity(cluster, node_id)``."""

    node_id: str | None = None
    machine_id: str | None = None
    host: str | None = None
    first_seen: float | None = None
    last_seen: float | None = None

    _CONVERT: ClassVar[Mapping[str, Any]] = {
        "node_id": _str, "machine_id": _str, "host": _str, "first_seen": _num, "last_seen": _num,
    }


__all__ = [
    "ConflictRecord", "IdentityRecord", "LaneOwnerRecord", "NodeRecord", "RefusalRecord", "dump", "lane_owner_in",
]
