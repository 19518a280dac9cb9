"""Repair of blocks that fail their checksums, from the other replicas of the object.

A read or a partial write that meets a bad block on this node asks for a repair, and so
does the scrub. For each run of bad blocks the other owners are asked for the same range
(their reads verify, so a copy that arrives is good) and it is written over the bad one.
While an object is being repaired, client operations on it wait (`guard`), so no write can
fall between the fetch and the install; a block that a whole-block write healed meanwhile
is left alone.

If every other replica answers that its block is bad too, no good copy exists. A block that
a crash tore on this node (written when it stopped, found on open: store/checksum.py) held
an unacknowledged write, and its data is accepted as it is. Any other block is lost: it is
logged and stays bad, so reads of it fail (the gateways answer EIO / MEDIUM ERROR) and
`dog vdi check` lists it; it is never re-stamped. If some replica could not be asked at
all, nothing is decided: the operation fails and is retried.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sheep.cluster.view import ClusterView
from sheep.dataplane.client import PeerPool
from sheep.errors import Corrupt, NoObject, SheepError, StoreIOError
from sheep.futures import settle_when
from sheep.oid import oid_str
from sheep.store import ObjectStore
from sheep.store.checksum import SUM_BLOCK, runs

log = logging.getLogger(__name__)



@dataclass
class RepairStats:
    repaired: int = 0  # blocks rewritten from another replica
    accepted: int = 0  # torn blocks no replica had good: their data was kept and re-summed
    lost: int = 0  # blocks bad on every replica and not torn: read errors until rewritten
    # (each counted once, however often it is read)
    failed: int = 0  # repairs that could not ask every replica


class Repairer:
    def __init__(self, node_id: str, store: ObjectStore, view: ClusterView,
                 pool: PeerPool) -> None:
        self.node_id = node_id
        self.stats = RepairStats()
        self._store = store
        self._view = view
        self._pool = pool
        self._running: dict[int, asyncio.Future[None]] = {}
        self._lost: set[tuple[int, int]] = set()  # (oid, block) counted in stats.lost

    def guard(self, oid: int) -> asyncio.Future[None] | None:
        """None when no repair of `oid` runs; else a future done when it ends, which the
        operation may drop without cancelling the repair."""
        running = self._running.get(oid)
        if running is None:
            return None
        return settle_when(running, outcome=False)

    def repair(self, oid: int, blocks: list[int]) -> asyncio.Future[None]:
        """Start (or join) the repair of `blocks` of `oid`; the future never fails (a
        failed repair is logged and counted; the operation that asked then fails)."""
        running = self._running.get(oid)
        if running is not None:
            return self.guard(oid)  # type: ignore[return-value]
        fut = asyncio.ensure_future(self._repair(oid, sorted(set(blocks))))
        self._running[oid] = fut
        fut.add_done_callback(lambda _f: self._running.pop(oid, None))
        return self.guard(oid)  # type: ignore[return-value]

    async def _repair(self, oid: int, blocks: list[int]) -> None:
        try:
            for first, count in runs(blocks):
                await self._repair_run(oid, first, count)
            await self._store.flush([oid])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.failed += 1
            log.warning("repair of %s failed: %s", oid_str(oid), exc)

    async def _repair_run(self, oid: int, first: int, count: int) -> None:
        start = first * SUM_BLOCK
        length = min(count * SUM_BLOCK, self._store.object_size - start)
        unreachable = 0
        for node in self._peers(oid):
            try:
                data = await self._pool.read_replica(node.data_addr, oid, start, length)
            except (Corrupt, NoObject):
                continue
            except (SheepError, OSError, TimeoutError) as exc:
                log.info("repair of %s: %s did not answer (%s)", oid_str(oid),
                         node.node_id[:8], exc)
                unreachable += 1
                continue
            await self._store.intend_now(oid)
            self._install(oid, first, data)
            return
        if unreachable:
            raise StoreIOError(f"{unreachable} replica(s) of {oid_str(oid)} could not be asked")
        still_bad = self._still_bad(oid, first, count)
        if not still_bad:
            return
        accepted = self._store.accept_torn(oid, still_bad)
        if accepted:
            log.warning("object %s: block(s) %s torn by a crash mid-write and bad on every "
                        "replica; keeping this copy's (unacknowledged) data", oid_str(oid),
                        accepted)
            self.stats.accepted += len(accepted)
        lost = [b for b in still_bad if b not in accepted]
        if lost:
            new = {(oid, b) for b in lost} - self._lost
            if new:
                log.error("object %s: block(s) %s fail their checksums on every replica: "
                          "data lost, reads of them fail", oid_str(oid), lost)
                self._lost |= new
                self.stats.lost += len(new)

    def _install(self, oid: int, first: int, good: bytes | bytearray | memoryview) -> None:
        """Write the good copy over the blocks that are still bad (synchronously: no
        client operation runs in between)."""
        view = memoryview(good)
        for block in self._still_bad(oid, first, -(-len(view) // SUM_BLOCK)):
            at = (block - first) * SUM_BLOCK
            self._store.write(oid, block * SUM_BLOCK, view[at : at + SUM_BLOCK], create=False)
            self.stats.repaired += 1
        log.info("object %s: repaired from another replica", oid_str(oid))

    def _still_bad(self, oid: int, first: int, count: int) -> list[int]:
        start = first * SUM_BLOCK
        length = min(count * SUM_BLOCK, self._store.object_size - start)
        try:
            self._store.read(oid, start, length)
        except Corrupt as exc:
            return exc.blocks
        return []

    def _peers(self, oid: int) -> list:
        if not self._view.formatted or self._view.record is None:
            return []
        return [n for n in self._view.placement(oid) if n.node_id != self.node_id]
