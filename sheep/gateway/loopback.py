"""A private NBD gateway for one VDI, inside the process that needs it (dog vdi import and
export hand it to qemu-img), so a conversion needs no node started with --nbd-port.

It is the daemon's gateway (NbdConnection over a VolumeCache), on a unix socket in a
directory only this user can enter: no other local user reaches a writable VDI through
it. It offers one export under a fixed name, since VDI names may hold characters an NBD
URL would need escaped. The volume is opened before the socket exists, so a missing VDI or
a lock held elsewhere is a typed error before qemu-img runs, and the gateway's
connections share that one open volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from sheep.objclient import ObjectClient
from sheep.units import format_size
from sheep.vdi.registry import VdiRegistry
from sheep.vdi.volume import Volume

from .exports import Export, ExportTable, VolumeCache
from .nbd.server import NbdConnection

log = logging.getLogger(__name__)

EXPORT = "vdi"
_CLOSE_TIMEOUT = 30.0  # for the gateway's last connection to hand the volume back


class _OneTable(ExportTable):
    def __init__(self, export: Export) -> None:
        self._export = export

    def names(self) -> list[str]:
        return [self._export.name]

    def find(self, name: str) -> Export | None:
        return self._export if name == self._export.name else None


class _OneExport(VolumeCache):
    """A VolumeCache that offers one export, and says when the last user let go."""

    def __init__(self, client: ObjectClient, registry: VdiRegistry, holder: str,
                 export: Export) -> None:
        super().__init__(client, registry, holder)
        self.export = export
        self.closed = asyncio.Event()

    async def table(self) -> ExportTable:
        return _OneTable(self.export)

    async def release(self, export: Export) -> None:
        await super().release(export)
        if not self._open:
            self.closed.set()


@dataclass(frozen=True)
class Loopback:
    url: str  # for qemu-img: nbd+unix:///vdi?socket=PATH
    volume: Volume


@contextlib.asynccontextmanager
async def loopback_nbd(client: ObjectClient, registry: VdiRegistry, holder: str, name: str,
                       tag: str | None = None, *, writable: bool = False
                       ) -> AsyncIterator[Loopback]:
    """Serve NAME (or NAME@TAG), read-only unless `writable`, for the block.
    On leaving, waits until every connection let go of the volume, then closes it
    (flushing and releasing the lock if writable)."""
    export = Export(EXPORT, name, tag, 0, "", read_only=not writable)
    volumes = _OneExport(client, registry, holder, export)
    volume = await volumes.acquire(export)
    volumes.export = replace(export, size=volume.size,
                             description=f"sheep {volume.record.label}, "
                                         f"{format_size(volume.size)}")
    server: asyncio.Server | None = None
    home = tempfile.mkdtemp(prefix="sheep-nbd-")  # mode 0700
    try:
        path = os.path.join(home, "nbd.sock")
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: NbdConnection(volumes), path)
        yield Loopback(f"nbd+unix:///{EXPORT}?socket={path}", volume)
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(home, ignore_errors=True)
        await volumes.release(export)
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await volumes.closed.wait()
        except TimeoutError:
            log.warning("loopback gateway: a connection outlived its client; closing")
            await volumes.close()
