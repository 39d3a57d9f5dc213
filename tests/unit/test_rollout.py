"""Unit tests of cbctl.core.model.{flags,stages,rollout}: flags, stage plan, rollbacks, transitions, JSON."""

from __future__ import annotations

import json

import pytest

from cbctl.core.model import flags as f
from cbctl.core.model import stages as st
from cbctl.core.model.errors import BadInput, CbctlError
from cbctl.core.model.flags import parse_flag_assignment, parse_flag_assignments, validate_flag
from cbctl.core.model.rollout import (
    AlreadyAtStage,
    FlagChange,
    RolloutDocument,
    apply_rollback,
    clear_rollback,
    diff,
    initial_document,
    plan_advance,
    set_flags,
    unset_flags,
)
from cbctl.core.model.stages import effective_flags

LANES = ("lane-01", "lane-02")
SUBS = ("sub-a",)

STAGE0 = {
    "cluster.enabled": False,
    "ownership.guard": "off",
    "eventbus.publish": "off",
    "eventbus.bridge": "off",
    "signals.routing": "off",
    "stream.source": "local",
    "eventbus.schema_versions": [1],
    "consumers.schema_version": 1,
    "canary.lanes": [],
    "canary.subscribers": [],
}
STAGE1 = {
    **STAGE0,
    "cluster.enabled": True,
    "ownership.guard": "observe",
    "eventbus.publish": "shadow",
    "eventbus.bridge": "read-only",
}
STAGE2 = {
    **STAGE0,
    "cluster.enabled": True,
    "ownership.guard": "canary",
    "eventbus.publish": "on",
    "eventbus.bridge": "canary",
    "signals.routing": "canary",
    "canary.lanes": list(LANES),
    "canary.subscribers": list(SUBS),
}
STAGE3 = {
    **STAGE2,
    "ownership.guard": "enforce",
    "eventbus.bridge": "streaming",
    "signals.routing": "all",
    "stream.source": "canonical",
}


def at_stage(n: int) -> RolloutDocument:
    doc = initial_document()
    while doc.stage < n:
        if doc.stage == 1:
            doc = plan_advance(doc, canary_lanes=LANES, canary_subscribers=SUBS)
        else:
            doc = plan_advance(doc)
    return doc


# ---------------------------------------------------------------- flag table


def test_flag_names_are_the_design_contract():
    assert f.FLAG_NAMES == (
        "cluster.enabled",
        "ownership.guard",
        "eventbus.publish",
        "eventbus.bridge",
        "signals.routing",
        "stream.source",
        "eventbus.schema_versions",
        "consumers.schema_version",
        "canary.lanes",
        "canary.subscribers",
    )


def test_flag_value_constants_are_the_table_values():
    # The agents compare flag values through these constants: they must be exactly the table's.
    assert f.GUARD_VALUES == f.FLAGS[f.OWNERSHIP_GUARD].allowed == (
        f.GUARD_OFF, f.GUARD_OBSERVE, f.GUARD_CANARY, f.GUARD_ENFORCE)
    assert f.PUBLISH_VALUES == f.FLAGS[f.EVENTBUS_PUBLISH].allowed == (f.PUBLISH_OFF, f.PUBLISH_SHADOW, f.PUBLISH_ON)
    assert f.BRIDGE_VALUES == f.FLAGS[f.EVENTBUS_BRIDGE].allowed == (
        f.BRIDGE_OFF, f.BRIDGE_READ_ONLY, f.BRIDGE_CANARY, f.BRIDGE_STREAMING)
    assert f.ROUTING_VALUES == f.FLAGS[f.SIGNALS_ROUTING].allowed == (f.ROUTING_OFF, f.ROUTING_CANARY, f.ROUTING_ALL)
    assert f.SOURCE_VALUES == f.FLAGS[f.STREAM_SOURCE].allowed == (f.SOURCE_LOCAL, f.SOURCE_CANONICAL)
    assert (f.BRIDGE_READ_ONLY, f.BRIDGE_STREAMING, f.PUBLISH_SHADOW, f.SOURCE_CANONICAL) == (
        "read-only", "streaming", "shadow", "canonical")


