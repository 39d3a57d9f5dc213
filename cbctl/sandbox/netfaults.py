"""Network faults for the harness: a network namespace linked to the root namespace by a veth
pair, and nftables rules that cut its traffic to one address and port.

Real faults, not simulated ones: a process started with ``ip netns exec <name>`` reaches the
root namespace's servers through the veth pair, and :meth:`NetNs.drop_tcp_to` drops its packets
(established connections too) until :meth:`NetNs.heal`.  Needs root, ``ip`` and ``nft``;
:func:`netns_unusable` says why not when they are missing (tests skip with that reason).
Addresses: ``10.231.<n>.0/24`` with a free ``<n>``, never routed beyond the two ends.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

__all__ = ["NetNs", "netns_unusable"]


def netns_unusable() -> str | None:
    """Why a network namespace cannot be made here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None or shutil.which("nft") is None:
        return "needs ip and nft"
    probe = f"cbtp{os.getpid() % 100000}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        return f"ip netns unavailable: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _sh(*argv: str) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


class NetNs:
    """A network namespace joined to the root namespace by a veth pair on 10.231.<n>.0/24.

    Contract: created on construction (or nothing is left behind and ``RuntimeError`` raised);
    :meth:`close` removes the pair and the namespace and may be called more than once.
    """

    def __init__(self) -> None:
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=10).stdout
        for _ in range(50):
            n = random.randint(1, 250)
            if f"10.231.{n}." not in used:
                break
        tag = f"{os.getpid() % 10000}{n}"
        self.name = f"cbt{tag}"
        self.host_if, self.ns_if = f"vh{tag}"[:15], f"vn{tag}"[:15]
        self.host_ip, self.ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"
        _sh("ip", "netns", "add", self.name)
        try:
            _sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _sh("ip", "link", "set", self.ns_if, "netns", self.name)
            _sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            _sh("ip", "link", "set", self.host_if, "up")
            self.exec("ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
            self.exec("ip", "link", "set", self.ns_if, "up")
            self.exec("ip", "link", "set", "lo", "up")
        except RuntimeError:
            self.close()
            raise

    def exec(self, *argv: str) -> None:
        """Run ``argv`` inside the namespace; ``RuntimeError`` with its stderr if it fails."""
        _sh("ip", "netns", "exec", self.name, *argv)

    def drop_tcp_to(self, ip: str, port: int) -> None:
        """Cut every packet from the namespace to ip:port (established connections too)."""
        self.exec("nft", "add", "table", "inet", "cbtcut")
        self.exec("nft", "add", "chain", "inet", "cbtcut", "out", "{ type filter hook output priority 0 ; }")
        self.exec("nft", "add", "rule", "inet", "cbtcut", "out", "ip", "daddr", ip, "tcp", "dport", str(port), "drop")

    def heal(self) -> None:
        """Remove the cut: traffic flows again."""
        self.exec("nft", "delete", "table", "inet", "cbtcut")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
