"""Soak: the sandbox at stage 3 under steady load; is each agent's memory bounded?

Starts a sandbox (``cbctl.sandbox.cluster.up``: etcd, nats-server, redis-server, prometheus,
chronyd, N agents, the load generator at ``--rate`` workflows/s, a standing subscriber per node)
in a temporary directory with its own contexts file, advances it to stage 3 (``cbctl stage
advance --force``: the soak measures memory, not the gates), then samples every ``--interval``
seconds for ``--duration``:

- each agent's RSS and CPU (user+system time over the interval, % of one core), from psutil;
- Redis ``used_memory`` (INFO memory);
- the event stream's bytes and messages (JetStream stream info), and the events/s it grew by.

Prints one table row per sample, then a verdict, and exits 1 if any agent's RSS exceeded
``--max-rss`` MB (default 150) or kept growing over the last third of the run (least-squares
slope of its samples there above ``--max-slope`` MB/min, default 1).  The sandbox is taken down
at the end unless ``--keep``.

Run: .venv/bin/python bench/soak.py [--rate 100] [--duration 30m] [--interval 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cbctl.core.model.durations import parse_duration
from cbctl.sandbox import cluster
from cbctl.sandbox.services.cbctl_procs import cbctl_executable

try:
    from bench.report import target
except ModuleNotFoundError:  # run as a script (python bench/<name>.py): bench/ is sys.path[0]
    from report import target  # type: ignore[no-redef]

def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (the kernel's VmRSS), None when it is gone."""
    try:
        return psutil.Process(pid).memory_info().rss / (1024 * 1024)
    except psutil.Error:
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used, None when it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return 0.0 if den == 0 else sum((t - mx) * (v - my) for t, v in points) / den * 60


@dataclass
class Sample:
    t: float
    rss: dict[str, float | None]
    cpu: dict[str, float | None]
    redis_mb: float | None
    stream_mb: float | None
    stream_msgs: int | None
    events_per_s: float | None = None