def test_flag_spec_allowed_values_and_defaults():
    assert f.FLAGS["ownership.guard"].allowed == ("off", "observe", "canary", "enforce")
    assert f.FLAGS["eventbus.publish"].allowed == ("off", "shadow", "on")
    assert f.FLAGS["eventbus.bridge"].allowed == ("off", "read-only", "canary", "streaming")
    assert f.FLAGS["signals.routing"].allowed == ("off", "canary", "all")
    assert f.FLAGS["stream.source"].allowed == ("local", "canonical")
    assert {n: s.default_value() for n, s in f.FLAGS.items()} == STAGE0
    for spec in f.FLAGS.values():
        assert spec.help and "\n" not in spec.help
        assert spec.allowed_text


def test_default_value_is_a_fresh_list():
    v = f.FLAGS["eventbus.schema_versions"].default_value()
    v.append(9)
    assert f.FLAGS["eventbus.schema_versions"].default_value() == [1]


# ---------------------------------------------------------------- stage plan


@pytest.mark.parametrize(
    ("stage", "name", "expected"),
    [(0, "preflight", STAGE0), (1, "observe-only", STAGE1), (2, "partial", STAGE2), (3, "full", STAGE3)],
)
def test_every_stage_flags(stage, name, expected):
    doc = at_stage(stage)
    assert doc.stage == stage
    assert doc.stage_name == name
    assert st.STAGES[stage].name == name
    assert st.STAGES[stage].description
    assert doc.flags == expected


def test_stage_plan_is_complete_and_keeps_persistent_flags_constant():
    for stage in st.STAGES:
        assert set(stage.flags) == set(f.FLAG_NAMES) - {"canary.lanes", "canary.subscribers"}
        for name in f.PERSISTENT_FLAGS:
            # The reason manual overrides of these survive a stage transition.
            assert stage.flags[name] == f.FLAGS[name].default


def test_effective_flags_directly():
    assert effective_flags(0) == STAGE0
    assert effective_flags(2, LANES, SUBS) == STAGE2
    assert effective_flags(3, LANES, SUBS, {"coordination": {"ownership.guard": "off"}}) == {
        **STAGE3,
        "ownership.guard": "off",
    }


def test_effective_flags_precedence_rollback_beats_manual_beats_plan():
    flags = effective_flags(
        3, LANES, (), rollbacks={"coordination": {"ownership.guard": "off"}},
        manual={"ownership.guard": "observe", "signals.routing": "off"},
    )
    assert flags["ownership.guard"] == "off"  # rollback wins over manual
    assert flags["signals.routing"] == "off"  # manual wins over plan
    assert flags["eventbus.bridge"] == "streaming"  # plan


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((4,), "invalid stage 4"),
        ((-1,), "invalid stage -1"),
        ((True,), "invalid stage True"),
        ((2,), "needs canary lanes"),
        ((1, LANES), "must be empty"),
        ((0, (), SUBS), "must be empty"),
        ((2, "lane-01"), "expected a list"),
    ],
)
def test_effective_flags_rejects(args, match):
    with pytest.raises(BadInput, match=match):
        effective_flags(*args)


def test_effective_flags_returns_fresh_containers():
    a = effective_flags(2, LANES)
    a["canary.lanes"].append("x")
    a["eventbus.schema_versions"].append(5)
    assert effective_flags(2, LANES)["canary.lanes"] == list(LANES)
    assert effective_flags(0)["eventbus.schema_versions"] == [1]


@pytest.mark.parametrize(("text", "n"), [("0", 0), ("partial", 2), (" Full ", 3), (1, 1)])
def test_parse_stage(text, n):
    assert st.parse_stage(text) == n


def test_parse_stage_rejects():
    with pytest.raises(BadInput, match=r"invalid stage 'bogus'.*2 \(partial\)"):
        st.parse_stage("bogus")


# ---------------------------------------------------------------- transitions


def test_advance_one_stage_at_a_time():
    doc = plan_advance(initial_document())
    assert doc.stage == 1
    with pytest.raises(BadInput, match="one stage at a time"):
        plan_advance(doc, to=3)
    with pytest.raises(BadInput, match="only move forward"):
        plan_advance(at_stage(2), to=1)


