"""``python -m bench`` (``make bench``): run every bench and print one summary table.

Each bench runs as its own process (it starts its own real services on loopback) with the short
arguments below, under a time limit; its ``bench-result:`` lines (bench/report.py) are collected
and shown as one table of value against target.  The benches' own output streams through
unchanged.  Exit 0 when every bench ran and met its targets, 1 otherwise.

``python -m bench NAME ...`` runs only those benches; ``--list`` names them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.report import PREFIX

HERE = Path(__file__).resolve().parent

#: name -> (arguments, time limit in seconds).  Arguments keep each bench short enough for a
#: full run in about 15 minutes on 2 cores; run a bench by itself for its full-size defaults.
BENCHES: dict[str, tuple[list[str], float]] = {
    "cli_startup": ([], 120),
    "coord": ([], 300),
    "guard": (["--writes", "10000", "--rounds", "3"], 300),
    "publish": (["--events", "10000", "--rounds", "5"], 300),
    "outbox": (["--events", "20000"], 300),
    "propagation": ([], 300),
    "failover": ([], 300),
    "preflight": ([], 300),
    "e2e": (["--rate", "1000", "--seconds", "10"], 300),
    "soak": (["--duration", "2m", "--interval", "20s"], 420),
    "scale": (["idle", "--agents", "5", "--seconds", "20"], 300),
}


def run_one(name: str, args: list[str], limit: float) -> tuple[list[dict[str, object]], str]:
    """Run one bench; its result lines and a status word (ok, exit N, timeout)."""
    argv = [sys.executable, "-u", str(HERE / f"{name}.py"), *args]
    results: list[dict[str, object]] = []
    print(f"\n=== {name} ({' '.join(args) or 'defaults'})", flush=True)
    proc = subprocess.Popen(argv, cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + limit
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.startswith(PREFIX):
                results.append(json.loads(line[len(PREFIX):]))
            else:
                sys.stdout.write(line)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(argv, limit)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return results, "timeout"
    return results, "ok" if code == 0 or results else f"exit {code}"


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="benches to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the benches and exit")
    opts = parser.parse_args(argv)
    if opts.list:
        print("\n".join(BENCHES))
        return 0
    unknown = [n for n in opts.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)} (choose from {', '.join(BENCHES)})")
    rows: list[tuple[str, str, str, str, str]] = []
    all_ok = True
    for name in opts.names or list(BENCHES):
        args, limit = BENCHES[name]
        results, status = run_one(name, args, limit)
        if not results:
            rows.append((name, "-", "-", "-", f"NO RESULT ({status})"))
            all_ok = False
        for r in results:
            unit = str(r["unit"])
            rows.append((name, str(r["what"]), _num(float(r["value"])) + unit,
                         f"{r['op']} {_num(float(r['goal']))}{unit}", "met" if r["met"] else "MISSED"))
            all_ok &= bool(r["met"])
    widths = [max(len(row[i]) for row in [("bench", "what", "value", "target", "result"), *rows]) for i in range(5)]
    print("\n=== summary")
    for row in [("bench", "what", "value", "target", "result"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
