"""An open VDI: byte ranges mapped onto data objects, with copy-on-write.

The owner table is held in memory by the one writer (the lock holder), so a read or an
in-place write costs one lookup and one object request: no chain walk, no metadata I/O.
A write to a block this VDI does not own yet (never written, or shared with a snapshot or a
clone's origin) first builds the block in a fresh object of this VDI, then persists the
table entry, and only then acknowledges; other writers of that block wait meanwhile.

A snapshot taken through the holder (`snapshot`, or a request from `dog vdi snapshot`)
stops new writes, waits for the ones in flight, flushes, and switches the working id: every
acknowledged write is in the snapshot, and no write is half in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from array import array
from collections.abc import AsyncIterator
from dataclasses import replace

from sheep.errors import (
    InvalidParams,
    NoObject,
    NoVdi,
    ReadOnly,
    StaleLock,
    VdiExists,
    VdiLocked,
)
from sheep.names import validate_label
from sheep.objclient import ObjectClient

from .fence import take_lock
from .inode import allocation, block_oid, pack_entry, ref_vdi, spans, table_offset
from .inodes import nblocks, read_table, write_header, write_inode
from .reclaim import release_block
from .registry import VdiLock, VdiRecord, VdiRegistry

log = logging.getLogger(__name__)


class Volume:
    def __init__(
        self,
        client: ObjectClient,
        registry: VdiRegistry,
        record: VdiRecord,
        table: array,
        *,
        lock: VdiLock | None = None,
    ) -> None:
        self.client = client
        self.registry = registry
        self.record = record
        self.table = table
        self.block_size = record.block_size
        self._lock = lock
        self._token = lock.token if lock is not None else 0  # what its writes carry
        self._changing: dict[int, asyncio.Future[None]] = {}  # block -> owner change running
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._gate: asyncio.Future[None] | None = None
        self._server: asyncio.Future | None = None
        if lock is not None:
            self._server = asyncio.ensure_future(
                registry.serve_requests(record.name, self._answer))

    @classmethod
    async def open(
        cls,
        client: ObjectClient,
        registry: VdiRegistry,
        name: str,
        tag: str | None = None,
        *,
        writable: bool = False,
        holder: str = "sheep",
    ) -> Volume:
        """Open NAME (or its snapshot TAG); writable takes the VDI's exclusive lock."""
        state = await registry.load()
        record = state.lookup(name, tag)
        if not writable:
            return cls(client, registry, record, await read_table(client, record))
        if record.snapshot:
            raise ReadOnly(f"snapshot {record.label} is read-only")
        lock, record = await take_lock(client, registry, name, holder)
        try:
            if record is None:
                raise NoVdi(f"VDI {name!r} has only snapshots (roll back or clone one)")
            return cls(client, registry, record, await read_table(client, record), lock=lock)
        except BaseException:
            await lock.release()
            raise

    # -- facts ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def token(self) -> int:
        """The fencing token this volume's writes carry (its lock's; 0: read-only)."""
        return self._token

    @property
    def read_only(self) -> bool:
        return self._lock is None

    @property
    def holds_lock(self) -> bool:
        """Whether this volume still holds its VDI's write lock, as far as it knows (a lock
        taken over by a newer holder is seen lost at a refused write or the next refresh)."""
        return self._lock is not None and not self._lock.lost.is_set()

    def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, allocated) runs: unallocated ranges are holes that read as zeros."""
        self._check_range(offset, length)
        return allocation(self.table, offset, length, self.block_size)

    def grown(self, record: VdiRecord) -> None:
        """Take this VDI's record after a resize made it larger (while this volume held
        its lock): the new blocks start unallocated."""
        self.record = record
        self.table.extend([0] * (nblocks(record) - len(self.table)))

    # -- I/O ------------------------------------------------------------------------------

    def read_now(self, offset: int, length: int) -> bytes | bytearray | None:
        """The range, if it can be had without waiting (unallocated, or in this node's own
        store); None means use `read`. Lets a gateway answer most reads with no task."""
        self._check_range(offset, length)
        pieces = list(spans(offset, length, self.block_size))
        if len(pieces) == 1:
            index, inner, n, _ = pieces[0]
            ref = self.table[index]
            return self.client.read_local(block_oid(ref, index), inner, n) if ref else bytes(n)
        buf = bytearray(length)
        for index, inner, n, pos in pieces:
            ref = self.table[index]
            if ref:
                data = self.client.read_local(block_oid(ref, index), inner, n)
                if data is None:
                    return None
                buf[pos : pos + n] = data
        return buf

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self._check_range(offset, length)
        pieces = list(spans(offset, length, self.block_size))
        if len(pieces) == 1:
            index, inner, n, _ = pieces[0]
            ref = self.table[index]
            return await self.client.read(block_oid(ref, index), inner, n) if ref else bytes(n)
        buf = bytearray(length)
        view = memoryview(buf)

        async def fill(oid: int, inner: int, n: int, pos: int) -> None:
            view[pos : pos + n] = await self.client.read(oid, inner, n)

        await asyncio.gather(*(fill(block_oid(self.table[i], i), inner, n, pos)
                               for i, inner, n, pos in pieces if self.table[i]))
        return buf

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        self._check_range(offset, len(data))
        await self._enter()
        try:
            view = memoryview(data).cast("B")
            pieces = list(spans(offset, len(view), self.block_size))
            if len(pieces) == 1:
                index, inner, _n, _ = pieces[0]
                await self._write_block(index, inner, view, fua)
            else:
                await asyncio.gather(*(self._write_block(i, inner, view[pos : pos + n], fua)
                                       for i, inner, n, pos in pieces))
        except StaleLock:
            self._lost()
            raise
        finally:
            self._leave()

    async def discard(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Make the range read as zeros, releasing storage: whole blocks drop their objects
        (the VDI gets thinner), partial ones punch holes."""
        self._check_range(offset, length)
        await self._enter()
        try:
            await asyncio.gather(*(self._discard_block(i, inner, n, fua)
                                   for i, inner, n, _ in spans(offset, length, self.block_size)))
        except StaleLock:
            self._lost()
            raise
        finally:
            self._leave()

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Zeros that stay allocated (NBD's NO_HOLE)."""
        self._check_range(offset, length)
        step = self.block_size
        start, end = offset, offset + length
        while start < end:
            n = min(step - start % step, end - start)
            await self.write(start, bytes(n), fua=fua)
            start += n

    async def flush(self) -> None:
        await self.client.flush()

    async def copy_block(self, index: int) -> None:
        """Give this VDI its own copy of block `index` if it shares it (flatten)."""
        await self._enter()
        try:
            if await self._claim(index) is None:
                try:
                    if self.table[index]:
                        await self._take_block(index, 0, memoryview(b""), False)
                finally:
                    self._settle(index)
        except StaleLock:
            self._lost()
            raise
        finally:
            self._leave()

    # -- snapshots ------------------------------------------------------------------------

    async def snapshot(self, tag: str) -> VdiRecord:
        """Freeze the current content as NAME@TAG; this volume goes on writing a new working
        VDI that starts as a copy of the table. Returns the snapshot's record."""
        validate_label(self.name, tag)
        self._check_writable()
        async with self._quiesced():
            await self.client.flush()
            frozen, working = await self._commit_snapshot(tag)
            self.record = working
            with contextlib.suppress(Exception):  # the header is informational
                await write_header(self.client, frozen, token=self._token)
        log.info("VDI %s: snapshot %r is id %d; writing on as id %d",
                 self.name, tag, frozen.id, working.id)
        return frozen

    async def _commit_snapshot(self, tag: str) -> tuple[VdiRecord, VdiRecord]:
        new_id = await self.registry.allocate_id()
        now = time.time()
        working = replace(self.record, id=new_id, parent=self.record.id, created=now,
                          serial=self.record.disk_serial)
        await write_inode(self.client, working, self.table, token=self._token)
        try:
            for _ in range(50):
                state = await self.registry.load()
                current = state.records.get(self.record.id)
                if current is None or state.working.get(self.name) != current.id:
                    raise VdiLocked(f"VDI {self.name!r} changed under its writer")
                if any(r.snapshot and r.tag == tag for r in state.family(self.name)):
                    raise VdiExists(f"VDI {self.name!r} already has a snapshot tagged {tag!r}")
                frozen = replace(current, snapshot=True, tag=tag, snap_time=now)
                working = replace(current, id=new_id, parent=current.id, created=now,
                                  serial=current.disk_serial)
                assert self._lock is not None
                change = self.registry.change(state).held(self._lock)
                change.put_record(frozen).put_record(working)
                if await change.put_family(self.name, new_id).commit():
                    return frozen, working
                await asyncio.sleep(0.01)
            raise VdiLocked(f"VDI {self.name!r}: the registry kept changing; try again")
        except BaseException:
            with contextlib.suppress(Exception):
                await self.client.remove(working.inode_oid, token=self._token)
            raise

    async def _answer(self, request: dict) -> dict:
        if request.get("op") != "snapshot":
            return {"ok": False, "error": f"unknown request {request.get('op')!r}"}
        frozen = await self.snapshot(str(request.get("tag", "")))
        return {"ok": True, "id": frozen.id}

    # -- lifetime -------------------------------------------------------------------------

    async def close(self) -> None:
        if self._server is not None:
            self._server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server
            self._server = None
        if self._lock is not None:
            try:
                if not self._lock.lost.is_set():
                    await self.client.flush()
            finally:
                await self._lock.release()
                self._lock = None

    async def __aenter__(self) -> Volume:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidParams(f"range [{offset}, {offset + length}) is past the end of "
                                f"VDI {self.record.label} ({self.size} bytes)")

    def _check_writable(self) -> None:
        if self._lock is None:
            raise ReadOnly(f"VDI {self.record.label} is open read-only")
        if self._lock.lost.is_set():
            raise VdiLocked(f"the write lock on VDI {self.name!r} was lost")

    async def _enter(self) -> None:
        self._check_writable()
        while self._gate is not None:
            await self._gate
        self._check_writable()
        self._inflight += 1

    def _lost(self) -> None:
        """A node refused a write for a newer holder's token: the lock moved while this
        volume was paused or cut off. It must not try again (and its close() must not
        flush as if it still held the VDI)."""
        log.error("VDI %s: a newer writer holds its lock; this volume's writes are refused",
                  self.name)
        if self._lock is not None:
            self._lock.lost.set()

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    @contextlib.asynccontextmanager
    async def _quiesced(self) -> AsyncIterator[None]:
        while self._gate is not None:
            await self._gate
        gate = self._gate = asyncio.get_running_loop().create_future()
        try:
            if self._inflight:
                self._idle = asyncio.Event()
                await self._idle.wait()
            yield
        finally:
            self._idle = None
            self._gate = None
            gate.set_result(None)

    async def _claim(self, index: int, *, exclusive: bool = False) -> int | None:
        """Wait until no owner change of `index` runs. Return this VDI's ref when the block
        is ours and can be written in place; otherwise claim the block for an owner change
        and return None (the caller must `_settle` it)."""
        while (running := self._changing.get(index)) is not None:
            await running
        if not exclusive and self.table[index] == self.record.ref:
            return self.record.ref
        self._changing[index] = asyncio.get_running_loop().create_future()
        return None

    def _settle(self, index: int) -> None:
        self._changing.pop(index).set_result(None)

    async def _write_block(self, index: int, inner: int, piece: memoryview, fua: bool) -> None:
        while True:
            mine = await self._claim(index)
            if mine is None:
                try:
                    await self._take_block(index, inner, piece, fua)
                finally:
                    self._settle(index)
                return
            try:
                await self.client.write(block_oid(mine, index), inner, piece, fua=fua,
                                        create=False, token=self._token)
                return
            except NoObject:
                if self.table[index] == mine:  # not a racing discard: the object is lost
                    raise

    async def _take_block(self, index: int, inner: int, piece: memoryview, fua: bool) -> None:
        """Build block `index` in an object of this VDI with `piece` at `inner`."""
        old = self.table[index]
        mine = self.record.ref
        target = block_oid(mine, index)
        if old and not (inner == 0 and len(piece) == self.block_size):
            base = bytearray(await self.client.read(block_oid(old, index), 0, self.block_size))
            base[inner : inner + len(piece)] = piece
            await self.client.write(target, 0, base, fua=fua, fresh=True, token=self._token)
        else:
            await self.client.write(target, inner, piece, fua=fua, fresh=True,
                                    token=self._token)
        await self._set_entry(index, mine, fua)
        if old:
            await self._release(old, index)

    async def _discard_block(self, index: int, inner: int, n: int, fua: bool) -> None:
        whole = inner == 0 and (n == self.block_size or index * self.block_size + n == self.size)
        mine = await self._claim(index, exclusive=whole)
        if mine is not None:
            await self.client.discard(block_oid(mine, index), inner, n, fua=fua,
                                      token=self._token)
            return
        try:
            old = self.table[index]
            if not old:
                return
            if not whole:  # shared with an ancestor: copy it, with zeros over the range
                await self._take_block(index, inner, memoryview(bytes(n)), fua)
                return
            await self._set_entry(index, 0, fua)
            if old == self.record.ref:
                await self.client.remove(block_oid(old, index), fua=fua, token=self._token)
            else:
                await self._release(old, index)
        finally:
            self._settle(index)

    async def _set_entry(self, index: int, ref: int, fua: bool) -> None:
        """Persist, then publish: a write that goes in place after this is already
        reachable from the table on disk."""
        await self.client.write(self.record.inode_oid, table_offset(index), pack_entry(ref),
                                fua=fua, create=False, token=self._token)
        self.table[index] = ref

    async def _release(self, old: int, index: int) -> None:
        if ref_vdi(old) == self.record.id:
            return
        try:
            await release_block(self.client, self.registry, old, index, self.record)
        except Exception as exc:  # a leftover object wastes space, never data
            log.warning("could not release block %d of VDI id %d: %s", index, ref_vdi(old), exc)
