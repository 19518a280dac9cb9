"""VDIs against a model: random sequences of VDI operations on a real cluster, every byte and
every owner-table entry checked against an in-memory model of copy-on-write.

The cluster (3 nodes, copies=3) is formatted with 64 KiB objects so that copying a block is
cheap. Each hypothesis example works under its own VDI-name prefix and deletes everything it
created at the end. After every step the test checks, for every live VDI of the example:
its registry record, its owner table (as VDI ids), `usage`, its full content, and that the
data and inode objects on every node are exactly the ones the live tables and records name:
nothing leaked by a delete, nothing lost. At the end it deletes the oldest snapshots first
(the order that splits snapshot trees most) and checks again after each delete. A writer is
sometimes kept open across steps: writes go through it, a snapshot is taken by it (asked
through etcd) after which it must write the new working VDI, and admin operations on its VDI
must be refused with VdiLocked. Every step is bounded in time: a hang fails with the stacks
of every task.

The model's owner tables are kept in real VDI ids (read from the registry after each
operation that makes a VDI), following the implementation's copy-on-write rules:

- a VDI owns the blocks it wrote; a write, or a partial discard, of a block it does not own
  (but that is allocated) makes it the owner; a partial discard of a hole stays a hole;
- a whole-block discard (or one from a block's start to the end of the VDI) unallocates;
- snapshot: the working VDI becomes the snapshot (same id, same table); the new working VDI
  gets a new id and a copy of the table; clone and rollback copy a snapshot's table into a
  new VDI (rollback deletes the old working VDI);
- flatten: the working VDI owns every block whose owner is not a live member of its family;
- delete: the VDI goes; its objects stay for as long as any live table references them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import uuid
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from sheep.errors import VdiLocked
from sheep.etcd_server import EtcdServer
from sheep.oid import ObjType, oid_type
from sheep.vdi.inode import ref_vdi
from sheep.vdi.manager import Usage, VdiManager, open_manager
from sheep.vdi.volume import Volume

from ..cluster import Cluster, start_cluster

pytestmark = pytest.mark.slow

BS = 64 << 10  # the cluster's object size: one block
MAX_BLOCKS = 6
NAMES = ("a", "b", "c", "d")
STEP_TIMEOUT = 60  # seconds: one operation or one round of checks
T = TypeVar("T")
Key = tuple[str, str | None]  # (short name, snapshot tag or None for the working VDI)
# the one rule draws its operation from here: how often each runs (hold toggles a writer)
OPS = (
    ("write",) * 5 + ("discard",) * 2 + ("snapshot",) * 3 + ("clone",) * 3 + ("delete",) * 3
    + ("rollback",) * 2 + ("create",) * 2 + ("hold",) * 2 + ("read", "flatten", "resize")
)


@dataclass
class Model:
    """One live VDI: its id, content and owner table (VDI ids, 0 = unallocated)."""

    id: int
    data: bytearray
    owners: list[int]

    @property
    def size(self) -> int:
        return len(self.data)


def nblocks(size: int) -> int:
    return -(-size // BS)


def pattern(kind: int, seed: int, n: int) -> bytes:
    """kind 0..255: that byte repeated; kind 256: random bytes from `seed`."""
    if kind < 256:
        return bytes([kind]) * n
    return random.Random(seed).randbytes(n)


async def bounded(step: Awaitable[T]) -> T:
    """Run one step, or fail with what every task was waiting for: a hang is a bug too."""
    try:
        return await asyncio.wait_for(step, STEP_TIMEOUT)
    except TimeoutError:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=stacks)
        raise AssertionError(f"step still running after {STEP_TIMEOUT}s; tasks:\n"
                             f"{stacks.getvalue()}") from None


async def every(steps: Iterable[Awaitable[T]]) -> list[T]:
    """Run `steps` concurrently, let all of them finish, then raise the first failure (no
    check is left running behind a failed one)."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def first_difference(got: bytes | bytearray, want: bytes | bytearray) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    for pos in range(0, len(want), 512):
        if got[pos : pos + 512] != want[pos : pos + 512]:
            for i in range(pos, min(pos + 512, len(want))):
                if got[i] != want[i]:
                    return (f"first difference at byte {i} (block {i // BS}, offset "
                            f"{i % BS}): got {got[i]:#04x}, want {want[i]:#04x}")
    return "equal"


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer
                  ) -> Iterator[Cluster]:
    """3 nodes, copies=3, 64 KiB objects: copy-on-write of a block is cheap."""
    c = start_cluster(tmp_path_factory.mktemp("vdi-model"), etcd.url, nodes=3, copies=0)
    try:
        reply = c.format(3, "--object-size", "64K")
        assert int(reply["object_size"]) == BS
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def manager(small_cluster: Cluster) -> Iterator[tuple[asyncio.AbstractEventLoop, VdiManager]]:
    """One VdiManager for the whole module, on an event loop the test drives itself."""
    loop = asyncio.new_event_loop()
    opened = open_manager(small_cluster.etcd_url, holder="model-test")
    m = loop.run_until_complete(opened.__aenter__())
    try:
        yield loop, m
    finally:
        loop.run_until_complete(opened.__aexit__(None, None, None))
        loop.close()


