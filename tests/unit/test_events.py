"""Canonical event schema: versioned encode/decode, subjects, ids, and every bad input -> BadEvent."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from cbctl.core.model.errors import CbctlError
from cbctl.core.model.events import (
    BAD_EVENT_REASONS,
    MAX_EVENT_BYTES,
    BadEvent,
    decode_event,
    deterministic_event_id,
    encode_event,
    make_event,
    msg_id,
    parse_subject,
    stream_subjects,
    subject,
    subject_filter,
    subject_token,
    unescape_token,
)

FIELDS = {"schema_version", "event_id", "workflow_id", "task_id", "lane", "node_id", "seq", "type", "occurred_at",
          "payload"}


def sample(**over: object):
    kw: dict[str, object] = dict(
        workflow_id="wf-1", seq=7, type="task.completed", lane="lane-03", node_id="node-a", task_id="t-9",
        payload={"result": "ok", "n": 3, "nested": {"x": [1, 2]}, "text": "héllo ✓"},
        occurred_at=datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC), attempt=2,
    )
    kw.update(over)
    return make_event(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [1, 2])
def test_round_trip(version: int) -> None:
    ev = sample()
    data = encode_event(ev, version)
    obj = json.loads(data.decode("utf-8"))
    expected = FIELDS | ({"attempt"} if version == 2 else set())
    assert set(obj) == expected
    assert obj["schema_version"] == version
    assert obj["occurred_at"] == "2024-05-01T12:00:00.123456Z"
    v, back = decode_event(data, subject=subject("c1", version, ev.workflow_id))
    assert v == version
    if version == 2:
        assert back == ev
    else:
        # v1 does not carry attempt: it decodes as 1, everything else is identical.
        assert back == dataclasses.replace(ev, attempt=1)


def test_v1_and_v2_share_event_id_and_fields() -> None:
    ev = sample()
    one = json.loads(encode_event(ev, 1))
    two = json.loads(encode_event(ev, 2))
    assert {k: v for k, v in two.items() if k not in ("attempt", "schema_version")} == {
        k: v for k, v in one.items() if k != "schema_version"
    }


def test_null_task_id_and_other_timezones() -> None:
    tz = timezone(timedelta(hours=2))
    ev = sample(task_id=None, occurred_at=datetime(2024, 5, 1, 14, 0, tzinfo=tz))
    _, back = decode_event(encode_event(ev, 2))
    assert back.task_id is None
    assert back.occurred_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    # An offset other than Z on the wire is accepted and normalised.
    obj = json.loads(encode_event(ev, 1))
    obj["occurred_at"] = "2024-05-01T14:00:00+02:00"
    _, back = decode_event(json.dumps(obj).encode())
    assert back.occurred_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def test_deterministic_ids() -> None:
    a = sample()
    b = sample(payload={"other": True})
    assert a.event_id == b.event_id == deterministic_event_id("wf-1", 7)
    assert len(a.event_id) == 32
    assert deterministic_event_id("wf-1", 8) != a.event_id
    assert deterministic_event_id("wf-2", 7) != a.event_id
    assert sample(event_id="explicit").event_id == "explicit"
    assert msg_id(a.event_id, 1) != msg_id(a.event_id, 2)


def test_subjects_and_escaping() -> None:
    assert subject("prod", 1, "wf-1") == "cb.prod.events.v1.wf-1"
    assert subject_filter("prod", 2) == "cb.prod.events.v2.>"
    assert stream_subjects("prod") == "cb.prod.events.>"
    for wf in ("order.42", "a b", "x*y>z", "100%", "ünï", "tab\there", "wf:1/2"):
        token = subject_token(wf)
        assert not any(c in token for c in ".*> \t"), token
        assert unescape_token(token) == wf
        assert parse_subject(subject("c1", 2, wf)) == ("c1", 2, wf)
    assert subject_token("plain-id_1:2") == "plain-id_1:2"
    with pytest.raises(ValueError):
        subject("", 1, "wf-1")


def test_one_subject_space_per_cluster() -> None:
    """Two clusters on one NATS account: neither's filter or stream captures the other's events,
    also when a cluster name holds subject specials (escaped into one token)."""
    import fnmatch

    def captures(pattern: str, subj: str) -> bool:  # NATS '>' = one or more trailing tokens
        p, t = pattern.split("."), subj.split(".")
        return p[-1] == ">" and len(t) >= len(p) and all(fnmatch.fnmatchcase(a, b) if b != "*" else True
                                                          for a, b in zip(t, p[:-1]))

    a, b = subject("blue", 1, "wf-1"), subject("green", 1, "wf-1")
    assert captures(stream_subjects("blue"), a) and not captures(stream_subjects("blue"), b)
    assert captures(subject_filter("green", 1), b) and not captures(subject_filter("green", 1), a)
    odd = subject("a.b", 1, "wf")
    assert odd.split(".")[1] == "a%2Eb" and parse_subject(odd) == ("a.b", 1, "wf")
    assert not captures(stream_subjects("a"), odd)


def _valid_obj(version: int = 1) -> dict[str, object]:
    return json.loads(encode_event(sample(), version))


def _mutated(version: int, **changes: object) -> bytes:
    obj = _valid_obj(version)
    for k, v in changes.items():
        if v is _DROP:
            del obj[k]
        else:
            obj[k] = v
    return json.dumps(obj).encode()


_DROP = object()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe garbage", "not_utf8"),
        (bytes(range(256)), "not_utf8"),
        (b"", "not_json"),
        (b"{not json", "not_json"),
        (b"[" * 100_000, "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"a string"', "not_object"),
        (b"null", "not_object"),
        (_mutated(1, schema_version=3), "unknown_version"),
        (_mutated(1, schema_version="1"), "unknown_version"),
        (_mutated(1, schema_version=True), "unknown_version"),
        (_mutated(1, schema_version=_DROP), "unknown_version"),
        (_mutated(1, seq=_DROP), "malformed"),
        (_mutated(1, extra_field=1), "malformed"),
        (_mutated(1, attempt=1), "malformed"),  # v2's field in a v1 event
        (_mutated(2, attempt=_DROP), "malformed"),
        (_mutated(2, attempt=0), "malformed"),
        (_mutated(1, seq=0), "malformed"),
        (_mutated(1, seq="7"), "malformed"),
        (_mutated(1, seq=True), "malformed"),
        (_mutated(1, seq=1.5), "malformed"),
        (_mutated(1, event_id=""), "malformed"),
        (_mutated(1, workflow_id=5), "malformed"),
        (_mutated(1, task_id=[]), "malformed"),
        (_mutated(1, lane=None), "malformed"),
        (_mutated(1, type=""), "malformed"),
        (_mutated(1, node_id="x" * 300), "malformed"),
        (_mutated(1, occurred_at="yesterday"), "malformed"),
        (_mutated(1, occurred_at="2024-05-01T12:00:00"), "malformed"),  # no offset
        (_mutated(1, occurred_at=1714564800), "malformed"),
        (_mutated(1, payload=[1]), "malformed"),
        (_mutated(1, payload="x"), "malformed"),
        (b" " * (MAX_EVENT_BYTES + 1), "too_large"),
    ],
)
def test_bad_input_is_bad_event(data: bytes, reason: str) -> None:
    with pytest.raises(BadEvent) as info:
        decode_event(data)
    assert info.value.reason == reason
    assert reason in BAD_EVENT_REASONS
    assert isinstance(info.value, CbctlError)


def test_subject_mismatch() -> None:
    data = encode_event(sample(), 1)
    decode_event(data, subject="cb.c1.events.v1.wf-1")
    for bad in ("cb.c1.events.v2.wf-1", "cb.c1.events.v1.wf-2", "other.subject", "cb.c1.events.vx.wf-1",
                "cb.c1.events.v1", "cb.events.v1.wf-1", "cb.c1.other.v1.wf-1"):
        with pytest.raises(BadEvent) as info:
            decode_event(data, subject=bad)
        assert info.value.reason == "subject_mismatch"


def test_encode_rejects_bad_values() -> None:
    with pytest.raises(BadEvent) as info:
        encode_event(sample(), 3)
    assert info.value.reason == "unknown_version"
    with pytest.raises(BadEvent) as info:
        encode_event(sample(payload={"when": datetime.now(UTC)}), 1)  # not JSON-serialisable
    assert info.value.reason == "malformed"
    with pytest.raises(BadEvent) as info:
        encode_event(sample(payload={"x": float("nan")}), 1)
    assert info.value.reason == "malformed"
    with pytest.raises(BadEvent) as info:
        encode_event(sample(payload={"x": "\ud800"}), 1)  # a lone surrogate has no UTF-8 form
    assert info.value.reason == "malformed"
    with pytest.raises(BadEvent) as info:
        encode_event(sample(payload={"x": "y" * MAX_EVENT_BYTES}), 2)
    assert info.value.reason == "too_large"
    for bad in ({"seq": 0}, {"workflow_id": ""}, {"occurred_at": datetime(2024, 1, 1)}, {"attempt": 0}):
        with pytest.raises(BadEvent):
            sample(**bad)