def test_advance_to_current_stage_is_already_at_stage_exit_0():
    doc = at_stage(2)
    with pytest.raises(AlreadyAtStage) as info:
        plan_advance(doc, to=2)
    assert isinstance(info.value, CbctlError)
    assert info.value.exit_code == 0
    assert info.value.stage == 2
    assert "partial" in str(info.value)


def test_advance_beyond_final_stage():
    doc = at_stage(3)
    with pytest.raises(BadInput, match="final stage 3"):
        plan_advance(doc)
    with pytest.raises(BadInput, match="invalid stage 4"):
        plan_advance(doc, to=4)


def test_advance_to_stage2_requires_canary_lanes():
    doc = at_stage(1)
    with pytest.raises(BadInput, match="needs canary lanes"):
        plan_advance(doc)
    with pytest.raises(BadInput, match="needs canary lanes"):
        plan_advance(doc, 2, canary_lanes=[], canary_subscribers=SUBS)
    doc2 = plan_advance(doc, 2, canary_lanes=LANES)
    assert doc2.canary_lanes == LANES
    assert doc2.canary_subscribers == ()
    assert doc2.flags["canary.subscribers"] == []


def test_advance_rejects_canary_outside_stage2():
    with pytest.raises(BadInput, match="only given when entering stage 2"):
        plan_advance(initial_document(), canary_lanes=LANES)
    with pytest.raises(BadInput, match="only given when entering stage 2"):
        plan_advance(at_stage(2), canary_subscribers=SUBS)


def test_advance_rejects_bad_canary_ids():
    with pytest.raises(BadInput, match="duplicate id 'lane-01'"):
        plan_advance(at_stage(1), canary_lanes=["lane-01", "lane-01"])
    with pytest.raises(BadInput, match="contains whitespace"):
        plan_advance(at_stage(1), canary_lanes=["lane 01"])


def test_stage3_carries_canary_lists():
    doc = at_stage(3)
    assert doc.canary_lanes == LANES
    assert doc.canary_subscribers == SUBS


def test_advance_is_pure():
    doc = at_stage(1)
    before = doc.to_json()
    plan_advance(doc, canary_lanes=LANES)
    assert doc.to_json() == before
    assert doc.stage == 1


def test_advance_clears_staged_manual_overrides_but_keeps_schema_and_rollbacks():
    doc = set_flags(at_stage(2), {"ownership.guard": "observe", "eventbus.schema_versions": [1, 2]})
    doc = set_flags(doc, {"consumers.schema_version": 2})
    doc = apply_rollback(doc, "event-bus")
    doc3 = plan_advance(doc)
    assert doc3.manual == {"eventbus.schema_versions": [1, 2], "consumers.schema_version": 2}
    assert doc3.flags["ownership.guard"] == "enforce"
    assert doc3.flags["eventbus.schema_versions"] == [1, 2]
    assert doc3.flags["consumers.schema_version"] == 2
    assert doc3.rollbacks == {"event-bus": {"eventbus.bridge": "off", "stream.source": "local"}}
    assert doc3.flags["eventbus.bridge"] == "off"
    assert doc3.flags["stream.source"] == "local"


# ---------------------------------------------------------------- rollbacks


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize(
    ("capability", "changes"),
    [
        ("coordination", {"ownership.guard": "off"}),
        ("event-bus", {"eventbus.bridge": "off", "stream.source": "local"}),
    ],
)
def test_rollback_touches_only_its_capability_and_clear_restores_plan(stage, capability, changes):
    doc = at_stage(stage)
    rolled = apply_rollback(doc, capability)
    assert rolled.stage == stage
    assert rolled.flags == {**doc.flags, **changes}
    assert rolled.rollbacks == {capability: changes}
    touched = {c.name for c in diff(doc.flags, rolled.flags)}
    assert touched <= set(st.ROLLBACKS[capability].flags)
    cleared = clear_rollback(rolled, capability)
    assert cleared.flags == doc.flags
    assert cleared == doc


def test_rollback_at_stage3_actually_changes_flags():
    doc = at_stage(3)
    assert [c.name for c in diff(doc.flags, apply_rollback(doc, "coordination").flags)] == ["ownership.guard"]
    assert diff(doc.flags, apply_rollback(doc, "event-bus").flags) == [
        FlagChange("eventbus.bridge", "streaming", "off"),
        FlagChange("stream.source", "canonical", "local"),
    ]


