"""Run records in the coordination store (``keys.runbook_run``) and the rules for resuming a
stopped run (``--resumes RUN --from-step N``)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from cbctl.core.model import keys
from cbctl.core.model.errors import BadInput
from cbctl.core.model.records import RunRecord
from cbctl.core.operator.runbook.model import Runbook

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator

log = logging.getLogger(__name__)

# Statuses of a run that stopped part-way and may be resumed (``--from-step N --resumes RUN``).
STOPPED: Final = ("failed", "aborted", "interrupted")


def new_run_id(runbook_name: str, now: float | None = None) -> str:
    """``20250102T030405Z-<runbook>-<6 hex>``: keys sort by start time, and never collide."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{runbook_name}-{secrets.token_hex(3)}"


async def save_run(coord: Coordinator, cluster: str, record: RunRecord | Mapping[str, Any]) -> int:
    """Put the run record (unconditional: one writer per run id). Returns the store revision."""
    data = record.to_json() if isinstance(record, RunRecord) else dict(record)
    return await coord.put(keys.runbook_run(cluster, data["run_id"]),
                           json.dumps(data, sort_keys=True).encode("utf-8"))


async def list_runs(coord: Coordinator, cluster: str) -> list[dict[str, Any]]:
    """Every stored run record, oldest first, in its stored shape (``runbook runs -o json`` emits
    it as is; read one with :meth:`RunRecord.from_dict`). Undecodable records are skipped (and
    logged)."""
    out: list[dict[str, Any]] = []
    for kv in await coord.list(keys.runbooks_prefix(cluster)):
        try:
            data = kv.json()
        except (UnicodeDecodeError, ValueError):
            log.warning("skipping undecodable run record %s", kv.key)
            continue
        if isinstance(data, dict) and "runbook" in data:
            out.append(data)
    return out


async def get_run(coord: Coordinator, cluster: str, run_id: str) -> RunRecord | None:
    """One stored run record, or None (also when undecodable). Raises ``BackendUnavailable``."""
    kv = await coord.get(keys.runbook_run(cluster, run_id))
    if kv is None:
        return None
    try:
        data = kv.json()
    except (UnicodeDecodeError, ValueError):
        return None
    return RunRecord.from_dict(data) if isinstance(data, dict) else None


def stopped_step(record: RunRecord | Mapping[str, Any]) -> int | None:
    """Index of the step a stopped run record stopped at (failed, declined or interrupted);
    a stored record (a mapping, as :func:`list_runs` gives it) is read with ``RunRecord.from_dict``."""
    rec = record if isinstance(record, RunRecord) else RunRecord.from_dict(record)
    return rec.stopped_step


def check_resumable(record: RunRecord | None, runbook: Runbook, run_id: str, from_step: int) -> None:
    """``--resumes RUN --from-step N`` must continue a stopped run of the same runbook file, at
    or before the step it stopped at. Raises ``BadInput`` (exit 2) saying which rule broke."""
    if record is None:
        raise BadInput(f"--resumes {run_id}: no such run recorded in this cluster")
    if record.runbook != runbook.name:
        raise BadInput(f"--resumes {run_id}: that is a run of {record.runbook!r}, not {runbook.name!r}")
    if record.status not in STOPPED:
        raise BadInput(f"--resumes {run_id}: that run is {record.status!r}; only a run that stopped "
                       f"({', '.join(STOPPED)}) can be resumed")
    if record.runbook_sha256 != runbook.sha256:
        raise BadInput(f"--resumes {run_id}: {runbook.path} changed since that run; start it again from step 1")
    stop = record.stopped_step
    if stop is None or from_step > stop:
        raise BadInput(f"--resumes {run_id}: that run stopped at step {stop}; --from-step must be at most {stop}")

