"""The VDI registry's lock and user rules, over an in-memory etcd and a fake clock: who may
write, who may break a lock, when a holder must stop, and who counts as a user."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sheep.errors import VdiLocked
from sheep.vdi.registry import LOCK_TTL, LockInfo, VdiRegistry

from ..fakes.clock import FakeClock
from ..fakes.kv import FakeKv, fake_etcd

TICK = LOCK_TTL / 3  # a held lease is refreshed this often


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def kv_registry(clock: FakeClock) -> tuple[FakeKv, VdiRegistry]:
    etcd, kv = fake_etcd(clock)
    return kv, VdiRegistry(etcd, clock=clock)


@pytest.fixture
async def registry(kv_registry: tuple[FakeKv, VdiRegistry]) -> AsyncIterator[VdiRegistry]:
    yield kv_registry[1]
    # the keep-alive tasks of whatever the test left held
    for task in asyncio.all_tasks() - {asyncio.current_task()}:
        task.cancel()


@pytest.fixture
def kv(kv_registry: tuple[FakeKv, VdiRegistry]) -> FakeKv:
    return kv_registry[0]


def dead_pid() -> int:
    """A pid no process has: pids stay below pid_max."""
    return int(Path("/proc/sys/kernel/pid_max").read_text())


async def put_lock(kv: FakeKv, registry: VdiRegistry, name: str, holder: str, *, pid: int,
                   host: str | None = None) -> int:
    """A lock as another process would hold it, on a lease of its own; the lease id."""
    lease = await kv.lease(LOCK_TTL)
    info = LockInfo(name, holder, host or socket.gethostname(), pid, time.time())
    await kv.put(registry.lock_key(name), info.dump(), lease=lease)
    return lease.id


# -- taking a lock ---------------------------------------------------------------------


async def test_a_free_vdi_is_locked_for_its_first_writer_on_its_lease(
    registry: VdiRegistry, kv: FakeKv
) -> None:
    await registry.acquire_lock("disk", "writer-a")
    holder = await registry.lock_holder("disk")
    assert holder is not None
    assert (holder.holder, holder.pid, holder.host) == ("writer-a", os.getpid(),
                                                        socket.gethostname())
    stored = await kv.get(registry.lock_key("disk"))
    assert stored is not None and stored.lease in kv.leases


async def test_a_held_lock_refuses_a_second_writer_naming_the_holder(
    registry: VdiRegistry,
) -> None:
    await registry.acquire_lock("disk", "writer-a")
    with pytest.raises(VdiLocked, match=rf"writer-a \(pid {os.getpid()} on "):
        await registry.acquire_lock("disk", "writer-b")
    assert (await registry.lock_holder("disk")).holder == "writer-a"  # type: ignore[union-attr]


async def test_a_refused_writer_leaves_no_lease_behind(registry: VdiRegistry,
                                                       kv: FakeKv) -> None:
    await registry.acquire_lock("disk", "writer-a")
    with pytest.raises(VdiLocked):
        await registry.acquire_lock("disk", "writer-b")
    assert len(kv.leases) == 1


async def test_locks_of_two_vdis_are_independent(registry: VdiRegistry) -> None:
    await registry.acquire_lock("disk", "writer-a")
    await registry.acquire_lock("other", "writer-b")
    assert (await registry.lock_holder("other")).holder == "writer-b"  # type: ignore[union-attr]


async def test_a_released_lock_frees_the_vdi_for_the_next_writer(
    registry: VdiRegistry, kv: FakeKv
) -> None:
    lock = await registry.acquire_lock("disk", "writer-a")
    await lock.release()
    assert await registry.lock_holder("disk") is None and kv.leases == set()
    await registry.acquire_lock("disk", "writer-b")


# -- breaking a lock -------------------------------------------------------------------


async def test_breaking_the_lock_of_an_unlocked_vdi_returns_none(registry: VdiRegistry) -> None:
    assert await registry.break_lock("disk") is None


async def test_break_lock_refuses_a_live_holder_without_force(registry: VdiRegistry) -> None:
    await registry.acquire_lock("disk", "writer-a")  # this process: alive
    with pytest.raises(VdiLocked, match="which is running; --force"):
        await registry.break_lock("disk")
    assert await registry.lock_holder("disk") is not None


async def test_a_holder_on_another_host_counts_as_live(registry: VdiRegistry,
                                                       kv: FakeKv) -> None:
    await put_lock(kv, registry, "disk", "remote", pid=dead_pid(), host="elsewhere.invalid")
    with pytest.raises(VdiLocked):
        await registry.break_lock("disk")


async def test_break_lock_with_force_breaks_a_live_holders_lock(registry: VdiRegistry) -> None:
    await registry.acquire_lock("disk", "writer-a")
    info = await registry.break_lock("disk", force=True)
    assert info is not None and info.holder == "writer-a"
    assert await registry.lock_holder("disk") is None


async def test_break_lock_breaks_a_dead_holders_lock_without_force(
    registry: VdiRegistry, kv: FakeKv
) -> None:
    await put_lock(kv, registry, "disk", "crashed", pid=dead_pid())
    info = await registry.break_lock("disk")
    assert info is not None and info.holder == "crashed"
    assert await registry.lock_holder("disk") is None


async def test_break_lock_never_deletes_a_newer_holders_lock(
    registry: VdiRegistry, kv: FakeKv
) -> None:
    old = await put_lock(kv, registry, "disk", "crashed", pid=dead_pid())

    async def the_lock_changes_hands() -> None:  # between break_lock's read and its write
        kv.end_lease(old)
        await registry.acquire_lock("disk", "writer-b")

    kv.before_next_transaction(the_lock_changes_hands)
    with pytest.raises(VdiLocked, match="changed hands meanwhile"):
        await registry.break_lock("disk")
    assert (await registry.lock_holder("disk")).holder == "writer-b"  # type: ignore[union-attr]


async def test_releasing_a_broken_lock_leaves_the_new_holders_lock(
    registry: VdiRegistry,
) -> None:
    old = await registry.acquire_lock("disk", "writer-a")
    await registry.break_lock("disk", force=True)
    await registry.acquire_lock("disk", "writer-b")
    await old.release()
    assert (await registry.lock_holder("disk")).holder == "writer-b"  # type: ignore[union-attr]


# -- a holder learns it lost its lock ----------------------------------------------------


async def test_a_refreshed_lock_is_held_past_many_ttls(registry: VdiRegistry,
                                                       clock: FakeClock) -> None:
    lock = await registry.acquire_lock("disk", "writer-a")
    await clock.advance(5 * LOCK_TTL)
    assert not lock.lost.is_set()
    assert await registry.lock_holder("disk") is not None


async def test_a_lock_broken_by_force_is_lost_at_its_next_refresh(
    registry: VdiRegistry, clock: FakeClock
) -> None:
    lock = await registry.acquire_lock("disk", "writer-a")
    await registry.break_lock("disk", force=True)
    assert not lock.lost.is_set()
    await clock.advance(TICK)
    assert lock.lost.is_set()


async def test_a_lock_whose_key_another_holder_took_is_lost(
    registry: VdiRegistry, clock: FakeClock
) -> None:
    lock = await registry.acquire_lock("disk", "writer-a")
    await registry.break_lock("disk", force=True)
    await registry.acquire_lock("disk", "writer-b")  # our lease lives; the key is not ours
    await clock.advance(TICK)
    assert lock.lost.is_set()


async def test_a_lock_whose_lease_is_revoked_is_lost(registry: VdiRegistry, kv: FakeKv,
                                                     clock: FakeClock) -> None:
    lock = await registry.acquire_lock("disk", "writer-a")
    kv.end_lease((await kv.get(registry.lock_key("disk"))).lease)  # type: ignore[union-attr]
    await clock.advance(TICK)
    assert lock.lost.is_set()
    assert await registry.lock_holder("disk") is None


async def test_a_lock_whose_lease_ran_out_while_etcd_was_away_is_lost(
    registry: VdiRegistry, kv: FakeKv, clock: FakeClock
) -> None:
    lock = await registry.acquire_lock("disk", "writer-a")
    kv.down = True
    await clock.advance(LOCK_TTL + 1)  # refreshes fail; the lease runs out meanwhile
    assert not lock.lost.is_set()  # nothing known yet: etcd could not be asked
    kv.down = False
    await clock.advance(TICK)
    assert lock.lost.is_set()
    assert await registry.lock_holder("disk") is None


async def test_a_lock_outlives_an_etcd_outage_shorter_than_its_ttl(
    registry: VdiRegistry, kv: FakeKv, clock: FakeClock
) -> None:
    lock = await registry.acquire_lock("disk", "writer-a")
    await clock.advance(TICK + 0.1)  # refreshed once
    kv.down = True
    await clock.advance(LOCK_TTL / 2)
    kv.down = False
    await clock.advance(LOCK_TTL)
    assert not lock.lost.is_set()
    assert await registry.lock_holder("disk") is not None


# -- users beyond a lock ------------------------------------------------------------------


async def test_a_recorded_reader_is_a_user_until_it_releases(registry: VdiRegistry) -> None:
    held = await registry.record_use("disk", "reader-1", "reader one")
    assert await registry.users("disk") == ["reader one"]
    await held.release()
    assert await registry.users("disk") == []


async def test_a_readers_record_vanishes_with_its_lease(registry: VdiRegistry, kv: FakeKv,
                                                        clock: FakeClock) -> None:
    held = await registry.record_use("disk", "reader-1", "reader one")
    kv.down = True  # the reader can refresh nothing: its lease runs out
    await clock.advance(LOCK_TTL + 1)
    kv.down = False
    assert await registry.users("disk") == []
    await clock.advance(TICK)
    assert held.lost.is_set()


async def test_a_user_on_a_lease_nobody_refreshes_is_gone_after_its_ttl(
    registry: VdiRegistry, kv: FakeKv, clock: FakeClock
) -> None:
    lease = await kv.lease(5)
    await registry.add_user("disk", "vm:a", "VM a", lease)
    await clock.advance(4.9)
    assert await registry.users("disk") == ["VM a"]
    await clock.advance(0.2)
    assert await registry.users("disk") == []


async def test_users_of_a_name_and_of_its_snapshots_are_told_apart(
    registry: VdiRegistry,
) -> None:
    await registry.record_use("disk", "r1", "reads the disk")
    await registry.record_use("disk@monday", "r2", "reads monday")
    await registry.record_use("disk2", "r3", "reads another disk")
    assert await registry.users("disk") == ["reads the disk"]
    assert await registry.users("disk@monday") == ["reads monday"]
    assert await registry.users("disk@tuesday") == []


async def test_removing_a_user_leaves_the_others(registry: VdiRegistry, kv: FakeKv) -> None:
    lease = await kv.lease(LOCK_TTL)
    await registry.add_user("disk", "vm:a", "VM a", lease)
    await registry.add_user("disk", "vm:b", "VM b", lease)
    await registry.remove_user("disk", "vm:a")
    assert await registry.users("disk") == ["VM b"]


# -- ids ----------------------------------------------------------------------------------


async def test_allocate_id_hands_out_no_id_twice_when_allocators_race(
    registry: VdiRegistry, kv: FakeKv, clock: FakeClock
) -> None:
    first = await registry.allocate_id()
    raced: list[int] = []

    async def another_allocator() -> None:
        raced.append(await registry.allocate_id())

    kv.before_next_transaction(another_allocator)
    mine = asyncio.ensure_future(registry.allocate_id())
    await clock.advance(0.01)  # the loser waits a moment, then tries again
    assert mine.done()
    assert sorted([first, *raced, mine.result()]) == [first, first + 1, first + 2]