class VdiMachine(RuleBasedStateMachine):
    """One example: VDIs under a fresh name prefix, driven through `VdiManager` and
    `Volume`, checked against `Model`s after every step."""

    loop: asyncio.AbstractEventLoop  # set by the test: the loop and manager it owns
    m: VdiManager

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"m{uuid.uuid4().hex[:8]}-"
        self.live: dict[Key, Model] = {}
        self.created: set[int] = set()  # every VDI id this example made
        self.held: tuple[str, Volume] | None = None  # a writer kept open across steps
        self.tags = 0
        self.ok = True  # False once a step or a check failed: teardown only cleans up

    # -- helpers ----------------------------------------------------------------------------

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(bounded(coro))

    def full(self, name: str) -> str:
        return self.prefix + name

    def family(self, name: str) -> list[Key]:
        return [k for k in self.live if k[0] == name]

    def working(self) -> list[str]:
        return sorted(k[0] for k in self.live if k[1] is None)

    def snapshots(self) -> list[Key]:
        return sorted((k for k in self.live if k[1] is not None), key=str)

    def free_names(self) -> list[str]:
        return [n for n in NAMES if not self.family(n)]

    def is_held(self, name: str) -> bool:
        return self.held is not None and self.held[0] == name

    def new_id(self, vdi_id: int) -> int:
        assert vdi_id not in self.created, f"VDI id {vdi_id} handed out twice"
        self.created.add(vdi_id)
        return vdi_id

    async def writer(self, name: str) -> contextlib.AbstractAsyncContextManager[Volume]:
        """The held volume if NAME is held, else a writer opened for this step."""
        if self.is_held(name):
            assert self.held is not None
            return contextlib.nullcontext(self.held[1])
        return await self.m.open(self.full(name), writable=True)

    def draw_range(self, data: st.DataObject, size: int) -> tuple[int, int]:
        """A range that often starts or ends at, or straddles, block boundaries."""
        block = data.draw(st.integers(0, nblocks(size) - 1), label="block")
        inner = data.draw(st.one_of(st.sampled_from([0, 1, BS // 2, BS - 1]),
                                    st.integers(0, BS - 1)), label="inner")
        offset = min(block * BS + inner, size - 1)
        length = data.draw(st.one_of(st.sampled_from([1, BS, BS - inner, 2 * BS, size - offset]),
                                     st.integers(1, 3 * BS)), label="length")
        return offset, max(1, min(length, size - offset))

    # -- the one rule: operations weighted by how much they exercise -------------------------

    def possible(self, op: str) -> bool:
        if op == "create":
            return bool(self.free_names())
        if op in ("read", "delete"):
            return bool(self.live)
        if op == "clone":
            return bool(self.snapshots() and self.free_names())
        if op == "rollback":
            return bool(self.snapshots())
        return bool(self.working())

    @rule(op=st.sampled_from(OPS), data=st.data())
    def step(self, op: str, data: st.DataObject) -> None:
        """Run `op`, or the first possible fallback when `op` has nothing to work on."""
        self.ok = False
        if not self.possible(op):
            op = next(o for o in ("create", "write", "rollback", "delete") if self.possible(o))
            data.draw(st.just(op), label="runs instead")
        getattr(self, "do_" + op)(data)

    # -- operations --------------------------------------------------------------------------

    def do_create(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.free_names()), label="name")
        blocks = data.draw(st.integers(1, MAX_BLOCKS), label="blocks")
        tail = data.draw(st.sampled_from([0, 512, BS // 2, BS - 512]), label="tail")  # sectors
        size = blocks * BS if tail == 0 else (blocks - 1) * BS + tail
        rec = self.run(self.m.create(self.full(name), size))
        self.live[(name, None)] = Model(self.new_id(rec.id), bytearray(size),
                                        [0] * nblocks(size))

    def do_write(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.working()), label="name")
        model = self.live[(name, None)]
        offset, length = self.draw_range(data, model.size)
        kind = data.draw(st.integers(0, 256), label="pattern")
        payload = pattern(kind, data.draw(st.integers(0, 2**32), label="seed"), length)

        async def go() -> None:
            async with await self.writer(name) as vol:
                assert vol.record.id == model.id
                await vol.write(offset, payload)

        self.run(go())
        model.data[offset : offset + length] = payload
        for index in range(offset // BS, (offset + length - 1) // BS + 1):
            model.owners[index] = model.id

    def do_discard(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.working()), label="name")
        model = self.live[(name, None)]
        offset, length = self.draw_range(data, model.size)

        async def go() -> None:
            async with await self.writer(name) as vol:
                await vol.discard(offset, length)

        self.run(go())
        model.data[offset : offset + length] = bytes(length)
        end = offset + length
        for index in range(offset // BS, (end - 1) // BS + 1):
            start, stop = max(offset, index * BS), min(end, (index + 1) * BS)
            if start == index * BS and (stop == (index + 1) * BS or stop == model.size):
                model.owners[index] = 0  # a whole block: the entry goes
            elif model.owners[index]:
                model.owners[index] = model.id  # partial: copied (if shared), then zeroed

    def do_read(self, data: st.DataObject) -> None:
        name, tag = data.draw(st.sampled_from(sorted(self.live, key=str)), label="vdi")
        model = self.live[(name, tag)]
        offset, length = self.draw_range(data, model.size)

        async def go() -> bytes | bytearray:
            if tag is None and self.is_held(name):
                assert self.held is not None
                return await self.held[1].read(offset, length)
            async with await self.m.open(self.full(name), tag) as vol:
                return await vol.read(offset, length)

        got = self.run(go())
        want = model.data[offset : offset + length]
        assert got == want, f"read {name}@{tag} [{offset}, +{length}): " + first_difference(
            got, want)

    def do_snapshot(self, data: st.DataObject) -> None:
        """Through the holder (asked via etcd) if the VDI is held, else directly."""
        name = data.draw(st.sampled_from(self.working()), label="name")
        self.tags += 1
        tag = f"t{self.tags}"
        old = self.live[(name, None)]

        async def go() -> int:
            frozen = await self.m.snapshot(self.full(name), tag)
            assert (frozen.id, frozen.snapshot, frozen.tag) == (old.id, True, tag)
            return (await self.m.state()).lookup(self.full(name)).id

        new_id = self.new_id(self.run(go()))
        self.live[(name, tag)] = old
        self.live[(name, None)] = Model(new_id, bytearray(old.data), list(old.owners))
        if self.is_held(name):  # the holder took it and writes on as the new working VDI
            assert self.held is not None
            assert self.held[1].record.id == new_id

    def do_clone(self, data: st.DataObject) -> None:
        name, tag = data.draw(st.sampled_from(self.snapshots()), label="snapshot")
        new = data.draw(st.sampled_from(self.free_names()), label="new name")
        src = self.live[(name, tag)]
        rec = self.run(self.m.clone(self.full(name), tag, self.full(new)))
        self.live[(new, None)] = Model(self.new_id(rec.id), bytearray(src.data),
                                       list(src.owners))

    def do_rollback(self, data: st.DataObject) -> None:
        name, tag = data.draw(st.sampled_from(self.snapshots()), label="snapshot")
        if self.is_held(name):
            with pytest.raises(VdiLocked):
                self.run(self.m.rollback(self.full(name), tag))
            return
        src = self.live[(name, tag)]
        rec = self.run(self.m.rollback(self.full(name), tag))
        self.live[(name, None)] = Model(self.new_id(rec.id), bytearray(src.data),
                                        list(src.owners))

    def do_delete(self, data: st.DataObject) -> None:
        name, tag = data.draw(st.sampled_from(sorted(self.live, key=str)), label="vdi")
        if tag is None and self.is_held(name):
            with pytest.raises(VdiLocked):
                self.run(self.m.delete(self.full(name)))
            return
        self.run(self.m.delete(self.full(name), tag))
        del self.live[(name, tag)]

    def do_flatten(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.working()), label="name")
        if self.is_held(name):
            with pytest.raises(VdiLocked):
                self.run(self.m.flatten(self.full(name)))
            return
        model = self.live[(name, None)]
        family = {self.live[k].id for k in self.family(name)}
        self.run(self.m.flatten(self.full(name)))
        model.owners = [model.id if owner and owner not in family else owner
                        for owner in model.owners]

    def do_resize(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.working()), label="name")
        grow = data.draw(st.sampled_from([512, BS // 2, BS, BS + 512, 2 * BS]), label="grow")
        model = self.live[(name, None)]
        size = model.size + grow
        if self.is_held(name):
            with pytest.raises(VdiLocked):
                self.run(self.m.resize(self.full(name), size))
            return
        rec = self.run(self.m.resize(self.full(name), size))
        assert (rec.id, rec.size) == (model.id, size)
        model.data.extend(bytes(grow))
        model.owners.extend([0] * (nblocks(size) - len(model.owners)))

    def do_hold(self, data: st.DataObject) -> None:
        """Open a writer kept across steps (or close the one kept): writes go through it, a
        snapshot is taken by it, admin operations on its VDI are refused meanwhile."""
        if self.held is not None:
            name, vol = self.held
            with pytest.raises(VdiLocked):
                self.run(self.m.open(self.full(name), writable=True))
            self.held = None
            self.run(vol.close())
            return
        name = data.draw(st.sampled_from(self.working()), label="name")
        vol = self.run(self.m.open(self.full(name), writable=True))
        self.held = (name, vol)
        assert vol.record.id == self.live[(name, None)].id

    # -- checks ------------------------------------------------------------------------------

    async def check(self) -> None:
        m = self.m
        state = await m.state()
        ours = {i: r for i, r in state.records.items() if r.name.startswith(self.prefix)}
        assert set(ours) == {v.id for v in self.live.values()}, "registry records"
        for name in NAMES:
            if not self.family(name):
                assert self.full(name) not in state.working, f"family {name} left over"
                continue
            working = self.live.get((name, None))
            assert state.working.get(self.full(name)) == (working.id if working else 0)
        async def check_vdi(name: str, tag: str | None, model: Model) -> None:
            rec = ours[model.id]
            assert (rec.name, rec.tag, rec.snapshot, rec.size) == (
                self.full(name), tag or "", tag is not None, model.size)
            table = await m.table(rec)
            assert [ref_vdi(ref) for ref in table] == model.owners, f"table of {name}@{tag}"
            own = sum(owner == model.id for owner in model.owners)
            shared = sum(1 for owner in model.owners if owner and owner != model.id)
            assert await m.usage(rec) == Usage(own * BS, shared * BS), f"usage of {name}@{tag}"
            async with await m.open(self.full(name), tag) as vol:
                got = await vol.read(0, model.size)
            assert got == model.data, f"content of {name}@{tag}: " + first_difference(
                got, model.data)

        # every VDI at once, and every node's listing at once: the checks are round trips,
        # and ~850 rounds of them a run; all finish before the first failure is raised
        await every(check_vdi(name, tag, model) for (name, tag), model in self.live.items())
        want_data = {(owner, index) for model in self.live.values()
                     for index, owner in enumerate(model.owners) if owner}
        want_inodes = {model.id for model in self.live.values()}
        record = m.client.view.record
        assert record is not None
        listings = await every(m.client.list_node(node) for node in record.nodes)
        for node, listing in zip(record.nodes, listings, strict=True):
            # copies=3 on 3 nodes: every node holds every object
            data: set[tuple[int, int]] = set()
            inodes: set[int] = set()
            for oid in listing:
                vdi_id, index = (oid >> 32) & 0xFFFFFF, oid & 0xFFFFFFFF
                if vdi_id not in self.created:
                    continue  # another example's or another test's
                if oid_type(oid) == ObjType.DATA:
                    data.add((vdi_id, index))
                elif oid_type(oid) == ObjType.INODE:
                    inodes.add(vdi_id)
            assert data == want_data, (f"data objects on node {node.node_id}: leaked "
                                       f"{sorted(data - want_data)}, lost "
                                       f"{sorted(want_data - data)}")
            assert inodes == want_inodes, f"inode objects on node {node.node_id}"

    @invariant()
    def matches_the_model(self) -> None:
        self.ok = False
        self.run(self.check())
        self.ok = True

    def teardown(self) -> None:
        checked = self.ok
        if self.held is not None:
            with contextlib.suppress(Exception):
                self.run(self.held[1].close())
            self.held = None
        # oldest snapshots first: what they held then stays only in unlinked children
        for name, tag in sorted(self.live, key=lambda k: (k[1] is None, self.live[k].id)):
            try:
                self.run(self.m.delete(self.full(name), tag))
            except Exception:
                if checked:
                    raise
            del self.live[(name, tag)]
            if checked:
                self.run(self.check())


@pytest.mark.timeout(900)  # passing takes well under a minute; shrinking a failure takes long
def test_vdi_operations_match_the_model(
    manager: tuple[asyncio.AbstractEventLoop, VdiManager],
) -> None:
    VdiMachine.loop, VdiMachine.m = manager
    run_state_machine_as_test(
        VdiMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )


def test_children_of_a_deleted_root_snapshot_keep_the_blocks_they_share(
    manager: tuple[asyncio.AbstractEventLoop, VdiManager],
) -> None:
    """The smallest sequence the model test found: deleting a snapshot that has no parent
    re-parents its children (the working VDI and a clone) to nothing, so they are no longer
    linked, yet both still reference the snapshot's objects. Deleting one of them, or
    copying the block on write in one of them, must not reclaim what the other one reads."""
    loop, m = manager
    prefix = f"r{uuid.uuid4().hex[:8]}-"
    a, b, c, d = (prefix + n for n in "abcd")

    async def read(name: str) -> bytes | bytearray:
        async with await m.open(name) as vol:
            return await vol.read(0, 1)

    async def write(name: str, data: bytes) -> None:
        async with await m.open(name, writable=True) as vol:
            await vol.write(0, data)

    async def scenario() -> None:
        # a delete: the working VDI goes, the clone keeps reading the snapshot's block
        await m.create(a, BS)
        await write(a, b"x")
        await m.snapshot(a, "s")
        await m.clone(a, "s", b)
        await m.delete(a, "s")
        await m.delete(a)
        assert await read(b) == b"x"
        # copy on write in the clone: the working VDI keeps reading the snapshot's block
        await m.create(c, BS)
        await write(c, b"y")
        await m.snapshot(c, "s")
        await m.clone(c, "s", d)
        await m.delete(c, "s")
        await write(d, b"z")
        assert await read(c) == b"y"
        assert await read(d) == b"z"

    async def cleanup() -> None:
        state = await m.state()
        for rec in state.records.values():
            if rec.name.startswith(prefix):
                with contextlib.suppress(Exception):
                    await m.delete(rec.name, rec.tag if rec.snapshot else None)

    try:
        loop.run_until_complete(bounded(scenario()))
    finally:
        loop.run_until_complete(bounded(cleanup()))
