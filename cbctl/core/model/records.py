"""Typed records stored in the coordination store, each with ONE parse and ONE serialise
(node, lane owner, conflict, refusal, identity, runbook run).

Contract of the store records (the :class:`_Record` s): ``to_json()`` gives exactly the bytes the writers store today (compact JSON, keys
sorted, see the key layout in cbctl/core/model/keys.py); ``from_dict()`` is as lenient as the
readers have always been: a field that is missing or of the wrong type reads as ``None`` (an
empty tuple for lists), unknown keys are kept in ``extra`` and written back. The run record has its own rules
(:meth:`RunRecord.from_dict`). Pure, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, Literal, TypeVar

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


# -- runbook runs ----------------------------------------------------------------------------
# Not a _Record: the run record has required fields, is stored with the store's plain
# ``json.dumps(sort_keys=True)`` (cbctl/core/operator/runbook/store.py) and its parse gives
# defaults rather than None.

RunStatus = Literal["running", "completed", "failed", "aborted", "interrupted"]

STEP_STOPPED: Final = ("failed", "declined", "interrupted")
"""Step statuses that stop a run (the step a resumed run may continue at or before)."""


@dataclass
class StepOutcome:
    """What happened to one step. ``status``: ``ok`` | ``failed`` | ``declined`` |
    ``interrupted`` | ``skipped`` (before ``--from-step``) | ``not-run`` (after a stop)."""

    index: int
    kind: str
    text: str
    status: str
    exit_code: int | None = None
    seconds: float = 0.0
    detail: str = ""
    # Store revisions of the run record saved just before and just after the step: every write
    # the step made (its audit entries) has a revision strictly between them. None when the
    # record could not be written (then the step's writes cannot be attributed).
    revisions: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "text": self.text, "status": self.status,
                "exit_code": self.exit_code, "seconds": round(self.seconds, 3), "detail": self.detail,
                "revisions": self.revisions}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepOutcome:
        """Parse a stored step (lenient: odd fields read as their defaults); the caller drops a
        step without an integer ``index`` (see :meth:`RunRecord.from_dict`)."""
        revisions = data.get("revisions")
        return cls(
            index=_int(data.get("index")) or 0,
            kind=_str(data.get("kind")) or "",
            text=_str(data.get("text")) or "",
            status=_str(data.get("status")) or "",
            exit_code=_int(data.get("exit_code")),
            seconds=float(_num(data.get("seconds")) or 0.0),
            detail=_str(data.get("detail")) or "",
            revisions=[r for r in revisions if _int(r) is not None] if isinstance(revisions, list) else None,
        )


@dataclass
class RunRecord:
    """A run as stored at ``keys.runbook_run(cluster, run_id)`` (JSON, see :meth:`to_json`).

    ``status`` is ``running`` while the run is in progress (a crashed run stays so), then
    ``completed`` | ``failed`` | ``aborted`` (declined at a prompt) | ``interrupted`` (SIGINT or
    SIGTERM: ``interrupted_by`` names it). Times are Unix seconds. ``vars`` holds values, secrets
    as ``<secret>``. ``resume`` is the command to continue a run that did not complete (None
    when completed); ``resumes`` the run this one continues. ``overrides``: for a run that
    stopped, the rollback overrides in force when it stopped (each with ``by_this_run`` and the
    command that lifts it); None when not looked at.
    """

    run_id: str
    runbook: str
    kind: str
    actor: str
    started_at: float
    from_step: int
    vars: dict[str, str]
    steps: list[StepOutcome]
    finished_at: float | None = None
    status: RunStatus = "running"
    resume: str | None = None
    cluster: str | None = None
    drill: str | None = None
    runbook_sha256: str = ""
    resumes: str | None = None
    interrupted_by: str | None = None
    overrides: list[dict[str, Any]] | None = None
    record_error: str | None = None  # not stored: set when the store could not be written

    @property
    def failed_step(self) -> StepOutcome | None:
        """The step the run stopped at (failed, declined or interrupted), if any."""
        return next((s for s in self.steps if s.status in STEP_STOPPED), None)

    @property
    def stopped_step(self) -> int | None:
        """The index of :attr:`failed_step` (None when no step stopped the run)."""
        step = self.failed_step
        return step.index if step is not None else None

    @property
    def done_steps(self) -> list[StepOutcome]:
        return [s for s in self.steps if s.status == "ok"]

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "runbook": self.runbook,
            "kind": self.kind,
            "actor": self.actor,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "from_step": self.from_step,
            "steps": [s.to_json() for s in self.steps],
            "vars": dict(self.vars),
            "resume": self.resume,
            "cluster": self.cluster,
            "drill": self.drill,
            "runbook_sha256": self.runbook_sha256,
            "resumes": self.resumes,
            "interrupted_by": self.interrupted_by,
            "overrides": self.overrides,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """The one parse of a stored run record (inverse of :meth:`to_json` for what it wrote).

        Lenient like its readers always were: a missing or mistyped field reads as its default
        (strings ``""``, ``from_step`` 1, optional fields None), ``vars`` keeps string values
        only, and a step that is not an object or has no integer ``index`` is left out.
        """
        steps = [StepOutcome.from_dict(s) for s in data.get("steps") or ()
                 if isinstance(s, Mapping) and _int(s.get("index")) is not None]
        raw_vars = data.get("vars")
        overrides = data.get("overrides")
        finished = _num(data.get("finished_at"))
        return cls(
            run_id=_str(data.get("run_id")) or "",
            runbook=_str(data.get("runbook")) or "",
            kind=_str(data.get("kind")) or "",
            actor=_str(data.get("actor")) or "",
            started_at=float(_num(data.get("started_at")) or 0.0),
            from_step=_int(data.get("from_step")) or 1,
            vars={k: v for k, v in raw_vars.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(raw_vars, Mapping) else {},
            steps=steps,
            finished_at=float(finished) if finished is not None else None,
            status=_str(data.get("status")) or "",  # type: ignore[arg-type]  # kept as stored
            resume=_str(data.get("resume")),
            cluster=_str(data.get("cluster")),
            drill=_str(data.get("drill")),
            runbook_sha256=_str(data.get("runbook_sha256")) or "",
            resumes=_str(data.get("resumes")),
            interrupted_by=_str(data.get("interrupted_by")),
            overrides=[dict(o) for o in overrides if isinstance(o, Mapping)] if isinstance(overrides, list) else None,
        )


__all__ = [
    "STEP_STOPPED", "ConflictRecord", "IdentityRecord", "LaneOwnerRecord", "NodeRecord", "RefusalRecord",
    "RunRecord", "RunStatus", "StepOutcome", "dump", "lane_owner_in",
]
