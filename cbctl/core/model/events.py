"""The canonical lifecycle event: schema, versioned encoding, subjects and ids.

Contract: the wire format (v1 fields; v2 adds ``attempt``), the subject layout
``cb.<cluster>.events.v<schema>.<token>``, ``Nats-Msg-Id`` = ``<event_id>.v<schema>`` and the
deterministic event id are all in docs/model.md (Events). Decoding is strict: anything off is a
:class:`BadEvent`, never a crash. Pure, no I/O.
"""

from __future__ import annotations

import json
import json.encoder
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from cbctl.core.model.errors import CbctlError

SUPPORTED_SCHEMA_VERSIONS: Final = (1, 2)
LATEST_SCHEMA_VERSION: Final = 2
SUBJECT_ROOT: Final = "cb"
SUBJECT_KIND: Final = "events"
MAX_EVENT_BYTES: Final = 1024 * 1024  # nats-server's default max_payload
MAX_ID_LENGTH: Final = 256

#: Namespace of deterministic event ids (a fixed uuid4; changing it changes every id).
EVENT_ID_NAMESPACE: Final = uuid.UUID("6f1c3d2e-8a4b-4c5d-9e7f-0a1b2c3d4e5f")

#: Every reason a :class:`BadEvent` may carry (bounded: used as a metric label).
BAD_EVENT_REASONS: Final = (
    "not_utf8",  # the bytes are not UTF-8
    "not_json",  # UTF-8 but not JSON
    "not_object",  # JSON, but not an object
    "unknown_version",  # schema_version missing/not an int, or not one we support
    "malformed",  # a field is missing, unexpected, of the wrong type or out of range
    "too_large",  # encoded size above MAX_EVENT_BYTES
    "subject_mismatch",  # the subject does not match the body's version/workflow
)

# One encoder for all calls: json.dumps with non-default options builds a new encoder per call
# (measured: half the cost of encoding an event).  allow_nan=False: NaN/Infinity are not JSON
# and other consumers would choke on them.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# JSON string literal of a str, non-ASCII kept as is (like ensure_ascii=False); C implementation.
_json_str: Final = json.encoder.encode_basestring

# Any character outside printable ASCII, or one of the four NATS/escape specials "% * . >".
_UNSAFE_TOKEN_CHAR: Final = re.compile(r"[^\x21-\x24\x26-\x29\x2b-\x2d\x2f-\x3d\x3f-\x7e]")

_FIELDS_V1: Final = frozenset(
    {"schema_version", "event_id", "workflow_id", "task_id", "lane", "node_id", "seq", "type", "occurred_at", "payload"}
)
_FIELDS: Final = {1: _FIELDS_V1, 2: _FIELDS_V1 | {"attempt"}}


class BadEvent(CbctlError):
    """Bytes or values that are not a valid canonical event.

    ``reason`` is one of :data:`BAD_EVENT_REASONS`; the message says what exactly was wrong
    (never the whole payload, which may be large or sensitive).
    """

    exit_code = 1

    def __init__(self, reason: str, message: str) -> None:
        assert reason in BAD_EVENT_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Event:
    """One canonical lifecycle event, independent of the schema version it travels in.

    Valid by construction: invalid values raise ``BadEvent(malformed)``.  :func:`make_event`
    also fills in ``event_id`` and ``occurred_at``.
    ``attempt`` is only carried on the wire by schema v2; v1 drops it (and decodes it as 1).
    """

    event_id: str
    workflow_id: str
    task_id: str | None
    lane: str
    node_id: str
    seq: int
    type: str
    occurred_at: datetime
    payload: Mapping[str, Any] = field(default_factory=dict)
    attempt: int = 1

    def __post_init__(self) -> None:
        # Every Event is valid by construction (BadEvent otherwise), so encoding, the hot path,
        # does not check the fields again.
        _validate(self)

    def subject(self, cluster: str, schema_version: int) -> str:
        """The subject this event is published on in ``cluster`` and ``schema_version``."""
        return subject(cluster, schema_version, self.workflow_id)


