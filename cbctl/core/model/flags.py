"""The flag table: every rollout flag, its values, its default, and how it is checked and spelled.

Contract: flag names and their values are a contract with the agents (stored in the rollout
document, see docs/model.md). Every module that compares a flag's value uses the constants here,
never a string literal. Pure: no I/O.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

from cbctl.core.model.errors import BadInput
from cbctl.core.model.events import SUPPORTED_SCHEMA_VERSIONS

# -- flag names ------------------------------------------------------------------------------
CLUSTER_ENABLED: Final = "cluster.enabled"
OWNERSHIP_GUARD: Final = "ownership.guard"
EVENTBUS_PUBLISH: Final = "eventbus.publish"
EVENTBUS_BRIDGE: Final = "eventbus.bridge"
SIGNALS_ROUTING: Final = "signals.routing"
STREAM_SOURCE: Final = "stream.source"
SCHEMA_VERSIONS: Final = "eventbus.schema_versions"
CONSUMER_SCHEMA_VERSION: Final = "consumers.schema_version"
CANARY_LANES: Final = "canary.lanes"
CANARY_SUBSCRIBERS: Final = "canary.subscribers"

# -- enum values -----------------------------------------------------------------------------
# ownership.guard
GUARD_OFF: Final = "off"
GUARD_OBSERVE: Final = "observe"  # count would-deny, deny nothing
GUARD_CANARY: Final = "canary"  # enforce on canary lanes only
GUARD_ENFORCE: Final = "enforce"
GUARD_VALUES: Final = (GUARD_OFF, GUARD_OBSERVE, GUARD_CANARY, GUARD_ENFORCE)

# eventbus.publish
PUBLISH_OFF: Final = "off"
PUBLISH_SHADOW: Final = "shadow"  # published, but nothing reads it as a source
PUBLISH_ON: Final = "on"
PUBLISH_VALUES: Final = (PUBLISH_OFF, PUBLISH_SHADOW, PUBLISH_ON)

# eventbus.bridge
BRIDGE_OFF: Final = "off"
BRIDGE_READ_ONLY: Final = "read-only"  # consumes and verifies, delivers to nobody
BRIDGE_CANARY: Final = "canary"  # delivers to canary subscribers only
BRIDGE_STREAMING: Final = "streaming"
BRIDGE_VALUES: Final = (BRIDGE_OFF, BRIDGE_READ_ONLY, BRIDGE_CANARY, BRIDGE_STREAMING)

# signals.routing
ROUTING_OFF: Final = "off"
ROUTING_CANARY: Final = "canary"  # route signals of canary lanes only
ROUTING_ALL: Final = "all"
ROUTING_VALUES: Final = (ROUTING_OFF, ROUTING_CANARY, ROUTING_ALL)

# stream.source
SOURCE_LOCAL: Final = "local"
SOURCE_CANONICAL: Final = "canonical"
SOURCE_VALUES: Final = (SOURCE_LOCAL, SOURCE_CANONICAL)

#: A flag's value as it appears in the JSON document: bool, str, int, list[int] or list[str].
FlagValue = Any

FlagKind = Literal["bool", "enum", "int", "int-list", "str-list"]


@dataclass(frozen=True)
class FlagSpec:
    """One flag: its type, allowed values, default (= stage 0 value) and a one-line help.

    ``default`` is immutable (tuples for lists); :meth:`default_value` gives the JSON-shaped
    value (a fresh list for list flags).
    """

    name: str
    kind: FlagKind
    default: bool | str | int | tuple[int, ...] | tuple[str, ...]
    help: str
    allowed: tuple[str, ...] = ()  # only for kind "enum"

    def default_value(self) -> FlagValue:
        return copy_value(self.default)

    @property
    def allowed_text(self) -> str:
        """The allowed values, for help output and error messages."""
        if self.kind == "bool":
            return "true, false"
        if self.kind == "enum":
            return ", ".join(self.allowed)
        if self.kind == "int":
            return f"a positive integer listed in {SCHEMA_VERSIONS}"
        if self.kind == "int-list":
            return "1 or 2 distinct positive integers, comma-separated"
        return "comma-separated ids (no whitespace), may be empty"


#: The flag table (README.md, Stages → commands). Names are a contract with the agents.
FLAGS: Final[Mapping[str, FlagSpec]] = MappingProxyType(
    {
        s.name: s
        for s in (
            FlagSpec(CLUSTER_ENABLED, "bool", False, "agents register and take part in coordination"),
            FlagSpec(
                OWNERSHIP_GUARD, "enum", GUARD_OFF,
                "lane ownership guard: observe counts would-deny, canary enforces on canary lanes",
                GUARD_VALUES,
            ),
            FlagSpec(
                EVENTBUS_PUBLISH, "enum", PUBLISH_OFF,
                "canonical event publishing; shadow publishes but nothing reads it as a source",
                PUBLISH_VALUES,
            ),
            FlagSpec(
                EVENTBUS_BRIDGE, "enum", BRIDGE_OFF,
                "stream bridge; read-only consumes and verifies but delivers to nobody",
                BRIDGE_VALUES,
            ),
            FlagSpec(
                SIGNALS_ROUTING, "enum", ROUTING_OFF,
                "route a workflow's signals to the node that owns its lane",
                ROUTING_VALUES,
            ),
            FlagSpec(STREAM_SOURCE, "enum", SOURCE_LOCAL, "default source of cross-node streaming updates", SOURCE_VALUES),
            FlagSpec(SCHEMA_VERSIONS, "int-list", (1,), "event schema versions published; two = dual-publish window"),
            FlagSpec(CONSUMER_SCHEMA_VERSION, "int", 1, "event schema version subscribers are pinned to"),
            FlagSpec(CANARY_LANES, "str-list", (), "lanes in the canary subset"),
            FlagSpec(CANARY_SUBSCRIBERS, "str-list", (), "subscribers in the canary subset"),
        )
    }
)

#: Flag names in table order.
FLAG_NAMES: Final[tuple[str, ...]] = tuple(FLAGS)

#: Flags whose manual overrides survive stage transitions (docs/model.md, "Manual overrides").
PERSISTENT_FLAGS: Final[frozenset[str]] = frozenset({SCHEMA_VERSIONS, CONSUMER_SCHEMA_VERSION})

_BOOL_WORDS: Final[Mapping[str, bool]] = MappingProxyType(
    {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
)



def copy_value(value: Any) -> Any:
    """A JSON-shaped copy: tuples and lists become fresh lists, so no caller shares our state."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def flag_spec(name: object) -> FlagSpec:
    """The spec of flag ``name``; raises BadInput naming the closest known flag."""
    if isinstance(name, str) and name in FLAGS:
        return FLAGS[name]
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name, FLAG_NAMES, n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    raise BadInput(f"unknown flag {name!r}{hint}; known flags: {', '.join(FLAG_NAMES)}")


