"""Handing a VDI's write lock from one gateway to another at a VM's live migration.

During a live migration two QEMUs have the VDI open: the source, writing through its
node's gateway (which holds the lock), and the destination, waiting for the VM's state
through its own node's gateway. The destination's gateway must offer the export writable
(QEMU refuses a read-only disk for a writable drive) without taking the lock: the source
still writes. So the destination's supervisor first offers a handover,

    vdi/handover/<name>    {"node": <destination node id>, "token": <source lock's token>,
                            "vm": <VM name>, "ready": false}, on its lease

and the destination gateway opens the VDI *pending* (sheep/gateway/pending.py). QEMU reads
a little of a disk as it opens it, before any of the VM's state came in: those reads are
served as a reader's, from the VDI as it is at that moment. Once the whole state came in
(the source stopped the guest, drained and flushed its disks), the supervisor marks the
handover ready, and only then lets the guest run: the first I/O after that takes the lock
over (`take_over`). That breaks the source's lock (only the lock the record names: the one
whose token it holds) and takes a new one, fenced (fence.py): from then on storage nodes
refuse the source's writes, so the lock passes exactly at the switch-over and the source
can no longer write.

A handover that never happens (the migration failed) goes away with the destination
supervisor's lease; until then it lets nobody but that node's gateway take the lock over.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from sheep.cluster import kv as tx
from sheep.cluster.kv import Lease
from sheep.errors import VdiLocked
from sheep.objclient import ObjectClient

from .registry import Handover, VdiRegistry
from .volume import Volume

log = logging.getLogger(__name__)


async def lock_token(registry: VdiRegistry, name: str) -> int:
    """The token of `name`'s current lock (the revision that created it); 0: unlocked."""
    kv = await registry.kv.get(registry.lock_key(name))
    return kv.create_revision if kv is not None else 0


class NotYet(VdiLocked):
    """the switch-over has not come: the lock stays where it is"""


async def offer(registry: VdiRegistry, name: str, node: str, vm: str, lease: Lease) -> Handover:
    """Let `node`'s gateway take `name`'s lock over from its current holder once the
    handover is ready, for as long as `lease` lives."""
    handover = Handover(node, await lock_token(registry, name), vm)
    await registry.kv.put(registry.handover_key(name), handover.dump(), lease=lease)
    return handover


async def make_ready(registry: VdiRegistry, name: str, handover: Handover,
                     lease: Lease) -> None:
    """The switch-over came: the next I/O of `handover.node`'s gateway takes the lock."""
    ready = replace(handover, ready=True)
    await registry.kv.put(registry.handover_key(name), ready.dump(), lease=lease)


async def take_over(client: ObjectClient, registry: VdiRegistry, name: str, node: str,
                    holder: str) -> Volume:
    """`name` open for writing by `node`'s gateway, its lock taken over from the holder
    the handover names; NotYet before the switch-over; VdiLocked when no handover names
    `node` (it was called off), or the lock is someone else's."""
    kv = await registry.kv.get(registry.handover_key(name))
    handover = Handover.load(kv.value) if kv is not None else None
    if handover is None or handover.node != node:
        raise VdiLocked(f"VDI {name!r} is not being handed over to node {node[:12]} "
                        f"(the migration was called off)")
    if not handover.ready:
        raise NotYet(f"VDI {name!r} is still written at its migration's source")
    key = registry.lock_key(name)
    kv = await registry.kv.get(key)
    if kv is not None:
        if kv.create_revision != handover.token:
            raise VdiLocked(f"VDI {name!r} is locked by another writer than the one "
                            f"handing it over")
        if not await registry.kv.transaction(compare=[tx.mod(key) == kv.mod_revision],
                                             success=[tx.delete(key)]):
            raise VdiLocked(f"the lock on VDI {name!r} changed hands during the handover")
    volume = await Volume.open(client, registry, name, writable=True, holder=holder)
    await registry.kv.delete(registry.handover_key(name))
    log.info("VDI %s: write lock taken over (token %d, was %d) for VM %s", name,
             volume.token, handover.token, handover.vm)
    return volume