# --------------------------------------------------------------------------- ids & subjects


def deterministic_event_id(workflow_id: str, seq: int) -> str:
    """The default ``event_id`` of event ``seq`` of ``workflow_id`` (see the module docstring)."""
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{workflow_id}\x00{seq}").hex


def msg_id(event_id: str, schema_version: int) -> str:
    """The ``Nats-Msg-Id`` of ``event_id`` published in ``schema_version``."""
    return f"{event_id}.v{schema_version}"


# Printable ASCII except the bytes NATS subjects give a meaning to and '%' (our escape char).
_TOKEN_SAFE: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {".", "*", ">", "%"}


def subject_token(workflow_id: str) -> str:
    """Escape a workflow id into one valid NATS subject token (reversible, see the module doc)."""
    if _UNSAFE_TOKEN_CHAR.search(workflow_id) is None:
        return workflow_id  # the common case: nothing to escape
    out: list[str] = []
    for c in workflow_id:
        if c in _TOKEN_SAFE:
            out.append(c)
        else:
            out.extend(f"%{b:02X}" for b in c.encode("utf-8"))
    return "".join(out)


def unescape_token(token: str) -> str:
    """Inverse of :func:`subject_token`. Raises ``BadEvent(malformed)`` on a broken escape."""
    if "%" not in token:
        return token
    raw = bytearray()
    i = 0
    while i < len(token):
        c = token[i]
        if c == "%":
            try:
                raw.append(int(token[i + 1 : i + 3], 16))
            except ValueError:
                raise BadEvent("malformed", f"bad escape in subject token {token[:80]!r}") from None
            i += 3
        else:
            raw.extend(c.encode("utf-8"))
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadEvent("malformed", f"subject token {token[:80]!r} does not unescape to UTF-8") from None


def _cluster_token(cluster: str) -> str:
    if not isinstance(cluster, str) or not cluster:
        raise ValueError(f"cluster name must be a non-empty string, got {cluster!r}")
    return subject_token(cluster)


def subject(cluster: str, schema_version: int, workflow_id: str) -> str:
    """``cb.<cluster>.events.v<schema>.<escaped workflow id>``: where ``workflow_id``'s events
    in ``schema_version`` are published.  Raises ``BadEvent(unknown_version)`` for an unsupported
    version and ``ValueError`` for an empty cluster name."""
    _check_version(schema_version)
    return f"{SUBJECT_ROOT}.{_cluster_token(cluster)}.{SUBJECT_KIND}.v{schema_version}.{subject_token(workflow_id)}"


def subject_filter(cluster: str, schema_version: int) -> str:
    """Every event of ``cluster`` in ``schema_version``: ``cb.<cluster>.events.v<N>.>``."""
    _check_version(schema_version)
    return f"{SUBJECT_ROOT}.{_cluster_token(cluster)}.{SUBJECT_KIND}.v{schema_version}.>"


def stream_subjects(cluster: str) -> str:
    """The subjects ``cluster``'s event stream captures: ``cb.<cluster>.events.>``."""
    return f"{SUBJECT_ROOT}.{_cluster_token(cluster)}.{SUBJECT_KIND}.>"


