"""Audit entries: who changed the rollout document, when, with which command and why.

An entry is written in the same transaction as the document it describes (see
``cbctl.core.model.keys.audit``), so a mutation without an audit entry — or an entry for a write
that did not happen — cannot exist.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any


def current_actor() -> str:
    """``user@host`` of whoever runs cbctl (``CBCTL_ACTOR`` overrides, e.g. for CI bots)."""
    override = os.environ.get("CBCTL_ACTOR")
    if override:
        return override
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


@dataclass
class AuditEntry:
    """One audited mutation. ``to_revision`` is filled from the entry key's own revision."""

    time: float
    actor: str
    command: str
    reason: str | None
    kind: str  # "stage" | "flags" | "rollback"
    from_revision: int
    to_revision: int | None
    diff: list[dict[str, Any]]
    from_stage: int | None = None
    to_stage: int | None = None
    forced: bool = False
    gates: list[dict[str, Any]] = field(default_factory=list)
    #: Expected nodes the operator chose not to wait for (``--ignore-missing``).
    ignore_missing: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data.pop("to_revision")  # derived from the key's mod_revision when read back
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_kv(cls, value: bytes, mod_revision: int) -> AuditEntry:
        data = json.loads(value.decode("utf-8"))
        data["to_revision"] = mod_revision
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def public(self) -> dict[str, Any]:
        """The JSON shape of ``stage history -o json`` entries (a contract)."""
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time)),
            "actor": self.actor,
            "command": self.command,
            "reason": self.reason,
            "from_revision": self.from_revision,
            "to_revision": self.to_revision,
            "diff": self.diff,
            "kind": self.kind,
            "from_stage": self.from_stage,
            "to_stage": self.to_stage,
        }
        if self.forced:
            out["forced"] = True
            out["gates"] = self.gates
        if self.ignore_missing:
            out["ignore_missing"] = list(self.ignore_missing)
        return out
