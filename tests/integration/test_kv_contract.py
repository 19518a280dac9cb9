"""The Kv contract (sheep/cluster/kv.py), checked against a real etcd through AetcdKv and
against the in-memory FakeKv the unit tests use, so the fake cannot drift from etcd."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from sheep.cluster import kv as tx
from sheep.cluster.etcd import AetcdKv
from sheep.cluster.kv import Kv, LeaseGone
from sheep.cluster.state import EtcdTarget
from sheep.etcd_server import EtcdServer

from ..fakes.clock import FakeClock
from ..fakes.kv import FakeKv


@dataclass
class Store:
    kv: Kv
    root: bytes  # every key of one test lives under it
    advance: Callable[[float], Awaitable[None]]  # let this much time pass

    def key(self, name: str) -> bytes:
        return self.root + name.encode()


@pytest.fixture(params=["fake", "etcd"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    root = f"/kv-contract/{uuid.uuid4().hex}/".encode()
    if request.param == "fake":
        clock = FakeClock()
        yield Store(FakeKv(clock), root, clock.advance)
        return
    etcd: EtcdServer = request.getfixturevalue("etcd")
    target = EtcdTarget.parse(etcd.url)
    kv = AetcdKv(target.host, target.port)
    await kv.connect()
    try:
        yield Store(kv, root, asyncio.sleep)
    finally:
        await kv.close()


# -- keys, versions, revisions --------------------------------------------------------------


async def test_a_missing_key_reads_as_none(store: Store) -> None:
    assert await store.kv.get(store.key("nothing")) is None


async def test_a_new_key_has_version_one_and_was_created_by_its_put(store: Store) -> None:
    await store.kv.put(store.key("a"), b"1")
    kv = await store.kv.get(store.key("a"))
    assert kv is not None
    assert (kv.key, kv.value, kv.version, kv.lease) == (store.key("a"), b"1", 1, 0)
    assert kv.create_revision == kv.mod_revision > 0


async def test_each_put_counts_a_version_and_moves_the_mod_revision(store: Store) -> None:
    await store.kv.put(store.key("a"), b"1")
    first = await store.kv.get(store.key("a"))
    await store.kv.put(store.key("a"), b"2")
    second = await store.kv.get(store.key("a"))
    assert first is not None and second is not None
    assert second.version == 2 and second.value == b"2"
    assert second.create_revision == first.create_revision
    assert second.mod_revision > first.mod_revision


async def test_delete_says_whether_the_key_was_there(store: Store) -> None:
    await store.kv.put(store.key("a"), b"1")
    assert await store.kv.delete(store.key("a")) is True
    assert await store.kv.delete(store.key("a")) is False
    assert await store.kv.get(store.key("a")) is None


async def test_a_key_created_again_starts_over_at_version_one(store: Store) -> None:
    await store.kv.put(store.key("a"), b"1")
    await store.kv.put(store.key("a"), b"2")
    old = await store.kv.get(store.key("a"))
    await store.kv.delete(store.key("a"))
    await store.kv.put(store.key("a"), b"3")
    new = await store.kv.get(store.key("a"))
    assert old is not None and new is not None
    assert new.version == 1 and new.create_revision > old.mod_revision


async def test_get_prefix_returns_only_keys_under_it_in_key_order(store: Store) -> None:
    for name in ("d/2", "d/1", "d/10", "d0", "e/1"):
        await store.kv.put(store.key(name), name.encode())
    kvs = await store.kv.get_prefix(store.key("d/"))
    assert [kv.value for kv in kvs] == [b"d/1", b"d/10", b"d/2"]
    assert await store.kv.get_prefix(store.key("none/")) == []


# -- transactions --------------------------------------------------------------------------


async def test_a_missing_key_compares_as_version_mod_and_create_zero(store: Store) -> None:
    k = store.key("absent")
    assert await store.kv.transaction(
        [tx.version(k) == 0, tx.mod(k) == 0, tx.create(k) == 0], [tx.put(k, b"x")])
    assert (await store.kv.get(k)) is not None


async def test_no_comparison_of_a_missing_keys_value_holds(store: Store) -> None:
    k = store.key("absent")
    assert not await store.kv.transaction([tx.value(k) == b""], [tx.put(k, b"x")])
    assert not await store.kv.transaction([tx.value(k) != b"y"], [tx.put(k, b"x")])
    assert await store.kv.get(k) is None


async def test_a_transaction_runs_success_when_every_comparison_holds(store: Store) -> None:
    a, b = store.key("a"), store.key("b")
    await store.kv.put(a, b"1")
    ok = await store.kv.transaction([tx.value(a) == b"1", tx.version(a) > 0, tx.version(b) == 0],
                                    [tx.put(b, b"yes")], [tx.put(b, b"no")])
    assert ok is True
    assert (await store.kv.get(b)).value == b"yes"  # type: ignore[union-attr]


async def test_a_transaction_runs_failure_when_one_comparison_fails(store: Store) -> None:
    a, b = store.key("a"), store.key("b")
    await store.kv.put(a, b"1")
    ok = await store.kv.transaction([tx.version(a) > 0, tx.value(a) == b"2"],
                                    [tx.put(b, b"yes")], [tx.put(b, b"no")])
    assert ok is False
    assert (await store.kv.get(b)).value == b"no"  # type: ignore[union-attr]


async def test_a_stale_mod_revision_guard_fails_and_changes_nothing(store: Store) -> None:
    a = store.key("a")
    await store.kv.put(a, b"1")
    seen = await store.kv.get(a)
    await store.kv.put(a, b"2")
    assert seen is not None
    assert not await store.kv.transaction([tx.mod(a) == seen.mod_revision],
                                          [tx.delete(a)])
    assert (await store.kv.get(a)).value == b"2"  # type: ignore[union-attr]


async def test_one_transaction_writes_every_key_in_one_revision(store: Store) -> None:
    a, b, c = store.key("a"), store.key("b"), store.key("c")
    await store.kv.put(c, b"old")
    assert await store.kv.transaction([], [tx.put(a, b"1"), tx.put(b, b"2"), tx.delete(c)])
    ka, kb = await store.kv.get(a), await store.kv.get(b)
    assert ka is not None and kb is not None and ka.mod_revision == kb.mod_revision
    assert await store.kv.get(c) is None


async def test_comparisons_order_revisions_with_less_and_greater(store: Store) -> None:
    a = store.key("a")
    await store.kv.put(a, b"1")
    kv = await store.kv.get(a)
    assert kv is not None
    assert await store.kv.transaction([tx.mod(a) < kv.mod_revision + 1,
                                       tx.create(a) > kv.create_revision - 1], [])
    assert not await store.kv.transaction([tx.mod(a) > kv.mod_revision], [])


# -- leases --------------------------------------------------------------------------------


async def test_a_key_put_on_a_lease_carries_its_id(store: Store) -> None:
    lease = await store.kv.lease(10)
    await store.kv.put(store.key("a"), b"1", lease=lease)
    assert (await store.kv.get(store.key("a"))).lease == lease.id  # type: ignore[union-attr]
    await lease.revoke()


async def test_revoking_a_lease_deletes_its_keys_and_no_others(store: Store) -> None:
    lease = await store.kv.lease(10)
    await store.kv.put(store.key("on"), b"1", lease=lease)
    assert await store.kv.transaction([], [tx.put(store.key("also"), b"2", lease=lease)])
    await store.kv.put(store.key("off"), b"3")
    await lease.revoke()
    assert await store.kv.get(store.key("on")) is None
    assert await store.kv.get(store.key("also")) is None
    assert await store.kv.get(store.key("off")) is not None


async def test_a_key_put_again_without_the_lease_outlives_it(store: Store) -> None:
    lease = await store.kv.lease(10)
    await store.kv.put(store.key("a"), b"1", lease=lease)
    await store.kv.put(store.key("a"), b"2")
    await lease.revoke()
    assert (await store.kv.get(store.key("a"))).lease == 0  # type: ignore[union-attr]


async def test_a_revoked_lease_refreshes_to_no_ttl_and_takes_no_keys(store: Store) -> None:
    lease = await store.kv.lease(10)
    assert await lease.refresh() > 0
    await lease.revoke()
    assert await lease.refresh() <= 0
    with pytest.raises(LeaseGone):
        await lease.revoke()
    with pytest.raises(LeaseGone):
        await store.kv.put(store.key("a"), b"1", lease=lease)
    with pytest.raises(LeaseGone):
        await store.kv.transaction([], [tx.put(store.key("a"), b"1", lease=lease)])
    assert await store.kv.get(store.key("a")) is None


async def test_a_lease_nobody_refreshes_runs_out_with_its_keys(store: Store) -> None:
    lease = await store.kv.lease(2)
    granted = await lease.refresh()  # etcd may grant more than asked (its minimum TTL)
    await store.kv.put(store.key("a"), b"1", lease=lease)
    await store.advance(granted + 1.5)  # etcd notices an expiry within ~0.5 s
    assert await store.kv.get(store.key("a")) is None
    assert await lease.refresh() <= 0


async def test_a_refreshed_lease_outlives_its_first_ttl(store: Store) -> None:
    lease = await store.kv.lease(2)
    granted = await lease.refresh()
    await store.kv.put(store.key("a"), b"1", lease=lease)
    for _ in range(3):
        await store.advance(granted / 2)
        assert await lease.refresh() > 0
    assert await store.kv.get(store.key("a")) is not None
    await lease.revoke()


# -- watches -------------------------------------------------------------------------------


async def test_a_watch_sees_changes_under_its_prefix_only(store: Store) -> None:
    watch = await store.kv.watch_prefix(store.key("w/"))
    seen: list[bytes] = []

    async def collect() -> None:
        async for key in watch:
            seen.append(key)
            if len(seen) == 2:
                return

    collector = asyncio.ensure_future(collect())
    await asyncio.sleep(0)
    await store.kv.put(store.key("x"), b"outside")
    await store.kv.put(store.key("w/1"), b"1")
    await store.kv.delete(store.key("w/1"))
    try:
        async with asyncio.timeout(5):
            await collector
    finally:
        collector.cancel()
        await watch.cancel()
    assert seen == [store.key("w/1"), store.key("w/1")]