def parse_subject(subject: str) -> tuple[str, int, str]:
    """``(cluster, schema_version, workflow_id)`` of an event subject, or
    ``BadEvent(subject_mismatch)``."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[0] != SUBJECT_ROOT or parts[2] != SUBJECT_KIND or not parts[3].startswith("v"):
        raise BadEvent("subject_mismatch", f"not an event subject: {subject[:200]!r}")
    try:
        version = int(parts[3][1:])
    except ValueError:
        raise BadEvent("subject_mismatch", f"bad version token in {subject[:200]!r}") from None
    try:
        cluster = unescape_token(parts[1])
    except BadEvent:
        raise BadEvent("subject_mismatch", f"bad cluster token in {subject[:200]!r}") from None
    return cluster, version, unescape_token(parts[4])


def _check_version(schema_version: int) -> None:
    if schema_version not in SUPPORTED_SCHEMA_VERSIONS or isinstance(schema_version, bool):
        raise BadEvent(
            "unknown_version",
            f"schema version {schema_version!r} is not supported (supported: {list(SUPPORTED_SCHEMA_VERSIONS)})",
        )


# --------------------------------------------------------------------------- construction


def _check_id(name: str, value: Any, *, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, str) or not value:
        raise BadEvent("malformed", f"{name} must be a non-empty string, got {type(value).__name__}")
    if len(value) > MAX_ID_LENGTH:
        raise BadEvent("malformed", f"{name} is longer than {MAX_ID_LENGTH} characters")


def _check_int(name: str, value: Any, minimum: int) -> None:
    # bool is an int subclass; True must not pass as seq 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadEvent("malformed", f"{name} must be an integer >= {minimum}, got {value!r:.40}")


def _validate(ev: Event) -> None:
    for name in ("event_id", "workflow_id", "lane", "node_id", "type"):
        _check_id(name, getattr(ev, name))
    _check_id("task_id", ev.task_id, nullable=True)
    _check_int("seq", ev.seq, 1)
    _check_int("attempt", ev.attempt, 1)
    if not isinstance(ev.occurred_at, datetime) or ev.occurred_at.tzinfo is None:
        raise BadEvent("malformed", "occurred_at must be a timezone-aware datetime")
    if not isinstance(ev.payload, Mapping):
        raise BadEvent("malformed", f"payload must be a JSON object, got {type(ev.payload).__name__}")


def make_event(
    *,
    workflow_id: str,
    seq: int,
    type: str,
    lane: str,
    node_id: str,
    task_id: str | None = None,
    payload: Mapping[str, Any] | None = None,
    occurred_at: datetime | None = None,
    attempt: int = 1,
    event_id: str | None = None,
) -> Event:
    """A validated :class:`Event`; ``event_id`` defaults to :func:`deterministic_event_id`,
    ``occurred_at`` to now (UTC).  Raises ``BadEvent(malformed)`` for invalid values."""
    ev = Event(
        event_id=event_id if event_id is not None else deterministic_event_id(workflow_id, seq),
        workflow_id=workflow_id,
        task_id=task_id,
        lane=lane,
        node_id=node_id,
        seq=seq,
        type=type,
        occurred_at=occurred_at or datetime.now(UTC),
        payload=dict(payload or {}),
        attempt=attempt,
    )
    return ev


# --------------------------------------------------------------------------- encoding


def format_time(dt: datetime) -> str:
    """RFC 3339 UTC with microseconds and a ``Z`` suffix."""
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    return dt.isoformat(timespec="microseconds")[:-6] + "Z"  # drop "+00:00"


def parse_time(value: str) -> datetime:
    """Parse an RFC 3339 timestamp with an explicit offset (``Z`` or ``+hh:mm``) into UTC."""
    dt = datetime.fromisoformat(value)  # 3.11 accepts 'Z'
    if dt.tzinfo is None:
        raise ValueError("no UTC offset")
    return dt.astimezone(UTC)


def encode_event(ev: Event, schema_version: int) -> bytes:
    """The wire bytes of ``ev`` in ``schema_version`` (field values were checked when the
    :class:`Event` was built).

    Raises ``BadEvent`` with reason ``unknown_version``, ``malformed`` (a payload that is not
    JSON-serialisable, e.g. it was mutated after construction) or ``too_large``.
    """
    _check_version(schema_version)
    task = ev.task_id
    try:
        # Assembled by hand around the C string escaper: the field set is fixed and this is
        # the publisher's hot path (measured ~30% cheaper than json-encoding a dict).
        text = (
            f'{{"schema_version":{schema_version},"event_id":{_json_str(ev.event_id)},'
            f'"workflow_id":{_json_str(ev.workflow_id)},"task_id":{"null" if task is None else _json_str(task)},'
            f'"lane":{_json_str(ev.lane)},"node_id":{_json_str(ev.node_id)},"seq":{ev.seq:d},'
            f'"type":{_json_str(ev.type)},"occurred_at":"{format_time(ev.occurred_at)}",'
            f'"payload":{_ENCODER.encode(ev.payload)}'
            + (f',"attempt":{ev.attempt:d}}}' if schema_version >= 2 else "}")
        )
        data = text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (lone surrogates) is a ValueError
        raise BadEvent("malformed", f"event is not JSON-serialisable: {exc}") from None
    if len(data) > MAX_EVENT_BYTES:
        raise BadEvent("too_large", f"encoded event is {len(data)} bytes (max {MAX_EVENT_BYTES})")
    return data


def decode_event(data: bytes | bytearray | memoryview, *, subject: str | None = None) -> tuple[int, Event]:
    """``(schema_version, Event)`` from wire bytes; never raises anything but :class:`BadEvent`.

    With ``subject``, also checks that the subject's version and workflow match the body
    (reason ``subject_mismatch``): a message on the wrong subject is as bad as garbage.
    """
    if len(data) > MAX_EVENT_BYTES:
        raise BadEvent("too_large", f"{len(data)} bytes (max {MAX_EVENT_BYTES})")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadEvent("not_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadEvent("not_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadEvent("not_json", "nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadEvent("not_object", f"top-level JSON value is a {type(obj).__name__}, not an object")
    version = obj.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BadEvent(
            "unknown_version",
            f"schema_version {version!r:.40} is not supported (supported: {list(SUPPORTED_SCHEMA_VERSIONS)})",
        )
    expected = _FIELDS[version]
    keys = obj.keys()
    if keys != expected:
        missing = sorted(expected - keys)
        extra = sorted(keys - expected)
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(x[:40] for x in extra[:5])}")
        raise BadEvent("malformed", f"v{version} event: {'; '.join(parts)}")
    occurred = obj["occurred_at"]
    if not isinstance(occurred, str):
        raise BadEvent("malformed", "occurred_at must be an RFC 3339 string")
    try:
        occurred_at = parse_time(occurred)
    except ValueError:
        raise BadEvent("malformed", f"occurred_at {occurred[:40]!r} is not an RFC 3339 timestamp") from None
    payload = obj["payload"]
    if not isinstance(payload, dict):
        raise BadEvent("malformed", f"payload must be a JSON object, got {type(payload).__name__}")
    ev = Event(
        event_id=obj["event_id"],
        workflow_id=obj["workflow_id"],
        task_id=obj["task_id"],
        lane=obj["lane"],
        node_id=obj["node_id"],
        seq=obj["seq"],
        type=obj["type"],
        occurred_at=occurred_at,
        payload=payload,
        attempt=obj["attempt"] if version >= 2 else 1,
    )  # validates the values
    if subject is not None:
        _cluster, s_version, s_workflow = parse_subject(subject)
        if s_version != version or s_workflow != ev.workflow_id:
            raise BadEvent(
                "subject_mismatch",
                f"subject {subject[:200]!r} does not match v{version} event of workflow {ev.workflow_id[:80]!r}",
            )
    return version, ev


__all__ = [
    "BAD_EVENT_REASONS", "EVENT_ID_NAMESPACE", "LATEST_SCHEMA_VERSION", "MAX_EVENT_BYTES", "SUBJECT_KIND",
    "SUBJECT_ROOT", "SUPPORTED_SCHEMA_VERSIONS", "BadEvent", "Event", "decode_event", "deterministic_event_id",
    "encode_event", "format_time", "make_event", "msg_id", "parse_subject", "parse_time", "stream_subjects",
    "subject", "subject_filter", "subject_token", "unescape_token",
]
