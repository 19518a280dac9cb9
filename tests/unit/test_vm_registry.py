"""The VM registry's rules over an in-memory etcd and a fake clock: definitions, the one
runtime claim per VM, runtime records that live on their supervisor's lease, exits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from qemu_driver.errors import NoVm, VmError, VmExists, VmRunning
from qemu_driver.registry import VmRegistry
from qemu_driver.spec import Gateway, VmExit, VmRuntime, VmSpec
from sheep.cluster.kv import Lease
from sheep.vdi.registry import VdiRegistry

from ..fakes.clock import FakeClock
from ..fakes.kv import FakeKv, fake_etcd

TTL = 6


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def world(clock: FakeClock) -> tuple[VmRegistry, VdiRegistry, FakeKv]:
    etcd, kv = fake_etcd(clock)
    return VmRegistry(etcd), VdiRegistry(etcd, clock=clock), kv


@pytest.fixture
def vms(world: tuple[VmRegistry, VdiRegistry, FakeKv]) -> VmRegistry:
    return world[0]


@pytest.fixture
def vdis(world: tuple[VmRegistry, VdiRegistry, FakeKv]) -> VdiRegistry:
    return world[1]


@pytest.fixture
def kv(world: tuple[VmRegistry, VdiRegistry, FakeKv]) -> FakeKv:
    return world[2]


def spec(name: str = "vm1", disks: tuple[str, ...] = ("disk",), memory: int = 256) -> VmSpec:
    return VmSpec(name=name, disks=disks, memory=memory)


def runtime(name: str = "vm1", disks: tuple[str, ...] = ("disk",), lease: int = 0) -> VmRuntime:
    return VmRuntime(name=name, host="host-a", pid=0, supervisor=4242, run_dir=f"/run/{name}",
                     qmp="qmp.sock", console="console.sock", console_log="console.log",
                     agent="agent.sock", accel="tcg", gateway=Gateway("nbd", "127.0.0.1", 10809),
                     disks=disks, lease=lease)


def ended(state: str = "crashed") -> VmExit:
    return VmExit(state, "guest panicked", None, 1.0, "host-a")


@pytest.fixture
def start(vms: VmRegistry, vdis: VdiRegistry, kv: FakeKv
          ) -> Callable[..., Awaitable[Lease]]:
    """Claims a VM as its supervisor does: the runtime and its disks' user keys, on a new
    lease, in one transaction. Returns the lease."""

    async def claim(name: str = "vm1", disks: tuple[str, ...] = ("disk",)) -> Lease:
        lease = await kv.lease(TTL)
        await vms.claim(runtime(name, disks, lease.id), lease,
                        [vdis.add_user_op(d, f"vm:{name}", f"VM {name}", lease) for d in disks])
        return lease

    return claim


# -- definitions ----------------------------------------------------------------------------


async def test_a_created_vm_is_listed_and_read_back(vms: VmRegistry) -> None:
    await vms.create(spec("b"))
    await vms.create(spec("a"))
    assert [s.name for s in await vms.list()] == ["a", "b"]
    got, rev = await vms.get("a")
    assert got == spec("a") and rev > 0


async def test_a_second_vm_of_one_name_is_refused(vms: VmRegistry) -> None:
    await vms.create(spec())
    with pytest.raises(VmExists):
        await vms.create(spec(memory=512))
    assert (await vms.get("vm1"))[0].memory == 256


async def test_reading_an_undefined_vm_says_there_is_none(vms: VmRegistry) -> None:
    with pytest.raises(NoVm):
        await vms.get("ghost")


async def test_an_update_guarded_by_the_current_revision_applies(vms: VmRegistry) -> None:
    await vms.create(spec())
    _, rev = await vms.get("vm1")
    await vms.update(spec(memory=512), rev)
    assert (await vms.get("vm1"))[0].memory == 512


async def test_an_update_from_a_stale_read_is_refused(vms: VmRegistry) -> None:
    await vms.create(spec())
    _, rev = await vms.get("vm1")
    await vms.update(spec(memory=512), rev)
    with pytest.raises(VmError, match="changed or went away"):
        await vms.update(spec(memory=1024), rev)
    assert (await vms.get("vm1"))[0].memory == 512


async def test_an_update_racing_a_delete_does_not_resurrect_the_vm(vms: VmRegistry) -> None:
    await vms.create(spec())
    _, rev = await vms.get("vm1")
    await vms.delete("vm1")
    with pytest.raises(VmError):
        await vms.update(spec(memory=512), rev)
    assert await vms.list() == []


async def test_deleting_an_undefined_vm_says_there_is_none(vms: VmRegistry) -> None:
    with pytest.raises(NoVm):
        await vms.delete("ghost")


async def test_a_running_vm_cannot_be_deleted(vms: VmRegistry,
                                             start: Callable[..., Awaitable[Lease]]) -> None:
    await vms.create(spec())
    await start()
    with pytest.raises(VmRunning, match="stop it first"):
        await vms.delete("vm1")
    assert await vms.list() == [spec()]


async def test_deleting_a_vm_forgets_how_its_last_run_ended(vms: VmRegistry) -> None:
    await vms.create(spec())
    await vms.record_exit("vm1", ended())
    await vms.delete("vm1")
    assert await vms.last_exit("vm1") is None


# -- claims and runtime records --------------------------------------------------------------


async def test_a_claim_publishes_the_runtime_on_the_supervisors_lease(
    vms: VmRegistry, kv: FakeKv, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    lease = await start()
    rt = await vms.runtime("vm1")
    assert rt is not None and rt.lease == lease.id and rt.supervisor == 4242
    stored = await kv.get(vms.run_key("vm1"))
    assert stored is not None and stored.lease == lease.id
    assert set(await vms.runtimes()) == {"vm1"}


async def test_an_undefined_vm_cannot_be_claimed(vms: VmRegistry, vdis: VdiRegistry,
                                                 start: Callable[..., Awaitable[Lease]]) -> None:
    with pytest.raises(NoVm):
        await start()
    assert await vms.runtime("vm1") is None and await vdis.users("disk") == []


async def test_a_vm_cannot_be_claimed_twice(vms: VmRegistry, vdis: VdiRegistry,
                                            start: Callable[..., Awaitable[Lease]]) -> None:
    await vms.create(spec())
    first = await start()
    with pytest.raises(VmRunning, match="already running"):
        await start()
    rt = await vms.runtime("vm1")
    assert rt is not None and rt.lease == first.id
    assert await vdis.users("disk") == ["VM vm1"]


async def test_a_claim_records_the_vm_as_a_user_of_each_disk(
    vms: VmRegistry, vdis: VdiRegistry, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec(disks=("disk", "data")))
    await start(disks=("disk", "data"))
    assert await vdis.users("disk") == ["VM vm1"] and await vdis.users("data") == ["VM vm1"]


async def test_a_claim_clears_the_last_runs_exit(vms: VmRegistry,
                                                 start: Callable[..., Awaitable[Lease]]) -> None:
    await vms.create(spec())
    await vms.record_exit("vm1", ended())
    await start()
    assert await vms.last_exit("vm1") is None


async def test_a_runtime_and_its_users_vanish_when_the_supervisor_stops_refreshing(
    vms: VmRegistry, vdis: VdiRegistry, clock: FakeClock,
    start: Callable[..., Awaitable[Lease]],
) -> None:
    await vms.create(spec())
    await start()
    await clock.advance(TTL - 0.1)
    assert await vms.runtime("vm1") is not None
    await clock.advance(0.2)
    assert await vms.runtime("vm1") is None and await vdis.users("disk") == []
    assert [s.name for s in await vms.list()] == ["vm1"]  # the definition stays


async def test_a_vm_whose_supervisor_died_can_be_claimed_again(
    vms: VmRegistry, clock: FakeClock, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    await start()
    await clock.advance(TTL + 0.1)
    lease = await start()
    assert (await vms.runtime("vm1")).lease == lease.id  # type: ignore[union-attr]


async def test_update_runtime_changes_some_fields_and_keeps_the_lease(
    vms: VmRegistry, kv: FakeKv, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    lease = await start()
    rt = await vms.update_runtime("vm1", state="running", pid=99)
    assert rt is not None and (rt.state, rt.pid, rt.supervisor) == ("running", 99, 4242)
    assert await vms.runtime("vm1") == rt
    assert (await kv.get(vms.run_key("vm1"))).lease == lease.id  # type: ignore[union-attr]


async def test_update_runtime_of_a_stopped_vm_returns_none(vms: VmRegistry) -> None:
    await vms.create(spec())
    assert await vms.update_runtime("vm1", state="running") is None
    assert await vms.runtime("vm1") is None


async def test_set_disks_records_a_hot_plug(vms: VmRegistry,
                                            start: Callable[..., Awaitable[Lease]]) -> None:
    await vms.create(spec())
    await start()
    await vms.set_disks("vm1", ("disk", "extra"))
    assert (await vms.runtime("vm1")).disks == ("disk", "extra")  # type: ignore[union-attr]


async def run_of(vms: VmRegistry, kv: FakeKv, name: str = "vm1") -> int:
    """The create revision of `name`'s runtime record: which run it is."""
    stored = await kv.get(vms.run_key(name))
    assert stored is not None
    return stored.create_revision


