"""Dynamic completion values: flag names and values, contexts, paths, runbooks, and the bounded
store read that returns nothing (and fast) when the store is unreachable. Runs the installed
`cbctl` as a shell's completion function would (the store-backed case against a real etcd is
tests/integration/test_complete_store.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cbctl.cli.completion import join_wordbreaks
from cbctl.core.backends.coord.peek import list_key_suffixes
from tests.helpers import CBCTL, write_config

pytestmark = pytest.mark.timeout(60)


def complete(shell: str, words: str, cword: int | str, config: Path | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMP_", "_CBCTL", "CBCTL_"))}
    env.update({"_CBCTL_COMPLETE": f"{shell}_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    if config is not None:
        env["CBCTL_CONFIG"] = str(config)
    proc = subprocess.run([CBCTL], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """Two contexts; the current one has 3 lanes, an expected node and an unreachable etcd."""
    path = write_config(tmp_path / "c.toml", cluster="c1", etcd=f"http://127.0.0.1:{closed_port()}",
                        lane_count=3, context="prod", extra={"expected-nodes": ["node-a"]})
    text = path.read_text() + '\n[contexts.staging]\ncluster = "c2"\n'
    path.write_text(text)
    return path


def test_flag_names_and_values_bash_splits_at_equals() -> None:
    assert "plain,ownership.guard=" in complete("bash", "cbctl flags set ", 3)
    assert "plain,ownership.guard" in complete("bash", "cbctl flags get own", 3)
    # bash hands NAME=VAL over as NAME, =, VAL and replaces only its own current word.
    assert complete("bash", "cbctl flags set ownership.guard = ob", 5) == ["plain,observe"]
    assert complete("bash", "cbctl flags set ownership.guard =", 4) == [
        "plain,=off", "plain,=observe", "plain,=canary", "plain,=enforce"]
    assert complete("bash", "cbctl flags set cluster.enabled =", 4) == ["plain,=true", "plain,=false"]
    # zsh's words are whole shell words.
    lines = complete("zsh", "cbctl flags set eventbus.bridge=re", 3)
    assert lines[:2] == ["plain", "eventbus.bridge=read-only"]


def test_contexts_paths_and_runbooks(config: Path, tmp_path: Path) -> None:
    assert complete("bash", "cbctl --context ", 2, config) == ["plain,prod", "plain,staging"]
    assert complete("bash", "cbctl --context =", 2, config) == ["plain,=prod", "plain,=staging"]
    assert complete("bash", "cbctl config use-context st", 3, config) == ["plain,staging"]
    assert complete("bash", "cbctl --config ", 2) == ["file,"]
    assert complete("bash", "cbctl stage advance --canary la", 4) == ["file,la"]
    assert complete("bash", "cbctl runbook run ./my", 3) == ["file,./my"]
    assert complete("bash", "cbctl runbook run --dir ", 4) == ["dir,"]
    (tmp_path / "rb").mkdir()
    (tmp_path / "rb" / "mine.yaml").write_text("x")
    assert complete("bash", f"cbctl runbook show --dir {tmp_path / 'rb'} m", 5) == ["plain,mine"]


def test_store_values_fall_back_to_the_config_when_the_store_is_unreachable(config: Path) -> None:
    start = time.monotonic()
    assert complete("bash", "cbctl stage advance --ignore-missing ", 4, config) == ["plain,node-a"]
    assert complete("bash", "cbctl flags set canary.lanes = lane-00,", 5, config) == [
        "plain,lane-00,lane-01", "plain,lane-00,lane-02"]
    assert complete("bash", "cbctl events tail --node x", 4, config) == []
    assert time.monotonic() - start < 20  # three processes, no connect retries


def test_peek_returns_nothing_on_any_error(tmp_path: Path) -> None:
    port = closed_port()
    assert list_key_suffixes({"endpoints": [f"http://127.0.0.1:{port}"]}, "/cbctl/x/nodes/") == []
    assert list_key_suffixes({"endpoints": ["not a url"]}, "/cbctl/x/nodes/") == []
    assert list_key_suffixes({"endpoints": [f"https://127.0.0.1:{port}"], "tls": {"ca-file": str(tmp_path / "no")}},
                             "/p/") == []
    # A server that accepts and never answers: the budget bounds the wait.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        start = time.monotonic()
        assert list_key_suffixes({"endpoints": [f"http://127.0.0.1:{srv.getsockname()[1]}"]}, "/p/",
                                 timeout=0.2) == []
        assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        (["cbctl", "flags", "set", "a.b", "=", "x"], 5, (["flags", "set"], "a.b=x", "a.b=")),
        (["cbctl", "flags", "set", "a.b", "="], 4, (["flags", "set"], "a.b=", "a.b")),
        (["cbctl", "flags", "set", "a.b", "="], 5, (["flags", "set", "a.b="], "", "")),
        (["cbctl", "--context", "=", "p", "stage"], 4, (["--context=p"], "stage", "")),
    ],
)
def test_join_wordbreaks(words: list[str], cword: int, expected: tuple[list[str], str, str]) -> None:
    assert join_wordbreaks(words, cword) == expected
