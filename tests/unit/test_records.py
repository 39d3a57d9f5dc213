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
    lane_owner_in,
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


def test_require_object_refuses_non_objects() -> None:
    # Preflight reports such a node record as unreadable; read_nodes skips it.
    with pytest.raises(ValueError, match="not a JSON object"):
        NodeRecord.from_json(b"[1, 2]", require_object=True)
    assert NodeRecord.from_json(b"[1, 2]").node_id is None  # the lenient default reads it as empty


def test_probes_and_clock_read_from_extra() -> None:
    rec = NodeRecord.from_json(stored(NODE))
    assert rec.probes == {"redis": {"ok": True}} and rec.clock == {"offset": 0.002}
    odd = NodeRecord.from_dict({"probes": "x"})
    assert odd.probes is None and odd.clock is None


def test_lane_owner_in_is_the_one_owner_reading() -> None:
    assert lane_owner_in(stored(LANE)) == "node-a"
    for raw in (None, b"{not json", b"[]", b'{"owner": ""}', b'{"owner": 7}', b"\xff\xfe"):
        assert lane_owner_in(raw) is None


def test_writer_records_give_todays_bytes() -> None:
    # How the writers build them now (session._record, ownership.acquire_lane, registration).
    node = NodeRecord(**{k: (tuple(v) if k == "lanes" else v) for k, v in NODE.items()
                         if k not in ("probes", "clock")},
                      extra={"probes": NODE["probes"], "clock": NODE["clock"]})
    assert node.to_json() == stored(NODE)
    assert LaneOwnerRecord(**LANE).to_json() == stored(LANE)
    extra = {k: CONFLICT[k] for k in ("host", "machine_id", "previous_host", "previous_machine_id")}
    assert ConflictRecord(node_id="node-a", instance_id="9b1e77aa", at=1714550001.0, kind="unstable-node-id",
                          extra=extra).to_json() == stored(CONFLICT)
    assert RefusalRecord(**REFUSAL).to_json() == stored(REFUSAL)
    assert IdentityRecord(**IDENTITY).to_json() == stored(IDENTITY)


def test_run_record_round_trip_and_leniency() -> None:
    from cbctl.core.model.records import RunRecord, StepOutcome

    rec = RunRecord(run_id="20250102T030405Z-rb-abc123", runbook="rb", kind="rollback", actor="ops",
                    started_at=1714550000.25, from_step=2, vars={"X": "<secret>"},
                    steps=[StepOutcome(1, "run", "a", "skipped"),
                           StepOutcome(2, "argv", "cbctl x", "failed", exit_code=2, seconds=0.12345, detail="boom",
                                       revisions=[7, 9]),
                           StepOutcome(3, "check", "q", "not-run")],
                    finished_at=1714550001.0, status="failed", resume="cbctl runbook run rb --from-step 2",
                    cluster="c", runbook_sha256="ff", resumes="r0", overrides=[{"capability": "event-bus"}])
    stored_shape = json.loads(json.dumps(rec.to_json(), sort_keys=True))  # as save_run stores and list_runs gives it
    again = RunRecord.from_dict(stored_shape)
    assert again.to_json() == stored_shape
    assert again.stopped_step == 2 and again.failed_step is not None and again.failed_step.detail == "boom"
    odd = RunRecord.from_dict({"runbook": "rb", "steps": ["x", {"index": "1", "status": "failed"},
                                                          {"index": 4, "status": "declined"}],
                               "vars": {"A": 1}, "from_step": None, "overrides": "no"})
    assert (odd.run_id, odd.from_step, odd.vars, odd.overrides, odd.stopped_step) == ("", 1, {}, None, 4)
