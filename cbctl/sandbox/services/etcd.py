"""etcd on loopback: one member (:class:`EtcdServer`) or a cluster of members (:class:`EtcdCluster`)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cbctl.sandbox.services.base import (
    LOOPBACK,
    PROBE_ERRORS,
    HarnessError,
    Service,
    free_port,
    http_call,
)
from cbctl.sandbox.waiting import wait_until

__all__ = ["EtcdCluster", "EtcdServer"]


@dataclass(eq=False, repr=False, kw_only=True)
class EtcdServer(Service):
    """One etcd member (3.4 flags). ``client_url`` http://host:port, ``peer_url`` http://host:peer.

    ``extra_listen_hosts`` (e.g. a veth address 10.231.0.1) are added to the client listen and
    advertise URLs so a network namespace, which cannot reach the root namespace's 127.0.0.1,
    can connect. ``initial_cluster`` is ``name=peer_url,...``; alone by default.
    """

    binary = "etcd"

    name: str = "etcd"
    peer_port: int | None = None
    extra_listen_hosts: Sequence[str] = ()
    initial_cluster: str | None = None
    cluster_token: str | None = None
    heartbeat_ms: int = 50
    election_ms: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peer_port is None:
            self.peer_port = free_port(self.host)
        self.extra_listen_hosts = list(self.extra_listen_hosts)
        self.initial_cluster = self.initial_cluster or f"{self.name}={self.peer_url}"
        # A unique token keeps members of two sandboxes from ever joining each other.
        self.cluster_token = self.cluster_token or f"cbctl-{uuid.uuid4().hex[:12]}"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def client_urls(self) -> list[str]:
        """Every client URL: loopback first, then one per extra listen host."""
        return [self.client_url, *(f"http://{h}:{self.port}" for h in self.extra_listen_hosts)]

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        assert self.port is not None and self.peer_port is not None
        return [(self.host, self.port), (self.host, self.peer_port),
                *((h, self.port) for h in self.extra_listen_hosts)]

    def env(self) -> dict[str, str]:
        # etcd reads ETCD_* variables as flags and refuses a flag given both ways.
        return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}

    def command(self) -> list[str]:
        urls = ",".join(self.client_urls)
        return [
            "etcd",
            "--name", self.name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", urls,
            "--advertise-client-urls", urls,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", str(self.initial_cluster),
            "--initial-cluster-token", str(self.cluster_token),
            "--initial-cluster-state", "new",  # ignored once the data dir holds a WAL (restart)
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]

    def probe(self) -> bool:
        status, body = http_call(f"{self.client_url}/health")
        return status == 200 and json.loads(body).get("health") == "true"

    def peer_serving(self) -> bool:
        """True once the member serves its peer API (GET /members), one probe."""
        try:
            return http_call(f"{self.peer_url}/members", timeout=0.2)[0] == 200
        except PROBE_ERRORS:
            return False

    def active_peers(self) -> int:
        """How many peers this member's transport counts as connected (from /metrics)."""
        _, body = http_call(f"{self.client_url}/metrics", timeout=0.5)
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in body.decode().splitlines()
                   if line.startswith("etcd_network_active_peers{"))

    def status(self, timeout: float = 0.5) -> dict[str, Any]:
        """This member's /v3/maintenance/status (JSON gateway). Raises OSError when unreachable."""
        status, body = http_call(f"{self.client_url}/v3/maintenance/status", data=b"{}",
                                 timeout=timeout)
        if status != 200:
            raise HarnessError(f"{self.name}: maintenance/status answered HTTP {status}: {body!r}")
        return dict(json.loads(body))

    def extra_info(self) -> dict[str, Any]:
        return {"client_url": self.client_url, "client_urls": self.client_urls,
                "peer_url": self.peer_url, "peer_port": self.peer_port}