def test_consumers_rollback_pins_and_dual_publishes():
    doc = set_flags(at_stage(3), {"eventbus.schema_versions": [2], "consumers.schema_version": 2})
    rolled = apply_rollback(doc, "consumers", schema_version=1)
    assert rolled.rollbacks == {"consumers": {"consumers.schema_version": 1, "eventbus.schema_versions": [1, 2]}}
    assert diff(doc.flags, rolled.flags) == [
        FlagChange("consumers.schema_version", 2, 1),
        FlagChange("eventbus.schema_versions", [2], [1, 2]),
    ]
    assert clear_rollback(rolled, "consumers").flags == doc.flags


def test_consumers_rollback_to_current_version_is_single_entry():
    rolled = apply_rollback(at_stage(2), "consumers", schema_version=1)
    assert rolled.flags["eventbus.schema_versions"] == [1]
    assert rolled.flags["consumers.schema_version"] == 1


def test_consumers_rollback_reapplied_uses_current_without_itself():
    doc = set_flags(at_stage(3), {"eventbus.schema_versions": [2], "consumers.schema_version": 2})
    once = apply_rollback(doc, "consumers", schema_version=1)
    twice = apply_rollback(once, "consumers", schema_version=1)
    # "current" is computed without the rollback itself: still 2, not the pinned 1.
    assert twice.flags["eventbus.schema_versions"] == [1, 2]
    assert twice.flags["consumers.schema_version"] == 1


@pytest.mark.parametrize("flags", [{"eventbus.schema_versions": [3]}, {"eventbus.schema_versions": [1, 3]},
                                   {"consumers.schema_version": 3}])
def test_unsupported_schema_versions_are_refused(flags):
    with pytest.raises(BadInput, match="schema version 3 is not supported"):
        set_flags(at_stage(3), flags)


@pytest.mark.parametrize(
    ("capability", "version", "match"),
    [
        ("consumers", None, "needs a schema version"),
        ("consumers", 0, "not a positive integer"),
        ("consumers", True, "not a positive integer"),
        ("consumers", 2, "current version is 1"),
        ("coordination", 1, "only applies to the 'consumers' rollback"),
        ("event-bus", 2, "only applies to the 'consumers' rollback"),
        ("nats", None, r"unknown capability 'nats' \(allowed: coordination, event-bus, consumers\)"),
    ],
)
def test_apply_rollback_rejects(capability, version, match):
    with pytest.raises(BadInput, match=match):
        apply_rollback(at_stage(2), capability, schema_version=version)


def test_rollbacks_are_independent_and_combine():
    doc = at_stage(3)
    both = apply_rollback(apply_rollback(doc, "coordination"), "event-bus")
    assert both.flags == {**STAGE3, "ownership.guard": "off", "eventbus.bridge": "off", "stream.source": "local"}
    only_bus = clear_rollback(both, "coordination")
    assert only_bus.flags == {**STAGE3, "eventbus.bridge": "off", "stream.source": "local"}
    assert set(only_bus.rollbacks) == {"event-bus"}


def test_apply_same_rollback_twice_and_clear_absent_are_idempotent():
    doc = apply_rollback(at_stage(2), "coordination")
    assert apply_rollback(doc, "coordination") == doc
    assert clear_rollback(at_stage(2), "event-bus") == at_stage(2)
    with pytest.raises(BadInput, match="unknown capability"):
        clear_rollback(doc, "everything")


def test_clear_rollback_restores_manual_override_not_just_plan():
    doc = set_flags(at_stage(3), {"ownership.guard": "observe"})
    rolled = apply_rollback(doc, "coordination")
    assert rolled.flags["ownership.guard"] == "off"
    assert clear_rollback(rolled, "coordination").flags["ownership.guard"] == "observe"


def test_rollback_survives_stage_transition():
    doc = apply_rollback(at_stage(1), "coordination")
    doc2 = plan_advance(doc, canary_lanes=LANES)
    assert doc2.flags["ownership.guard"] == "off"
    assert plan_advance(doc2).flags["ownership.guard"] == "off"


