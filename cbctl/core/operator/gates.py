"""Metric gates: the built-in rule table and the ``[gates]`` validator now live in the model
(cbctl/core/model/gate_settings.py), so that the config loader can validate ``[gates]`` without
importing the operator side. Evaluation is :mod:`cbctl.core.operator.gate_eval`; the evaluation
instant :mod:`cbctl.core.operator.instant`.

Transitional: importers should import these names from ``cbctl.core.model.gate_settings``
directly; this module then goes (operator floor).
"""

from __future__ import annotations

from cbctl.core.model.gate_settings import (
    DEFAULT_SCRAPE_INTERVAL,
    OPS,
    RULES,
    STAGE_GATES,
    STAGE_WATCH,
    GateConfig,
    Outcome,
    Rule,
    configured_scrape_interval,
    fmt_num,
    gate_config,
    grace_of,
)

__all__ = [
    "DEFAULT_SCRAPE_INTERVAL", "GateConfig", "OPS", "Outcome", "RULES", "Rule", "STAGE_GATES", "STAGE_WATCH",
    "configured_scrape_interval", "fmt_num", "gate_config", "grace_of",
]
