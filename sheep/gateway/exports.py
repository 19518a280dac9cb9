"""What a gateway exports: every VDI by name, every snapshot as NAME@TAG (read-only), and
the volumes behind them, shared by all connections to one export on this gateway.

Sharing one Volume per export is what makes multi-conn true: every connection writes
through the same owner table and the same write lock, and a flush on any connection flushes
the cluster, so what one connection flushed, another reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from sheep.errors import NoVdi
from sheep.objclient import ObjectClient
from sheep.units import format_size
from sheep.vdi.registry import HeldLease, RegistryState, VdiRegistry
from sheep.vdi.volume import Volume

from .pending import PendingVolume

log = logging.getLogger(__name__)

MAX_REQUEST = 32 << 20


@dataclass(frozen=True)
class Export:
    name: str  # as clients ask for it: NAME or NAME@TAG
    vdi: str
    tag: str | None
    size: int
    description: str
    read_only: bool
    nbd_allow: frozenset[str] | None = None  # certificate names that may attach it over NBD
    pending: bool = False  # writable, its lock to be taken over at a migration (pending.py)


def split_export(name: str) -> tuple[str, str | None]:
    vdi, sep, tag = name.partition("@")
    return vdi, (tag if sep else None)


class ExportTable:
    """A snapshot of the registry taken when a client connects, answering synchronously
    what the handshake asks. A working VDI that another process holds open for writing is
    offered read-only: readers need no lock, and a second writer must not get one; unless
    it is being handed over to this node (a VM migrating here): that one is offered
    writable, its lock taken over at its first I/O."""

    def __init__(self, state: RegistryState, held_here: set[str], node: str = "") -> None:
        self._state = state
        self._held_here = held_here
        self._node = node

    def names(self) -> list[str]:
        out = []
        for name in sorted(self._state.working):
            for rec in self._state.family(name):
                out.append(rec.label)
        return out

    def find(self, name: str) -> Export | None:
        vdi, tag = split_export(name)
        try:
            rec = self._state.lookup(vdi, tag)
        except NoVdi:
            return None
        locked_elsewhere = vdi in self._state.locks and vdi not in self._held_here
        handover = self._state.handovers.get(vdi)
        pending = (locked_elsewhere and not rec.snapshot and handover is not None
                   and bool(self._node) and handover.node == self._node)
        read_only = rec.snapshot or (locked_elsewhere and not pending)
        what = "snapshot" if rec.snapshot else "VDI"
        note = ", in use elsewhere: read-only" if read_only and not rec.snapshot else ""
        if pending:
            note = ", migrating here"
        return Export(name, vdi, tag, rec.size,
                      f"sheep {what} {rec.label}, {format_size(rec.size)}{note}", read_only,
                      self._state.nbd_allow.get(vdi), pending)


class VolumeCache:
    """Open volumes by export name and mode, with a count of the connections using each.

    The mode is part of the key: a reader that connected while another process held the
    VDI keeps its read-only volume, and a client that connects after that writer left (and
    is offered NAME writable) must get a writable volume, not share the reader's.
    """

    def __init__(self, client: ObjectClient, registry: VdiRegistry, holder: str,
                 node: str = "") -> None:
        self.client = client
        self.registry = registry
        self.holder = holder
        self.node = node  # this gateway's node id: VDIs handed over to it are writable
        self._reader = f"gateway-{uuid.uuid4().hex[:12]}"  # this cache's users key
        self._open: dict[tuple[str, bool], tuple[Volume | PendingVolume, int]] = {}
        # a read-only volume holds no lock: its record of use is what keeps a delete from
        # pulling the blocks from under its clients
        self._uses: dict[tuple[str, bool], HeldLease] = {}
        self._opening: dict[tuple[str, bool], asyncio.Future[Volume | PendingVolume]] = {}
        # closing volumes still hold their lock: a client arriving meanwhile must wait for
        # the close, not be told the VDI is in use elsewhere
        self._closing: dict[tuple[str, bool],
                            tuple[Volume | PendingVolume, asyncio.Future[None]]] = {}

    def held_writable(self) -> set[str]:
        """VDIs this gateway holds the write lock of, or is taking or giving it up. A
        pending volume holds none until it took the lock over: if its handover is called
        off, the VDI is still locked elsewhere, read-only here. Nor does a volume whose lock
        a newer holder took (a migration's source): a new client there is a reader."""
        vols = [v for v, _ in self._open.values()] + [v for v, _ in self._closing.values()]
        opening = {name for name, read_only in self._opening if not read_only}
        return {v.name for v in vols if v.holds_lock} | opening

    async def table(self) -> ExportTable:
        # Ours before or after the registry read: a close that ends during the read leaves
        # our own lock in what it returns, which must not make the VDI read-only.
        held = self.held_writable()
        state = await self.registry.load()
        return ExportTable(state, held | self.held_writable(), self.node)

    @staticmethod
    def _key(export: Export) -> tuple[str, bool]:
        return export.name, export.read_only

    async def acquire(self, export: Export) -> Volume | PendingVolume:
        key = self._key(export)
        while True:
            closing = self._closing.get(key)
            if closing is not None:
                await asyncio.shield(closing[1])
                continue
            if key in self._open:
                vol, users = self._open[key]
                self._open[key] = (vol, users + 1)
                return vol
            pending = self._opening.get(key)
            if pending is None:
                break
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
            # look again: if that open failed, another waiter may be opening by now, and
            # two opens of one key would leave two volumes under one count
        fut: asyncio.Future[Volume | PendingVolume] = asyncio.get_running_loop().create_future()
        self._opening[key] = fut
        try:
            vol = await self._open_volume(export)
            try:
                if vol.read_only:
                    self._uses[key] = await self.registry.record_use(
                        export.name, self._reader,
                        f"{self.holder} (pid {os.getpid()} on {socket.gethostname()}) for "
                        f"a read-only client")
            except BaseException:
                await vol.close()
                raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-try on their own
            raise
        finally:
            self._opening.pop(key, None)
        fut.set_result(vol)
        self._open[key] = (vol, 1)
        log.info("export %s opened %s", export.name, "read-only" if vol.read_only else
                 "for writing at the switch-over" if export.pending else "for writing")
        return vol

    async def _open_volume(self, export: Export) -> Volume | PendingVolume:
        if export.pending:
            state = await self.registry.load()
            return PendingVolume(self.client, self.registry, state.lookup(export.vdi),
                                 self.node, self.holder)
        return await Volume.open(self.client, self.registry, export.vdi, export.tag,
                                 writable=not export.read_only, holder=self.holder)

    async def release(self, export: Export) -> None:
        key = self._key(export)
        if key not in self._open:  # closed with the whole cache (the daemon is stopping)
            return
        vol, users = self._open[key]
        if users > 1:
            self._open[key] = (vol, users - 1)
            return
        del self._open[key]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing[key] = (vol, done)
        try:
            await vol.close()
            if (use := self._uses.pop(key, None)) is not None:
                await use.release()
        except Exception as exc:
            log.warning("closing export %s: %s", export.name, exc)
        finally:
            del self._closing[key]
            done.set_result(None)
        log.info("export %s closed", export.name)

    async def close(self) -> None:
        for key in list(self._open):
            vol, _ = self._open.pop(key)
            with contextlib.suppress(Exception):
                await vol.close()
        for use in self._uses.values():
            with contextlib.suppress(Exception):
                await use.release()
        self._uses.clear()
