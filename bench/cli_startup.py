"""CLI start-up: median wall time of `cbctl --help` against `python -c "import typer"`.

Both are measured in the same run, interleaved, so machine noise hits both alike.
Target ratio <= 1.3 (issue 2). Run: .venv/bin/python bench/cli_startup.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    from bench.report import target
except ModuleNotFoundError:  # run as a script (python bench/NAME.py): bench/ is sys.path[0]
    from report import target  # type: ignore[no-redef]

VENV_BIN = Path(sys.executable).parent
RUNS = 21


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    cases = {
        "import typer (baseline)": [sys.executable, "-c", "import typer"],
        "cbctl --help": [str(VENV_BIN / "cbctl"), "--help"],
        "cbctl stage --help": [str(VENV_BIN / "cbctl"), "stage", "--help"],
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for argv in cases.values():  # warm the page cache once
        wall(argv)
    for _ in range(RUNS):
        for name, argv in cases.items():
            samples[name].append(wall(argv))
    base = statistics.median(samples["import typer (baseline)"])
    for name, values in samples.items():
        med = statistics.median(values)
        print(f"{name:<26} median {med * 1000:7.1f} ms   ratio {med / base:5.2f}")
    ratio = statistics.median(samples["cbctl --help"]) / base
    target("cli_startup", "cbctl --help / import typer", ratio, "<=", 1.3)


if __name__ == "__main__":
    main()