async def test_republish_publishes_again_on_a_new_lease_where_no_run_took_over(
    vms: VmRegistry, kv: FakeKv, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    old = await start()
    kv.end_lease(old.id)  # etcd was away too long
    new = await kv.lease(TTL)
    run = await vms.republish(runtime(lease=new.id), new, [])
    assert run == await run_of(vms, kv)
    assert (await kv.get(vms.run_key("vm1"))).lease == new.id  # type: ignore[union-attr]


async def test_republish_leaves_a_run_that_took_over_alone(
    vms: VmRegistry, vdis: VdiRegistry, kv: FakeKv, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    old = await start()
    kv.end_lease(old.id)
    taker = await start()  # HA restarted it elsewhere
    new = await kv.lease(TTL)
    assert await vms.republish(runtime(lease=new.id), new,
                               [vdis.add_user_op("disk", "vm:vm1", "old run", new)]) == 0
    assert (await kv.get(vms.run_key("vm1"))).lease == taker.id  # type: ignore[union-attr]
    assert await vdis.users("disk") == ["VM vm1"]


async def test_update_runtime_of_a_run_leaves_another_runs_record_alone(
    vms: VmRegistry, kv: FakeKv, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    old = await start()
    run = await run_of(vms, kv)
    kv.end_lease(old.id)
    await start()
    assert await vms.update_runtime("vm1", old, run, state="io-error") is None
    assert (await vms.runtime("vm1")).state == "starting"  # type: ignore[union-attr]


async def test_forget_runtime_removes_the_record(vms: VmRegistry,
                                                 start: Callable[..., Awaitable[Lease]]) -> None:
    await vms.create(spec())
    await start()
    await vms.forget_runtime("vm1")
    assert await vms.runtime("vm1") is None


# -- how runs ended -------------------------------------------------------------------------


async def test_an_exit_outlives_the_runtime_record(
    vms: VmRegistry, kv: FakeKv, clock: FakeClock, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    await start()
    assert await vms.record_exit("vm1", ended(), await run_of(vms, kv))
    await clock.advance(TTL + 0.1)
    assert await vms.runtime("vm1") is None
    assert await vms.last_exit("vm1") == ended()


async def test_exits_lists_each_vms_last_exit_by_name(vms: VmRegistry) -> None:
    await vms.record_exit("vm1", ended("crashed"))
    await vms.record_exit("vm2", ended("stopped"))
    await vms.record_exit("vm1", ended("stopped"))
    exits = await vms.exits()
    assert {name: e.state for name, e in exits.items()} == {"vm1": "stopped", "vm2": "stopped"}


# -- whether a VM should run ----------------------------------------------------------------


async def test_a_claim_records_that_the_vm_should_run_on_its_node(
    vms: VmRegistry, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    await start()
    assert set(await vms.wants()) == {"vm1"}


async def test_the_wish_outlives_a_lost_host(
    vms: VmRegistry, clock: FakeClock, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    await start()
    await clock.advance(TTL + 0.1)  # the supervisor's lease ran out: no word of how it ended
    assert await vms.runtime("vm1") is None and set(await vms.wants()) == {"vm1"}


async def test_the_end_of_a_run_clears_the_wish_that_it_run(
    vms: VmRegistry, kv: FakeKv, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    await start()
    assert await vms.record_exit("vm1", ended("stopped"), await run_of(vms, kv))
    assert await vms.wants() == {}


async def test_a_run_that_lost_the_vm_to_another_leaves_the_others_records_alone(
    vms: VmRegistry, kv: FakeKv, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    old = await start()
    run = await run_of(vms, kv)
    kv.end_lease(old.id)
    await start()  # HA restarted it elsewhere
    assert not await vms.record_exit("vm1", ended("crashed"), run)
    assert set(await vms.wants()) == {"vm1"} and await vms.last_exit("vm1") is None


async def test_a_stop_on_purpose_clears_the_wish(
    vms: VmRegistry, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    await start()
    await vms.unwant("vm1")
    assert await vms.wants() == {}


async def test_deleting_a_vm_that_lost_its_host_forgets_the_wish(
    vms: VmRegistry, kv: FakeKv, start: Callable[..., Awaitable[Lease]]
) -> None:
    await vms.create(spec())
    kv.end_lease((await start()).id)
    await vms.delete("vm1")
    assert await vms.wants() == {}
