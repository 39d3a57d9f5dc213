"""Packaging: the runbooks, completion scripts and man page live inside the package and are
declared as package data; the man page is current and renders.

The wheel itself is built, installed into a fresh venv and walked through the operator guide
by tests/integration/test_wheel.py.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cbctl
from cbctl.cli import manpage
from cbctl.cli.completion_gen import shipped_dir
from cbctl.cli.main import app
from cbctl.core.operator.criteria import ROLLBACK_RUNBOOKS
from cbctl.core.operator.runbook.parser import default_runbooks_dir, load_all

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PKG = Path(cbctl.__file__).resolve().parent


def test_shipped_runbooks_are_inside_the_package_and_all_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CBCTL_RUNBOOKS_DIR", raising=False)
    d = default_runbooks_dir()
    assert d.resolve() == (PKG / "runbooks").resolve()
    good, bad = load_all(d)
    assert bad == []
    assert set(ROLLBACK_RUNBOOKS) <= {rb.name for rb in good}
    assert not (ROOT / "runbooks").exists() and not (ROOT / "completions").exists()  # moved, not copied


def test_env_dir_wins_and_a_missing_dir_names_that_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-runbooks"
    r = CliRunner().invoke(app, ["runbook", "list"], env={"CBCTL_RUNBOOKS_DIR": str(missing)})
    assert r.exit_code == 2, r.output
    assert f"runbooks directory {missing} does not exist" in r.stderr
    (tmp_path / "books").mkdir()
    r = CliRunner().invoke(app, ["runbook", "list", "-o", "json"], env={"CBCTL_RUNBOOKS_DIR": str(tmp_path / "books")})
    assert r.exit_code == 0, r.stderr
    assert "rollback-coordination" not in r.stdout


def test_package_data_declares_every_shipped_file() -> None:
    """A file under cbctl/ that is not Python and not matched by [tool.setuptools.package-data]
    would be missing from the wheel."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = [(pkg.replace(".", "/"), pat) for pkg, pats in data.items() for pat in pats]
    unshipped = []
    for path in sorted(PKG.rglob("*")):
        if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(PKG.parent).as_posix()
        if not any(fnmatch.fnmatch(rel, f"{base}/{pat}") for base, pat in patterns):
            unshipped.append(rel)
    assert unshipped == []
    for name in ("runbooks/rollback-coordination.yaml", "completions/cbctl.bash", "man/man1/cbctl.1"):
        assert (PKG / name).is_file(), name
    assert shipped_dir().resolve() == (PKG / "completions").resolve()


def test_man_page_is_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert manpage.shipped_path().read_text(encoding="utf-8") == manpage.render(), "cbctl/man/man1/cbctl.1 is stale: run make man"
    assert manpage.main(["--check"]) == 0
    stale = tmp_path / "cbctl.1"
    stale.write_text(manpage.render().replace("stage advance", "stage advanse"))
    assert manpage.main(["--check", str(stale)]) == 1
    assert "stale; run make man" in capsys.readouterr().err


def test_man_page_covers_the_command_tree() -> None:
    page = manpage.render()
    for section in ('.SS "cbctl stage advance"', '.SS "cbctl runbook run"', '.SS "cbctl agent run"',
                    '.SS "cbctl completion"', ".SH ENVIRONMENT", "CBCTL_RUNBOOKS_DIR"):
        assert section in page, section
    assert "\\fB\\-\\-gate\\-timeout DURATION\\fR" in page  # an option with its metavar
    assert page == manpage.render()  # deterministic (no date)


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_man_page_renders_without_warnings() -> None:
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(manpage.shipped_path())],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.skipif(shutil.which("man") is None, reason="man not installed")
def test_man_l_shows_the_page() -> None:
    env = {**os.environ, "MANWIDTH": "100", "PAGER": "cat", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(["man", "-l", str(manpage.shipped_path())], capture_output=True, text=True, timeout=30,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r".\x08", "", proc.stdout).replace("\u2010", "-")  # no overstrike bold, plain hyphens
    assert "CBCTL(1)" in text and "cbctl stage advance [OPTIONS]" in text and "--ignore-missing NODE" in text
