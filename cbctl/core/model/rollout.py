"""The rollout document and its transitions (stage advance, flag overrides, rollbacks) — pure.

Contract: every function returns a new, valid :class:`RolloutDocument` and none mutates its
input; :meth:`RolloutDocument.to_json` is the stored JSON (shape in docs/model.md), and
:meth:`RolloutDocument.from_json` refuses anything no command could have written. The CLI reads
and writes the document (compare-and-swap on its revision); the agents apply its ``flags``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cbctl.core.model.errors import BadInput, CbctlError
from cbctl.core.model.flags import (
    CANARY_LANES,
    CANARY_SUBSCRIBERS,
    CONSUMER_SCHEMA_VERSION,
    FLAG_NAMES,
    FLAGS,
    PERSISTENT_FLAGS,
    SCHEMA_VERSIONS,
    FlagValue,
    copy_value,
    flag_spec,
    validate_flag,
)
from cbctl.core.model.stages import (
    CAPABILITIES,
    FINAL_STAGE,
    ROLLBACKS,
    STAGES,
    Stage,
    check_canary_list,
    check_rollback,
    check_stage_number,
    effective_flags,
    parse_stage,
    rollback_spec,
)


class AlreadyAtStage(CbctlError):
    """The rollout is already at the requested stage: nothing to do, which is not a failure."""

    exit_code = 0

    def __init__(self, stage: int) -> None:
        super().__init__(f"already at stage {stage} ({STAGES[stage].name}); nothing to do")
        self.stage = stage


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
        check_stage_number(self.stage)
        if not isinstance(self.rollbacks, Mapping):
            raise BadInput("rollbacks must be an object of capability -> overrides")
        if not isinstance(self.manual, Mapping):
            raise BadInput("manual must be an object of flag -> value")
        # Normalized private copies, so a caller's later mutation cannot reach us.
        object.__setattr__(self, "canary_lanes", check_canary_list(CANARY_LANES, self.canary_lanes))
        object.__setattr__(self, "canary_subscribers", check_canary_list(CANARY_SUBSCRIBERS, self.canary_subscribers))
        object.__setattr__(
            self, "rollbacks", {c: check_rollback(c, o) for c, o in sorted(self.rollbacks.items(), key=lambda kv: str(kv[0]))}
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
            "flags": {n: copy_value(v) for n, v in self.flags.items()},
            "canary_lanes": list(self.canary_lanes),
            "canary_subscribers": list(self.canary_subscribers),
            "manual": {n: copy_value(v) for n, v in self.manual.items()},
            "rollbacks": {c: {n: copy_value(v) for n, v in o.items()} for c, o in self.rollbacks.items()},
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
            stage = check_stage_number(data["stage"])
        except BadInput as exc:
            raise field_error("stage", exc) from None
        lists: dict[str, tuple[str, ...]] = {}
        for key, flag in (("canary_lanes", CANARY_LANES), ("canary_subscribers", CANARY_SUBSCRIBERS)):
            if not isinstance(data[key], list):
                raise BadInput(f"{where}: field {key!r}: expected a list, got {data[key]!r}")
            try:
                lists[key] = check_canary_list(flag, data[key])
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
                check_rollback(capability, overrides)
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
    rollbacks are kept (docs/model.md, "Manual overrides"). Lane ids are not checked against the lane
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
        lanes = check_canary_list(CANARY_LANES, canary_lanes)
        subscribers = check_canary_list(CANARY_SUBSCRIBERS, canary_subscribers or ())
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
    spec = rollback_spec(capability)
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
    rollback_spec(capability)
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
        flag_spec(name)
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
        FlagChange(name, copy_value(old_flags.get(name)), copy_value(new_flags.get(name)))
        for name in sorted(set(old_flags) | set(new_flags))
        if name not in old_flags or name not in new_flags or old_flags[name] != new_flags[name]
    ]


__all__ = [
    "FORMAT_VERSION", "AlreadyAtStage", "FlagChange", "RolloutDocument",
    "apply_rollback", "clear_rollback", "diff", "initial_document", "plan_advance", "set_flags", "unset_flags",
]
