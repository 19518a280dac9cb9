"""Recovery: after every epoch change, a node copies in the objects it now owns and lacks.

The plan for an epoch comes from the other members' object lists: every object some member
holds and the new ring places on this node, but that this node does not hold, is fetched
from a member that has it. Client I/O goes on meanwhile. An operation that reaches this node
for an object it should have but does not yet (`guard`) waits for that object's fetch, which
jumps the queue; writes to an object being fetched wait until the fetched copy is in place
and are applied on top of it, so a recovered copy never overwrites a newer write.

A copy that verifies on no source is never installed as good: each block comes from a source
where it verifies, and blocks that verify nowhere are installed condemned (reads of them
fail), counted lost, and keep the epoch from being reported finished until a source has them
good again (a torn write its node accepts, see store/checksum.py) or a client rewrites them.
Such objects are asked for again in later epochs too: a copy condemned here is not current.

A node reports each finished epoch in etcd. Once every member of the epoch has finished,
copies that the ring no longer places on this node are removed: never before, because until
then they may be the only source of some object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from dataclasses import dataclass, field
from typing import Protocol

from sheep.clock import SYSTEM, Clock
from sheep.cluster.ring import Ring
from sheep.cluster.state import EpochRecord, NodeInfo
from sheep.cluster.view import ClusterView
from sheep.dataplane.client import PeerPool
from sheep.dataplane.wire import Opcode
from sheep.errors import Corrupt, NoObject, NoSpace, SheepError
from sheep.futures import settle_when
from sheep.node.verified import fill_verified
from sheep.oid import oid_str
from sheep.store import ObjectStore
from sheep.store.checksum import SUM_BLOCK
from sheep.zeros import nonzero_runs

log = logging.getLogger(__name__)

UNVERIFIED_RETRY = 10.0  # seconds between asks for blocks that verified on no source


class RecoveryLog(Protocol):
    """Where members record the epochs they finished recovering: the part of
    EtcdCluster recovery uses."""

    async def mark_recovered(self, epoch: int, node_id: str) -> None: ...

    async def recovered_members(self, epoch: int) -> set[str]: ...


_GUARDED = frozenset({Opcode.WRITE, Opcode.CREATE, Opcode.READ, Opcode.DISCARD})


@dataclass
class RecoveryStatus:
    epoch: int = 0
    state: str = "idle"  # idle | listing | recovering | waiting | done
    done: int = 0
    total: int = 0
    bytes: int = 0
    lost: int = 0  # blocks that verified on no source (installed unreadable)
    started: float = 0.0
    finished: float = 0.0
    clock: Clock = field(default=SYSTEM, repr=False, compare=False)  # of started, finished

    @property
    def rate(self) -> float:
        """Objects per second over this epoch's recovery so far."""
        end = self.finished or self.clock.monotonic()
        return self.done / (end - self.started) if self.started and end > self.started else 0.0


