"""Shell completion: the checked-in scripts are current, and completion really works — the
installed `cbctl` answers the `_CBCTL_COMPLETE` protocol, and bash, sourcing our script, gets
the candidates."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbctl.cli.completion import SHELLS, script
from cbctl.cli.completion_gen import expected_files, main, shipped_dir, stale
from cbctl.cli.main import app
from tests.helpers import CBCTL

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
COMPLETIONS = ROOT / "cbctl" / "completions"


def test_checked_in_scripts_equal_the_generated_ones(tmp_path: Path) -> None:
    assert main([str(tmp_path)]) == 0
    for name in expected_files():
        generated = (tmp_path / name).read_text(encoding="utf-8")
        current = (COMPLETIONS / name).read_text(encoding="utf-8") if (COMPLETIONS / name).exists() else None
        assert current == generated, f"cbctl/completions/{name} is stale: run make completions"
    assert stale(COMPLETIONS) == []
    assert shipped_dir().resolve() == COMPLETIONS.resolve()  # the default directory is the shipped one


def test_check_mode_names_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path)])
    (tmp_path / "cbctl.zsh").write_text("# edited by hand\n")
    assert main(["--check", str(tmp_path)]) == 1
    assert "cbctl.zsh: stale" in capsys.readouterr().err


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_completion_command_prints_the_script(shell: str) -> None:
    r = CliRunner().invoke(app, ["completion", shell], catch_exceptions=False)
    assert r.exit_code == 0
    assert r.stdout == script(shell)
    assert f"_CBCTL_COMPLETE={shell}_complete" in r.stdout


def complete(env: dict[str, str]) -> tuple[int, list[str], str]:
    """Run the installed cbctl as a shell's completion function would."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("COMP_", "_CBCTL"))}
    proc = subprocess.run([CBCTL], env={**full, **env}, capture_output=True, text=True, timeout=30, check=False)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


def test_bash_complete_protocol_with_the_installed_program() -> None:
    code, lines, err = complete({"_CBCTL_COMPLETE": "bash_complete", "COMP_WORDS": "cbctl st", "COMP_CWORD": "1"})
    assert code == 0, err
    assert "plain,stage" in lines
    assert all(line.split(",", 1)[1].startswith("st") for line in lines)


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        ("cbctl stage ", 2, {"status", "advance", "history"}),
        ("cbctl rollback ", 2, {"coordination", "event-bus", "consumers"}),
        ("cbctl runbook run rollback-", 3, {"rollback-coordination", "rollback-event-bus", "rollback-consumers"}),
        ("cbctl runbook run --fr", 3, {"--from-step"}),
    ],
)
def test_bash_completes_subcommands_choices_runbooks_and_options(words: str, cword: int, expected: set[str]) -> None:
    code, lines, err = complete({"_CBCTL_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    assert code == 0, err
    assert {line.split(",", 1)[1] for line in lines} == expected


def test_zsh_and_fish_protocols() -> None:
    code, lines, err = complete({"_CBCTL_COMPLETE": "zsh_complete", "COMP_WORDS": "cbctl st", "COMP_CWORD": "1"})
    assert code == 0, err
    i = lines.index("stage")
    assert lines[i - 1] == "plain" and lines[i + 1].startswith("Show and move the rollout stage")
    code, lines, err = complete({"_CBCTL_COMPLETE": "fish_complete", "COMP_WORDS": "cbctl st", "COMP_CWORD": "st"})
    assert code == 0, err
    assert any(line.startswith("plain,stage\t") for line in lines)


def test_typer_spelling_and_unknown_shell() -> None:
    code, lines, _ = complete({"_CBCTL_COMPLETE": "complete_bash", "COMP_WORDS": "cbctl st", "COMP_CWORD": "1"})
    assert code == 0 and "plain,stage" in lines
    code, _, err = complete({"_CBCTL_COMPLETE": "tcsh_complete", "COMP_WORDS": "cbctl st", "COMP_CWORD": "1"})
    assert code == 1 and "unsupported completion request" in err


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_sourcing_the_checked_in_script_completes() -> None:
    prog = f"""
        source {COMPLETIONS / 'cbctl.bash'}
        COMP_WORDS=(cbctl st); COMP_CWORD=1; _cbctl_completion cbctl; printf '%s\\n' "${{COMPREPLY[@]}}"
        COMPREPLY=()
        COMP_WORDS=(cbctl runbook run rollback-ev); COMP_CWORD=3; _cbctl_completion cbctl; printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    env = {**os.environ, "PATH": f"{Path(CBCTL).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "--norc", "-c", prog], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["stage", "rollback-event-bus"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh not installed")
def test_zsh_script_parses() -> None:
    proc = subprocess.run(["zsh", "-n", str(COMPLETIONS / "cbctl.zsh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish not installed")
def test_fish_script_parses() -> None:
    proc = subprocess.run(["fish", "--no-execute", str(COMPLETIONS / "cbctl.fish")], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
