"""A VDI's NBD allow-list in the registry (over an in-memory etcd): kept per family, so its
snapshots follow it, and gone with the family, so a new VDI of the same name starts open."""

from __future__ import annotations

import pytest

from sheep.errors import NoVdi
from sheep.vdi.registry import VdiRegistry

from ..fakes.clock import FakeClock
from ..fakes.kv import fake_etcd


@pytest.fixture
def registry() -> VdiRegistry:
    clock = FakeClock()
    etcd, _kv = fake_etcd(clock)
    return VdiRegistry(etcd, clock=clock)


async def make_family(registry: VdiRegistry, name: str) -> None:
    assert await registry.change(await registry.load()).put_family(name, 7).commit()


async def test_a_set_allow_list_is_read_back_with_the_registry(registry: VdiRegistry) -> None:
    await make_family(registry, "disk")
    await registry.set_nbd_allow("disk", frozenset({"vmhost1", "vmhost2"}))
    state = await registry.load()
    assert state.nbd_allow == {"disk": frozenset({"vmhost1", "vmhost2"})}
    assert state.working == {"disk": 7}  # not mistaken for a family


async def test_none_removes_the_allow_list(registry: VdiRegistry) -> None:
    await make_family(registry, "disk")
    await registry.set_nbd_allow("disk", frozenset({"vmhost1"}))
    await registry.set_nbd_allow("disk", None)
    assert (await registry.load()).nbd_allow == {}


async def test_an_allow_list_for_a_missing_vdi_is_refused(registry: VdiRegistry) -> None:
    with pytest.raises(NoVdi):
        await registry.set_nbd_allow("ghost", frozenset({"vmhost1"}))
    assert (await registry.load()).nbd_allow == {}


async def test_deleting_the_family_deletes_its_allow_list(registry: VdiRegistry) -> None:
    await make_family(registry, "disk")
    await registry.set_nbd_allow("disk", frozenset({"vmhost1"}))
    assert await registry.change(await registry.load()).delete_family("disk").commit()
    await make_family(registry, "disk")
    assert (await registry.load()).nbd_allow == {}
