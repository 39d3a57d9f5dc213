"""What the control-plane tests share: a small lane inventory, a context without metric gates,
and a passing preflight on record (stage advance requires one)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cbctl.core.model.config import load_config
from tests.support.records import write_preflight

LANES = [f"lane-{i:02d}" for i in range(8)]

# Tests about the document, CAS and audit, not about metric gates (tests/integration/test_gates.py
# covers those): the context has no metric rules.
NO_METRIC_GATES = {"gates": {"stages": {"1": [], "2": [], "3": []}}}


def record_passing_preflight(cfg: Path) -> None:
    """Store a fresh, passing last-preflight record for the contexts file's current context."""
    asyncio.run(write_preflight(load_config(cfg).context(), ok=True))