class EtcdCluster:
    """``size`` etcd members on loopback forming one cluster (default 3).

    Members are named ``{name}0..`` and live in ``base_dir/{name}N``. ``start`` launches all
    members first and then waits for each (a member is healthy only once there is a quorum).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        size: int = 3,
        name: str = "etcd",
        host: str = LOOPBACK,
        extra_listen_hosts: Sequence[str] = (),
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        stop_at_exit: bool = True,
    ) -> None:
        token = f"cbctl-{uuid.uuid4().hex[:12]}"
        self.members: list[EtcdServer] = [
            EtcdServer(base_dir, name=f"{name}{i}", host=host,
                       extra_listen_hosts=extra_listen_hosts, cluster_token=token,
                       heartbeat_ms=heartbeat_ms, election_ms=election_ms,
                       stop_at_exit=stop_at_exit)
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of all members (loopback), in member order."""
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 15.0) -> EtcdCluster:
        """Launch the members one after another, then wait until each is healthy; return self.

        Each member is launched only once the previous one serves its peer API. Why: on first
        bootstrap etcd 3.4 asks every other peer URL whether it is already a member, with a 1 s
        timeout; a peer whose port is bound but not yet served swallows that whole second, so
        launching all at once costs 1-2 s, launching in turn ~0.3 s.
        On failure every member is stopped and :class:`HarnessError` is raised.
        """
        deadline = time.monotonic() + timeout
        try:
            for m in self.members:
                m.launch()
                m.wait_for(m.peer_serving, max(0.1, deadline - time.monotonic()), "serving peers")
            for m in self.members:
                m.wait_ready(max(0.1, deadline - time.monotonic()))
        except HarnessError:
            self.stop(timeout=2.0)
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop all members: followers first (in parallel), then the leader; idempotent.

        Why this order: a leader that gets SIGTERM tries to hand leadership to a follower its
        transport still counts as active; if that follower is stopping too, the hand-over waits
        ~6 s before giving up. A leader that has seen its followers go (checked on its
        etcd_network_active_peers metric) skips the hand-over and exits in milliseconds.
        """
        deadline = time.monotonic() + timeout
        leader = self.find_leader()
        groups = [[m for m in self.members if m is not leader], [leader] if leader else []]
        errors = []
        for group in groups:
            if group and group[0] is leader and leader.is_running():
                # The leader must notice that its followers are gone, else it still tries to
                # hand over leadership. Best effort: on timeout stop it anyway.
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: leader.active_peers() == 0, 2.0, interval=0.01,
                               message="etcd leader sees no peers", ignore=PROBE_ERRORS)
            for m in group:
                m.send_stop()
            for m in group:
                try:
                    m.finish_stop(deadline)
                except HarnessError as exc:
                    errors.append(str(exc))
        if errors:
            raise HarnessError("; ".join(errors))

    def find_leader(self) -> EtcdServer | None:
        """The running member that says it is the leader, or None. One round of probes.

        A member counts only if its own member_id equals the leader it reports, so followers
        still naming a dead leader are ignored; among several claimants the highest raft term
        wins (a stale leader cut off from the others keeps an older term).
        """
        best: tuple[int, EtcdServer] | None = None
        for m in self.members:
            if not m.is_running():
                continue
            try:
                st = m.status(timeout=0.3)
            except (*PROBE_ERRORS, HarnessError):
                continue
            header = st.get("header", {})
            if header.get("member_id") and header.get("member_id") == st.get("leader"):
                term = int(st.get("raftTerm", header.get("raft_term", 0)))
                if best is None or term > best[0]:
                    best = (term, m)
        return best[1] if best else None

    def leader(self) -> EtcdServer:
        """The current leader; raises :class:`HarnessError` if no member claims leadership."""
        found = self.find_leader()
        if found is None:
            raise HarnessError("etcd cluster: no member reports itself as leader")
        return found

    def wait_for_leader(self, timeout: float = 5.0, exclude: EtcdServer | None = None) -> EtcdServer:
        """Poll until a leader other than ``exclude`` exists; return it. TimeoutError otherwise."""

        def probe() -> EtcdServer | None:
            found = self.find_leader()
            return found if found is not None and found is not exclude else None

        return wait_until(probe, timeout, interval=0.05, message="etcd cluster leader")

    def is_healthy(self) -> bool:
        """True when every member is running and healthy."""
        return all(m.is_healthy() for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"name": "etcd-cluster", "endpoints": self.endpoints,
                "members": [m.to_dict() for m in self.members]}

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
