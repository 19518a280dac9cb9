"""Garbage collection: objects of deleted VDIs that a delete could not remove.

A delete removes the objects it reclaims from the replicas of the current epoch. A node
that was down at the time keeps its copies, and when it returns, recovery cannot tell them
from replicas the others lost, so it copies them back. Nothing references them; they only
take space. The registry remembers every deleted VDI id (`vdi/retired/<id>`), so a
collection can find them without guessing: an object is garbage when its VDI id is retired
and no live VDI's table references it. Ids still being created are never retired, so a VDI
whose objects are written before its record is published is never at risk.

References move only by copying a table into a newer VDI (snapshot, clone, rollback), so
the check reads the tables of the live VDIs, and repeats with the newcomers until the set of
live VDIs was the same before and after a round.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from sheep.errors import NoObject
from sheep.objclient import ObjectClient
from sheep.oid import ObjType, oid_copies, oid_index, oid_type, oid_vdi

from .inode import make_ref
from .inodes import read_table
from .reclaim import remove_objects
from .registry import RegistryState, VdiRegistry

_ROUNDS = 10


@dataclass
class GcReport:
    scanned: int = 0  # distinct objects found on the nodes
    garbage: list[int] = field(default_factory=list)  # oids of retired VDIs nobody needs
    removed: int = 0

    def by_vdi(self) -> dict[int, int]:
        """How many garbage objects each deleted VDI id left."""
        counts: dict[int, int] = {}
        for oid in self.garbage:
            counts[oid_vdi(oid)] = counts.get(oid_vdi(oid), 0) + 1
        return dict(sorted(counts.items()))

    def data_objects(self) -> int:
        return sum(oid_type(oid) == ObjType.DATA for oid in self.garbage)


async def _referenced(client: ObjectClient, state: RegistryState, candidates: set[int],
                      tables: dict[int, array]) -> set[int]:
    """The candidate data objects some live VDI of `state` references; `tables` caches the
    tables read so far, by VDI id."""
    needed: set[int] = set()
    for rec in state.records.values():
        if rec.id not in tables:
            try:
                tables[rec.id] = await read_table(client, rec)
            except NoObject:  # deleted since the registry was read: the next round sees it
                continue
        table = tables[rec.id]
        for oid in candidates:
            index = oid_index(oid)
            if index < len(table) and table[index] == make_ref(oid_vdi(oid), oid_copies(oid)):
                needed.add(oid)
    return needed


async def collect_garbage(client: ObjectClient, registry: VdiRegistry, *, dry_run: bool = False,
                          progress: Callable[[int, int], None] | None = None) -> GcReport:
    """Find (and unless `dry_run`, remove) every object of a retired VDI that no live VDI
    references."""
    stored = await client.stored_objects()
    report = GcReport(scanned=len(stored))
    state = await registry.load()
    retired = await registry.retired()
    candidates = {oid for oid in stored
                  if oid_type(oid) in (ObjType.DATA, ObjType.INODE) and oid_vdi(oid) in retired}
    data = {oid for oid in candidates if oid_type(oid) == ObjType.DATA}
    tables: dict[int, array] = {}
    needed: set[int] = set()
    for _ in range(_ROUNDS):
        needed |= await _referenced(client, state, data - needed, tables)
        after = await registry.load()
        if set(after.records) == set(state.records):
            break
        state = after
    else:
        raise RuntimeError("the VDI registry kept changing; run the collection again")
    report.garbage = sorted(candidates - needed)
    if not dry_run:
        done = 0
        for start in range(0, len(report.garbage), 256):
            batch = report.garbage[start : start + 256]
            done += await remove_objects(client, batch)
            if progress is not None:
                progress(done, len(report.garbage))
        report.removed = done
    return report
