"""Membership's rules over an in-memory etcd and a fake clock: joining and leaving as epoch
bumps, fencing before the lease can run out, and rejoining after a lease loss."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest

from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.membership import Membership
from sheep.cluster.state import NodeInfo, load_node

from ..fakes.clock import FakeClock
from ..fakes.kv import FakeKv, fake_etcd

TTL = 4
TICK = TTL / 3  # keep_alive refreshes this often
FENCE = TTL * 2 / 3  # unrefreshed this long, a node takes no writes


def node(i: int) -> NodeInfo:
    return NodeInfo(f"node-{i}", "127.0.0.1", 7000 + i, 7100 + i)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def world(clock: FakeClock) -> tuple[EtcdCluster, FakeKv]:
    return fake_etcd(clock)


@pytest.fixture
def etcd(world: tuple[EtcdCluster, FakeKv]) -> EtcdCluster:
    return world[0]


@pytest.fixture
def kv(world: tuple[EtcdCluster, FakeKv]) -> FakeKv:
    return world[1]


@pytest.fixture
def member(etcd: EtcdCluster, clock: FakeClock) -> Callable[[int], Membership]:
    def make(i: int) -> Membership:
        return Membership(etcd, node(i), lease_ttl=TTL, clock=clock)

    return make


@pytest.fixture
async def keep_alive() -> AsyncIterator[Callable[[Membership], None]]:
    """Starts a member's keep_alive loop (stopped after the test)."""
    tasks: list[asyncio.Future[None]] = []
    yield lambda m: tasks.append(asyncio.ensure_future(m.keep_alive()))
    for task in tasks:
        task.cancel()


@pytest.fixture
async def alive(member: Callable[[int], Membership],
                keep_alive: Callable[[Membership], None]) -> Membership:
    """Node 0, joined, its lease kept alive."""
    m = member(0)
    await m.join()
    keep_alive(m)
    return m


async def members(etcd: EtcdCluster) -> tuple[int, list[str]]:
    """The current epoch and its members' ids."""
    record, _ = await etcd.epoch()
    assert record is not None
    return record.epoch, [n.node_id for n in record.nodes]


async def lease_of(etcd: EtcdCluster, kv: FakeKv, i: int) -> int:
    stored = await kv.get(etcd.target.node_key(node(i).node_id))
    assert stored is not None
    return stored.lease


# -- joining and leaving -------------------------------------------------------------------


async def test_a_node_is_fenced_until_it_joins(member: Callable[[int], Membership]) -> None:
    assert member(0).fenced


async def test_joining_puts_the_nodes_key_on_a_lease_and_bumps_the_epoch(
    etcd: EtcdCluster, kv: FakeKv, member: Callable[[int], Membership]
) -> None:
    m = member(0)
    await m.join()
    assert await members(etcd) == (1, ["node-0"])
    assert await lease_of(etcd, kv, 0) in kv.leases
    assert not m.fenced


async def test_each_join_is_a_new_epoch_with_every_live_node(
    etcd: EtcdCluster, member: Callable[[int], Membership]
) -> None:
    await member(0).join()
    await member(1).join()
    assert await members(etcd) == (2, ["node-0", "node-1"])
    assert [r.epoch for r in await etcd.epoch_history()] == [1, 2]


async def test_leaving_drops_the_node_from_the_epoch_and_ends_its_lease(
    etcd: EtcdCluster, kv: FakeKv, member: Callable[[int], Membership]
) -> None:
    a, b = member(0), member(1)
    await a.join()
    await b.join()
    await b.leave()
    assert await members(etcd) == (3, ["node-0"])
    assert await kv.get(etcd.target.node_key("node-1")) is None
    assert kv.leases == {await lease_of(etcd, kv, 0)}


async def test_publish_changes_the_nodes_record_without_an_epoch_bump(
    etcd: EtcdCluster, kv: FakeKv, member: Callable[[int], Membership]
) -> None:
    m = member(0)
    await m.join()
    await m.publish(replace(node(0), nbd_port=10809))
    stored = await kv.get(etcd.target.node_key("node-0"))
    assert stored is not None and load_node(stored.value).nbd_port == 10809
    assert stored.lease in kv.leases
    assert await members(etcd) == (1, ["node-0"])