class Recovery:
    """One node's recovery. `pool` reaches the other members (`call`, `read_replica`),
    `etcd` records who finished an epoch (`RecoveryLog`), `clock` paces, polls and
    retries: tests give fakes of all three."""

    def __init__(
        self,
        node_id: str,
        store: ObjectStore,
        view: ClusterView,
        pool: PeerPool,
        etcd: RecoveryLog,
        *,
        parallel: int = 4,
        throttle: int = 0,
        min_free: int = 0,
        clock: Clock = SYSTEM,
    ) -> None:
        self.node_id = node_id
        self._clock = clock
        self.status = RecoveryStatus(clock=clock)
        self._throttle = throttle  # bytes/s of recovery reads; 0 = unbounded
        self.min_free = min_free  # free bytes recovery must leave on the node
        self._store = store
        self._view = view
        self._pool = pool
        self._etcd = etcd
        self._parallel = parallel
        self._task: asyncio.Task | None = None
        self._active = False
        self._listed: asyncio.Future[None] | None = None
        self._fetch_done: asyncio.Future[None] | None = None
        # oid -> (epoch of the newest copy, members holding a copy that new)
        self._pending: dict[int, tuple[int, list[NodeInfo]]] = {}
        self._inflight: dict[int, asyncio.Future[None]] = {}
        # objects installed with blocks that verified nowhere -> the sources to ask again
        self._unverified: dict[int, list[NodeInfo]] = {}
        self._seen: EpochRecord | None = None  # the last epoch this process saw
        self._seen_ring: Ring | None = None  # and its ring
        self._may_be_stale = True  # our copies may have missed writes: wait for the plan
        self._paced_until = 0.0  # the throttle's budget, shared by every fetch of the node
        # while listing: the ring of the epoch before, and the objects that epoch had not
        # brought in yet (a copy is only known current if that ring placed it here and it
        # was not still waiting to be recovered)
        self._prev_ring: Ring | None = None
        self._unsettled: frozenset[int] = frozenset()

    @property
    def throttle(self) -> int:
        """Bytes per second of recovery reads for the whole node; 0 = unbounded."""
        return self._throttle

    @throttle.setter
    def throttle(self, bytes_per_second: int) -> None:
        self._throttle = bytes_per_second
        self._paced_until = 0.0  # a new bound starts afresh, not behind the old one's debt

    # -- lifecycle ------------------------------------------------------------------------

    def on_view(self, view: ClusterView) -> None:
        """View listener: a new epoch restarts recovery against its ring."""
        record = view.record
        if record is None or view.config is None or record.epoch == self.status.epoch:
            return
        if self._task is not None:
            self._task.cancel()
        prev, prev_ring = self._seen, self._seen_ring
        old_listed = self._listed
        prev_listed = old_listed is None or old_listed.done()
        self._seen, self._seen_ring = record, view.ring
        # continuous membership since the last epoch means no write passed this node by
        # for the objects that epoch placed here, once its plan was known
        self._may_be_stale = (prev is None or record.epoch != prev.epoch + 1
                              or prev.node(self.node_id) is None or not prev_listed)
        self._prev_ring = prev_ring
        self._unsettled = frozenset(self._pending.keys() | self._inflight.keys())
        for fetch in list(self._inflight.values()):
            fetch.cancel()  # its sources were the old epoch's: who waits on it asks again
        if record.node(self.node_id) is None:
            # not a member (lease lost while paused or cut off; it rejoins in a later
            # epoch): no part in this epoch's recovery, and above all no dropping of copies
            # by this ring, in which this node owns nothing; they may be the only ones left
            self._active = False
            self._listed = None
            self._pending = {}
            self._task = None
            self.status = RecoveryStatus(epoch=record.epoch, state="idle", clock=self._clock)
        else:
            self._begin(record.epoch)
        if old_listed is not None and not old_listed.done():
            # the old epoch's listing will never finish: who waited for it asks again
            old_listed.set_result(None)

    def rescan(self) -> asyncio.Future[None] | None:
        """Look again, within the current epoch, for objects this node owns and lacks (a
        replica lost outside any membership change): the scrub's first step. None when
        this node is not a member or the epoch's recovery is still running (it does just
        this)."""
        record = self._view.record
        if (record is None or record.node(self.node_id) is None
                or (self._task is not None and not self._task.done())):
            return None
        # nothing missed writes within one epoch: copies this node holds are current
        self._may_be_stale = False
        self._prev_ring = self._view.ring
        self._unsettled = frozenset()
        self._begin(record.epoch)
        return self._fetch_done  # not the task: that may wait long for blocks to verify

    def _begin(self, epoch: int) -> asyncio.Task:
        self._active = True
        loop = asyncio.get_running_loop()
        self._listed = loop.create_future()
        # done once every object is in, verified or not: what a scrub waits for before it
        # checks (blocks that verify nowhere may keep the task itself waiting for long)
        fetch_done = self._fetch_done = loop.create_future()
        self._pending = {}
        self.status = RecoveryStatus(epoch=epoch, state="listing",
                                     started=self._clock.monotonic(), clock=self._clock)
        self._task = asyncio.ensure_future(self._run(epoch))
        self._task.add_done_callback(lambda _t: fetch_done.done() or fetch_done.set_result(None))
        return self._task

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # -- the guard on client I/O --------------------------------------------------------

    def guard(self, oid: int, opcode: int, fresh: bool) -> asyncio.Future[None] | None:
        """None when an operation on `oid` may run now; else a future to wait for first.

        Cheap when nothing is being recovered: one attribute test. The future settles with
        the fetch but is not the fetch: a fetch is cancelled with its epoch's recovery, and
        that must not cancel the operation (it asks the guard again, or its epoch check
        refuses it)."""
        if not self._active or opcode not in _GUARDED:
            return None
        running = self._inflight.get(oid)
        if running is not None:
            return settle_when(running, outcome=False)
        if fresh:  # the write replaces the object: nothing old is worth fetching
            self._pending.pop(oid, None)
            return None
        listed = self._listed
        if listed is not None and not listed.done():
            if (not self._may_be_stale and oid not in self._unsettled
                    and self._placed_before(oid) and self._store.exists(oid)):
                return None
            return asyncio.ensure_future(self._after_listing(oid))
        if oid in self._pending:
            return settle_when(self._start_fetch(oid), outcome=False)
        return None

    def _placed_before(self, oid: int) -> bool:
        """Whether the previous epoch's ring placed `oid` on this node: a copy it did not
        place here (left from an earlier epoch, not yet dropped) missed that epoch's
        writes."""
        ring, config = self._prev_ring, self._view.config
        if ring is None or config is None:
            return False
        return ring.places_on(oid, config.copies, self.node_id)

    async def _after_listing(self, oid: int) -> None:
        assert self._listed is not None
        await asyncio.shield(self._listed)
        fut = self.guard(oid, Opcode.READ, False)
        if fut is not None:
            await fut

    # -- the epoch's work ---------------------------------------------------------------

    async def _run(self, epoch: int) -> None:
        try:
            await self._list(epoch)
            self.status.state = "recovering"
            await self._fetch_all()
            self._active = False
            fetch_done = self._fetch_done
            if fetch_done is not None and not fetch_done.done():
                fetch_done.set_result(None)
            await self._settle(epoch)
            self.status.state = "waiting"
            self.status.finished = self._clock.monotonic()
            log.info("epoch %d: recovered %d object(s)", epoch, self.status.done)
            await self._report_done(epoch)
            if not await self._wait_for_members(epoch):
                return  # a newer epoch took over; its recovery drops what is unowned
            removed = self._drop_unowned(epoch)
            self.status.state = "done"
            if removed:
                log.info("epoch %d: dropped %d copy(ies) this node no longer owns",
                         epoch, removed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recovery of epoch %d failed", epoch)
            self.status.state = "failed"

    async def _list(self, epoch: int) -> None:
        record = self._view.record
        assert record is not None
        mine = dict(self._store.list_versions())  # this node's copies as the epoch began
        newest: dict[int, tuple[int, list[NodeInfo]]] = {}
        for node in record.nodes:
            if node.node_id == self.node_id:
                continue
            for oid, written in await self._list_node(node, epoch):
                best = newest.get(oid)
                if best is None or written > best[0]:
                    newest[oid] = (written, [node])
                elif written == best[0]:
                    best[1].append(node)
        # and as they are now: the guard let writes through meanwhile (ones that replace an
        # object, ones to copies known current), and an older copy listed elsewhere must
        # not be fetched over them; a copy removed meanwhile still counts as it was, or a
        # member that has not removed its own yet would bring it back
        mine.update(self._store.list_versions())
        ring = self._view.ring
        copies = self._view.config.copies if self._view.config else 1
        for oid, (written, nodes) in newest.items():
            if mine.get(oid, -1) >= written:
                continue  # ours is as new as any
            if ring.places_on(oid, copies, self.node_id):
                self._pending[oid] = (written, nodes)
        self.status.total = len(self._pending)
        assert self._listed is not None
        self._listed.set_result(None)
        log.info("epoch %d: %d object(s) to recover", epoch, len(self._pending))

    async def _list_node(self, node: NodeInfo, epoch: int) -> list[tuple[int, int]]:
        """A member's object list; retried while the member is part of this epoch (a dead
        member leaves the epoch when its lease expires, which restarts recovery)."""
        while True:
            try:
                frame = await self._pool.call(node.data_addr, Opcode.LIST_EPOCHS)
                flat = struct.unpack(f"<{len(frame.payload) // 8}Q", frame.payload)
                return list(zip(flat[::2], flat[1::2], strict=True))
            except (SheepError, OSError, TimeoutError) as exc:
                log.info("epoch %d: cannot list %s yet (%s)", epoch, node.node_id[:8], exc)
                await self._clock.sleep(1.0)

    async def _fetch_all(self) -> None:
        async def worker() -> None:
            while self._pending:
                oid = next(iter(self._pending))
                try:
                    await self._start_fetch(oid)
                except NoSpace:
                    self.status.state = "paused (free space below the floor)"
                    await self._clock.sleep(2.0)
                    self.status.state = "recovering"
                except (SheepError, OSError) as exc:  # back in the plan (_start_fetch)
                    log.warning("recovering %s failed: %s", oid_str(oid), exc)
                    await self._clock.sleep(1.0)
                await self._pace()

        # a fetch that client I/O started and that fails goes back into the plan, maybe
        # after the workers ran out of work: they start again until nothing is left
        while self._pending or self._inflight:
            await asyncio.gather(*(worker() for _ in range(self._parallel)))
            while self._inflight:
                await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    def _start_fetch(self, oid: int) -> asyncio.Future[None]:
        running = self._inflight.get(oid)
        if running is not None:
            return running
        written, sources = self._pending.pop(oid, (0, []))
        fut = asyncio.ensure_future(self._fetch(oid, written, sources))
        self._inflight[oid] = fut

        def done(f: asyncio.Future[None]) -> None:
            self._inflight.pop(oid, None)
            if not f.cancelled() and f.exception() is not None:
                self._pending.setdefault(oid, (written, sources))  # not in yet: again

        fut.add_done_callback(done)
        return fut

    async def _fetch(self, oid: int, written: int, sources: list[NodeInfo]) -> None:
        """Fetch `oid` from one of `sources`. Given up only when every source answers that
        it has no such object (removed since it was listed): a source that fails otherwise
        may hold the only copy, and once this node reported the epoch finished the others
        drop theirs. It is asked again while the epoch lasts (a dead member leaves the
        epoch when its lease expires, which restarts recovery)."""
        while not await self._fetch_once(oid, written, sources):
            await self._clock.sleep(1.0)

    async def _fetch_once(self, oid: int, written: int, sources: list[NodeInfo]) -> bool:
        """False when a source failed and none provided the object."""
        size = self._store.object_size
        corrupt: list[NodeInfo] = []
        failed = False
        for node in sources:
            started = self._clock.monotonic()
            try:
                data = await self._pool.read_replica(node.data_addr, oid, 0, size)
            except NoObject:
                continue
            except Corrupt:
                corrupt.append(node)
                continue
            except (SheepError, OSError, TimeoutError) as exc:
                log.warning("fetching %s from %s failed: %s", oid_str(oid), node.node_id[:8],
                            exc)
                failed = True
                continue
            self._check_floor(oid, written, sources)
            await self._store.intend_now(oid)
            self._install(oid, data, written)
            self._fetched(size, started)
            return True
        if failed:
            return False  # a source not heard may hold it good: nothing is decided yet
        if corrupt:
            return await self._fetch_blockwise(oid, written, sources, corrupt)
        log.warning("no member holds object %s any more", oid_str(oid))
        return True

    async def _fetch_blockwise(self, oid: int, written: int, sources: list[NodeInfo],
                               corrupt: list[NodeInfo]) -> bool:
        """No source verifies as a whole: each block is taken from a source where it
        verifies, and one that verifies nowhere is installed condemned (reads of it fail,
        store.condemn), counted lost, and keeps the epoch from being reported finished
        (`_settle`): the sources keep their copies meanwhile, and a source's own repair
        may yet make its block good (a torn write it accepts under its own mark)."""
        size = self._store.object_size
        started = self._clock.monotonic()
        try:
            data = bytearray(await self._pool.read_replica(corrupt[0].data_addr, oid, 0, size,
                                                           raw=True))
            bad = list(range(-(-size // SUM_BLOCK)))
            for node in corrupt:
                bad = await fill_verified(self._pool, node.data_addr, oid, data, bad)
                if not bad:
                    break
        except (SheepError, OSError, TimeoutError) as exc:
            log.warning("fetching %s block by block failed: %s", oid_str(oid), exc)
            return False
        self._check_floor(oid, written, sources)
        await self._store.intend_now(oid)
        self._install(oid, data, written)
        self._store.condemn(oid, bad)
        self._fetched(size, started)
        if bad:
            log.error("object %s: block(s) %s verify on no source; installed unreadable, "
                      "the epoch is not reported finished until they verify", oid_str(oid),
                      bad)
            self.status.lost += len(bad)
            self._unverified[oid] = corrupt
        return True

    def _check_floor(self, oid: int, written: int, sources: list[NodeInfo]) -> None:
        """NoSpace (and the object back in the plan) when installing it would take the
        node below its free-space floor."""
        size = self._store.object_size
        _used, free = self._store.usage()
        if free - size < self.min_free:
            self._pending[oid] = (written, sources)  # retried when space comes back
            log.warning("not recovering %s: %d bytes free, the floor is %d",
                        oid_str(oid), free, self.min_free)
            raise NoSpace("recovery would go below the free-space floor")

    def _fetched(self, size: int, started: float) -> None:
        self.status.done += 1
        self.status.bytes += size
        self._charge(size, started)

    async def _settle(self, epoch: int) -> None:
        """Until every block installed unverified verifies: taken from a source where it
        now does, or rewritten by a client. Asked again every `UNVERIFIED_RETRY`
        seconds while the epoch lasts (a new epoch cancels this)."""
        while self._unverified:
            self.status.state = (f"verifying ({len(self._unverified)} object(s) with blocks "
                                 "that verify nowhere)")
            for oid, sources in list(self._unverified.items()):
                if await self._reverify(oid, self._with_owners(oid, sources)):
                    del self._unverified[oid]
                    log.info("epoch %d: object %s verifies again", epoch, oid_str(oid))
            if self._unverified:
                await self._clock.sleep(UNVERIFIED_RETRY)

    def _with_owners(self, oid: int, sources: list[NodeInfo]) -> list[NodeInfo]:
        """`sources` and the other owners of `oid` now (an earlier epoch's sources may
        have left since, and a block a repair made good there is as good)."""
        try:
            owners = self._view.placement(oid)
        except SheepError:
            owners = []
        ids = {n.node_id for n in sources} | {self.node_id}
        return sources + [n for n in owners if n.node_id not in ids]

    async def _reverify(self, oid: int, sources: list[NodeInfo]) -> bool:
        """True once no block of `oid` fails here (or it is gone, or no longer placed
        here: then whether it verifies is its owners' concern)."""
        config = self._view.config
        if config is not None and not self._view.ring.places_on(oid, config.copies,
                                                                self.node_id):
            return True
        try:
            bad = self._store.check_object(oid)
            for node in sources:
                if not bad:
                    break
                data = bytearray(self._store.object_size)
                try:
                    still = await fill_verified(self._pool, node.data_addr, oid, data, bad)
                except (SheepError, OSError, TimeoutError):
                    continue
                await self._store.intend_now(oid)
                # synchronously from here: a block a client rewrote meanwhile is left alone
                now_bad = set(self._store.check_object(oid))
                for block in sorted(set(bad) - set(still)):
                    if block in now_bad:
                        at = block * SUM_BLOCK
                        self._store.write(oid, at, data[at : at + SUM_BLOCK], create=False)
                bad = self._store.check_object(oid)
        except NoObject:
            return True
        return not bad

    def _install(self, oid: int, data: bytes | bytearray | memoryview, written: int) -> None:
        """Write the fetched copy sparsely (all-zero ranges stay holes), stamped with the
        epoch of the copy it came from."""
        self._store.write(oid, 0, b"", epoch=written, fresh=True)
        view = memoryview(data)
        for offset, length in nonzero_runs(view):
            self._store.write(oid, offset, view[offset : offset + length], epoch=written)

    def _charge(self, nbytes: int, started: float) -> None:
        """Count a fetch against the throttle. One budget for all the fetches of the node,
        the parallel workers' and the ones client I/O asked for: the bound is per node."""
        if self.throttle > 0:
            self._paced_until = max(self._paced_until, started) + nbytes / self.throttle

    async def _pace(self) -> None:
        """A worker waits here, between fetches, until the budget allows the next one. A
        fetch that client I/O waits for is never held back: it is only charged."""
        while self.throttle > 0:
            wait = self._paced_until - self._clock.monotonic()
            if wait <= 0:
                return
            await self._clock.sleep(min(wait, 0.5))  # a new throttle takes effect soon

    # -- after the epoch ------------------------------------------------------------------

    async def _report_done(self, epoch: int) -> None:
        await self._store.flush()
        await self._etcd.mark_recovered(epoch, self.node_id)

    async def _wait_for_members(self, epoch: int) -> bool:
        """True once every member finished `epoch`; False if the epoch moved on."""
        while True:
            record = self._view.record
            if record is None or record.epoch != epoch:
                return False
            done = await self._etcd.recovered_members(epoch)
            if all(n.node_id in done for n in record.nodes):
                return True
            await self._clock.sleep(0.5)

    def _drop_unowned(self, epoch: int) -> int:
        record = self._view.record
        if record is None or record.epoch != epoch or self._view.config is None:
            return 0
        ring = self._view.ring
        copies = self._view.config.copies
        removed = 0
        for oid in self._store.list_oids():
            if not ring.places_on(oid, copies, self.node_id):
                self._store.remove(oid)
                removed += 1
        return removed