@dataclass
class Soak:
    sb: cluster.Sandbox
    config: Path
    agents: dict[str, int] = field(default_factory=dict)

    def cbctl(self, *args: str) -> None:
        env = {**os.environ, "CBCTL_CONFIG": str(self.config), "CBCTL_CONTEXT": cluster.CONTEXT_NAME,
               "NO_COLOR": "1"}
        for attempt in range(8):
            if attempt:
                time.sleep(3)
            res = subprocess.run([cbctl_executable(), *args], env=env, capture_output=True, text=True,
                                 timeout=120)
            if res.returncode != 4:  # 4: a backend did not answer in time (a busy machine): try again
                break
            print(f"soak: cbctl {args[0]} {args[1]}: a backend did not answer, retrying", file=sys.stderr)
        if res.returncode != 0:
            raise SystemExit(f"soak: cbctl {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-2000:]}")

    def to_stage_3(self) -> None:
        for stage in (1, 2, 3):
            extra = ["--canary", str(self.sb.canary_path)] if stage == 2 else []
            self.cbctl("stage", "advance", "--to", str(stage), *extra, "--force", "--reason", "soak bench", "--yes")

    async def backends(self) -> tuple[float | None, float | None, int | None]:
        """Redis used_memory (MB), stream bytes (MB) and messages."""
        import nats
        import redis.asyncio as aredis

        from cbctl.core.model.config import load_config

        ctx = load_config(self.sb.agent_config_path).context(cluster.CONTEXT_NAME)
        redis_mb = stream_mb = None
        msgs = None
        r = aredis.Redis.from_url(ctx.redis.url, socket_timeout=5)
        try:
            redis_mb = int((await r.info("memory"))["used_memory"]) / 1e6
        except (aredis.RedisError, OSError) as exc:
            print(f"soak: redis INFO failed: {exc}", file=sys.stderr)
        finally:
            await r.aclose()
        try:
            nc = await nats.connect(list(ctx.nats.servers), connect_timeout=5, allow_reconnect=False)
            try:
                info = await nc.jetstream(timeout=5).stream_info(ctx.nats.stream.name)
                stream_mb, msgs = info.state.bytes / 1e6, info.state.messages
            finally:
                await nc.close()
        except Exception as exc:  # noqa: BLE001 - a bench reports and goes on
            print(f"soak: stream info failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return redis_mb, stream_mb, msgs


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=100.0, help="workflows/s (default 100)")
    ap.add_argument("--duration", default="30m", help="how long to sample at stage 3 (default 30m)")
    ap.add_argument("--interval", default="60s", help="sampling interval (default 60s)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--max-rss", type=float, default=150.0, help="MB per agent (default 150)")
    ap.add_argument("--max-slope", type=float, default=1.0, help="MB/min allowed over the last third (default 1)")
    ap.add_argument("--dir", type=Path, default=None, help="sandbox dir (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="leave the sandbox running")
    args = ap.parse_args()
    duration = parse_duration(args.duration)
    interval = parse_duration(args.interval)

    base = args.dir or Path(tempfile.mkdtemp(prefix="cbctl-soak-"))
    config = base / "config.toml"
    print(f"soak: sandbox in {base}, {args.nodes} nodes, {args.rate:g} workflows/s, "
          f"{duration:g}s at stage 3, sample every {interval:g}s", file=sys.stderr)
    sb = cluster.up(directory=base / "sandbox", nodes=args.nodes, config_path=config, load_rate=args.rate,
                    timeout=90.0)
    soak = Soak(sb, config)
    try:
        soak.agents = {p.name: p.pid for p in sb.processes if p.role == "agent" and p.pid}
        soak.to_stage_3()
        names = sorted(soak.agents)
        header = (f"{'min':>5} " + " ".join(f"{n + ' MB':>11} {n[-2:] + ' cpu%':>8}" for n in names)
                  + f" {'redis MB':>9} {'stream MB':>10} {'stream msgs':>12} {'events/s':>9}")
        print(header)
        samples: list[Sample] = []
        t0 = time.monotonic()
        last_cpu = {n: cpu_seconds(pid) for n, pid in soak.agents.items()}
        last_t = t0
        k = 0
        while True:
            now = time.monotonic()
            cpu_now = {n: cpu_seconds(pid) for n, pid in soak.agents.items()}
            dt = max(1e-6, now - last_t)
            cpu = {n: (None if cpu_now[n] is None or last_cpu[n] is None or k == 0
                       else (cpu_now[n] - last_cpu[n]) / dt * 100) for n in names}
            last_cpu, last_t = cpu_now, now
            redis_mb, stream_mb, msgs = asyncio.run(soak.backends())
            s = Sample(now - t0, {n: rss_mb(pid) for n, pid in soak.agents.items()}, cpu, redis_mb, stream_mb, msgs)
            if samples and msgs is not None and samples[-1].stream_msgs is not None:
                s.events_per_s = (msgs - samples[-1].stream_msgs) / max(1e-6, s.t - samples[-1].t)
            samples.append(s)
            print(f"{s.t / 60:>5.1f} " + " ".join(f"{fmt(s.rss[n]):>11} {fmt(s.cpu[n]):>8}" for n in names)
                  + f" {fmt(redis_mb, '.1f'):>9} {fmt(stream_mb, '.1f'):>10} {fmt(msgs, 'd'):>12}"
                  f" {fmt(s.events_per_s):>9}", flush=True)
            if s.t >= duration - 0.5:
                break
            k += 1
            time.sleep(max(0.0, t0 + k * interval - time.monotonic()))
        return verdict(samples, names, duration, args.max_rss, args.max_slope)
    finally:
        if args.keep:
            print(f"soak: sandbox left running in {base / 'sandbox'} (CBCTL_CONFIG={config})", file=sys.stderr)
        else:
            cluster.down(base / "sandbox")


def verdict(samples: list[Sample], names: list[str], duration: float, max_rss: float, max_slope: float) -> int:
    failed = False
    for n in names:
        series = [(s.t, s.rss[n]) for s in samples if s.rss[n] is not None]
        if not series:
            print(f"{n}: FAIL no RSS samples (agent died?)")
            failed = True
            continue
        peak = max(v for _, v in series)
        tail = [(t, v) for t, v in series if t >= duration * 2 / 3 - 1]
        slope = slope_per_min(tail)
        gone = any(s.rss[n] is None for s in samples)
        ok = target("soak", f"{n} peak RSS", peak, "<=", max_rss, unit=" MB")
        ok &= target("soak", f"{n} RSS slope, last third", slope, "<=", max_slope, unit=" MB/min")
        ok &= not gone
        failed |= not ok
        print(f"{n}: {'ok' if ok else 'FAIL'} peak RSS {peak:.0f} MB (limit {max_rss:g}), last-third slope "
              f"{slope:+.2f} MB/min over {len(tail)} samples (limit {max_slope:g})" + ("; agent died" if gone else ""))
    rates = [s.events_per_s for s in samples if s.events_per_s is not None]
    if rates:
        print(f"stream: {sum(rates) / len(rates):.0f} events/s on average; "
              f"redis {fmt(samples[-1].redis_mb, '.1f')} MB, stream {fmt(samples[-1].stream_mb, '.1f')} MB at the end")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
