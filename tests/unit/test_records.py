"""Typed store records (cbctl/core/model/records.py): each round-trips today's stored bytes.

The example records are built exactly as their writers build them today
(cbctl/core/agent/session.py _record, cbctl/core/agent/ownership.py acquire_lane,
cbctl/core/agent/registration.py record_conflict / record_refusal / check_identity), and
encoded as they are (json.dumps sort_keys, compact separators)."""

from __future__ import annotations

import json

import pytest

from cbctl.core.model.records import (
    ConflictRecord,
    IdentityRecord,
    LaneOwnerRecord,
    NodeRecord,
    RefusalRecord,
    dump,
)


def stored(obj: dict) -> bytes:
    # The writers' encoding (registration._dump, ownership.acquire_lane).
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


NODE = {
    # extra_record_fields first, then the fields (session._record)
    "probes": {"redis": {"ok": True}}, "clock": {"offset": 0.002},
    "node_id": "node-a", "machine_id": "2f0c6a4e-0000-4000-8000-000000000001", "instance_id": "9b1e77aa",
    "host": "web-3", "pid": 4711, "version": "0.1.0", "started_at": 1714550000.12, "lease": "7587abcd",
    "session": 1, "applied_revision": 42, "cluster_enabled": True, "guard": "observe",
    "lanes": ["lane-03", "lane-07"], "heartbeat": 1714550123.4, "http": "127.0.0.1:9101",
}
LANE = {"lane": "lane-03", "owner": "node-a", "instance_id": "9b1e77aa", "since": 1714550000.5}
CONFLICT = {"node_id": "node-a", "instance_id": "9b1e77aa", "at": 1714550001.0, "kind": "unstable-node-id",
            "host": "web-4", "machine_id": "m-2", "previous_host": "web-3", "previous_machine_id": "m-1"}
REFUSAL = {"node_id": "node-a", "instance_id": "c0ffee00", "at": 1714550002.5, "expires_in": 900.0,
           "kind": "duplicate-node-id", "host": "web-5", "pid": 99, "holder_instance_id": "9b1e77aa",
           "holder_host": "web-3", "holder_pid": 4711}
IDENTITY = {"node_id": "node-a", "machine_id": "m-1", "host": "web-3", "first_seen": 1714000000.0,
            "last_seen": 1714550000}


@pytest.mark.parametrize(
    ("cls", "example"),
    [(NodeRecord, NODE), (LaneOwnerRecord, LANE), (ConflictRecord, CONFLICT), (RefusalRecord, REFUSAL),
     (IdentityRecord, IDENTITY)],
)
def test_round_trip_gives_todays_bytes(cls, example) -> None:
    raw = stored(example)
    rec = cls.from_json(raw)
    assert rec.to_json() == raw
    assert rec.to_dict() == example
    assert dump(example) == raw


def test_node_record_typed_fields_and_extra() -> None:
    rec = NodeRecord.from_json(stored(NODE))
    assert rec.applied_revision == 42 and rec.lanes == ("lane-03", "lane-07") and rec.cluster_enabled is True
    assert rec.heartbeat == 1714550123.4 and rec.http == "127.0.0.1:9101"
    assert dict(rec.extra) == {"probes": {"redis": {"ok": True}}, "clock": {"offset": 0.002}}


def test_readers_leniency_is_kept() -> None:
    # What read_nodes tolerated by hand: wrong types read as None / empty, never an exception.
    rec = NodeRecord.from_dict({"node_id": "n", "applied_revision": "42", "lanes": "lane-01", "heartbeat": True,
                                "pid": 1.5})
    assert (rec.applied_revision, rec.lanes, rec.heartbeat, rec.pid) == (None, (), None, None)
    assert NodeRecord.from_dict(["not", "an", "object"]).node_id is None
    assert LaneOwnerRecord.from_dict({"owner": 7}).owner is None
    with pytest.raises(ValueError):
        LaneOwnerRecord.from_json(b"{not json")


def test_fields_override_extra_like_the_writer() -> None:
    # session._record: dict(extra_record_fields) then update(fields): a field always wins.
    rec = NodeRecord(node_id="n", extra={"node_id": "spoofed", "probes": {}})
    assert rec.to_dict()["node_id"] == "n"