# ---------------------------------------------------------------- manual flags


def test_set_flags_records_override_and_is_pure():
    doc = at_stage(2)
    new = set_flags(doc, {"signals.routing": "off", "eventbus.publish": "shadow"})
    assert new.manual == {"eventbus.publish": "shadow", "signals.routing": "off"}
    assert diff(doc.flags, new.flags) == [
        FlagChange("eventbus.publish", "on", "shadow"),
        FlagChange("signals.routing", "canary", "off"),
    ]
    assert doc.manual == {}


def test_set_flags_refuses_flags_held_by_rollback():
    doc = apply_rollback(at_stage(3), "event-bus")
    with pytest.raises(BadInput, match=r"stream.source is held by the 'event-bus' rollback.*--clear"):
        set_flags(doc, {"stream.source": "canonical"})
    doc = apply_rollback(at_stage(3), "consumers", schema_version=1)
    with pytest.raises(BadInput, match="held by the 'consumers' rollback"):
        set_flags(doc, {"eventbus.schema_versions": [1, 2]})
    # Flags of other capabilities remain settable.
    assert set_flags(doc, {"ownership.guard": "observe"}).flags["ownership.guard"] == "observe"


@pytest.mark.parametrize(
    ("assignments", "match"),
    [
        ({}, "no flags to set"),
        ({"ownership.gaurd": "off"}, r"unknown flag 'ownership.gaurd' \(did you mean 'ownership.guard'\?\)"),
        ({"ownership.guard": "on"}, "invalid value 'on' for flag ownership.guard"),
        ({"consumers.schema_version": 2}, "consumers.schema_version=2 is not one of eventbus.schema_versions=1"),
        ({"eventbus.schema_versions": [2]}, "consumers.schema_version=1 is not one of"),
        ({"canary.lanes": []}, "ownership.guard=canary needs a non-empty canary.lanes"),
    ],
)
def test_set_flags_rejects(assignments, match):
    with pytest.raises(BadInput, match=match):
        set_flags(at_stage(2), assignments)


def test_set_canary_guard_at_stage1_needs_lanes_in_same_call():
    doc = at_stage(1)
    with pytest.raises(BadInput, match="needs a non-empty canary.lanes"):
        set_flags(doc, {"ownership.guard": "canary"})
    new = set_flags(doc, {"ownership.guard": "canary", "canary.lanes": ["lane-03"]})
    assert new.flags["canary.lanes"] == ["lane-03"]
    assert new.canary_lanes == ()


def test_unset_flags_returns_to_plan():
    doc = set_flags(at_stage(2), {"signals.routing": "off", "eventbus.publish": "shadow"})
    back = unset_flags(doc, ["signals.routing", "stream.source"])
    assert back.manual == {"eventbus.publish": "shadow"}
    assert back.flags["signals.routing"] == "canary"
    with pytest.raises(BadInput, match="unknown flag"):
        unset_flags(doc, ["nope"])


# ---------------------------------------------------------------- validation and parsing


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("cluster.enabled", 1),
        ("cluster.enabled", "true"),
        ("cluster.enabled", None),
        ("ownership.guard", "enforced"),
        ("ownership.guard", "OFF"),
        ("eventbus.publish", "shadows"),
        ("eventbus.publish", False),
        ("eventbus.bridge", "readonly"),
        ("signals.routing", "some"),
        ("stream.source", "remote"),
        ("eventbus.schema_versions", []),
        ("eventbus.schema_versions", [1, 2, 3]),
        ("eventbus.schema_versions", [1, 1]),
        ("eventbus.schema_versions", [0]),
        ("eventbus.schema_versions", [True]),
        ("eventbus.schema_versions", 1),
        ("consumers.schema_version", 0),
        ("consumers.schema_version", -1),
        ("consumers.schema_version", True),
        ("consumers.schema_version", "1"),
        ("consumers.schema_version", 1.0),
        ("canary.lanes", "lane-01"),
        ("canary.lanes", ["lane-01", "lane-01"]),
        ("canary.lanes", [""]),
        ("canary.lanes", ["a,b"]),
        ("canary.lanes", [3]),
        ("canary.subscribers", ["a b"]),
    ],
)
def test_validate_flag_rejects_with_name_value_and_allowed(name, value):
    with pytest.raises(BadInput) as info:
        validate_flag(name, value)
    msg = str(info.value)
    assert f"flag {name}" in msg
    assert repr(value) in msg
    assert f"(allowed: {f.FLAGS[name].allowed_text})" in msg


