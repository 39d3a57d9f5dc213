"""Store-backed completion against a real etcd: node ids and owned lanes come from one bounded
read (cbctl/core/backends/coord/peek.py), merged with the contexts file's expected nodes and lanes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import CBCTL, write_config

pytestmark = pytest.mark.timeout(60)


def complete(words: str, cword: int, config: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMP_", "_CBCTL", "CBCTL_"))}
    env.update({"_CBCTL_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword),
                "CBCTL_CONFIG": str(config)})
    proc = subprocess.run([CBCTL], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_node_and_lane_ids_from_the_store(tmp_path: Path, shared_etcd: Any, unique_cluster: str) -> None:
    config = write_config(tmp_path / "c.toml", cluster=unique_cluster, etcd=shared_etcd.client_url,
                          lanes=["lane-a", "lane-b"], extra={"expected-nodes": ["node-x"]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    for key in (f"/cbctl/{unique_cluster}/nodes/node-1", f"/cbctl/{unique_cluster}/nodes/node-2",
                f"/cbctl/{unique_cluster}/lanes/lane-z", f"/cbctl/{unique_cluster}/nodes-not/node-9"):
        subprocess.run(["etcdctl", f"--endpoints={shared_etcd.client_url}", "put", key, "{}"], env=env,
                       check=True, capture_output=True, timeout=10)
    assert complete("cbctl stage advance --ignore-missing ", 4, config) == [
        "plain,node-1", "plain,node-2", "plain,node-x"]
    assert complete("cbctl events tail --node node-", 4, config) == ["plain,node-1", "plain,node-2", "plain,node-x"]
    assert complete("cbctl flags set canary.lanes = lane-b,", 5, config) == [
        "plain,lane-b,lane-a", "plain,lane-b,lane-z"]
