"""The wheel, as a user installs it: built from the working tree, installed into a fresh venv,
then the operator guide (README.md) walked end to end against a real etcd and Prometheus.

The fresh venv holds only the wheel (``pip install --no-deps --no-index``); its dependencies
come from this test's own environment through a ``.pth`` file, which Python appends AFTER the
venv's site-packages, so the ``cbctl`` imported is the wheel's (asserted) and never the
checkout's. Nothing is downloaded: the build backend comes from the configured package index
(isolated build) or, when that is unavailable, from this environment (``--no-build-isolation``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cbctl.core.operator.criteria import ROLLBACK_RUNBOOKS
from tests.helpers import write_config
from tests.support.controlplane import NO_METRIC_GATES, record_passing_preflight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
LANES = [f"lane-{i:02d}" for i in range(4)]
SKIP = {".venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", ".sandbox"}
# The guide's stage commands here are about the document, not the gates (tests/integration/
# test_gates.py covers those): no metric gates, and a passing preflight on record.


def _run(argv: list[str], *, timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]


def _build_wheel(dist: Path, tmp: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of the working tree (no build/ or egg-info left in it)."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=lambda _d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", str(src), "-w", str(dist)]
    attempts = [base, [*base, "--no-build-isolation", "--no-index"]]
    errors = []
    for argv in attempts:
        proc = _run(argv, timeout=150, cwd=tmp)
        wheels = sorted(dist.glob("cbctl-*.whl"))
        if proc.returncode == 0 and wheels:
            return wheels[-1]
        errors.append(f"{' '.join(argv[3:])}:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    pytest.fail("could not build the wheel:\n" + "\n".join(errors))


@dataclass
class Installed:
    venv: Path
    wheel: Path

    @property
    def cbctl(self) -> Path:
        return self.venv / "bin" / "cbctl"

    @property
    def package(self) -> Path:
        proc = _run([str(self.venv / "bin" / "python"), "-c", "import cbctl, os; print(os.path.dirname(cbctl.__file__))"],
                    timeout=30, cwd=self.venv, env=_clean_env())
        assert proc.returncode == 0, proc.stderr
        return Path(proc.stdout.strip())


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("CBCTL_")}
    return {**env, "NO_COLOR": "1", **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp / "dist", tmp)
    venv = tmp / "venv"
    proc = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                 "--no-index", "--disable-pip-version-check", str(wheel)], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = _run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                timeout=30).stdout.strip()
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "zz_test_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    yield Installed(venv, wheel)


def test_the_wheel_ships_runbooks_completions_and_man_page(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    shipped = sorted(p.name for p in (ROOT / "cbctl" / "runbooks").glob("*.yaml"))
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("cbctl/runbooks/")) == shipped
    for name in ("cbctl/completions/cbctl.bash", "cbctl/completions/cbctl.zsh", "cbctl/completions/cbctl.fish",
                 "cbctl/man/man1/cbctl.1"):
        assert name in names, name
    assert any(n.endswith("/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    pkg = installed.package
    assert pkg.is_relative_to(installed.venv), pkg  # the wheel's cbctl, not the checkout's
    assert not pkg.is_relative_to(ROOT)


def test_operator_guide_end_to_end_with_the_installed_wheel(installed: Installed, tmp_path: Path, shared_etcd,
                                                              prometheus, unique_cluster: str) -> None:
    cfg = write_config(tmp_path / "config.toml", cluster=unique_cluster, etcd=shared_etcd.client_url,
                       prometheus=prometheus.url, lanes=LANES, extra=NO_METRIC_GATES)
    record_passing_preflight(cfg)
    env = _clean_env(CBCTL_CONFIG=str(cfg))
    pkg = installed.package

    def cbctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # From a directory outside the checkout: nothing can be picked up from the working tree.
        return _run([str(installed.cbctl), *args], timeout=timeout, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)

    # Runbooks: the shipped ones, from inside the installed package.
    r = cbctl("runbook", "list", "-o", "json")
    assert r.returncode == 0, r.stderr
    books = {b["name"]: b for b in json.loads(r.stdout)["runbooks"]}
    assert set(ROLLBACK_RUNBOOKS) | {"full-rollout", "preflight"} <= set(books)
    assert all(Path(b["path"]).is_relative_to(pkg / "runbooks") for b in books.values()), books
    r = cbctl("runbook", "show", "rollback-coordination")
    assert r.returncode == 0, r.stderr
    assert "rollback-coordination" in r.stdout + r.stderr

    # Completion: the script printed is the one shipped in the package.
    r = cbctl("completion", "bash")
    assert r.returncode == 0, r.stderr
    assert "_CBCTL_COMPLETE=bash_complete" in r.stdout
    assert r.stdout == (pkg / "completions" / "cbctl.bash").read_text()

    # The stage commands against the real etcd.
    r = cbctl("stage", "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stage"] == 0
    r = cbctl("flags", "set", "ownership.guard=observe", "--yes", "--no-wait", "--reason", "wheel test")
    assert r.returncode == 0, r.stderr
    r = cbctl("stage", "advance", "--to", "1", "--yes", "--no-wait", "--reason", "wheel test")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cbctl("stage", "status", "-o", "json")
    assert json.loads(r.stdout)["stage"] == 1

    # Exit criteria: not passing here (no agents, no drills), but it finds the rollback runbooks.
    r = cbctl("exit-criteria", "--window", "10s", "-o", "json", timeout=90)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    assert "runbooks directory" not in r.stderr
    (crit,) = [c for c in json.loads(r.stdout)["criteria"] if c["name"] == "rollback-runbooks"]
    assert set(ROLLBACK_RUNBOOKS) <= set(crit["evidence"]), crit

    # The man page, from the installed package.
    if shutil.which("man"):
        m = _run(["man", "-l", str(pkg / "man" / "man1" / "cbctl.1")], timeout=30,
                 env={**env, "MANWIDTH": "100", "PAGER": "cat", "LC_ALL": "C.UTF-8"})
        assert m.returncode == 0, m.stderr
        assert "cbctl stage advance" in re.sub(r".\x08", "", m.stdout)


def test_a_missing_runbooks_dir_names_the_path_given(installed: Installed, tmp_path: Path) -> None:
    missing = tmp_path / "mine"
    r = _run([str(installed.cbctl), "runbook", "list"], timeout=60, cwd=tmp_path,
             env=_clean_env(CBCTL_RUNBOOKS_DIR=str(missing), CBCTL_CONFIG=str(tmp_path / "none.toml")))
    assert r.returncode == 2
    assert "runbooks directory mine does not exist" in r.stderr or f"runbooks directory {missing} does not exist" in r.stderr
