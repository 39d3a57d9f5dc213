"""The rollout document, the stage plan and the per-capability rollbacks — as data, pure.

Nothing here does I/O: the CLI reads and writes the document (compare-and-swap on its revision)
and the agents apply ``flags``. Every function returns a new :class:`RolloutDocument`; none
mutates its input.

How the effective flags are computed (:func:`effective_flags`), lowest precedence first:

1. the **stage plan** (:data:`STAGES`) for the document's stage, with the canary lists recorded
   when the rollout entered stage 2 (carried into stage 3);
2. **manual overrides** set with ``cbctl flags set`` (:func:`set_flags`);
3. **rollback overrides** (:func:`apply_rollback`): they win over everything, because they are
   the emergency brake — nothing else may quietly undo one.

Manual overrides and stage transitions (the decision): an override of a *staged* flag (every flag
except :data:`PERSISTENT_FLAGS`) lasts until the next stage transition, which clears it. The
operator who advances a stage asks for that stage's plan; an old override such as
``ownership.guard=observe`` left over from stage 1 would otherwise silently hold stage 3 back
from enforcing. The schema flags (``eventbus.schema_versions``, ``consumers.schema_version``) are
not what the stages are about — the plan keeps them at ``[1]``/``1`` at every stage — so a schema
migration done with ``flags set`` survives stage transitions; advancing the rollout must never
silently revert consumers to an older schema. :func:`unset_flags` drops overrides explicitly.

Rollbacks are independent of the stage: they survive stage transitions and only
:func:`clear_rollback` removes them. Each touches only its own capability's flags
(:data:`ROLLBACKS`), and while one is active ``flags set`` refuses the flags it holds.

JSON shape of the document (:meth:`RolloutDocument.to_json`; keys sorted, UTF-8, 2-space indent)::

    {
      "canary_lanes": ["lane-01", "lane-02"],        # recorded on entering stage 2, else []
      "canary_subscribers": ["sub-a"],
      "flags": {                                     # EFFECTIVE flags: all agents read
        "canary.lanes": ["lane-01", "lane-02"],
        "canary.subscribers": ["sub-a"],
        "cluster.enabled": true,
        "consumers.schema_version": 1,
        "eventbus.bridge": "canary",
        "eventbus.publish": "on",
        "eventbus.schema_versions": [1],
        "ownership.guard": "canary",
        "signals.routing": "canary",
        "stream.source": "local"
      },
      "format": 1,
      "manual": {"signals.routing": "off"},          # flag -> value
      "rollbacks": {"event-bus": {"eventbus.bridge": "off", "stream.source": "local"}},
      "stage": 2
    }
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from cbctl.core.model.errors import BadInput, CbctlError

# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------

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
        return _copy_value(self.default)

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


_GUARD_VALUES: Final = ("off", "observe", "canary", "enforce")
_PUBLISH_VALUES: Final = ("off", "shadow", "on")
_BRIDGE_VALUES: Final = ("off", "read-only", "canary", "streaming")
_ROUTING_VALUES: Final = ("off", "canary", "all")
_SOURCE_VALUES: Final = ("local", "canonical")

#: The flag table (README.md, Stages → commands). Names are a contract with the agents.
FLAGS: Final[Mapping[str, FlagSpec]] = MappingProxyType(
    {
        s.name: s
        for s in (
            FlagSpec(CLUSTER_ENABLED, "bool", False, "agents register and take part in coordination"),
            FlagSpec(
                OWNERSHIP_GUARD, "enum", "off",
                "lane ownership guard: observe counts would-deny, canary enforces on canary lanes",
                _GUARD_VALUES,
            ),
            FlagSpec(
                EVENTBUS_PUBLISH, "enum", "off",
                "canonical event publishing; shadow publishes but nothing reads it as a source",
                _PUBLISH_VALUES,
            ),
            FlagSpec(
                EVENTBUS_BRIDGE, "enum", "off",
                "stream bridge; read-only consumes and verifies but delivers to nobody",
                _BRIDGE_VALUES,
            ),
            FlagSpec(
                SIGNALS_ROUTING, "enum", "off",
                "route a workflow's signals to the node that owns its lane",
                _ROUTING_VALUES,
            ),
            FlagSpec(STREAM_SOURCE, "enum", "local", "default source of cross-node streaming updates", _SOURCE_VALUES),
            FlagSpec(SCHEMA_VERSIONS, "int-list", (1,), "event schema versions published; two = dual-publish window"),
            FlagSpec(CONSUMER_SCHEMA_VERSION, "int", 1, "event schema version subscribers are pinned to"),
            FlagSpec(CANARY_LANES, "str-list", (), "lanes in the canary subset"),
            FlagSpec(CANARY_SUBSCRIBERS, "str-list", (), "subscribers in the canary subset"),
        )
    }
)

#: Flag names in table order.
FLAG_NAMES: Final[tuple[str, ...]] = tuple(FLAGS)

#: Flags whose manual overrides survive stage transitions (see the module docstring).
PERSISTENT_FLAGS: Final[frozenset[str]] = frozenset({SCHEMA_VERSIONS, CONSUMER_SCHEMA_VERSION})

_BOOL_WORDS: Final[Mapping[str, bool]] = MappingProxyType(
    {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
)


class AlreadyAtStage(CbctlError):
    """The rollout is already at the requested stage: nothing to do, which is not a failure."""

    exit_code = 0

    def __init__(self, stage: int) -> None:
        super().__init__(f"already at stage {stage} ({STAGES[stage].name}); nothing to do")
        self.stage = stage


def _copy_value(value: Any) -> Any:
    """A JSON-shaped copy: tuples and lists become fresh lists, so no caller shares our state."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def _spec(name: object) -> FlagSpec:
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
    from cbctl.core.model.events import SUPPORTED_SCHEMA_VERSIONS

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
    spec = _spec(name)
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
    spec = _spec(name)
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
    spec = _spec(name)
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
        _spec(name)
    out = {name: validate_flag(name, flags[name]) for name in FLAG_NAMES}
    if out[CONSUMER_SCHEMA_VERSION] not in out[SCHEMA_VERSIONS]:
        raise BadInput(
            f"{CONSUMER_SCHEMA_VERSION}={out[CONSUMER_SCHEMA_VERSION]} is not one of "
            f"{SCHEMA_VERSIONS}={format_flag_value(SCHEMA_VERSIONS, out[SCHEMA_VERSIONS])}: "
            "consumers can only be pinned to a published version"
        )
    for name in (OWNERSHIP_GUARD, SIGNALS_ROUTING):
        if out[name] == "canary" and not out[CANARY_LANES]:
            raise BadInput(f"{name}=canary needs a non-empty {CANARY_LANES}")
    return out


