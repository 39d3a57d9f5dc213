"""The signal contract shared by the sender (``cbctl signal send``) and the agent's router: the
route decision, the NATS subject, the wire format and what a signal writes.  No I/O.

Wire format (UTF-8 JSON).  Request: ``{"v": 1, "workflow_id", "name", "payload", "signal_id",
"lane"}``.  Reply: ``{"ok": true, "seq", "node", "lane", "token", "already_applied"}`` or
``{"ok": false, "error": "not_owner" | "invalid" | "error", "message", "node", "owner"?}``
(``owner``: the owner key's node as the receiver read it, for messages only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from cbctl.core.model.errors import BadInput
from cbctl.core.model.flags import CANARY_LANES, ROUTING_ALL, ROUTING_CANARY, ROUTING_OFF, SIGNALS_ROUTING

__all__ = [
    "MAX_NAME",
    "SIGNAL_TYPE",
    "WIRE_VERSION",
    "Route",
    "check_signal",
    "decide_route",
    "decode_reply",
    "encode_reply",
    "encode_request",
    "refusal",
    "signal_subject",
    "signal_task_payload",
    "signal_update",
]

SIGNAL_TYPE = "signal"
"""Task / history entry type of a signal (both routes)."""

WIRE_VERSION = 1
"""The ``v`` of a request; a receiver refuses any other as ``invalid``."""

MAX_NAME = 256
"""Longest signal name accepted."""

Route = Literal["routed", "local"]


def signal_subject(cluster: str, node_id: str) -> str:
    """The NATS subject a node's signal router answers on."""
    return f"cb.signals.{cluster}.{node_id}"


def signal_update(name: str, signal_id: str, payload: Any) -> dict[str, Any]:
    """The guarded update a signal writes (history ``data`` and workflow state fields)."""
    return {"signal": name, "signal_id": signal_id, "signal_payload": payload}


def signal_task_payload(name: str, signal_id: str, payload: Any) -> dict[str, Any]:
    """The payload of a queued ``signal`` task (the local route) and of a routed signal's
    applied update as the agent's hooks see it."""
    return {"signal": name, "signal_id": signal_id, "payload": payload}


def decide_route(flags: Mapping[str, Any], lane: str) -> Route:
    """``routed`` under ``signals.routing=all`` or ``canary`` with ``lane`` in ``canary.lanes``;
    ``local`` otherwise (``off``, a non-canary lane, an unknown value)."""
    routing = flags.get(SIGNALS_ROUTING, ROUTING_OFF)
    if routing == ROUTING_ALL:
        return "routed"
    if routing == ROUTING_CANARY and lane in tuple(flags.get(CANARY_LANES, ())):
        return "routed"
    return "local"


def check_signal(workflow_id: Any, name: Any, payload: Any) -> str:
    """Validate a signal; return the payload as compact JSON.  ``BadInput`` if bad."""
    if not isinstance(workflow_id, str) or not workflow_id:
        raise BadInput("signal: the workflow id is empty")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise BadInput(f"signal name {name!r}: must be non-empty and at most {MAX_NAME} characters")
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"signal payload is not JSON-serializable: {exc}") from None


def encode_request(workflow_id: str, name: str, payload: Any, signal_id: str, lane: str) -> bytes:
    """A routed signal request (module doc)."""
    return json.dumps({"v": WIRE_VERSION, "workflow_id": workflow_id, "name": name, "payload": payload,
                       "signal_id": signal_id, "lane": lane}, separators=(",", ":"), ensure_ascii=False).encode()


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """A reply as sent on the wire."""
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()


def decode_reply(data: bytes) -> dict[str, Any]:
    """A reply as a dict; an unreadable one becomes an ``error`` reply."""
    try:
        reply = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {"ok": False, "error": "error", "message": f"unreadable reply {data[:80]!r}"}
    return reply if isinstance(reply, dict) else {"ok": False, "error": "error", "message": "reply is not an object"}


def refusal(error: str, message: str, *, owner: str | None = None) -> dict[str, Any]:
    """A refusing reply (``ok: false``); ``node`` is added by the receiver."""
    reply: dict[str, Any] = {"ok": False, "error": error, "message": message}
    if owner is not None:
        reply["owner"] = owner
    return reply
