"""A VDI a gateway serves writable before it holds its lock: the disk of a VM migrating to
this node (sheep/vdi/handover.py). The destination QEMU connects at its start, long before
the switch-over. The reads QEMU makes before it are a reader's: each sees the VDI as it is
then (its owner table read anew: the source is changing it). The first I/O after the
switch-over takes the lock over; a write before it is refused.

It answers what a Volume answers, for as long as a connection keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib

from sheep.objclient import ObjectClient
from sheep.vdi.handover import NotYet, take_over
from sheep.vdi.registry import VdiRecord, VdiRegistry
from sheep.vdi.volume import Volume


class PendingVolume:
    def __init__(self, client: ObjectClient, registry: VdiRegistry, record: VdiRecord,
                 node: str, holder: str) -> None:
        self.client, self.registry = client, registry
        self._record = record  # as of the connection: its size and identity
        self._node, self._holder = node, holder
        self._volume: Volume | None = None
        self._taking: asyncio.Future[Volume] | None = None

    async def _active(self) -> Volume:
        """The volume, its lock taken over by the first caller; a failed takeover is
        tried again by the next I/O (the error goes to this one's client)."""
        if self._volume is not None:
            return self._volume
        if self._taking is None:
            self._taking = asyncio.ensure_future(take_over(
                self.client, self.registry, self._record.name, self._node, self._holder))
        taking = self._taking
        try:
            self._volume = await asyncio.shield(taking)
        except BaseException:
            if self._taking is taking and taking.done():
                self._taking = None
            raise
        return self._volume

    # -- what a Volume says of itself -------------------------------------------------------

    @property
    def record(self) -> VdiRecord:
        return self._volume.record if self._volume is not None else self._record

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def block_size(self) -> int:
        return self._record.block_size

    @property
    def read_only(self) -> bool:
        return False

    @property
    def holds_lock(self) -> bool:
        """None before the takeover: a called-off handover leaves the VDI locked elsewhere."""
        return self._volume is not None and self._volume.holds_lock

    @property
    def token(self) -> int:
        return self._volume.token if self._volume is not None else 0

    # -- I/O --------------------------------------------------------------------------------

    def read_now(self, offset: int, length: int) -> bytes | bytearray | None:
        return None if self._volume is None else self._volume.read_now(offset, length)

    def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Before the takeover, all data: never a hole that is not one (a client may
        always be told that a hole holds data, never the reverse)."""
        if self._volume is None:
            return [(length, True)]
        return self._volume.block_status(offset, length)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        try:
            volume = await self._active()
        except NotYet:
            async with await Volume.open(self.client, self.registry, self.name) as reader:
                return await reader.read(offset, length)
        return await volume.read(offset, length)

    async def write(self, offset: int, data, *, fua: bool = False) -> None:
        await (await self._active()).write(offset, data, fua=fua)

    async def discard(self, offset: int, length: int, *, fua: bool = False) -> None:
        await (await self._active()).discard(offset, length, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await (await self._active()).write_zeroes(offset, length, fua=fua)

    async def flush(self) -> None:
        """A flush before the takeover has nothing of ours to flush: it takes nothing."""
        if self._volume is not None:
            await self._volume.flush()

    async def close(self) -> None:
        if self._volume is None and self._taking is not None:
            with contextlib.suppress(Exception):
                self._volume = await self._taking
        if self._volume is not None:
            await self._volume.close()