# --------------------------------------------------------------------------------------------
# Stage plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage of the plan.

    ``flags`` holds every flag except ``canary.lanes``/``canary.subscribers``, which are inputs
    (``--canary FILE`` on entering stage 2) rather than plan: ``carries_canary`` says whether the
    recorded canary lists appear in the effective flags at this stage.
    """

    number: int
    name: str
    description: str
    flags: Mapping[str, bool | str | int | tuple[int, ...]]
    requires_canary_lanes: bool = False
    carries_canary: bool = False


def _plan(**changes: object) -> Mapping[str, Any]:
    base = {name: spec.default for name, spec in FLAGS.items() if name not in (CANARY_LANES, CANARY_SUBSCRIBERS)}
    for key, value in changes.items():
        name = key.replace("__", ".")
        if name not in base:  # a typo in the table below must fail at import, not pass silently
            raise KeyError(name)
        base[name] = value
    return MappingProxyType(base)


#: The stage plan, indexed by stage number. Each stage's flags are written out in full.
STAGES: Final[tuple[Stage, ...]] = (
    Stage(0, "preflight", "everything off: nodes run locally, nothing registered, nothing published", _plan()),
    Stage(
        1, "observe-only",
        "agents register; guard only observes, events are shadow-published, bridge verifies without delivering",
        _plan(cluster__enabled=True, ownership__guard="observe", eventbus__publish="shadow",
              eventbus__bridge="read-only"),
    ),
    Stage(
        2, "partial",
        "guard enforces, signals are routed and the bridge delivers on the canary lanes and subscribers only",
        _plan(cluster__enabled=True, ownership__guard="canary", eventbus__publish="on",
              eventbus__bridge="canary", signals__routing="canary"),
        requires_canary_lanes=True, carries_canary=True,
    ),
    Stage(
        3, "full",
        "guard enforces on every lane, all signals routed, bridge streams, canonical events are the source",
        _plan(cluster__enabled=True, ownership__guard="enforce", eventbus__publish="on",
              eventbus__bridge="streaming", signals__routing="all", stream__source="canonical"),
        carries_canary=True,
    ),
)

FINAL_STAGE: Final = len(STAGES) - 1


def _check_stage_number(stage: object) -> int:
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= FINAL_STAGE:
        raise BadInput(f"invalid stage {stage!r} (allowed: 0..{FINAL_STAGE})")
    return stage


def parse_stage(value: str | int) -> int:
    """A stage given as a number (``2``) or a name (``partial``) -> its number."""
    if isinstance(value, str):
        raw = value.strip().lower()
        for stage in STAGES:
            if raw == stage.name or raw == str(stage.number):
                return stage.number
        names = ", ".join(f"{s.number} ({s.name})" for s in STAGES)
        raise BadInput(f"invalid stage {value!r} (allowed: {names})")
    return _check_stage_number(value)


# --------------------------------------------------------------------------------------------
# Rollbacks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RollbackSpec:
    """A per-capability rollback: the only flags it may touch, and their values.

    ``fixed`` is the complete override for capabilities without a parameter; the ``consumers``
    rollback's override depends on ``--schema-version`` and the current version, so ``fixed`` is
    empty and ``takes_schema_version`` is set.
    """

    capability: str
    flags: tuple[str, ...]
    description: str
    fixed: Mapping[str, FlagValue] = field(default_factory=lambda: MappingProxyType({}))
    takes_schema_version: bool = False


ROLLBACKS: Final[Mapping[str, RollbackSpec]] = MappingProxyType(
    {
        "coordination": RollbackSpec(
            "coordination", (OWNERSHIP_GUARD,),
            "ownership guard off; local processing keeps running",
            MappingProxyType({OWNERSHIP_GUARD: "off"}),
        ),
        "event-bus": RollbackSpec(
            "event-bus", (EVENTBUS_BRIDGE, STREAM_SOURCE),
            "bridge off, streaming from the local source; publishing and local execution keep running",
            MappingProxyType({EVENTBUS_BRIDGE: "off", STREAM_SOURCE: "local"}),
        ),
        "consumers": RollbackSpec(
            "consumers", (CONSUMER_SCHEMA_VERSION, SCHEMA_VERSIONS),
            "pin consumers to schema version N and dual-publish N and the current version",
            takes_schema_version=True,
        ),
    }
)

CAPABILITIES: Final[tuple[str, ...]] = tuple(ROLLBACKS)


def _rollback_spec(capability: object) -> RollbackSpec:
    if isinstance(capability, str) and capability in ROLLBACKS:
        return ROLLBACKS[capability]
    raise BadInput(f"unknown capability {capability!r} (allowed: {', '.join(CAPABILITIES)})")


def _check_rollback(capability: object, overrides: object) -> dict[str, FlagValue]:
    """Validate one recorded rollback override; return it normalized."""
    spec = _rollback_spec(capability)
    if not isinstance(overrides, Mapping):
        raise BadInput(f"rollback {capability!r}: overrides must be an object of flag -> value")
    if set(overrides) != set(spec.flags):
        raise BadInput(
            f"rollback {capability!r} must set exactly {', '.join(spec.flags)}; got {', '.join(map(str, overrides)) or 'nothing'}"
        )
    out = {name: validate_flag(name, overrides[name]) for name in spec.flags}
    if not spec.takes_schema_version:
        for name, want in spec.fixed.items():
            if out[name] != want:
                raise BadInput(f"rollback {capability!r} must set {name}={want}, not {out[name]!r}")
        return out
    # consumers: pinned version N is the lower entry of [N, current] (N == current gives [N]).
    pinned, versions = out[CONSUMER_SCHEMA_VERSION], out[SCHEMA_VERSIONS]
    if pinned != versions[0]:
        raise BadInput(
            f"rollback 'consumers': {CONSUMER_SCHEMA_VERSION}={pinned} must be the lowest of "
            f"{SCHEMA_VERSIONS}={format_flag_value(SCHEMA_VERSIONS, versions)}"
        )
    return out


# --------------------------------------------------------------------------------------------
# Effective flags
# --------------------------------------------------------------------------------------------


def _check_canary_list(name: str, values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        # A bare string would be iterated character by character.
        raise BadInput(f"{name}: expected a list of ids, got the string {values!r}")
    return tuple(validate_flag(name, list(values)))


def effective_flags(
    stage: int,
    canary_lanes: Collection[str] = (),
    canary_subscribers: Collection[str] = (),
    rollbacks: Mapping[str, Mapping[str, FlagValue]] | None = None,
    manual: Mapping[str, FlagValue] | None = None,
) -> dict[str, FlagValue]:
    """The flags agents apply: stage plan, then manual overrides, then rollbacks (rollbacks win).

    The canary lists are the ones recorded on entering stage 2; they must be empty at stages 0
    and 1 and ``canary_lanes`` must be non-empty at stage 2. Every input is validated and so is
    the result (:func:`validate_flags`); raises :class:`BadInput`. Returns a fresh dict in table
    order.
    """
    info = STAGES[_check_stage_number(stage)]
    lanes = _check_canary_list(CANARY_LANES, canary_lanes)
    subscribers = _check_canary_list(CANARY_SUBSCRIBERS, canary_subscribers)
    if not info.carries_canary and (lanes or subscribers):
        raise BadInput(f"stage {stage} ({info.name}) has no canary: canary lanes and subscribers must be empty")
    if info.requires_canary_lanes and not lanes:
        raise BadInput(f"stage {stage} ({info.name}) needs canary lanes (--canary FILE)")

    flags: dict[str, FlagValue] = {name: _copy_value(value) for name, value in info.flags.items()}
    flags[CANARY_LANES] = list(lanes)
    flags[CANARY_SUBSCRIBERS] = list(subscribers)
    for name, value in (manual or {}).items():
        flags[name] = validate_flag(name, value)
    for capability, overrides in (rollbacks or {}).items():
        flags.update(_check_rollback(capability, overrides))
    return validate_flags(flags)


# --------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------

FORMAT_VERSION: Final = 1
_DOC_FIELDS: Final = ("canary_lanes", "canary_subscribers", "flags", "format", "manual", "rollbacks", "stage")


@dataclass(frozen=True)
class RolloutDocument:
    """The rollout document. Every instance is valid: construction validates and raises BadInput.

    ``flags`` is not passed in: it is always computed with :func:`effective_flags` from the other
    fields, so it can never disagree with them. Treat the dicts as read-only (they are private
    copies; the dataclass is frozen but Python dicts are not).
    """

    stage: int = 0
    canary_lanes: tuple[str, ...] = ()
    canary_subscribers: tuple[str, ...] = ()
    rollbacks: Mapping[str, Mapping[str, FlagValue]] = field(default_factory=dict)
    manual: Mapping[str, FlagValue] = field(default_factory=dict)
    flags: dict[str, FlagValue] = field(init=False)

    def __post_init__(self) -> None:
        _check_stage_number(self.stage)
        if not isinstance(self.rollbacks, Mapping):
            raise BadInput("rollbacks must be an object of capability -> overrides")
        if not isinstance(self.manual, Mapping):
            raise BadInput("manual must be an object of flag -> value")
        # Normalized private copies, so a caller's later mutation cannot reach us.
        object.__setattr__(self, "canary_lanes", _check_canary_list(CANARY_LANES, self.canary_lanes))
        object.__setattr__(self, "canary_subscribers", _check_canary_list(CANARY_SUBSCRIBERS, self.canary_subscribers))
        object.__setattr__(
            self, "rollbacks", {c: _check_rollback(c, o) for c, o in sorted(self.rollbacks.items(), key=lambda kv: str(kv[0]))}
        )
        object.__setattr__(self, "manual", {n: validate_flag(n, v) for n, v in sorted(self.manual.items(), key=lambda kv: str(kv[0]))})
        object.__setattr__(
            self,
            "flags",
            effective_flags(self.stage, self.canary_lanes, self.canary_subscribers, self.rollbacks, self.manual),
        )

    @property
    def stage_info(self) -> Stage:
        return STAGES[self.stage]

    @property
    def stage_name(self) -> str:
        return STAGES[self.stage].name

    def to_dict(self) -> dict[str, Any]:
        """The JSON-shaped document (fresh containers)."""
        return {
            "format": FORMAT_VERSION,
            "stage": self.stage,
            "flags": {n: _copy_value(v) for n, v in self.flags.items()},
            "canary_lanes": list(self.canary_lanes),
            "canary_subscribers": list(self.canary_subscribers),
            "manual": {n: _copy_value(v) for n, v in self.manual.items()},
            "rollbacks": {c: {n: _copy_value(v) for n, v in o.items()} for c, o in self.rollbacks.items()},
        }

    def to_json(self) -> str:
        """Stable JSON: sorted keys, 2-space indent, non-ASCII kept; encode as UTF-8 to store."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: object) -> RolloutDocument:
        """Validate a JSON-shaped document; raise BadInput naming the bad field.

        Strict: unknown fields are rejected (a new field means a new ``format``), and the stored
        ``flags`` must equal what the stage plan and overrides give — a hand-edited ``flags``
        that agents would apply but no command produced is refused.
        """
        where = "rollout document"
        if not isinstance(data, Mapping):
            raise BadInput(f"{where}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in _DOC_FIELDS)
        if unknown:
            raise BadInput(f"{where}: unknown field {unknown[0]!r}")
        missing = [k for k in _DOC_FIELDS if k not in data]
        if missing:
            raise BadInput(f"{where}: field {missing[0]!r} is missing")
        # type() and not ==: True and 1.0 both compare equal to 1.
        if type(data["format"]) is not int or data["format"] != FORMAT_VERSION:
            raise BadInput(f"{where}: field 'format': unsupported format {data['format']!r} (this cbctl reads {FORMAT_VERSION})")

        def field_error(name: str, exc: BadInput) -> BadInput:
            return BadInput(f"{where}: field {name!r}: {exc}")

        try:
            stage = _check_stage_number(data["stage"])
        except BadInput as exc:
            raise field_error("stage", exc) from None
        lists: dict[str, tuple[str, ...]] = {}
        for key, flag in (("canary_lanes", CANARY_LANES), ("canary_subscribers", CANARY_SUBSCRIBERS)):
            if not isinstance(data[key], list):
                raise BadInput(f"{where}: field {key!r}: expected a list, got {data[key]!r}")
            try:
                lists[key] = _check_canary_list(flag, data[key])
            except BadInput as exc:
                raise field_error(key, exc) from None
        info = STAGES[stage]
        if not info.carries_canary:
            for key in ("canary_lanes", "canary_subscribers"):
                if lists[key]:
                    raise BadInput(f"{where}: field {key!r}: must be empty at stage {stage} ({info.name})")
        if info.requires_canary_lanes and not lists["canary_lanes"]:
            raise BadInput(f"{where}: field 'canary_lanes': stage {stage} ({info.name}) needs canary lanes")
        manual = data["manual"]
        if not isinstance(manual, Mapping):
            raise BadInput(f"{where}: field 'manual': expected an object, got {manual!r}")
        for name, value in manual.items():
            try:
                validate_flag(name, value)
            except BadInput as exc:
                raise field_error(f"manual.{name}", exc) from None
        rollbacks = data["rollbacks"]
        if not isinstance(rollbacks, Mapping):
            raise BadInput(f"{where}: field 'rollbacks': expected an object, got {rollbacks!r}")
        for capability, overrides in rollbacks.items():
            try:
                _check_rollback(capability, overrides)
            except BadInput as exc:
                raise field_error(f"rollbacks.{capability}", exc) from None
        stored = data["flags"]
        if not isinstance(stored, Mapping):
            raise BadInput(f"{where}: field 'flags': expected an object, got {stored!r}")
        for name in stored:
            if name not in FLAGS:
                raise field_error("flags", BadInput(f"unknown flag {name!r}"))
        for name in FLAG_NAMES:
            if name not in stored:
                raise BadInput(f"{where}: field 'flags.{name}' is missing")
            try:
                validate_flag(name, stored[name])
            except BadInput as exc:
                raise field_error(f"flags.{name}", exc) from None
        try:
            doc = cls(stage, lists["canary_lanes"], lists["canary_subscribers"], rollbacks, manual)
        except BadInput as exc:
            # Fields are individually valid but do not fit together (e.g. stage 2 without lanes).
            raise BadInput(f"{where}: {exc}") from None
        for name in FLAG_NAMES:
            # Compare as stored (not normalized): an unsorted schema_versions is a tampered doc too.
            if stored[name] != doc.flags[name]:
                raise BadInput(
                    f"{where}: field 'flags.{name}': is {stored[name]!r} but stage {stage} and the "
                    f"recorded overrides give {doc.flags[name]!r}"
                )
        return doc

    @classmethod
    def from_json(cls, text: str | bytes) -> RolloutDocument:
        """Parse and validate (see :meth:`from_dict`); bytes must be UTF-8."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(f"rollout document: not valid UTF-8 (byte {exc.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"rollout document: not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
        return cls.from_dict(data)


def initial_document() -> RolloutDocument:
    """Stage 0 (preflight), no overrides: everything off."""
    return RolloutDocument()


# --------------------------------------------------------------------------------------------
# Transitions (each returns a new document)
# --------------------------------------------------------------------------------------------


def plan_advance(
    doc: RolloutDocument,
    to: int | None = None,
    canary_lanes: Collection[str] | None = None,
    canary_subscribers: Collection[str] | None = None,
) -> RolloutDocument:
    """Advance exactly one stage (``to`` defaults to the next one).

    - ``to`` equal to the current stage raises :class:`AlreadyAtStage` (exit 0);
    - backwards, skipping a stage, or past the final stage raises :class:`BadInput` (rolling a
      capability back is :func:`apply_rollback`, not a stage move);
    - entering stage 2 requires ``canary_lanes`` (non-empty; ``canary_subscribers`` optional);
      the canary lists are only accepted for that move, and carry on into stage 3.

    Manual overrides of staged flags are cleared, those of :data:`PERSISTENT_FLAGS` kept;
    rollbacks are kept (see the module docstring). Lane ids are not checked against the lane
    inventory here: that is the lanes file's job (:mod:`cbctl.core.model.lanesfile`).
    """
    if to is None:
        if doc.stage == FINAL_STAGE:
            raise BadInput(f"already at the final stage {FINAL_STAGE} ({STAGES[FINAL_STAGE].name}); there is no next stage")
        target = doc.stage + 1
    else:
        target = parse_stage(to)
    if target == doc.stage:
        raise AlreadyAtStage(doc.stage)
    if target < doc.stage:
        raise BadInput(
            f"stages only move forward (at {doc.stage}, asked for {target}); "
            f"roll a capability back with a rollback ({', '.join(CAPABILITIES)})"
        )
    if target != doc.stage + 1:
        raise BadInput(f"one stage at a time: at {doc.stage}, the next stage is {doc.stage + 1}, not {target}")
    info = STAGES[target]
    if info.requires_canary_lanes:
        if not canary_lanes:
            raise BadInput(f"stage {target} ({info.name}) needs canary lanes (--canary FILE)")
        lanes = _check_canary_list(CANARY_LANES, canary_lanes)
        subscribers = _check_canary_list(CANARY_SUBSCRIBERS, canary_subscribers or ())
    else:
        if canary_lanes or canary_subscribers:
            raise BadInput(f"canary lanes and subscribers are only given when entering stage 2, not stage {target}")
        lanes, subscribers = doc.canary_lanes, doc.canary_subscribers
    manual = {n: v for n, v in doc.manual.items() if n in PERSISTENT_FLAGS}
    return RolloutDocument(target, lanes, subscribers, doc.rollbacks, manual)


def apply_rollback(doc: RolloutDocument, capability: str, schema_version: int | None = None) -> RolloutDocument:
    """Record the rollback override of ``capability`` (see :data:`ROLLBACKS`); stage unchanged.

    ``consumers`` needs ``schema_version`` N (others refuse it): consumers are pinned to N and
    ``eventbus.schema_versions`` becomes ``sorted({N, current})``, current being the highest
    version published without this rollback. N above current is refused (not a rollback). The
    override is computed now and recorded; re-applying replaces it. Applying a rollback that is
    already in force returns an equal document.
    """
    spec = _rollback_spec(capability)
    if not spec.takes_schema_version:
        if schema_version is not None:
            raise BadInput(f"--schema-version only applies to the 'consumers' rollback, not {capability!r}")
        overrides = dict(spec.fixed)
    else:
        if schema_version is None:
            raise BadInput("rollback 'consumers' needs a schema version (--schema-version N)")
        pinned = validate_flag(CONSUMER_SCHEMA_VERSION, schema_version)
        others = {c: o for c, o in doc.rollbacks.items() if c != capability}
        base = effective_flags(doc.stage, doc.canary_lanes, doc.canary_subscribers, others, doc.manual)
        current = max(base[SCHEMA_VERSIONS])
        if pinned > current:
            raise BadInput(
                f"cannot roll consumers back to schema version {pinned}: the current version is {current}"
            )
        overrides = {CONSUMER_SCHEMA_VERSION: pinned, SCHEMA_VERSIONS: sorted({pinned, current})}
    return RolloutDocument(
        doc.stage, doc.canary_lanes, doc.canary_subscribers, {**doc.rollbacks, capability: overrides}, doc.manual
    )


def clear_rollback(doc: RolloutDocument, capability: str) -> RolloutDocument:
    """Remove ``capability``'s rollback: its flags return to the stage plan and manual overrides.

    Clearing a rollback that is not in force returns an equal document (idempotent, so a
    runbook may clear unconditionally); an unknown capability raises :class:`BadInput`.
    """
    _rollback_spec(capability)
    if capability not in doc.rollbacks:
        return doc
    rollbacks = {c: o for c, o in doc.rollbacks.items() if c != capability}
    return RolloutDocument(doc.stage, doc.canary_lanes, doc.canary_subscribers, rollbacks, doc.manual)


def _held_by_rollback(doc: RolloutDocument, names: Iterable[str]) -> None:
    for name in names:
        for capability in doc.rollbacks:
            if name in ROLLBACKS[capability].flags:
                raise BadInput(
                    f"flag {name} is held by the {capability!r} rollback; clear it first "
                    f"(cbctl rollback {capability} --clear)"
                )


def set_flags(doc: RolloutDocument, assignments: Mapping[str, FlagValue]) -> RolloutDocument:
    """Record manual overrides ``{flag: typed value}`` (parse strings with :func:`parse_flag_assignments`).

    Refused (BadInput): no assignments, an unknown flag or bad value, a flag held by an active
    rollback (the rollback would hide it, so the change would silently do nothing), or a result
    that breaks a cross-flag rule. Setting a flag to its stage-plan value still records an
    override (an explicit pin). Overrides of staged flags end at the next stage transition.
    """
    if not assignments:
        raise BadInput("no flags to set (give NAME=VALUE)")
    values = {name: validate_flag(name, value) for name, value in assignments.items()}
    _held_by_rollback(doc, values)
    return RolloutDocument(
        doc.stage, doc.canary_lanes, doc.canary_subscribers, doc.rollbacks, {**doc.manual, **values}
    )


def unset_flags(doc: RolloutDocument, names: Iterable[str]) -> RolloutDocument:
    """Drop manual overrides: those flags return to the stage plan. Names without one are ignored."""
    drop = set()
    for name in names:
        _spec(name)
        drop.add(name)
    manual = {n: v for n, v in doc.manual.items() if n not in drop}
    return RolloutDocument(doc.stage, doc.canary_lanes, doc.canary_subscribers, doc.rollbacks, manual)


# --------------------------------------------------------------------------------------------
# Diff
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlagChange:
    """One flag whose value differs; ``None`` stands for 'absent' on that side."""

    name: str
    old: FlagValue | None
    new: FlagValue | None


def diff(old_flags: Mapping[str, FlagValue], new_flags: Mapping[str, FlagValue]) -> list[FlagChange]:
    """Flags whose value differs between two flag sets, sorted by name."""
    return [
        FlagChange(name, _copy_value(old_flags.get(name)), _copy_value(new_flags.get(name)))
        for name in sorted(set(old_flags) | set(new_flags))
        if name not in old_flags or name not in new_flags or old_flags[name] != new_flags[name]
    ]


__all__ = [
    "CAPABILITIES", "FINAL_STAGE", "FLAGS", "FLAG_NAMES", "FORMAT_VERSION", "PERSISTENT_FLAGS", "ROLLBACKS", "STAGES",
    "AlreadyAtStage", "FlagChange", "FlagSpec", "RollbackSpec", "RolloutDocument", "Stage",
    "apply_rollback", "clear_rollback", "diff", "effective_flags", "format_flag_value", "initial_document",
    "parse_flag_assignment", "parse_flag_assignments", "parse_flag_value", "parse_stage", "plan_advance",
    "set_flags", "unset_flags", "validate_flag", "validate_flags",
]
