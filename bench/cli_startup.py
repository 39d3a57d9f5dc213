"""CLI start-up and tab completion, as whole processes, against `python -c "import typer"`.

Every case is measured in the same run, interleaved (one sample of each case per round), so
machine noise hits them alike; the median of each case is compared with the baseline's.

* ``cbctl --help``: target ratio <= 1.3 (issue 2).
* ``cbctl stage status`` and ``cbctl nodes`` against a real etcd started through the harness
  (cbctl.sandbox's EtcdServer), with one live node record: target ratio <= 2 (issue 13, item 8).
* One TAB as the shell runs it (``_CBCTL_COMPLETE=bash_complete COMP_WORDS=... cbctl``):
  static values (flag names, flag values): target <= 150 ms; store-backed values (node ids,
  read from the etcd above) are reported, with the same 150 ms target.

Every process uses a private bytecode cache (PYTHONPYCACHEPREFIX), written by a warm-up run, so
cbctl's modules load from .pyc as in an installed package, whatever PYTHONDONTWRITEBYTECODE says.

Run: .venv/bin/python bench/cli_startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cbctl.sandbox import EtcdServer

try:
    from bench.report import target
except ModuleNotFoundError:  # run as a script (python bench/<name>.py): bench/ is sys.path[0]
    from report import target  # type: ignore[no-redef]

VENV_BIN = Path(sys.executable).parent
CBCTL = str(VENV_BIN / "cbctl")
CLUSTER = "bench"
BASELINE = "import typer (baseline)"


def wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def tab(words: str) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment of one bash TAB on the command line ``words``."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    return [CBCTL], {"_CBCTL_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}


def seed(etcd_url: str) -> None:
    """One node record, so `cbctl nodes` and node-id completion have something to show."""
    record = {"node_id": "node-1", "host": "127.0.0.1", "instance_id": "bench", "applied_revision": 0,
              "heartbeat": time.time()}
    subprocess.run(["etcdctl", f"--endpoints={etcd_url}", "put", f"/cbctl/{CLUSTER}/nodes/node-1",
                    json.dumps(record)], check=True, stdout=subprocess.DEVNULL,
                   env={k: v for k, v in os.environ.items() if not k.startswith("ETCD")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="rounds (samples per case); default 15")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cbctl-bench-startup-") as tmp:
        server = EtcdServer(tmp, name="bench-etcd")
        server.start()
        try:
            seed(server.client_url)
            config = Path(tmp) / "config.toml"
            config.write_text(f'current-context = "bench"\n[contexts.bench]\ncluster = "{CLUSTER}"\n'
                              f'[contexts.bench.coordination]\nbackend = "etcd"\nendpoints = ["{server.client_url}"]\n')
            base_env = {k: v for k, v in os.environ.items()
                        if not k.startswith(("COMP_", "_CBCTL", "CBCTL_")) and k != "PYTHONDONTWRITEBYTECODE"}
            base_env["CBCTL_CONFIG"] = str(config)
            # Bytecode cached as an installed package has it (a wheel install compiles .pyc), in
            # a private tree: with PYTHONDONTWRITEBYTECODE every run would compile cbctl afresh.
            base_env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
            cases: dict[str, tuple[list[str], dict[str, str]]] = {
                BASELINE: ([sys.executable, "-c", "import typer"], {}),
                "cbctl --help": ([CBCTL, "--help"], {}),
                "cbctl stage status": ([CBCTL, "stage", "status"], {}),
                "cbctl nodes": ([CBCTL, "nodes"], {}),
                "TAB flags set <names>": tab("cbctl flags set "),
                "TAB flags set guard=<values>": tab("cbctl flags set ownership.guard="),
                "TAB --ignore-missing <node ids>": tab("cbctl stage advance --ignore-missing "),
            }
            envs = {name: {**base_env, **extra} for name, (_, extra) in cases.items()}
            samples: dict[str, list[float]] = {k: [] for k in cases}
            for name, (argv, _) in cases.items():  # warm the page cache once; fail loudly if broken
                wall(argv, envs[name])
            for _ in range(args.runs):
                for name, (argv, _) in cases.items():
                    samples[name].append(wall(argv, envs[name]))
        finally:
            server.stop()

    med = {name: statistics.median(values) for name, values in samples.items()}
    base = med[BASELINE]
    print(f"{'case':<32} {'median':>9} {'ratio':>7}   ({args.runs} interleaved runs)")
    for name, value in med.items():
        print(f"{name:<32} {value * 1000:7.1f} ms {value / base:6.2f}")
    target("cli_startup", "cbctl --help / import typer", med["cbctl --help"] / base, "<=", 1.3)
    target("cli_startup", "cbctl stage status / import typer", med["cbctl stage status"] / base, "<=", 2.0)
    target("cli_startup", "cbctl nodes / import typer", med["cbctl nodes"] / base, "<=", 2.0)
    for name in cases:
        if name.startswith("TAB"):
            target("cli_startup", name, med[name] * 1000, "<=", 150, unit=" ms")


if __name__ == "__main__":
    main()
