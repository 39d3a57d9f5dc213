"""What the shared agent stack of tests/integration/conftest.py is built from (a module overrides
its ``stack_options`` fixture with one of these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tests.helpers import KEEPALIVE, TTL

__all__ = ["StackOptions"]


@dataclass(frozen=True)
class StackOptions:
    """What the stack's contexts file holds.

    ``nats``: none, the module's own server (the ``nats`` fixture: a test may kill it) or the
    session's ``shared_nats``. Short leases (``ttl``/``keepalive``) so faults show within seconds.
    """

    lane_count: int = 8
    nats: Literal["none", "own", "shared"] = "none"
    ttl: float = TTL
    keepalive: float = KEEPALIVE
    #: ``[nats] connect-timeout`` (None: the config default); 1 s makes a dead server show fast
    nats_connect_timeout: float | None = 1.0
    #: extra context keys, merged into the tables write_config makes
    extra: dict[str, Any] = field(default_factory=dict)
