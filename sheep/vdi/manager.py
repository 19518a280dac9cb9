"""Admin operations on VDIs: what `dog vdi` runs, against the registry and the objects.

Every operation changes the registry in one guarded transaction and does its object work
around it so that a crash leaves, at worst, objects nobody references (wasted space), never
a VDI that references objects that are gone: new objects are written before the registry
names them, and old ones are reclaimed only after the registry stopped naming them.
"""

from __future__ import annotations

import contextlib
import time
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from sheep.errors import ClusterError, InvalidParams, NoVdi, VdiExists, VdiLocked
from sheep.names import validate_label, validate_name
from sheep.objclient import ObjectClient, open_client
from sheep.oid import validate_copies
from sheep.security.identity import Identity
from sheep.units import SECTOR

from .fence import take_lock
from .inode import block_oid, max_vdi_size
from .inodes import nblocks, read_table, write_header, write_inode
from .parallel import for_each
from .reclaim import reclaim
from .registry import (
    HolderGone,
    RegistryState,
    VdiRecord,
    VdiRegistry,
)
from .volume import Volume

Progress = Callable[[int, int], None]
_RETRIES = 50


@dataclass(frozen=True)
class Usage:
    """Space a VDI references: `used` is in objects it owns, `shared` in objects owned by
    ancestors (or a clone's origin) that it still shares."""

    used: int
    shared: int


def usage_of(record: VdiRecord, table: array) -> Usage:
    own = shared = 0
    mine = record.ref
    for ref in table:
        if ref == mine:
            own += 1
        elif ref:
            shared += 1
    return Usage(own * record.block_size, shared * record.block_size)


