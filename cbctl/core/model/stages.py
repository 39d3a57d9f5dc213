"""The stage plan, the per-capability rollbacks and the effective flags they give — as data, pure.

Contract: :data:`STAGES` lists every stage's flags in full; :data:`ROLLBACKS` lists the only flags
each rollback may touch; :func:`effective_flags` is the one place that combines plan, manual
overrides and rollbacks (precedence explained in docs/model.md). No I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from cbctl.core.model.errors import BadInput
from cbctl.core.model.flags import (
    BRIDGE_CANARY,
    BRIDGE_OFF,
    BRIDGE_READ_ONLY,
    BRIDGE_STREAMING,
    CANARY_LANES,
    CANARY_SUBSCRIBERS,
    CLUSTER_ENABLED,
    CONSUMER_SCHEMA_VERSION,
    EVENTBUS_BRIDGE,
    EVENTBUS_PUBLISH,
    FLAGS,
    GUARD_CANARY,
    GUARD_ENFORCE,
    GUARD_OBSERVE,
    GUARD_OFF,
    OWNERSHIP_GUARD,
    PUBLISH_ON,
    PUBLISH_SHADOW,
    ROUTING_ALL,
    ROUTING_CANARY,
    SCHEMA_VERSIONS,
    SIGNALS_ROUTING,
    SOURCE_CANONICAL,
    SOURCE_LOCAL,
    STREAM_SOURCE,
    FlagValue,
    copy_value,
    format_flag_value,
    validate_flag,
    validate_flags,
)


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


def _plan(changes: Mapping[str, FlagValue] | None = None) -> Mapping[str, Any]:
    base = {name: spec.default for name, spec in FLAGS.items() if name not in (CANARY_LANES, CANARY_SUBSCRIBERS)}
    for name, value in (changes or {}).items():
        if name not in base:  # a typo in the table below must fail at import, not pass silently
            raise KeyError(name)
        base[name] = value
    return MappingProxyType(base)


#: The stage plan, indexed by stage number (README.md, Stages → commands).
STAGES: Final[tuple[Stage, ...]] = (
    Stage(0, "preflight", "everything off: nodes run locally, nothing registered, nothing published", _plan()),
    Stage(
        1, "observe-only",
        "agents register; guard only observes, events are shadow-published, bridge verifies without delivering",
        _plan({CLUSTER_ENABLED: True, OWNERSHIP_GUARD: GUARD_OBSERVE, EVENTBUS_PUBLISH: PUBLISH_SHADOW,
               EVENTBUS_BRIDGE: BRIDGE_READ_ONLY}),
    ),
    Stage(
        2, "partial",
        "guard enforces, signals are routed and the bridge delivers on the canary lanes and subscribers only",
        _plan({CLUSTER_ENABLED: True, OWNERSHIP_GUARD: GUARD_CANARY, EVENTBUS_PUBLISH: PUBLISH_ON,
               EVENTBUS_BRIDGE: BRIDGE_CANARY, SIGNALS_ROUTING: ROUTING_CANARY}),
        requires_canary_lanes=True, carries_canary=True,
    ),
    Stage(
        3, "full",
        "guard enforces on every lane, all signals routed, bridge streams, canonical events are the source",
        _plan({CLUSTER_ENABLED: True, OWNERSHIP_GUARD: GUARD_ENFORCE, EVENTBUS_PUBLISH: PUBLISH_ON,
               EVENTBUS_BRIDGE: BRIDGE_STREAMING, SIGNALS_ROUTING: ROUTING_ALL, STREAM_SOURCE: SOURCE_CANONICAL}),
        carries_canary=True,
    ),
)

FINAL_STAGE: Final = len(STAGES) - 1


def check_stage_number(stage: object) -> int:
    """``stage`` if it is a stage number (an int, not a bool, 0..FINAL_STAGE); else BadInput."""
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
    return check_stage_number(value)


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
            MappingProxyType({OWNERSHIP_GUARD: GUARD_OFF}),
        ),
        "event-bus": RollbackSpec(
            "event-bus", (EVENTBUS_BRIDGE, STREAM_SOURCE),
            "bridge off, streaming from the local source; publishing and local execution keep running",
            MappingProxyType({EVENTBUS_BRIDGE: BRIDGE_OFF, STREAM_SOURCE: SOURCE_LOCAL}),
        ),
        "consumers": RollbackSpec(
            "consumers", (CONSUMER_SCHEMA_VERSION, SCHEMA_VERSIONS),
            "pin consumers to schema version N and dual-publish N and the current version",
            takes_schema_version=True,
        ),
    }
)

CAPABILITIES: Final[tuple[str, ...]] = tuple(ROLLBACKS)


def rollback_spec(capability: object) -> RollbackSpec:
    """The rollback of ``capability``; BadInput listing the capabilities if unknown."""
    if isinstance(capability, str) and capability in ROLLBACKS:
        return ROLLBACKS[capability]
    raise BadInput(f"unknown capability {capability!r} (allowed: {', '.join(CAPABILITIES)})")


def check_rollback(capability: object, overrides: object) -> dict[str, FlagValue]:
    """Validate one recorded rollback override; return it normalized."""
    spec = rollback_spec(capability)
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


def check_canary_list(name: str, values: Iterable[str]) -> tuple[str, ...]:
    """The canary ids of flag ``name`` validated (:func:`validate_flag`), as a tuple."""
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
    info = STAGES[check_stage_number(stage)]
    lanes = check_canary_list(CANARY_LANES, canary_lanes)
    subscribers = check_canary_list(CANARY_SUBSCRIBERS, canary_subscribers)
    if not info.carries_canary and (lanes or subscribers):
        raise BadInput(f"stage {stage} ({info.name}) has no canary: canary lanes and subscribers must be empty")
    if info.requires_canary_lanes and not lanes:
        raise BadInput(f"stage {stage} ({info.name}) needs canary lanes (--canary FILE)")

    flags: dict[str, FlagValue] = {name: copy_value(value) for name, value in info.flags.items()}
    flags[CANARY_LANES] = list(lanes)
    flags[CANARY_SUBSCRIBERS] = list(subscribers)
    for name, value in (manual or {}).items():
        flags[name] = validate_flag(name, value)
    for capability, overrides in (rollbacks or {}).items():
        flags.update(check_rollback(capability, overrides))
    return validate_flags(flags)


__all__ = [
    "CAPABILITIES", "FINAL_STAGE", "ROLLBACKS", "STAGES", "RollbackSpec", "Stage",
    "check_canary_list", "check_rollback", "check_stage_number", "effective_flags", "parse_stage", "rollback_spec",
]