def _bad_value(spec: FlagSpec, value: object, reason: str) -> BadInput:
    return BadInput(f"invalid value {value!r} for flag {spec.name}: {reason} (allowed: {spec.allowed_text})")


def _check_id(spec: FlagSpec, whole: object, item: object) -> str:
    # Ids go on one line of a lanes file and into comma-separated command-line values, so
    # whitespace and commas in an id could never round-trip.
    if not isinstance(item, str):
        raise _bad_value(spec, whole, f"entry {item!r} is not a string")
    if not item:
        raise _bad_value(spec, whole, "empty id")
    if any(c.isspace() for c in item) or "," in item:
        raise _bad_value(spec, whole, f"id {item!r} contains whitespace or ','")
    return item


def _check_schema_supported(spec: FlagSpec, whole: object, version: int) -> None:
    """Schema versions must be ones this cbctl can encode: a document naming another would leave
    every agent unable to apply it (refused here, exit 2, nothing written)."""
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_SCHEMA_VERSIONS))
        raise _bad_value(spec, whole, f"schema version {version} is not supported (supported: {supported})")


def validate_flag(name: str, value: object) -> FlagValue:
    """Check one flag's typed value; return it normalized (JSON-shaped, a fresh list for lists).

    Types are strict: a bool flag takes only ``True``/``False`` (not 1/0, not "true" — strings
    from the command line go through :func:`parse_flag_value`). ``eventbus.schema_versions`` is
    returned sorted ascending. Cross-flag rules (e.g. ``consumers.schema_version`` must be
    published) are checked by :func:`validate_flags`.

    Raises :class:`BadInput` naming the flag, the bad value and the allowed set.
    """
    spec = flag_spec(name)
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise _bad_value(spec, value, "not a boolean")
        return value
    if spec.kind == "enum":
        if not isinstance(value, str) or value not in spec.allowed:
            raise _bad_value(spec, value, "not one of the allowed values")
        return value
    if spec.kind == "int":
        # bool is an int subclass: True must not pass as schema version 1.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _bad_value(spec, value, "not a positive integer")
        _check_schema_supported(spec, value, value)
        return value
    if not isinstance(value, (list, tuple)):
        raise _bad_value(spec, value, "not a list")
    if spec.kind == "int-list":
        for item in value:
            if not isinstance(item, int) or isinstance(item, bool) or item < 1:
                raise _bad_value(spec, value, f"entry {item!r} is not a positive integer")
        if len(set(value)) != len(value):
            raise _bad_value(spec, value, "duplicate entries")
        if not 1 <= len(value) <= 2:
            raise _bad_value(spec, value, f"{len(value)} entries")
        for item in value:
            _check_schema_supported(spec, value, item)
        return sorted(value)
    ids = [_check_id(spec, value, item) for item in value]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise _bad_value(spec, value, f"duplicate id {dup!r}")
    return ids


