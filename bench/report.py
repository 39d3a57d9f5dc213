"""One way for every bench to state a result against its target.

:func:`target` prints the human line the bench always printed and one machine line,
``bench-result: {json}``, that ``python -m bench`` (``make bench``) collects into its summary
table.  A bench may report several results (one per target).
"""

from __future__ import annotations

import json
import sys
from typing import Literal

PREFIX = "bench-result: "


def target(bench: str, what: str, value: float, op: Literal["<=", ">="], goal: float, *,
           unit: str = "", detail: str = "") -> bool:
    """Print ``what`` = ``value`` against ``op goal`` (human and machine line); True when met."""
    met = value <= goal if op == "<=" else value >= goal
    shown = f"{value:.3g}{unit}" if abs(value) < 1000 else f"{value:,.0f}{unit}"
    print(f"target: {what} {op} {goal:,g}{unit} -> {'met' if met else 'MISSED'} ({shown})"
          + (f"; {detail}" if detail else ""))
    print(PREFIX + json.dumps({"bench": bench, "what": what, "value": value, "op": op, "goal": goal,
                               "unit": unit, "met": met}), flush=True)
    sys.stdout.flush()
    return met