class VdiManager:
    def __init__(self, client: ObjectClient, registry: VdiRegistry, *, holder: str = "dog"):
        self.client = client
        self.registry = registry
        self.holder = holder

    # -- lookups --------------------------------------------------------------------------

    async def state(self) -> RegistryState:
        return await self.registry.load()

    async def table(self, record: VdiRecord) -> array:
        return await read_table(self.client, record)

    async def open(self, name: str, tag: str | None = None, *, writable: bool = False) -> Volume:
        return await Volume.open(self.client, self.registry, name, tag, writable=writable,
                                 holder=self.holder)

    def _block_size(self) -> int:
        config = self.client.view.config
        if config is None:
            raise ClusterError("the cluster is not formatted")
        return config.object_size

    def check_size(self, size: int, block_size: int) -> None:
        limit = max_vdi_size(block_size)
        if size <= 0:
            raise InvalidParams("VDI size must be more than 0")
        if size % SECTOR:
            raise InvalidParams(f"VDI size {size} is not a whole number of {SECTOR}-byte "
                                f"sectors (block devices see disks in sectors)")
        if size > limit:
            raise InvalidParams(f"VDI size {size} is over the maximum of {limit} bytes "
                                f"for {block_size}-byte objects")

    # -- create ---------------------------------------------------------------------------

    async def create(
        self, name: str, size: int, *, copies: int | None = None, prealloc: bool = False,
        incomplete: bool = False,
    ) -> VdiRecord:
        validate_label(name)
        block_size = self._block_size()
        self.check_size(size, block_size)
        config = self.client.view.config
        assert config is not None
        copies = validate_copies(copies if copies is not None else config.copies)
        record_nodes = self.client.view.record
        nodes = len(record_nodes.nodes) if record_nodes is not None else 0
        if copies > nodes:
            raise InvalidParams(f"{copies} copies need at least {copies} nodes; "
                                f"the cluster has {nodes}")
        state = await self.state()
        if name in state.working:
            if not state.working[name]:
                raise VdiExists(snapshots_remain(state, name))
            raise VdiExists(f"VDI {name!r} already exists")
        vdi_id = await self.registry.allocate_id()
        record = VdiRecord(vdi_id, name, size, copies, block_size, time.time(), serial=vdi_id,
                           incomplete=incomplete)
        table = array("I", [record.ref] * nblocks(record)) if prealloc else None
        try:
            if table is not None:
                await self._preallocate(record)
            await write_inode(self.client, record, table)
            if not await self.registry.change(state).put_record(record).put_family(
                    name, record.id).commit():
                raise VdiExists(f"VDI {name!r} already exists")
        except BaseException:
            await self._discard_objects(record, table)
            raise
        return record

    async def _preallocate(self, record: VdiRecord) -> None:
        zeros = bytes(record.block_size)

        async def one(index: int) -> None:
            await self.client.write(block_oid(record.ref, index), 0, zeros, fresh=True)

        await for_each(range(nblocks(record)), one, 8)

    async def _discard_objects(self, record: VdiRecord, table: array | None) -> None:
        with contextlib.suppress(Exception):
            await self.client.remove(record.inode_oid)
            if table is not None:
                for index, ref in enumerate(table):
                    if ref == record.ref:
                        await self.client.remove(block_oid(ref, index))

    # -- snapshot, clone, rollback ------------------------------------------------------

    async def snapshot(self, name: str, tag: str) -> VdiRecord:
        """Snapshot NAME as TAG. If a writer holds NAME open, it takes the snapshot itself
        (between two of its writes); otherwise this process opens NAME for writing to."""
        validate_label(name, tag)
        for attempt in range(3):
            state = await self.state()
            state.lookup(name)
            if attempt:  # a writer that died may have taken it before it went
                with contextlib.suppress(NoVdi):
                    return state.lookup(name, tag)
            if name not in state.locks:
                try:
                    async with await self.open(name, writable=True) as vol:
                        return await vol.snapshot(tag)
                except VdiLocked:
                    pass  # a writer opened it meanwhile: ask that writer
            try:
                answer = await self.registry.ask_holder(name, {"op": "snapshot", "tag": tag})
            except HolderGone:
                continue  # its lock is gone: take the snapshot here
            if not answer.get("ok"):
                raise ClusterError(str(answer.get("error", "the writer refused the snapshot")))
            return (await self.state()).lookup(name, tag)
        raise ClusterError(f"VDI {name!r}: its writers kept going away; try again")

    async def clone(self, name: str, tag: str, new_name: str) -> VdiRecord:
        validate_label(new_name)
        for _ in range(_RETRIES):
            state = await self.state()
            source = state.lookup(name, tag)
            if new_name in state.working:
                raise VdiExists(f"VDI {new_name!r} already exists")
            table = await self.table(source)
            vdi_id = await self.registry.allocate_id()
            record = VdiRecord(vdi_id, new_name, source.size, source.copies, source.block_size,
                               time.time(), parent=source.id, serial=vdi_id)
            await write_inode(self.client, record, table)
            change = self.registry.change(state).require(source).put_record(record)
            if await change.put_family(new_name, record.id).commit():
                return record
            await self._discard_objects(record, None)
        raise ClusterError("the registry kept changing; try again")

    async def rollback(self, name: str, tag: str) -> VdiRecord:
        """NAME's working VDI becomes a copy of snapshot TAG; what the old working VDI
        alone held is reclaimed."""
        validate_name(tag, "snapshot tag")
        (await self.state()).lookup(name, tag)
        if users := await self.registry.users(name):
            raise VdiLocked(f"VDI {name!r} is in use by {users[0]}: stop it before a rollback")
        lock, _ = await take_lock(self.client, self.registry, name,
                                  f"{self.holder} (rollback)")
        try:
            for _ in range(_RETRIES):
                state = await self.state()
                snap = state.lookup(name, tag)
                old = state.records.get(state.working.get(name, 0))
                old_table = await self.table(old) if old is not None else None
                # the rolled-back disk stays the same disk to its initiators
                serial = (old or snap).disk_serial
                record = replace(snap, id=await self.registry.allocate_id(), parent=snap.id,
                                 created=time.time(), snapshot=False, tag="", snap_time=0.0,
                                 serial=serial)
                await write_inode(self.client, record, await self.table(snap),
                                  token=lock.token)
                change = self.registry.change(state).require(snap).put_record(record)
                change.put_family(name, record.id)
                if old is not None:
                    change.delete_record(old)
                if await change.commit():
                    if old is not None and old_table is not None:
                        await reclaim(self.client, self.registry, old_table)
                        await self.client.remove(old.inode_oid)
                    return record
                await self._discard_objects(record, None)
            raise ClusterError("the registry kept changing; try again")
        finally:
            await lock.release()

    # -- flatten, resize ------------------------------------------------------------------

    async def flatten(self, name: str, progress: Progress | None = None) -> VdiRecord:
        """Copy into NAME every block it shares outside its own family (a clone's origin),
        so that it no longer depends on it; then cut the link to the origin."""
        async with await self.open(name, writable=True) as vol:
            state = await self.state()
            family = {r.ref for r in state.family(name)}
            todo = [i for i, ref in enumerate(vol.table) if ref and ref not in family]
            for done, index in enumerate(todo, 1):
                await vol.copy_block(index)
                if progress is not None:
                    progress(done, len(todo))
            for _ in range(_RETRIES):
                state = await self.state()
                current = state.records[vol.record.id]
                parent = state.records.get(current.parent)
                if parent is not None and parent.name == name:
                    return current  # its own snapshots still share with the origin
                flat = replace(current, parent=0)
                if await self.registry.change(state).put_record(flat).commit():
                    with contextlib.suppress(Exception):
                        await write_header(self.client, flat, token=vol.token)
                    return flat
            raise ClusterError("the registry kept changing; try again")

    async def resize(self, name: str, size: int, *, prealloc: bool = False) -> VdiRecord:
        """Grow NAME to `size`; with `prealloc`, the new part's objects are then allocated
        (as zeros) under NAME's write lock, before anyone else can write it."""
        if prealloc:
            async with await self.open(name, writable=True) as vol:
                old = vol.size
                grown = await self._grow(name, size, vol.token)
                vol.grown(grown)
                await vol.write_zeroes(old, size - old)
                await vol.flush()
            return grown
        lock, _ = await take_lock(self.client, self.registry, name, f"{self.holder} (resize)")
        try:
            return await self._grow(name, size, lock.token)
        finally:
            await lock.release()

    async def _grow(self, name: str, size: int, token: int) -> VdiRecord:
        """Publish NAME's new size; the caller holds NAME's lock, with `token`."""
        for _ in range(_RETRIES):
            state = await self.state()
            current = state.lookup(name)
            if size < current.size:
                raise InvalidParams(f"shrinking is not supported: VDI {name!r} is "
                                    f"{current.size} bytes, asked for {size}")
            self.check_size(size, current.block_size)
            grown = replace(current, size=size)
            if await self.registry.change(state).put_record(grown).commit():
                await write_header(self.client, grown, token=token)
                return grown
        raise ClusterError("the registry kept changing; try again")

    async def mark_incomplete(self, name: str, incomplete: bool) -> VdiRecord:
        """Set or clear NAME's `incomplete` flag: set while an import writes into it, so
        that an import stopped by anything (even kill -9) leaves a VDI that says so."""
        for _ in range(_RETRIES):
            state = await self.state()
            current = state.lookup(name)
            if current.incomplete == incomplete:
                return current
            marked = replace(current, incomplete=incomplete)
            if await self.registry.change(state).put_record(marked).commit():
                return marked
        raise ClusterError("the registry kept changing; try again")

    # -- delete ---------------------------------------------------------------------------

    async def delete(self, name: str, tag: str | None = None) -> int:
        """Delete NAME's working VDI, or its snapshot TAG; returns how many data objects
        were reclaimed. Children of a deleted snapshot keep every block they use."""
        state = await self.state()
        target = state.lookup(name, tag)
        await self._refuse_if_used(target)
        lock = None
        if not target.snapshot:
            lock, _ = await take_lock(self.client, self.registry, name,
                                      f"{self.holder} (delete)")
        try:
            table = await self.table(target)
            for _ in range(_RETRIES):
                state = await self.state()
                target = state.records.get(target.id)
                if target is None:
                    raise NoVdi(f"VDI {name!r} was deleted meanwhile")
                children = state.children(target.id)
                change = self.registry.change(state).delete_record(target)
                for child in children:
                    change.put_record(replace(child, parent=target.parent))
                remaining = [r for r in state.family(name) if r.id != target.id]
                if not remaining:
                    change.delete_family(name)
                else:
                    working = 0 if not target.snapshot else state.working.get(name, 0)
                    change.put_family(name, working)
                if await change.commit():
                    break
            else:
                raise ClusterError("the registry kept changing; try again")
            removed = await reclaim(self.client, self.registry, table)
            await self.client.remove(target.inode_oid)
            for child in children:
                with contextlib.suppress(Exception):
                    await write_header(self.client, replace(child, parent=target.parent))
            return removed
        finally:
            if lock is not None:
                await lock.release()

    async def _refuse_if_used(self, record: VdiRecord) -> None:
        """A VDI or snapshot that a VM or a gateway's client uses is not deleted under it."""
        if users := await self.registry.users(record.label):
            what = "snapshot" if record.snapshot else "VDI"
            raise VdiLocked(f"{what} {record.label!r} is in use by {users[0]}: stop it "
                            f"before deleting the {what}")

    async def delete_recursive(self, name: str) -> tuple[list[str], int]:
        """Delete NAME's working VDI and every snapshot of it, newest first; returns what
        was deleted and how many data objects were reclaimed. Clones of its snapshots are
        VDIs of their own: they keep every block they use (reclaim goes by reference)."""
        state = await self.state()
        if name not in state.working:
            raise NoVdi(f"no VDI named {name!r}")
        for rec in state.family(name):
            await self._refuse_if_used(rec)
        deleted, removed = [], 0
        for rec in reversed(state.family(name)):
            removed += await self.delete(name, rec.tag if rec.snapshot else None)
            deleted.append(rec.label)
        return deleted, removed

    # -- accounting -----------------------------------------------------------------------

    async def usage(self, record: VdiRecord) -> Usage:
        return usage_of(record, await self.table(record))


def snapshots_remain(state: RegistryState, name: str) -> str:
    """What to tell a user about NAME when only its snapshots are left."""
    tags = ", ".join(r.tag for r in state.family(name) if r.snapshot)
    return (f"VDI {name!r} was deleted but its snapshots remain ({tags}): 'dog vdi delete "
            f"-r {name}' removes them, 'dog vdi rollback {name} -s TAG' revives one")


@contextlib.asynccontextmanager
async def open_manager(etcd_url: str, *, holder: str = "dog",
                       identity: Identity | None = None, **kwargs: object
                       ) -> AsyncIterator[VdiManager]:
    """A VdiManager on the cluster at `etcd_url`, for as long as the block runs; it
    shows `identity` to etcd and to the data plane (dog's admin certificate; None on an
    open cluster)."""
    async with open_client(etcd_url, identity=identity, **kwargs) as client:
        if client.view.config is None:
            raise ClusterError("the cluster is not formatted")
        yield VdiManager(client, VdiRegistry(client.etcd), holder=holder)
