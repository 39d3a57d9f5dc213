"""The Coordinator contract (cbctl/core/backends/coord/base.py), run against every backend.

``backend`` is ``etcd`` (always: a real etcd from ``cbctl.sandbox``) and ``consul`` (only when
``CBCTL_TEST_CONSUL_URL`` names a Consul agent — none exists on the development machines;
``CBCTL_TEST_CONSUL_TOKEN`` optionally names an ACL token).  Tests that inject faults into the
store (kill, stop, SIGSTOP a member) are etcd-only: we cannot do that to a Consul agent we did
not start.  No mock stands in for a backend; every wait is a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from cbctl.core.model.config import Secret
from cbctl.core.backends.coord.base import Coordinator, LeaseKeeper, WatchEvent
from cbctl.core.backends.coord.etcd import EtcdCoordinator
from cbctl.core.model.errors import AuthFailed, BackendUnavailable, CbctlError, Conflict, LeaseLost
from cbctl.sandbox import EtcdCluster, EtcdServer, async_wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

CONSUL_URL = os.environ.get("CBCTL_TEST_CONSUL_URL")
NO_CONSUL = "no Consul server on this machine (set CBCTL_TEST_CONSUL_URL to run the Consul contract tests)"


@dataclass
class Store:
    """A connected coordinator plus what the tests need to know about its backend."""

    coord: Coordinator
    prefix: str  # unique per test: /cbctl/<unique>/
    ttl: float  # lease TTL the tests ask for
    expiry_slack: float  # how long after the TTL the store may take to drop an expired lease

    def key(self, name: str) -> str:
        return self.prefix + name


@pytest.fixture(params=["etcd", pytest.param("consul", marks=pytest.mark.skipif(not CONSUL_URL, reason=NO_CONSUL))])
async def store(request: pytest.FixtureRequest, unique_cluster: str) -> AsyncIterator[Store]:
    prefix = f"/cbctl/{unique_cluster}/"
    if request.param == "etcd":
        server: EtcdServer = request.getfixturevalue("shared_etcd")
        coord: Coordinator = EtcdCoordinator([server.client_url], timeout=3.0)
        # etcd may grant more than asked (its minimum TTL); the grant reports it.
        s = Store(coord, prefix, ttl=1.0, expiry_slack=3.0)
    else:
        from cbctl.core.backends.coord.consul import ConsulCoordinator

        token = os.environ.get("CBCTL_TEST_CONSUL_TOKEN")
        coord = ConsulCoordinator([CONSUL_URL or ""], timeout=3.0,
                                  token=Secret(token, "env:CBCTL_TEST_CONSUL_TOKEN") if token else None)
        # Consul's minimum session TTL is 10 s and it may wait up to 2 x TTL to invalidate.
        s = Store(coord, prefix, ttl=10.0, expiry_slack=15.0)
    await coord.connect()
    try:
        yield s
    finally:
        await coord.close()


async def next_event(events: asyncio.Queue[WatchEvent | BaseException], timeout: float = 5.0) -> WatchEvent:
    item = await asyncio.wait_for(events.get(), timeout)
    if isinstance(item, BaseException):
        raise item
    return item


def start_watch(coord: Coordinator, key: str, *, prefix: bool, start_revision: int | None
                ) -> tuple[asyncio.Task[None], asyncio.Queue[WatchEvent | BaseException]]:
    """Consume ``coord.watch`` in a task, into a queue (an error ends the queue)."""
    events: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue()

    async def run() -> None:
        try:
            async for ev in coord.watch(key, prefix=prefix, start_revision=start_revision):
                events.put_nowait(ev)
        except CbctlError as exc:
            events.put_nowait(exc)

    return asyncio.get_running_loop().create_task(run()), events


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


# -- key/value ------------------------------------------------------------------------------


async def test_get_put_list_delete(store: Store) -> None:
    c = store.coord
    assert await c.get(store.key("a")) is None
    r1 = await c.put(store.key("b"), b"2")
    r2 = await c.put(store.key("a"), b"1")
    assert r2 > r1
    kv = await c.get(store.key("a"))
    assert kv is not None and kv.value == b"1" and kv.mod_revision == r2 and kv.create_revision == r2
    r3 = await c.put(store.key("a"), b"1b")
    kv = await c.get(store.key("a"))
    assert kv is not None and kv.mod_revision == r3 > r2 and kv.create_revision == r2
    await c.put(store.key("sub/c"), b"")
    listed = await c.list(store.prefix)
    assert [k.key for k in listed] == [store.key("a"), store.key("b"), store.key("sub/c")]
    assert listed[2].value == b""
    assert await c.current_revision() >= r3
    assert await c.delete(store.key("b")) is True
    assert await c.delete(store.key("b")) is False
    assert await c.get(store.key("b")) is None


async def test_commit_success_and_conflict_writes_nothing(store: Store) -> None:
    c = store.coord
    doc = store.key("rollout")
    r1 = await c.create(doc, b"v1")
    r2 = await c.commit(doc, b"v2", expected_revision=r1, also_put={store.key("audit/1"): b"a1"})
    assert r2 > r1
    assert (await c.get(doc)).value == b"v2"  # type: ignore[union-attr]
    audit = await c.get(store.key("audit/1"))
    assert audit is not None and audit.value == b"a1" and audit.mod_revision == r2  # same transaction

    with pytest.raises(Conflict) as info:
        await c.commit(doc, b"v3", expected_revision=r1, also_put={store.key("audit/2"): b"a2"})
    assert info.value.current_revision == r2
    assert info.value.key == doc
    kv = await c.get(doc)
    assert kv is not None and kv.value == b"v2" and kv.mod_revision == r2
    assert await c.get(store.key("audit/2")) is None  # nothing written on conflict


async def test_create_if_absent_conflicts_when_present(store: Store) -> None:
    c = store.coord
    r = await c.create(store.key("owner"), b"node-a")
    with pytest.raises(Conflict) as info:
        await c.create(store.key("owner"), b"node-b")
    assert info.value.current_revision == r
    assert (await c.get(store.key("owner"))).value == b"node-a"  # type: ignore[union-attr]
    # Conflict on a missing key reports revision 0.
    with pytest.raises(Conflict) as info:
        await c.commit(store.key("missing"), b"x", expected_revision=r)
    assert info.value.current_revision == 0
    assert await c.get(store.key("missing")) is None


async def test_create_revision_is_a_fencing_token(store: Store) -> None:
    """Re-creating a key gives a strictly higher create_revision (never reused)."""
    c = store.coord
    await c.create(store.key("lane"), b"a")
    first = await c.get(store.key("lane"))
    assert first is not None
    assert await c.delete(store.key("lane"), expected_revision=first.mod_revision)
    await c.create(store.key("lane"), b"b")
    second = await c.get(store.key("lane"))
    assert second is not None and second.create_revision > first.create_revision


async def test_delete_with_expected_revision(store: Store) -> None:
    c = store.coord
    r = await c.put(store.key("k"), b"v")
    assert await c.delete(store.key("k"), expected_revision=r + 1000) is False
    assert await c.get(store.key("k")) is not None
    assert await c.delete(store.key("k"), expected_revision=r) is True
    assert await c.get(store.key("k")) is None
    assert await c.delete(store.key("k"), expected_revision=r) is False


# -- leases ---------------------------------------------------------------------------------


async def test_lease_keys_vanish_after_expiry_and_refresh_raises(store: Store) -> None:
    c = store.coord
    lease = await c.grant_lease(store.ttl)
    assert lease.ttl >= store.ttl
    await c.put(store.key("eph"), b"x", lease=lease)
    kv = await c.get(store.key("eph"))
    assert kv is not None and kv.lease == lease.id
    await c.create(store.key("eph2"), b"y", lease=lease)

    async def gone() -> bool:
        return await c.get(store.key("eph")) is None and await c.get(store.key("eph2")) is None

    await async_wait_until(gone, lease.ttl + store.expiry_slack, interval=0.1, message="leased keys deleted")
    # etcd answers a keep-alive of an expired lease with TTL 0 and no error: must be LeaseLost.
    with pytest.raises(LeaseLost):
        await c.refresh_lease(lease)
    with pytest.raises(LeaseLost):
        await c.put(store.key("eph3"), b"z", lease=lease)
    assert await c.get(store.key("eph3")) is None


async def test_revoke_deletes_keys_and_is_idempotent(store: Store) -> None:
    c = store.coord
    lease = await c.grant_lease(30)
    await c.put(store.key("eph"), b"x", lease=lease)
    assert await c.refresh_lease(lease) > 0
    await c.revoke_lease(lease)
    await async_wait_until(lambda: _absent(c, store.key("eph")), 3.0, message="revoked lease's key deleted")
    await c.revoke_lease(lease)  # absent lease: not an error
    with pytest.raises(LeaseLost):
        await c.refresh_lease(lease)


async def _absent(c: Coordinator, key: str) -> bool:
    return await c.get(key) is None


async def test_lease_keeper_keeps_lease_alive_past_ttl(store: Store) -> None:
    c = store.coord
    lease = await c.grant_lease(max(store.ttl, 2.0))
    await c.put(store.key("alive"), b"x", lease=lease)
    keeper = c.keep_alive(lease, interval=lease.ttl / 4)
    try:
        # Observing for 2.5 TTLs is the point of the test (not a synchronisation sleep).
        await asyncio.sleep(lease.ttl * 2.5)
        assert not keeper.lost.is_set(), keeper.reason
        assert await c.get(store.key("alive")) is not None
    finally:
        await keeper.stop()
    await c.revoke_lease(lease)


# -- watch ----------------------------------------------------------------------------------


async def test_watch_delivers_puts_and_deletes_in_order(store: Store) -> None:
    """Lock-step writes (each awaited on the watch): valid for level-triggered Consul too."""
    c = store.coord
    start = await c.current_revision() + 1
    task, events = start_watch(c, store.prefix, prefix=True, start_revision=start)
    try:
        r1 = await c.put(store.key("x"), b"1")
        assert await next_event(events) == WatchEvent("put", store.key("x"), b"1", r1)
        r2 = await c.commit(store.key("x"), b"2", expected_revision=r1)
        assert await next_event(events) == WatchEvent("put", store.key("x"), b"2", r2)
        await c.put(store.prefix[:-1] + "-other/x", b"not under the prefix")
        r3 = await c.put(store.key("y"), b"3")
        assert await next_event(events) == WatchEvent("put", store.key("y"), b"3", r3)
        assert await c.delete(store.key("x"))
        ev = await next_event(events)
        assert (ev.kind, ev.key, ev.value) == ("delete", store.key("x"), b"") and ev.revision > r3
    finally:
        await stop_task(task)


async def test_etcd_watch_replays_history_from_start_revision(shared_etcd: EtcdServer, unique_cluster: str) -> None:
    """etcd keeps history: a watch from a past revision sees every event, transactions included."""
    p = f"/cbctl/{unique_cluster}/"
    async with EtcdCoordinator([shared_etcd.client_url], timeout=3.0) as c:
        start = await c.current_revision() + 1
        r1 = await c.put(p + "a", b"1")
        r2 = await c.commit(p + "a", b"2", expected_revision=r1, also_put={p + "b": b"3", p + "c": b"4"})
        assert await c.delete(p + "b")
        r4 = await c.current_revision()
        got: list[WatchEvent] = []
        async with asyncio.timeout(5):
            async for ev in c.watch(p, prefix=True, start_revision=start):
                got.append(ev)
                if len(got) == 5:
                    break
        assert got == [
            WatchEvent("put", p + "a", b"1", r1),
            WatchEvent("put", p + "a", b"2", r2),
            WatchEvent("put", p + "b", b"3", r2),
            WatchEvent("put", p + "c", b"4", r2),
            WatchEvent("delete", p + "b", b"", r4),
        ]
        # A single-key watch sees only that key.
        async with asyncio.timeout(5):
            async for ev in c.watch(p + "a", start_revision=start):
                assert ev == WatchEvent("put", p + "a", b"1", r1)
                break


# -- etcd faults ----------------------------------------------------------------------------


def _ordered_endpoints(cluster: EtcdCluster, first: EtcdServer) -> list[str]:
    return [first.client_url] + [m.client_url for m in cluster.members if m is not first]


async def _create_retrying(c: EtcdCoordinator, key: str, deadline: float) -> int:
    """Create ``key``, retrying through a failover; the revision it was created at, exactly once.

    A create whose answer was lost may have been applied: the retry then conflicts and the
    key's own create_revision is the truth.
    """
    while True:
        try:
            return await c.create(key, b"v")
        except Conflict:
            kv = await c.get(key)
            assert kv is not None
            return kv.create_revision
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("victim", ["connected-follower", "connected-leader"])
async def test_etcd_watch_resumes_after_member_sigkill(etcd_cluster: EtcdCluster, victim: str) -> None:
    leader = etcd_cluster.leader()
    target = leader if victim == "connected-leader" else next(m for m in etcd_cluster.members if m is not leader)
    n, kill_at = 60, 20
    async with EtcdCoordinator(_ordered_endpoints(etcd_cluster, target), timeout=2.0) as c:
        assert c.current_endpoint == target.client_url
        start = await c.current_revision() + 1
        task, events = start_watch(c, "/w/", prefix=True, start_revision=start)
        try:
            written: list[int] = []
            deadline = time.monotonic() + 15
            for i in range(n):
                if i == kill_at:
                    target.kill()  # SIGKILL the member both the writer and the watch talk to
                written.append(await _create_retrying(c, f"/w/{i:03d}", deadline))
            seen: list[int] = []
            while len(seen) < n:
                ev = await next_event(events, timeout=10)
                seen.append(ev.revision)
            assert seen == written  # every event once, in order, none skipped
            assert events.empty()
            assert c.current_endpoint != target.client_url
        finally:
            await stop_task(task)


async def test_etcd_failover_and_member_status(etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.leader()
    follower = next(m for m in etcd_cluster.members if m is not leader)
    async with EtcdCoordinator(_ordered_endpoints(etcd_cluster, follower), timeout=2.0) as c:
        rows = await c.member_status()
        assert [r["endpoint"] for r in rows] == c.endpoints
        assert all(r["reachable"] and r["error"] is None and r["version"] for r in rows)
        assert [r["is_leader"] for r in rows].count(True) == 1
        assert {r["leader_id"] for r in rows} == {next(r["member_id"] for r in rows if r["is_leader"])}
        assert all(r["db_size"] > 0 and r["raft_index"] > 0 for r in rows)

        r1 = await c.put("/f/a", b"1")
        follower.kill()
        await async_wait_until(lambda: not follower.is_running(), 5.0, message="killed member gone")
        # No retry loop here: the coordinator itself fails over within one call.  (A write
        # already in flight when the member dies is not repeated — its outcome is unknown —
        # and raises BackendUnavailable: that case is covered by the watch test's writer.)
        assert (await c.get("/f/a")).value == b"1"  # type: ignore[union-attr]
        assert c.current_endpoint != follower.client_url
        r2 = await c.put("/f/b", b"2")
        assert r2 > r1
        rows = await c.member_status()
        dead = rows[0]
        assert dead["endpoint"] == follower.client_url and not dead["reachable"] and dead["error"]
        assert all(r["reachable"] for r in rows[1:])


async def test_etcd_unavailable_when_only_member_stopped(etcd: EtcdServer) -> None:
    c = EtcdCoordinator([etcd.client_url], timeout=1.0, reconnect_deadline=1.0)
    await c.connect()
    try:
        rev = await c.put("/u/a", b"1")
        task, events = start_watch(c, "/u/", prefix=True, start_revision=rev + 1)
        etcd.stop()
        for call in (lambda: c.get("/u/a"), lambda: c.put("/u/a", b"2"), lambda: c.list("/u/"),
                     lambda: c.commit("/u/a", b"3", expected_revision=rev), lambda: c.grant_lease(5)):
            with pytest.raises(BackendUnavailable) as info:
                await call()
            assert type(info.value) is BackendUnavailable and info.value.backend == "etcd"
        with pytest.raises(BackendUnavailable):
            await next_event(events, timeout=10)  # the watch gives up after reconnect_deadline
        await stop_task(task)
    finally:
        await c.close()
    with pytest.raises(BackendUnavailable):
        await EtcdCoordinator([etcd.client_url], timeout=1.0).connect()


async def test_etcd_lease_keeper_declares_loss_when_store_paused(etcd: EtcdServer) -> None:
    async with EtcdCoordinator([etcd.client_url], timeout=1.0) as c:
        lease = await c.grant_lease(2)
        lost: list[BaseException] = []
        keeper: LeaseKeeper = c.keep_alive(lease, interval=0.4, on_lost=lost.append)
        try:
            await asyncio.sleep(0.5)  # a few successful refreshes first
            assert not keeper.lost.is_set()
            etcd.pause()
            paused_at = time.monotonic()
            try:
                await asyncio.wait_for(keeper.lost.wait(), timeout=lease.ttl + 1)
                declared_after = time.monotonic() - paused_at
            finally:
                etcd.resume()
            # Declared before the store itself could expire the lease.
            assert declared_after < lease.ttl, declared_after
            assert len(lost) == 1 and isinstance(lost[0], LeaseLost)
            assert keeper.reason is lost[0]
        finally:
            await keeper.stop()


def _etcdctl(server: EtcdServer, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    subprocess.run(["etcdctl", "--endpoints", server.client_url, "--command-timeout=5s", *args],
                   check=True, capture_output=True, timeout=10, env={**env, "ETCDCTL_API": "3"})


@pytest.mark.skipif(shutil.which("etcdctl") is None, reason="etcdctl is not installed")
async def test_etcd_auth(etcd: EtcdServer) -> None:
    """Wrong credentials and denied keys are AuthFailed, distinct from 'unreachable'."""
    _etcdctl(etcd, "user", "add", "root:rootpw")
    _etcdctl(etcd, "user", "add", "agent:agentpw")
    _etcdctl(etcd, "role", "add", "cbctl")
    _etcdctl(etcd, "role", "grant-permission", "cbctl", "--prefix=true", "readwrite", "/cbctl/")
    _etcdctl(etcd, "user", "grant-role", "agent", "cbctl")
    _etcdctl(etcd, "auth", "enable")

    def make(password: str | None, user: str | None = "agent") -> EtcdCoordinator:
        secret = Secret(password, "test") if password is not None else None
        return EtcdCoordinator([etcd.client_url], timeout=2.0, username=user if secret else None, password=secret)

    for bad in (make("wrong"), make(None)):
        with pytest.raises(AuthFailed):
            await bad.connect()
        await bad.close()
    async with make("agentpw") as c:
        assert await c.put("/cbctl/x", b"1") > 0
        with pytest.raises(AuthFailed):
            await c.put("/elsewhere", b"1")
        with pytest.raises(AuthFailed):
            async with asyncio.timeout(5):
                async for _ in c.watch("/elsewhere"):
                    pass
