"""The floors contract (pyproject.toml [tool.importlinter]), checked by import-linter itself.

cli > sandbox > (operator | agent, independent) > backends > model, and no import circle between
sibling modules anywhere in cbctl (docs/architecture.md).  grimp parses every import statement,
function-level ones included, so a late import cannot hide a circle.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout, result.stdout[-2000:]


def test_no_test_module_imports_another_test_module() -> None:
    """Shared test code lives in tests/helpers.py, tests/support/ and the conftests (docs/testing.md)."""
    import re

    pattern = re.compile(r"^\s*(from|import)\s+tests\.(unit|integration|chaos)\.test_\w+", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("*.py"))
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
