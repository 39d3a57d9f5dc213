"""Real faults on a running sandbox (``cbctl sandbox chaos ...``).

Every action works on processes recorded in the sandbox's state, re-attached only when
:func:`cbctl.sandbox.state.owns` says the pid is still ours (a recycled pid is never signalled),
and returns a one-line description of what it did; :class:`ChaosError` when it could not (unknown
node, process not running, not root for a partition, nft failed). Partitions are nftables rules
in table ``inet cbctl_sandbox`` matching the agent's own group id (``meta skgid``; agents get one
when the sandbox is started as root). What each action does: docs/testing.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from typing import Any

from cbctl.sandbox.services.base import HarnessError, Service, group_members
from cbctl.sandbox.services.cbctl_procs import AgentProcess
from cbctl.sandbox.state import Sandbox, SandboxProcess, build_service, owns, process_state
from cbctl.sandbox.waiting import wait_until

__all__ = [
    "ChaosError", "NFT_TABLE", "heal_all", "heal_node", "kill_node", "kill_service", "partition_node",
    "partition_rules", "pause_node", "restore_service", "resume_node", "skew_node", "start_node",
]

NFT_TABLE = "cbctl_sandbox"


class ChaosError(Exception):
    """A chaos action could not be carried out; the message says why."""


def _agent(sb: Sandbox, node: str) -> SandboxProcess:
    try:
        return sb.agent(node)
    except KeyError as exc:
        raise ChaosError(str(exc.args[0])) from None


def _live(sb: Sandbox, proc: SandboxProcess) -> Service:
    """The attached Service of a process that must be running now."""
    if not owns(sb, proc):
        raise ChaosError(f"{proc.name} is not running (start it first)")
    return build_service(sb, proc)


def _sigkill(sb: Sandbox, proc: SandboxProcess) -> str:
    svc = _live(sb, proc)
    pid = svc.pid
    assert pid is not None
    svc.kill(signal.SIGKILL)
    try:
        # Gone = no live member left in the group (a zombie never reaped by PID 1 does not count).
        wait_until(lambda: not group_members(pid), 5.0, message=f"{proc.name} gone after SIGKILL")
    except TimeoutError as exc:
        raise ChaosError(str(exc)) from None
    sb.update_pid(proc.name, None)
    return f"SIGKILL {proc.name} (process group {pid})"


def _start(sb: Sandbox, proc: SandboxProcess, timeout: float = 30.0, **changes: Any) -> Service:
    """Start ``proc`` again (after applying ``changes`` to its recorded args) and record its pid."""
    if owns(sb, proc):
        raise ChaosError(f"{proc.name} is already running (pid {proc.pid})")
    proc.args.update(changes)
    svc = build_service(sb, proc, attach=False)
    try:
        svc.start(timeout)
    except HarnessError as exc:
        sb.update_pid(proc.name, None)
        raise ChaosError(str(exc)) from None
    sb.update_pid(proc.name, svc.pid)
    return svc


# -- servers ----------------------------------------------------------------------------------

def kill_service(sb: Sandbox, name: str) -> str:
    """SIGKILL the server ``name`` (e.g. ``nats``); return what was done."""
    try:
        proc = sb.process(name)
    except KeyError as exc:
        raise ChaosError(str(exc.args[0])) from None
    return _sigkill(sb, proc)


def restore_service(sb: Sandbox, name: str) -> str:
    """Start the server ``name`` again on its recorded ports and data dir; return what was done."""
    try:
        proc = sb.process(name)
    except KeyError as exc:
        raise ChaosError(str(exc.args[0])) from None
    svc = _start(sb, proc)
    return f"started {name} again on 127.0.0.1:{svc.port} (pid {svc.pid}), same data dir"


# -- agents -----------------------------------------------------------------------------------

def kill_node(sb: Sandbox, node: str) -> str:
    """SIGKILL the agent of ``node``: no graceful stop, its lease expires after the TTL."""
    return _sigkill(sb, _agent(sb, node))


def start_node(sb: Sandbox, node: str) -> str:
    """Start the agent of ``node`` again (after kill-node)."""
    svc = _start(sb, _agent(sb, node))
    return f"started {node} again on 127.0.0.1:{svc.port} (pid {svc.pid})"


def pause_node(sb: Sandbox, node: str) -> str:
    """SIGSTOP the agent's process group: it holds its sockets but does nothing."""
    proc = _agent(sb, node)
    svc = _live(sb, proc)
    if process_state(sb, proc) == "paused":
        raise ChaosError(f"{node} is already paused")
    svc.pause()
    return f"SIGSTOP {node} (process group {svc.pid})"


def resume_node(sb: Sandbox, node: str) -> str:
    """SIGCONT the agent's process group."""
    proc = _agent(sb, node)
    svc = _live(sb, proc)
    svc.resume()
    return f"SIGCONT {node} (process group {svc.pid})"


