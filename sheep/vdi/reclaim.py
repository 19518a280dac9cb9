"""Reclaiming data objects that no live VDI references any more.

Owner tables are only ever copied into VDIs made later (snapshot, clone, rollback), and VDI
ids are handed out in increasing order and never reused, so the VDIs that can still
reference an object of a deleted VDI are live ones with a larger id. The parent links are
not enough to find them: deleting a VDI re-parents its children to its parent, so deleting
a root splits its children into separate trees that still share the root's objects. No live
VDI can create a new object under a deleted VDI's id: once no table references such an
object, nothing ever will again, and it can go.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from sheep.objclient import ObjectClient

from .inode import block_oid, ref_vdi
from .inodes import read_entry, read_table
from .parallel import for_each
from .registry import RegistryState, VdiRecord, VdiRegistry

_PARALLEL = 32


async def remove_objects(client: ObjectClient, oids: Iterable[int]) -> int:
    oids = list(oids)
    await for_each(oids, client.remove, _PARALLEL)
    return len(oids)


def _may_share(state: RegistryState, owners: set[int]) -> list[VdiRecord]:
    """The live VDIs whose tables may reference objects owned by `owners` (deleted VDIs)."""
    oldest = min(owners, default=0)
    return sorted((r for r in state.records.values() if r.id > oldest), key=lambda r: r.id)


async def reclaim(client: ObjectClient, registry: VdiRegistry, table: array) -> int:
    """Remove the objects `table` (of a VDI just deleted from the registry) referenced that
    no live VDI references any more. Returns how many objects were removed."""
    state = await registry.load()
    candidates = {i: ref for i, ref in enumerate(table)
                  if ref and ref_vdi(ref) not in state.records}
    for member in _may_share(state, {ref_vdi(ref) for ref in candidates.values()}):
        if not candidates:
            break
        theirs = await read_table(client, member)
        for i in [i for i in candidates if i < len(theirs) and theirs[i] == candidates[i]]:
            del candidates[i]
    return await remove_objects(client, (block_oid(ref, i) for i, ref in candidates.items()))


async def release_block(
    client: ObjectClient, registry: VdiRegistry, ref: int, index: int, holder: VdiRecord
) -> bool:
    """`holder` just stopped referencing block `index` of owner `ref` (its own table is
    already updated): remove the object if its owner was deleted and nobody else needs it."""
    if await registry.is_live(ref_vdi(ref)):
        return False
    state = await registry.load()
    for member in _may_share(state, {ref_vdi(ref)}):
        if await read_entry(client, member, index) == ref:
            return False
    await client.remove(block_oid(ref, index))
    return True