async def test_reconcile_drops_a_node_whose_lease_ran_out_once(
    etcd: EtcdCluster, clock: FakeClock, member: Callable[[int], Membership],
    keep_alive: Callable[[Membership], None],
) -> None:
    a, b = member(0), member(1)
    await a.join()
    await b.join()
    keep_alive(a)  # b died: nobody refreshes its lease
    await clock.advance(TTL + 0.1)
    await a.reconcile()
    assert await members(etcd) == (3, ["node-0"])
    await a.reconcile()  # nothing left to do
    assert await members(etcd) == (3, ["node-0"])


# -- fencing -------------------------------------------------------------------------------


async def test_a_node_that_stops_refreshing_is_fenced_before_its_lease_runs_out(
    etcd: EtcdCluster, kv: FakeKv, clock: FakeClock, member: Callable[[int], Membership]
) -> None:
    m = member(0)
    await m.join()
    await clock.advance(FENCE - 0.1)
    assert not m.fenced
    await clock.advance(0.2)
    assert m.fenced
    assert await kv.get(etcd.target.node_key("node-0")) is not None  # still in the ring


async def test_keep_alive_keeps_a_node_unfenced_in_its_epoch(
    etcd: EtcdCluster, clock: FakeClock, alive: Membership,
) -> None:
    m = alive
    for _ in range(30):
        await clock.advance(TTL / 4)
        assert not m.fenced
    assert await members(etcd) == (1, ["node-0"])


async def test_a_node_cut_off_from_etcd_fences_itself_while_its_lease_lives(
    etcd: EtcdCluster, kv: FakeKv, clock: FakeClock, alive: Membership,
) -> None:
    m = alive
    await clock.advance(0.1)
    kv.down = True
    await clock.advance(FENCE)
    assert m.fenced
    kv.down = False
    assert await kv.get(etcd.target.node_key("node-0")) is not None


async def test_one_missed_refresh_neither_fences_a_node_nor_changes_its_epoch(
    etcd: EtcdCluster, kv: FakeKv, clock: FakeClock, alive: Membership,
) -> None:
    m = alive
    await clock.advance(TICK + 0.1)  # refreshed once
    kv.down = True
    await clock.advance(TICK)  # the next refresh fails
    kv.down = False
    assert not m.fenced
    await clock.advance(TICK)
    assert not m.fenced
    assert await members(etcd) == (1, ["node-0"])


# -- after a lease loss --------------------------------------------------------------------


async def test_a_lease_lost_during_an_outage_is_rejoined_in_a_new_epoch(
    etcd: EtcdCluster, kv: FakeKv, clock: FakeClock, member: Callable[[int], Membership],
    keep_alive: Callable[[Membership], None],
) -> None:
    m = member(0)
    await m.join()
    lost = await lease_of(etcd, kv, 0)
    keep_alive(m)
    kv.down = True
    await clock.advance(TTL + 1)
    kv.down = False
    assert m.fenced
    await clock.advance(TICK)
    assert not m.fenced
    assert await members(etcd) == (2, ["node-0"])
    assert await lease_of(etcd, kv, 0) not in (lost, 0)


async def test_a_revoked_lease_makes_the_node_rejoin_at_its_next_refresh(
    etcd: EtcdCluster, kv: FakeKv, clock: FakeClock, member: Callable[[int], Membership],
    keep_alive: Callable[[Membership], None],
) -> None:
    a, b = member(0), member(1)
    await a.join()
    await b.join()
    keep_alive(a)
    kv.end_lease(await lease_of(etcd, kv, 0))
    await b.reconcile()
    assert await members(etcd) == (3, ["node-1"])
    await clock.advance(TICK)
    assert await members(etcd) == (4, ["node-0", "node-1"])
    assert not a.fenced


async def test_a_paused_node_is_fenced_dropped_and_rejoins_when_it_resumes(
    etcd: EtcdCluster, kv: FakeKv, clock: FakeClock, member: Callable[[int], Membership],
    keep_alive: Callable[[Membership], None],
) -> None:
    a, b = member(0), member(1)
    await a.join()
    await b.join()
    keep_alive(b)
    await clock.advance(TTL + 0.1)  # a refreshes nothing: paused
    assert a.fenced
    await b.reconcile()
    assert await members(etcd) == (3, ["node-1"])
    keep_alive(a)  # a resumes
    await clock.advance(TICK)
    assert not a.fenced
    assert await members(etcd) == (4, ["node-0", "node-1"])