def parse_flag_value(name: str, text: str) -> FlagValue:
    """Parse a command-line string into a typed, validated value for flag ``name``.

    bool: ``true/false/on/off/1/0`` (case-insensitive); enums: case-insensitive; ints: decimal;
    lists: comma-separated, entries stripped (an empty string is the empty list; an empty entry
    as in ``a,,b`` is an error). Inverse of :func:`format_flag_value`.
    """
    spec = flag_spec(name)
    raw = text.strip()
    if spec.kind == "bool":
        if raw.lower() not in _BOOL_WORDS:
            raise BadInput(
                f"invalid value {text!r} for flag {name} (allowed: true, false, on, off, 1, 0)"
            )
        return _BOOL_WORDS[raw.lower()]
    if spec.kind == "enum":
        if raw.lower() not in spec.allowed:
            raise _bad_value(spec, text, "not one of the allowed values")
        return raw.lower()
    if spec.kind == "int":
        return validate_flag(name, _parse_int(spec, text, raw))
    items = [item.strip() for item in raw.split(",")] if raw else []
    if any(not item for item in items):
        raise _bad_value(spec, text, "empty entry")
    if spec.kind == "int-list":
        return validate_flag(name, [_parse_int(spec, text, item) for item in items])
    return validate_flag(name, items)


def _parse_int(spec: FlagSpec, whole: str, raw: str) -> int:
    # isdecimal() and not int(): int() would also take "+1", "1_000" and non-ASCII digits.
    if not raw.isascii() or not raw.isdecimal():
        raise _bad_value(spec, whole, f"{raw!r} is not an integer")
    return int(raw)


def format_flag_value(name: str, value: FlagValue) -> str:
    """A flag value as the command line writes it (``true``, ``canary``, ``1,2``, ``""``)."""
    spec = flag_spec(name)
    if spec.kind == "bool":
        return "true" if value else "false"
    if spec.kind in ("int-list", "str-list"):
        return ",".join(str(v) for v in value)
    return str(value)


