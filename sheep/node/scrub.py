"""Scrub: every so often, and on demand, a node proves its replicas whole.

A pass has three steps. First the node looks for objects it owns but lacks (recovery's
listing, run again within the epoch): a replica lost outside any membership change comes
back. Then it reads every object it holds and checks every block against its checksum; a
bad block is repaired from another replica (repair.py). Last, for the objects whose primary
it is, it compares the replicas' digests: a write that failed on some replicas and not on
others (its client was told it failed) leaves replicas whole by their checksums but unlike,
and a read then answers one or the other. Those are made like the primary's copy, while
no writer can touch them: the object's VDI is locked for the copy (a snapshot's objects
never change), and one whose VDI a writer holds waits for a later pass. Reads are paced by
the same kind of bound as recovery's, so a scrub never takes the machine from client I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import xxhash

from sheep.cluster.state import NodeInfo
from sheep.cluster.view import ClusterView
from sheep.dataplane.client import PeerPool
from sheep.dataplane.wire import Flags, Opcode
from sheep.errors import Corrupt, NoObject, NotFormatted, SheepError, VdiLocked
from sheep.node.recovery import Recovery
from sheep.node.repair import Repairer
from sheep.oid import oid_str, oid_vdi
from sheep.store import ObjectStore
from sheep.vdi.registry import VdiRegistry

log = logging.getLogger(__name__)


@dataclass
class ScrubStatus:
    state: str = "idle"  # idle | listing | checking
    passes: int = 0  # passes completed since the node started
    done: int = 0  # objects checked in the current (or last) pass
    total: int = 0
    bad_blocks: int = 0  # found in the current (or last) pass
    repaired: int = 0  # of those, repaired (or accepted: see repair.py)
    started: float = 0.0  # wall-clock time of the current (or last) pass
    finished: float = 0.0
    diverged: int = 0  # objects whose replicas read differently
    reconciled: int = 0  # replicas made like the primary's copy again


@dataclass
class Replicas:
    """What a scrub needs to compare an object's replicas: who this node is, where each
    object lives, a way to the peers, and the VDI locks that keep writers away."""

    node_id: str
    view: ClusterView
    pool: PeerPool
    registry: VdiRegistry


class Scrubber:
    def __init__(self, store: ObjectStore, recovery: Recovery, repairer: Repairer,
                 replicas: Replicas, *, interval: float, throttle: int = 0) -> None:
        self.status = ScrubStatus()
        self._replicas = replicas
        self.interval = interval  # seconds between passes; 0: only on demand
        self.throttle = throttle  # bytes per second of scrub reads; 0 = unbounded
        self._store = store
        self._recovery = recovery
        self._repairer = repairer
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    def request(self) -> bool:
        """Start a pass now; False if one is running already."""
        if self.status.state != "idle":
            return False
        self._wake.set()
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval or None):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.scrub()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scrub failed")
            finally:
                self.status.state = "idle"

    async def scrub(self) -> None:
        status = self.status = ScrubStatus(state="listing", passes=self.status.passes,
                                           started=time.time())
        rescan = self._recovery.rescan()
        if rescan is not None:
            await asyncio.shield(rescan)
        status.state = "checking"
        oids = self._store.list_oids()
        status.total = len(oids)
        paced_until = time.monotonic()
        for oid in oids:
            try:
                bad, digest = self._store.scan_object(oid)
            except NoObject:  # removed since the listing
                bad, digest = [], None
            if bad:
                status.bad_blocks += len(bad)
                log.warning("scrub: object %s has %d bad block(s); repairing", oid_str(oid),
                            len(bad))
                await self._repairer.repair(oid, bad)
                status.repaired += len(bad) - len(self._store.check_object(oid))
            elif digest is not None:
                await self._compare(oid, digest)
            status.done += 1
            paced_until += self._store.object_size / self.throttle if self.throttle else 0
            await asyncio.sleep(max(0.0, paced_until - time.monotonic()))
        status.passes += 1
        status.finished = time.time()
        log.info("scrub pass %d: %d object(s), %d bad block(s), %d repaired, %d diverged, "
                 "%d replica(s) reconciled", status.passes, status.total, status.bad_blocks,
                 status.repaired, status.diverged, status.reconciled)

    # -- replicas alike ------------------------------------------------------------------

    async def _compare(self, oid: int, mine: int) -> None:
        """Make the other replicas of `oid` read like this node's (whose digest, as the
        check read it, is `mine`), if it is the primary."""
        r = self._replicas
        try:
            placed = r.view.placement(oid)
            if not placed or placed[0].node_id != r.node_id or len(placed) < 2:
                return
            if not await self._unlike(oid, mine, placed[1:]):
                return
        except (NotFormatted, NoObject, Corrupt):
            return  # not ours to judge now: recovery and repair see to it
        self.status.diverged += 1
        log.warning("scrub: the replicas of %s differ", oid_str(oid))
        async with self._quiet(oid) as quiet:
            if not quiet:
                log.info("scrub: %s is being written; reconciling it in a later pass",
                         oid_str(oid))
                return
            try:
                # read afresh: it may have changed before the lock was ours
                data = self._store.read(oid, 0, self._store.object_size)
                unlike = await self._unlike(oid, xxhash.xxh3_64_intdigest(data),
                                            r.view.placement(oid)[1:])
                for node in unlike:
                    await r.pool.call(node.data_addr, Opcode.CREATE, flags=Flags.FRESH,
                                      oid=oid, offset=0, length=len(data), payload=data,
                                      epoch=r.view.epoch)
                    self.status.reconciled += 1
                    log.warning("scrub: %s on node %s made like the primary's copy",
                                oid_str(oid), node.node_id[:8])
            except (SheepError, OSError, TimeoutError) as exc:
                log.warning("scrub: reconciling %s failed: %s", oid_str(oid), exc)

    async def _unlike(self, oid: int, mine: int, others: list[NodeInfo]) -> list[NodeInfo]:
        """The replicas among `others` whose digest is not `mine` (those that cannot
        answer now are left to their own recovery or repair)."""
        unlike = []
        for node in others:
            try:
                theirs = await self._replicas.pool.digest_replica(node.data_addr, oid)
            except (SheepError, OSError, TimeoutError):
                continue
            if theirs != mine:
                unlike.append(node)
        return unlike

    @contextlib.asynccontextmanager
    async def _quiet(self, oid: int) -> AsyncIterator[bool]:
        """True while no writer can change `oid`: its VDI's lock is ours, or it belongs to a
        snapshot (never written again); False when a writer holds the VDI (or it is gone)."""
        registry = self._replicas.registry
        record = (await registry.load()).records.get(oid_vdi(oid))
        if record is None:
            yield False
            return
        if record.snapshot:
            yield True
            return
        try:
            lock = await registry.acquire_lock(
                record.name, f"the scrub of sheep node {self._replicas.node_id[:8]}")
        except VdiLocked:
            yield False
            return
        try:
            yield True
        finally:
            await lock.release()