def test_validate_flag_normalizes():
    assert validate_flag("eventbus.schema_versions", (2, 1)) == [1, 2]
    assert validate_flag("canary.lanes", ("b", "a")) == ["b", "a"]
    assert validate_flag("cluster.enabled", False) is False


def test_validate_flag_unknown_name():
    with pytest.raises(BadInput, match=r"unknown flag 'foo'; known flags: cluster.enabled, "):
        validate_flag("foo", 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cluster.enabled=true", ("cluster.enabled", True)),
        ("cluster.enabled=ON", ("cluster.enabled", True)),
        ("cluster.enabled=1", ("cluster.enabled", True)),
        ("cluster.enabled=false", ("cluster.enabled", False)),
        ("cluster.enabled=off", ("cluster.enabled", False)),
        ("cluster.enabled=0", ("cluster.enabled", False)),
        ("ownership.guard=Enforce", ("ownership.guard", "enforce")),
        ("eventbus.bridge=read-only", ("eventbus.bridge", "read-only")),
        (" stream.source = canonical ", ("stream.source", "canonical")),
        ("eventbus.schema_versions=2, 1", ("eventbus.schema_versions", [1, 2])),
        ("consumers.schema_version=2", ("consumers.schema_version", 2)),
        ("canary.lanes=lane-01,lane-02", ("canary.lanes", ["lane-01", "lane-02"])),
        ("canary.subscribers=", ("canary.subscribers", [])),
        ("canary.subscribers=a=b", ("canary.subscribers", ["a=b"])),
    ],
)
def test_parse_flag_assignment(text, expected):
    assert parse_flag_assignment(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("cluster.enabled", "expected NAME=VALUE"),
        ("=true", "expected NAME=VALUE"),
        ("bogus=1", "unknown flag 'bogus'"),
        ("cluster.enabled=yes", r"invalid value 'yes' for flag cluster.enabled \(allowed: true, false, on, off, 1, 0\)"),
        ("ownership.guard=bogus", r"invalid value 'bogus' for flag ownership.guard.*allowed: off, observe, canary, enforce"),
        ("eventbus.publish=", "invalid value '' for flag eventbus.publish"),
        ("eventbus.bridge=stream", "allowed: off, read-only, canary, streaming"),
        ("signals.routing=none", "allowed: off, canary, all"),
        ("stream.source=nats", "allowed: local, canonical"),
        ("eventbus.schema_versions=", "0 entries"),
        ("eventbus.schema_versions=1,x", "'x' is not an integer"),
        ("eventbus.schema_versions=1,,2", "empty entry"),
        ("eventbus.schema_versions=1,2,3", "3 entries"),
        ("eventbus.schema_versions=2,2", "duplicate entries"),
        ("consumers.schema_version=two", "'two' is not an integer"),
        ("consumers.schema_version=+1", "'\\+1' is not an integer"),
        ("consumers.schema_version=0", "not a positive integer"),
        ("canary.lanes=a,,b", "empty entry"),
        ("canary.lanes=a,a", "duplicate id 'a'"),
        ("canary.lanes=a b", "contains whitespace"),
    ],
)
def test_parse_flag_assignment_rejects(text, match):
    with pytest.raises(BadInput, match=match):
        parse_flag_assignment(text)


def test_parse_flag_assignments_refuses_repeats():
    assert parse_flag_assignments(["cluster.enabled=1", "signals.routing=all"]) == {
        "cluster.enabled": True,
        "signals.routing": "all",
    }
    with pytest.raises(BadInput, match="signals.routing given more than once"):
        parse_flag_assignments(["signals.routing=all", "signals.routing=off"])


@pytest.mark.parametrize("name", f.FLAG_NAMES)
def test_format_and_parse_round_trip(name):
    value = STAGE3[name]
    assert f.parse_flag_value(name, f.format_flag_value(name, value)) == value