def parse_flag_assignment(text: str) -> tuple[str, FlagValue]:
    """Parse ``NAME=VALUE`` from the command line into ``(name, typed value)``.

    Splits on the first ``=``; ``canary.lanes=`` sets the empty list. Raises :class:`BadInput`
    for a missing ``=``, an unknown flag or a bad value.
    """
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise BadInput(f"expected NAME=VALUE, got {text!r}")
    return name, parse_flag_value(name, value)


def parse_flag_assignments(texts: Iterable[str]) -> dict[str, FlagValue]:
    """Parse several ``NAME=VALUE``; the same flag given twice is an error, not last-one-wins."""
    out: dict[str, FlagValue] = {}
    for text in texts:
        name, value = parse_flag_assignment(text)
        if name in out:
            raise BadInput(f"flag {name} given more than once")
        out[name] = value
    return out


def validate_flags(flags: Mapping[str, object]) -> dict[str, FlagValue]:
    """Check a complete flag set: every flag present, each valid, and the cross-flag rules.

    Cross-flag rules: ``consumers.schema_version`` is one of ``eventbus.schema_versions`` (a
    consumer pinned to an unpublished version would receive nothing); ``ownership.guard=canary``
    and ``signals.routing=canary`` need a non-empty ``canary.lanes`` (canary of nothing is a
    mistake, not a stage). Returns the normalized flags in table order.
    """
    missing = [n for n in FLAG_NAMES if n not in flags]
    if missing:
        raise BadInput(f"missing flags: {', '.join(missing)}")
    for name in flags:
        flag_spec(name)
    out = {name: validate_flag(name, flags[name]) for name in FLAG_NAMES}
    if out[CONSUMER_SCHEMA_VERSION] not in out[SCHEMA_VERSIONS]:
        raise BadInput(
            f"{CONSUMER_SCHEMA_VERSION}={out[CONSUMER_SCHEMA_VERSION]} is not one of "
            f"{SCHEMA_VERSIONS}={format_flag_value(SCHEMA_VERSIONS, out[SCHEMA_VERSIONS])}: "
            "consumers can only be pinned to a published version"
        )
    for name, canary in ((OWNERSHIP_GUARD, GUARD_CANARY), (SIGNALS_ROUTING, ROUTING_CANARY)):
        if out[name] == canary and not out[CANARY_LANES]:
            raise BadInput(f"{name}=canary needs a non-empty {CANARY_LANES}")
    return out


__all__ = [
    "BRIDGE_CANARY", "BRIDGE_OFF", "BRIDGE_READ_ONLY", "BRIDGE_STREAMING", "BRIDGE_VALUES",
    "CANARY_LANES", "CANARY_SUBSCRIBERS", "CLUSTER_ENABLED", "CONSUMER_SCHEMA_VERSION",
    "EVENTBUS_BRIDGE", "EVENTBUS_PUBLISH", "FLAGS", "FLAG_NAMES", "GUARD_CANARY", "GUARD_ENFORCE",
    "GUARD_OBSERVE", "GUARD_OFF", "GUARD_VALUES", "OWNERSHIP_GUARD", "PERSISTENT_FLAGS", "PUBLISH_OFF",
    "PUBLISH_ON", "PUBLISH_SHADOW", "PUBLISH_VALUES", "ROUTING_ALL", "ROUTING_CANARY", "ROUTING_OFF",
    "ROUTING_VALUES", "SCHEMA_VERSIONS", "SIGNALS_ROUTING", "SOURCE_CANONICAL", "SOURCE_LOCAL",
    "SOURCE_VALUES", "STREAM_SOURCE", "FlagKind", "FlagSpec", "FlagValue",
    "copy_value", "flag_spec", "format_flag_value", "parse_flag_assignment", "parse_flag_assignments",
    "parse_flag_value", "validate_flag", "validate_flags",
]
