"""Run the demo (scripts/demo.sh) N times from this checkout: each run's result and wall time,
then the pass rate.  ``make demo-repeat N=10`` (``BUSY=1`` adds ``--busy``).

Each run gets its own contexts file and sandbox directory under one base directory (default: a
new ``/tmp/cbctl-demo-repeat-*``), so the operator's own config is never touched and one run's
leftovers cannot leak into the next.  After every run the run's sandbox is taken down.  A
passing run's directory is deleted; a failing run's is kept: ``demo.log`` (the demo's whole
output) and ``sandbox/`` (every server's and agent's log).

``--busy`` starts one ``python3 -c 'while True: pass'`` process for the duration (one core kept
busy, as the issue's "5 more runs while another process keeps one core busy") and kills it at
the end.  Exit code: 0 when every run passed, 1 otherwise, 2 for bad usage.

Run: .venv/bin/python bench/demo_repeat.py 10 [--busy] [--dir DIR] [--timeout 600]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo.sh"
CBCTL = ROOT / ".venv" / "bin" / "cbctl"


@dataclass
class Outcome:
    index: int
    passed: bool
    seconds: float
    exit_code: int | None  # None: killed after the timeout
    where: str  # the failure line of the demo's log, "" when it passed
    log_dir: Path | None  # kept for a failed run


def _last_failure_line(log: Path) -> str:
    """The demo's own "DEMO FAILED ... at: CMD" line, else the last non-empty line."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    failed = [ln for ln in lines if ln.startswith("DEMO FAILED")]
    return failed[-1] if failed else (lines[-1] if lines else "")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_once(index: int, base: Path, timeout: float) -> Outcome:
    """One demo in ``base/run-<index>``; its sandbox is taken down afterwards, whatever happened."""
    d = base / f"run-{index:02d}"
    d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CBCTL_CONFIG": str(d / "config.toml"), "CBCTL_SANDBOX_DIR": str(d / "sandbox"),
           "NO_COLOR": "1"}
    log = d / "demo.log"
    started = time.monotonic()
    code: int | None
    with open(log, "wb") as out:
        # Own session: a timed-out demo is killed with everything it started (agents, servers).
        proc = subprocess.Popen(["bash", str(DEMO)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            seconds = time.monotonic() - started
            subprocess.run([str(CBCTL), "sandbox", "down", "--dir", str(d / "sandbox")], env=env, cwd=ROOT,
                           stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False, timeout=120)
    if code == 0:
        shutil.rmtree(d, ignore_errors=True)
        return Outcome(index, True, seconds, 0, "", None)
    where = _last_failure_line(log) if code is not None else f"killed after the {timeout:g} s timeout"
    return Outcome(index, False, seconds, code, where, d)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=int, nargs="?", default=10, help="how many demos to run (default 10)")
    parser.add_argument("--busy", action="store_true", help="keep one core busy (one spinning python3) meanwhile")
    parser.add_argument("--dir", type=Path, default=None, help="base directory for the runs (default: a new /tmp dir)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one demo is killed (default 600)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("runs must be at least 1")
    if not CBCTL.exists():
        print(f"demo-repeat: {CBCTL} not found; run 'make setup' first", file=sys.stderr)
        return 2

    base = args.dir or Path(tempfile.mkdtemp(prefix="cbctl-demo-repeat-"))
    base.mkdir(parents=True, exist_ok=True)
    busy: subprocess.Popen[bytes] | None = None
    if args.busy:
        busy = subprocess.Popen(["python3", "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    print(f"demo-repeat: {args.runs} run(s) of {DEMO.relative_to(ROOT)}"
          f"{' with one core kept busy (pid %d)' % busy.pid if busy else ''}; runs under {base}", flush=True)
    outcomes: list[Outcome] = []
    try:
        for i in range(1, args.runs + 1):
            o = run_once(i, base, args.timeout)
            outcomes.append(o)
            if o.passed:
                print(f"run {i}/{args.runs}: PASS  {o.seconds:6.1f} s", flush=True)
            else:
                code = "timeout" if o.exit_code is None else f"exit {o.exit_code}"
                print(f"run {i}/{args.runs}: FAIL  {o.seconds:6.1f} s  ({code}) {o.where}", flush=True)
                print(f"    log kept: {o.log_dir}/demo.log (sandbox logs: {o.log_dir}/sandbox)", flush=True)
    except KeyboardInterrupt:
        print("demo-repeat: interrupted", file=sys.stderr)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()

    passed = sum(o.passed for o in outcomes)
    times = [o.seconds for o in outcomes]
    if times:
        print(f"pass rate: {passed}/{len(outcomes)} ({100.0 * passed / len(outcomes):.0f}%)"
              f"{' with one core busy' if args.busy else ''}; wall time per run: min {min(times):.1f} s, "
              f"median {statistics.median(times):.1f} s, max {max(times):.1f} s")
    if passed == len(outcomes) == args.runs:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