def test_format_flag_value():
    assert f.format_flag_value("cluster.enabled", True) == "true"
    assert f.format_flag_value("eventbus.schema_versions", [1, 2]) == "1,2"
    assert f.format_flag_value("canary.lanes", []) == ""


# ---------------------------------------------------------------- diff


def test_diff_sorted_by_name_only_changes():
    old = {"b": 1, "a": 1, "c": [1], "same": "x"}
    new = {"c": [1, 2], "b": 2, "a": 0, "same": "x", "d": True}
    assert diff(old, new) == [
        FlagChange("a", 1, 0),
        FlagChange("b", 1, 2),
        FlagChange("c", [1], [1, 2]),
        FlagChange("d", None, True),
    ]
    assert diff(new, new) == []


def test_diff_of_stage_1_to_2():
    assert [c.name for c in diff(at_stage(1).flags, at_stage(2).flags)] == [
        "canary.lanes",
        "canary.subscribers",
        "eventbus.bridge",
        "eventbus.publish",
        "ownership.guard",
        "signals.routing",
    ]


# ---------------------------------------------------------------- document and JSON


def rich_doc() -> RolloutDocument:
    doc = set_flags(at_stage(2), {"signals.routing": "off", "eventbus.schema_versions": [1, 2]})
    doc = apply_rollback(doc, "event-bus")
    return apply_rollback(doc, "consumers", schema_version=1)


@pytest.mark.parametrize("make", [initial_document, lambda: at_stage(1), lambda: at_stage(3), rich_doc])
def test_json_round_trip(make):
    doc = make()
    text = doc.to_json()
    back = RolloutDocument.from_json(text)
    assert back == doc
    assert back.to_json() == text
    assert RolloutDocument.from_json(text.encode("utf-8")) == doc


def test_json_shape_and_stability():
    doc = rich_doc()
    data = json.loads(doc.to_json())
    assert list(data) == sorted(data)
    assert data == {
        "format": 1,
        "stage": 2,
        "flags": {
            **STAGE2,
            "signals.routing": "off",
            "eventbus.schema_versions": [1, 2],
            "eventbus.bridge": "off",
            "stream.source": "local",
        },
        "canary_lanes": list(LANES),
        "canary_subscribers": list(SUBS),
        "manual": {"eventbus.schema_versions": [1, 2], "signals.routing": "off"},
        "rollbacks": {
            "consumers": {"consumers.schema_version": 1, "eventbus.schema_versions": [1, 2]},
            "event-bus": {"eventbus.bridge": "off", "stream.source": "local"},
        },
    }
    # Same state built in another order -> byte-identical JSON.
    other = apply_rollback(at_stage(2), "consumers", schema_version=1)
    assert other.to_json() != doc.to_json()
    other = RolloutDocument(2, LANES, SUBS, dict(reversed(list(doc.rollbacks.items()))), dict(reversed(list(doc.manual.items()))))
    assert other.to_json() == doc.to_json()


def test_non_ascii_ids_are_utf8_in_json():
    doc = plan_advance(at_stage(1), canary_lanes=["lane-é"])
    text = doc.to_json()
    assert "lane-é" in text
    assert RolloutDocument.from_json(text.encode("utf-8")).canary_lanes == ("lane-é",)


def test_document_copies_inputs():
    lanes = ["lane-01"]
    manual = {"signals.routing": "off"}
    doc = RolloutDocument(2, lanes, (), {}, manual)
    lanes.append("lane-02")
    manual["signals.routing"] = "all"
    assert doc.canary_lanes == ("lane-01",)
    assert doc.flags["signals.routing"] == "off"
    with pytest.raises(AttributeError):
        doc.stage = 3  # type: ignore[misc]


def good() -> dict:
    return json.loads(rich_doc().to_json())


