"""Is the cluster converged? Every expected node applied the current revision and every gate of
the current stage passes (``cbctl wait converged``).

Contract: :func:`check_converged` reads once (the rollout document, the live node records, the
gates of the document's stage via :func:`cbctl.core.operator.gate_eval.stage_gates`: the
preflight gate and the stage's metric gates, judged exactly as ``stage advance`` judges them)
and never writes. Nodes are judged like ``--wait`` (:func:`cbctl.core.operator.controlplane.applied_state`):
every live agent and every ``expected-nodes`` entry must report ``applied_revision`` >= the
document's revision. :func:`wait_converged` repeats the check every ``interval`` until it holds
or ``timeout`` passes; it is a poll, not a retry (the gates are Prometheus queries, which have no
watch), so it does not go through cbctl/core/backends/retry.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cbctl.core.model.errors import BadInput, CheckFailed
from cbctl.core.model.stages import STAGES
from cbctl.core.operator.controlplane import ControlPlane, WaitResult, applied_state
from cbctl.core.operator.gate_eval import GateResult, stage_gates

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator
    from cbctl.core.model.config import Context
    from cbctl.core.model.gate_settings import GateConfig


@dataclass
class Convergence:
    """One look at the cluster. ``nodes``: who applied ``revision``; ``gates``: the stage's gates."""

    stage: int
    revision: int
    nodes: WaitResult
    gates: list[GateResult] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def failing_gates(self) -> list[GateResult]:
        return [g for g in self.gates if g.outcome != "pass"]

    @property
    def ok(self) -> bool:
        return self.nodes.ok and not self.failing_gates

    def missing(self) -> list[str]:
        """What keeps the cluster from converging, one line per node or gate ([] when converged)."""
        out = [f"node {n} has not applied revision {self.revision}" for n in self.nodes.pending]
        out += [f"node {n} (expected) is not live" for n in self.nodes.missing]
        out += [f"gate {g.name}: {g.outcome}: {g.detail}" for g in self.failing_gates]
        return out

    def progress_line(self) -> str:
        """``stage 2, revision 41: 2/3 applied; waiting for node-3; gates 7/8 pass (degraded no-data)``.
        Equal states give equal lines (no times in it), so printing changed lines only gives one
        line per change."""
        gates = f"gates {len(self.gates) - len(self.failing_gates)}/{len(self.gates)} pass"
        if self.failing_gates:
            gates += " (" + ", ".join(f"{g.name} {g.outcome}" for g in self.failing_gates) + ")"
        nodes = self.nodes.progress_line().split(": ", 1)[-1]
        return f"stage {self.stage}, revision {self.revision}: {nodes}; {gates}"

    def public(self) -> dict[str, Any]:
        """The ``wait converged -o json`` shape (snake_case)."""
        return {
            "converged": self.ok,
            "stage": self.stage,
            "stage_name": STAGES[self.stage].name,
            "revision": self.revision,
            "nodes": {"applied": self.nodes.applied, "pending": self.nodes.pending, "missing": self.nodes.missing},
            "gates": [{"name": g.name, "outcome": g.outcome, "value": g.to_dict()["value"], "threshold": g.threshold,
                       "detail": g.detail} for g in self.gates],
            "missing": self.missing(),
            "seconds": round(self.elapsed, 3),
        }


async def check_converged(ctx: Context, coord: Coordinator, *, cfg: GateConfig | None = None) -> Convergence:
    """One read of the document, the nodes and the gates of the document's stage. Writes nothing.

    Raises ``BackendUnavailable`` when the store cannot be read; an unreachable Prometheus makes
    the metric gates ``no-data`` (not converged), as it does for ``stage advance``.
    """
    cp = ControlPlane(ctx, coord)
    doc, revision = await cp.read()
    nodes, gates = await asyncio.gather(cp.live_nodes(), stage_gates(ctx, coord, doc.stage, cfg))
    return Convergence(doc.stage, revision, applied_state(revision, nodes, ctx.expected_nodes), list(gates))


async def wait_converged(
    ctx: Context,
    coord: Coordinator,
    *,
    timeout: float,
    interval: float = 2.0,
    progress: Callable[[Convergence], None] | None = None,
    cfg: GateConfig | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Convergence:
    """Check every ``interval`` seconds until converged or ``timeout`` seconds have passed;
    return the last look (``ok`` False on timeout). ``progress`` sees every look. The revision
    is re-read each time: a write while waiting moves the target."""
    if not timeout > 0 or not interval > 0:
        raise BadInput(f"timeout and interval must be positive durations (got {timeout!r}, {interval!r})")
    start = clock()
    deadline = start + timeout
    last: Convergence | None = None
    while True:
        try:
            async with asyncio.timeout(max(deadline - clock(), 0.001)):
                look = await check_converged(ctx, coord, cfg=cfg)
        except TimeoutError:
            if last is None:
                raise CheckFailed(f"not converged within {timeout:g}s: the first check (store, gates) did not "
                                  "finish in time") from None
            break  # the look in flight could not finish in time: report the previous one
        look.elapsed = clock() - start
        last = look
        if progress is not None:
            progress(look)
        if look.ok:
            return look
        remaining = deadline - clock()
        if remaining <= 0:
            break
        await asyncio.sleep(min(interval, remaining))
    last.elapsed = clock() - start
    return last


__all__ = ["Convergence", "check_converged", "wait_converged"]