def skew_node(sb: Sandbox, node: str, offset: float) -> str:
    """Restart the agent of ``node`` with its wall clock off by ``offset`` seconds (faketime).

    The agent is stopped gracefully first (lease revoked, lanes handed over), then started with
    the same node id, port and state dir. ``offset`` 0 restarts it without skew.
    """
    if shutil.which("faketime") is None and offset:
        raise ChaosError("skew-node needs the faketime executable (apt-get install faketime)")
    proc = _agent(sb, node)
    if owns(sb, proc):
        build_service(sb, proc).stop(timeout=10.0)
        sb.update_pid(node, None)
    svc = _start(sb, proc, clock_offset=offset or None)
    assert isinstance(svc, AgentProcess)
    what = f"clock {offset:+g}s (faketime)" if offset else "no clock skew"
    return f"restarted {node} with {what} (pid {svc.pid})"


# -- partitions -------------------------------------------------------------------------------

def _nft(*args: str, script: str | None = None) -> str:
    """Run nft; return stdout. Raises ChaosError with nft's message on failure."""
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is None:
        raise ChaosError("partition-node needs nftables (apt-get install nftables)")
    try:
        res = subprocess.run([nft, *args], input=script, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        raise ChaosError(f"cannot run nft: {exc}") from None
    if res.returncode != 0:
        raise ChaosError(f"nft {' '.join(args)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def _comment(sb: Sandbox, node: str) -> str:
    return f"cbctl-sandbox {sb.id} {node}"


def partition_rules(sb: Sandbox) -> dict[str, int]:
    """This sandbox's partition rules now installed: node -> nft rule handle."""
    if os.geteuid() != 0:
        return {}
    try:
        out = _nft("-j", "-a", "list", "chain", "inet", NFT_TABLE, "output")
    except ChaosError:
        return {}  # no table/chain: no rules
    prefix = f"cbctl-sandbox {sb.id} "
    rules: dict[str, int] = {}
    for item in json.loads(out).get("nftables", []):
        rule = item.get("rule")
        if rule and str(rule.get("comment", "")).startswith(prefix):
            rules[str(rule["comment"])[len(prefix):]] = int(rule["handle"])
    return rules


def _backend_ports(sb: Sandbox) -> list[int]:
    ports = []
    for name in ("etcd", "nats", "redis"):
        ports.append(int(sb.process(name).args["port"]))
    return ports


def partition_node(sb: Sandbox, node: str) -> str:
    """Drop every packet ``node``'s agent sends to etcd, NATS and Redis (until :func:`heal_node`)."""
    proc = _agent(sb, node)
    if os.geteuid() != 0:
        raise ChaosError("partition-node needs root (nftables, and agents started as root)")
    gid = proc.args.get("gid")
    if gid is None:
        raise ChaosError(f"{node} was started without its own group id (sandbox up as non-root): "
                         "cannot single it out; run `cbctl sandbox up` as root")
    _live(sb, proc)
    if node in partition_rules(sb):
        raise ChaosError(f"{node} is already partitioned (heal it with `cbctl sandbox chaos heal-node {node}`)")
    ports = _backend_ports(sb)
    script = (
        f"add table inet {NFT_TABLE}\n"
        f"add chain inet {NFT_TABLE} output {{ type filter hook output priority 0 ; policy accept ; }}\n"
        f"add rule inet {NFT_TABLE} output meta skgid {int(gid)} ip daddr 127.0.0.1 "
        f"tcp dport {{ {', '.join(str(p) for p in ports)} }} drop comment \"{_comment(sb, node)}\"\n"
    )
    _nft("-f", "-", script=script)
    return (f"partitioned {node}: nft drops its packets (gid {gid}) to etcd/nats/redis ports "
            f"{', '.join(str(p) for p in ports)}")


def heal_node(sb: Sandbox, node: str) -> str:
    """Remove ``node``'s partition rule."""
    _agent(sb, node)
    handle = partition_rules(sb).get(node)
    if handle is None:
        raise ChaosError(f"{node} is not partitioned")
    _nft("delete", "rule", "inet", NFT_TABLE, "output", "handle", str(handle))
    _drop_empty_table()
    return f"healed {node}: partition rule removed"


def heal_all(sb: Sandbox) -> list[str]:
    """Remove every partition rule of this sandbox (``down`` calls it); return the nodes healed."""
    healed = []
    for node, handle in partition_rules(sb).items():
        _nft("delete", "rule", "inet", NFT_TABLE, "output", "handle", str(handle))
        healed.append(node)
    if healed:
        _drop_empty_table()
    return healed


def _drop_empty_table() -> None:
    """Delete the table once no sandbox has a rule in it (another sandbox may still)."""
    try:
        out = _nft("-j", "list", "chain", "inet", NFT_TABLE, "output")
    except ChaosError:
        return
    if not any("rule" in item for item in json.loads(out).get("nftables", [])):
        _nft("delete", "table", "inet", NFT_TABLE)


def wait_paused_for(seconds: float) -> None:
    """Block ``seconds`` (a drill's duration). KeyboardInterrupt propagates at once."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(0.2, left))