def mutate(path: str, value, *, delete: bool = False) -> dict:
    data = good()
    keys = path.split("/")
    target = data
    for k in keys[:-1]:
        target = target[k]
    if delete:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (mutate("stage", 7), r"field 'stage': invalid stage 7"),
        (mutate("stage", "2"), r"field 'stage'"),
        (mutate("stage", None, delete=True), r"field 'stage' is missing"),
        (mutate("format", 2), r"field 'format': unsupported format 2"),
        (mutate("format", True), r"field 'format'"),
        (mutate("extra", 1), r"unknown field 'extra'"),
        (mutate("canary_lanes", "lane-01"), r"field 'canary_lanes': expected a list"),
        (mutate("canary_lanes", ["lane-01", "lane-01"]), r"field 'canary_lanes'.*duplicate id"),
        (mutate("canary_lanes", []), r"field 'canary_lanes': stage 2 \(partial\) needs canary lanes"),
        (mutate("canary_subscribers", [1]), r"field 'canary_subscribers'"),
        (mutate("manual", []), r"field 'manual': expected an object"),
        (mutate("manual/signals.routing", "sometimes"), r"field 'manual.signals.routing': invalid value 'sometimes'"),
        (mutate("manual/bogus", 1), r"field 'manual.bogus': unknown flag 'bogus'"),
        (mutate("rollbacks", None), r"field 'rollbacks': expected an object"),
        (mutate("rollbacks/everything", {}), r"field 'rollbacks.everything': unknown capability"),
        (mutate("rollbacks/coordination", {"ownership.guard": "observe"}), r"field 'rollbacks.coordination'.*ownership.guard=off"),
        (mutate("rollbacks/coordination", {"signals.routing": "off"}), r"field 'rollbacks.coordination'.*exactly ownership.guard"),
        (mutate("rollbacks/event-bus/stream.source", "canonical"), r"field 'rollbacks.event-bus'"),
        (mutate("rollbacks/consumers/consumers.schema_version", 2), r"field 'rollbacks.consumers'.*must be the lowest"),
        (mutate("flags", "x"), r"field 'flags': expected an object"),
        (mutate("flags/ownership.guard", None, delete=True), r"field 'flags.ownership.guard' is missing"),
        (mutate("flags/ownership.guard", "sideways"), r"field 'flags.ownership.guard': invalid value 'sideways'"),
        (mutate("flags/new.flag", True), r"field 'flags': unknown flag 'new.flag'"),
        (mutate("flags/ownership.guard", "enforce"), r"field 'flags.ownership.guard': is 'enforce' but stage 2"),
        (mutate("flags/eventbus.bridge", "canary"), r"field 'flags.eventbus.bridge': is 'canary'.*give 'off'"),
        (mutate("flags/eventbus.schema_versions", [2, 1]), r"field 'flags.eventbus.schema_versions'"),
    ],
)
def test_from_dict_rejects_naming_the_field(data, match):
    with pytest.raises(BadInput, match=match):
        RolloutDocument.from_dict(data)
    with pytest.raises(BadInput, match=match):
        RolloutDocument.from_json(json.dumps(data))


def test_from_dict_rejects_canary_at_stage_1():
    data = json.loads(at_stage(1).to_json())
    data["canary_lanes"] = ["lane-01"]
    with pytest.raises(BadInput, match=r"field 'canary_lanes': must be empty at stage 1"):
        RolloutDocument.from_dict(data)


def test_from_dict_rejects_inconsistent_manual():
    data = json.loads(at_stage(2).to_json())
    data["manual"] = {"consumers.schema_version": 2}
    with pytest.raises(BadInput, match=r"rollout document: consumers.schema_version=2 is not one of"):
        RolloutDocument.from_dict(data)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not valid JSON"),
        ("{", r"not valid JSON.*line 1"),
        ("[]", "expected a JSON object, got list"),
        ("null", "expected a JSON object, got NoneType"),
        (b"\xff\xfe{}", "not valid UTF-8"),
    ],
)
def test_from_json_rejects_malformed(text, match):
    with pytest.raises(BadInput, match=match):
        RolloutDocument.from_json(text)


def test_initial_document():
    doc = initial_document()
    assert doc.stage == 0
    assert doc.flags == STAGE0
    assert doc.rollbacks == {} and doc.manual == {}
    assert doc.canary_lanes == () and doc.canary_subscribers == ()


def test_rollback_specs_touch_disjoint_flags():
    seen: set[str] = set()
    for spec in st.ROLLBACKS.values():
        assert not seen & set(spec.flags)
        seen |= set(spec.flags)
    assert st.CAPABILITIES == ("coordination", "event-bus", "consumers")
