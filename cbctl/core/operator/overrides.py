"""Where each effective flag comes from: the stage plan, a manual override or a rollback.

Contract: :func:`flag_sources` compares a rollout document's effective flags with what its stage
plan alone gives (:func:`cbctl.core.model.stages.effective_flags` without overrides, canary sets
kept: they are inputs of stage 2, not overrides) and names the source of every flag, with the
precedence the model applies (plan, then manual overrides, then rollbacks; docs/model.md). Pure:
``stage status`` marks the flags it returns as differing, and ``flags unset`` uses
:func:`manual_overrides` to say what it would drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from cbctl.core.model.flags import FLAG_NAMES, FlagValue, copy_value
from cbctl.core.model.rollout import RolloutDocument
from cbctl.core.model.stages import ROLLBACKS, effective_flags

Source = Literal["plan", "manual", "rollback"]

SOURCE_PLAN: Final = "plan"
SOURCE_MANUAL: Final = "manual"
SOURCE_ROLLBACK: Final = "rollback"


@dataclass(frozen=True)
class FlagSource:
    """One flag: its effective value, the value the stage plan gives, and who set it.

    ``source``: ``plan`` (no override), ``manual`` (``flags set``), ``rollback`` (``capability``'s
    rollback holds it; a rollback wins over a manual override, which then shows in
    ``shadowed_manual``). ``differs``: the effective value is not the plan's (a manual override
    equal to the plan value is an explicit pin: ``source`` manual, ``differs`` False).
    """

    name: str
    value: FlagValue
    plan: FlagValue
    source: Source
    capability: str | None = None
    shadowed_manual: FlagValue | None = None

    @property
    def differs(self) -> bool:
        return self.value != self.plan

    @property
    def marker(self) -> str:
        """A short table mark: ``""`` (plan), ``manual``, ``pinned`` (manual, equal to the plan)
        or ``rollback:<capability>``."""
        if self.source == SOURCE_ROLLBACK:
            return f"rollback:{self.capability}"
        if self.source == SOURCE_MANUAL:
            return "manual" if self.differs else "pinned"
        return ""

    def public(self) -> dict[str, Any]:
        """The JSON item (snake_case keys)."""
        return {
            "flag": self.name,
            "value": copy_value(self.value),
            "plan": copy_value(self.plan),
            "source": self.source,
            "capability": self.capability,
            "differs": self.differs,
        }


def plan_flags(doc: RolloutDocument) -> dict[str, FlagValue]:
    """The flags the document's stage plan alone gives (its canary sets kept, no overrides)."""
    return effective_flags(doc.stage, doc.canary_lanes, doc.canary_subscribers)


def flag_sources(doc: RolloutDocument) -> list[FlagSource]:
    """Every flag in table order with its source (see :class:`FlagSource`)."""
    plan = plan_flags(doc)
    held: dict[str, str] = {}
    for capability in doc.rollbacks:
        for name in ROLLBACKS[capability].flags:
            held[name] = capability
    out = []
    for name in FLAG_NAMES:
        value = doc.flags[name]
        if name in held:
            out.append(FlagSource(name, value, plan[name], SOURCE_ROLLBACK, held[name],
                                  copy_value(doc.manual[name]) if name in doc.manual else None))
        elif name in doc.manual:
            out.append(FlagSource(name, value, plan[name], SOURCE_MANUAL))
        else:
            out.append(FlagSource(name, value, plan[name], SOURCE_PLAN))
    return out


def overridden(doc: RolloutDocument) -> list[FlagSource]:
    """The flags not from the plan (manual overrides, pins included, and rollbacks)."""
    return [s for s in flag_sources(doc) if s.source != SOURCE_PLAN]


def manual_overrides(doc: RolloutDocument) -> dict[str, FlagValue]:
    """The recorded manual overrides ``{flag: value}`` (what ``flags unset`` can drop)."""
    return {n: copy_value(v) for n, v in doc.manual.items()}


__all__ = [
    "SOURCE_MANUAL", "SOURCE_PLAN", "SOURCE_ROLLBACK", "FlagSource", "Source",
    "flag_sources", "manual_overrides", "overridden", "plan_flags",
]
