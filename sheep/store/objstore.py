"""ObjectStore: one sparse file per object under DIR/obj, indexed in LMDB (DIR/meta.lmdb).

Threading model. The synchronous methods (write, read, readinto, discard, remove, ...) run on
the event loop thread: a pwrite/pread that hits the page cache is cheaper than a thread hop.
Everything that can block for long (fdatasync, the LMDB commit of the object index, the fsync
of obj/) runs in one dedicated worker thread, group-committed (commit.py).

State shared with the worker is handed over, never shared: a commit takes a snapshot of the
dirty set and of the pending index batch on the loop thread, and syncs duplicates (os.dup) of
the cached fds, so the loop may close or evict fds while the worker syncs them.

Every 4 KiB block of an object has an xxh3 sum in the object's sidecar file under
DIR/sum (checksum.py says why there and how crashes are handled; sumfile.py keeps it);
reads verify them and raise Corrupt, which the node answers by repairing the block from
another replica.

Write intent (how a torn write is told from rot). Data and sums reach the disk in no
particular order, so after a crash a block written since the last sync may fail its sum
without being rot. Before the first change to an object that is not marked, the store
durably creates DIR/intent/<oid> (an empty file and an fsync of the directory, one per
object per busy spell, not per write, and group-committed off the event loop: intent.py;
the data plane and recovery wait for it with `intend`). The store itself (`run_upkeep`)
syncs an object that stayed unwritten for `intent_idle` seconds and removes its mark (no
sync), whether or not any client flushes it; a clean close removes them all.
On open, the marked objects are checked: their failing blocks are `torn` (unacknowledged
writes the crash cut), which the repairer may accept when no replica has them good
(`accept_torn`). Every other failing block is rot: an error unless a replica has it good.
A failed fdatasync makes an object untrusted: every block it holds gets INVALID_SUM
(checksum.py), so reads fail and are repaired from other replicas, never accepted.

Nothing is cached that the page cache caches: no object data is kept in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import struct
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import xxhash

from sheep.clock import SYSTEM, Clock
from sheep.errors import (
    InvalidParams,
    NoObject,
    NoSpace,
    OutOfRange,
    SheepError,
    StoreIOError,
)
from sheep.fdlimit import object_cache_size
from sheep.oid import DEFAULT_OBJECT_SIZE, oid_str
from sheep.store import sumfile
from sheep.store.checksum import (
    INVALID_SUM,
    SUM_BLOCK,
    SUM_SIZE,
    block_span,
    runs,
    unpack_sums,
)
from sheep.store.commit import CommitJob, GroupCommit, merge_batches
from sheep.store.fileio import (
    CREATE_FLAGS,
    OPEN_FLAGS,
    OUT_OF_DESCRIPTORS,
    REPLACE_FLAGS,
    deallocate,
    dup_or_none,
    io_error,
    pread_full,
    private_dir,
    pwrite_full,
    syncfs,
    unlink_missing_ok,
)
from sheep.store.intent import IntentMarks
from sheep.store.meta import NodeMeta
from sheep.store.space import FULL_RATIO, Space, space_of

log = logging.getLogger(__name__)

MAX_OID = (1 << 64) - 1


class ObjectStore:
    """Objects of one node: sparse files under ``root/obj``, metadata in ``root/meta.lmdb``.

    ``meta`` is the node's NodeMeta (LMDB allows one open environment per process, so the
    daemon uses this one for node identity and the epoch log too).
    """

    def __init__(
        self,
        root: Path,
        *,
        object_size: int = DEFAULT_OBJECT_SIZE,
        max_open_files: int | None = None,
        full_ratio: float = FULL_RATIO,
        intent_idle: float = 10.0,
        clock: Clock = SYSTEM,
    ) -> None:
        if object_size <= 0:
            raise InvalidParams(f"object size {object_size} must be positive")
        if max_open_files is None:
            max_open_files = object_cache_size()
        if max_open_files <= 0:
            raise InvalidParams(f"max_open_files {max_open_files} must be positive")
        self.root = Path(root)
        self.object_size = object_size
        self.commits = 0  # completed group commits (for tests and stats)
        if not 0 < full_ratio <= 1:
            raise InvalidParams(f"full ratio {full_ratio} must be in (0, 1]")
        self.full_ratio = full_ratio
        self._max_open = max_open_files
        self._objdir = str(self.root / "obj")
        self._sumdir = str(self.root / "sum")
        private_dir(self.root)
        private_dir(Path(self._objdir))
        private_dir(Path(self._sumdir))
        self._dirfd = os.open(self._objdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._sumdirfd = os.open(self._sumdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        private_dir(self.root / "intent")
        self._intents = IntentMarks(str(self.root / "intent"))
        self.meta = NodeMeta(self.root)
        self._closed = False

        # fd cache (LRU, oldest first) and, per cached oid, st_blocks last accounted in usage
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._sum_fds: dict[int, int] = {}  # the same oids' sidecar sum files
        self._blocks: dict[int, int] = {}
        self._stale: set[int] = set()  # cached oids whose st_blocks may have changed
        self._used_blocks = 0

        # what the next commit must make durable
        self._dirty: set[int] = set()
        self._pending_new: dict[int, tuple[int, int]] = {}
        self._pending_drop: set[int] = set()
        self._dir_dirty = False
        self._written: dict[int, int] = {}  # oid -> epoch of its last write, as known

        # write intent (see the module's docstring)
        self._marked = self._intents.marked  # objects whose intent file is durable
        self._clean_since: dict[int, float] = {}  # marked, synced, unwritten since then
        self._torn: dict[int, set[int]] = {}  # blocks a crash cut mid-write (found on open)
        self._intent_idle = intent_idle
        self._clock = clock

        self._commits = GroupCommit(self._take_job, self._run_job, self._finish_job)

        try:
            self._reconcile()
            self._load_intents()
        except BaseException:
            self.meta.close()
            for fd in (*self._fds.values(), *self._sum_fds.values()):
                os.close(fd)
            os.close(self._dirfd)
            os.close(self._sumdirfd)
            self._intents.close()
            self._commits.shutdown()
            raise

    # -- open-time ------------------------------------------------------------------------

    def _reconcile(self) -> None:
        """Make the index match obj/ (a crash may fall between a create and its commit)."""
        on_disk: set[int] = set()
        used = 0
        with os.scandir(self._objdir) as entries:
            for entry in entries:
                name = entry.name
                if len(name) != 16:
                    continue
                try:
                    oid = int(name, 16)
                except ValueError:
                    continue
                if oid_str(oid) != name:
                    continue
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue
                on_disk.add(oid)
                used += st.st_blocks
        self._used_blocks = used
        indexed = set(self.meta.list_objects())
        missing = on_disk - indexed
        gone = indexed - on_disk
        if missing or gone:
            self.meta.update_objects({oid: (0, 1) for oid in missing}, gone)
        # sums whose object is gone (a crash between the two unlinks), half-built ones
        with os.scandir(self._sumdir) as entries:
            for entry in entries:
                name = entry.name
                try:
                    orphan = len(name) != 16 or int(name, 16) not in on_disk
                except ValueError:
                    orphan = True
                if orphan:
                    unlink_missing_ok(entry.path)

    def _load_intents(self) -> None:
        """The objects marked when the store last stopped (a crash, or a failed sync) may
        hold torn writes: find their failing blocks now, while nothing has changed since
        the crash. They stay marked until synced and idle (and torn until resolved)."""
        for name in self._intents.names():
            try:
                oid = int(name, 16)
                valid = oid_str(oid) == name
            except ValueError:
                valid = False
            if not valid or not self.exists(oid):
                unlink_missing_ok(os.path.join(self._intents.directory, name))
                continue
            self._marked.add(oid)
            self._dirty.add(oid)  # synced before it may be unmarked
            fd = self._fd(oid)
            sfd = self._sum_fds[oid]
            bad = sumfile.check(oid, fd, sfd, self.object_size)
            torn = {b for b in bad if self._stored_sum(sfd, b) != INVALID_SUM}
            if torn:
                self._torn[oid] = torn
                log.warning("object %s: %d block(s) written when the store stopped do not "
                            "match their sums (torn writes): %s", oid_str(oid), len(torn),
                            sorted(torn))

    @staticmethod
    def _stored_sum(sfd: int, block: int) -> int:
        return unpack_sums(os.pread(sfd, SUM_SIZE, block * SUM_SIZE), 1)[0]

    def _mark(self, oid: int) -> None:
        """Durably note that `oid` is about to change (before any of its pages may reach
        the disk), so that a crash's torn blocks are not taken for rot. Synchronous: for
        callers that did not wait for `intend` (the data plane and recovery do)."""
        self._intents.mark_now(oid)

    def intend(self, oid: int) -> asyncio.Future[None] | None:
        """None when `oid` may be changed at once; else a future done once its write-intent
        mark is durable (group-committed with the marks asked for alongside it, off the
        event loop). Who changes an object calls this first and waits."""
        return self._intents.wait(oid)

    async def intend_now(self, oid: int) -> None:
        """Until `oid` may be changed (`intend`, awaited)."""
        await self._intents.ready(oid)

    @property
    def mark_syncs(self) -> int:
        """Directory syncs made for write-intent marks so far."""
        return self._intents.syncs

    def _unmark(self, oid: int) -> None:
        """No sync: a mark that survives a crash only makes the store more lenient."""
        self._intents.unmark(oid)
        self._clean_since.pop(oid, None)

    async def tidy_intents(self) -> int:
        """Sync and unmark the objects marked and unwritten for `intent_idle` seconds (by
        the store's clock): an object no client flushes again must not keep its mark, or
        rot found in it after a crash would pass for a torn write. How many were unmarked.

        An object counts as idle from the first call that finds it unwritten, so call this
        every `intent_idle / 2` seconds or so (`run_upkeep` does)."""
        now = self._clock.monotonic()
        idle = []
        for oid in list(self._marked):
            if oid in self._torn:
                continue  # marked until resolved
            if now - self._clean_since.setdefault(oid, now) >= self._intent_idle:
                idle.append(oid)
        dirty = [oid for oid in idle if oid in self._dirty]
        if dirty:
            try:
                await self.flush(dirty)
            except SheepError as e:
                log.warning("syncing %d idle object(s) failed: %s", len(dirty), e)
                return 0
        job = self._commits.job
        syncing = job.oids if job is not None and not job.finished else set()
        unmarked = 0
        for oid in idle:
            # written, or failed to sync, since (a write drops it from _clean_since)
            if (oid in self._marked and oid in self._clean_since and oid not in self._dirty
                    and oid not in syncing and oid not in self._torn):
                self._unmark(oid)
                unmarked += 1
        return unmarked

    async def run_upkeep(self) -> None:
        """What the store does on its own while it is open: unmark idle objects."""
        period = self._intent_idle / 2 if self._intent_idle > 0 else 1.0
        while not self._closed:
            await self._clock.sleep(period)
            if self._closed:
                return
            try:
                await self.tidy_intents()
            except (OSError, SheepError) as e:  # the next round tries again
                log.warning("unmarking idle objects failed: %s", e)

    def _heal(self, oid: int, offset: int, length: int) -> None:
        """Blocks a write or discard covers whole are no longer torn."""
        torn = self._torn.get(oid)
        if torn is None:
            return
        _first, _last, lo, hi = sumfile.whole_blocks(offset, offset + length, self.object_size)
        torn.difference_update(range(lo, hi))
        if not torn:
            del self._torn[oid]

    def torn_blocks(self, oid: int) -> set[int]:
        """The blocks of `oid` found torn on open and not resolved since."""
        return set(self._torn.get(oid, ()))

    def set_object_size(self, n: int) -> None:
        if n <= 0:
            raise InvalidParams(f"object size {n} must be positive")
        self.object_size = n

    # -- fd cache -------------------------------------------------------------------------

    def _path(self, oid: int) -> str:
        return os.path.join(self._objdir, oid_str(oid))

    def _sum_path(self, oid: int) -> str:
        return os.path.join(self._sumdir, oid_str(oid))

    def _open(self, oid: int, *, create: bool, epoch: int = 0) -> int:
        """Slow path of every access: open (maybe create) the object's file and cache its fd."""
        if self._closed:
            raise StoreIOError("object store is closed")
        if not 0 <= oid <= MAX_OID:
            raise InvalidParams(f"oid {oid} out of range")
        path = self._path(oid)
        while True:
            created = False
            try:
                try:
                    fd = os.open(path, OPEN_FLAGS)
                except FileNotFoundError:
                    if not create:
                        raise NoObject(f"no object {oid_str(oid)}") from None
                    self._check_room()
                    fd = os.open(path, CREATE_FLAGS, 0o600)
                    created = True
                try:
                    blocks = 0 if created else os.fstat(fd).st_blocks
                    sfd = self._open_sums(oid, fd, created)
                except OSError:
                    os.close(fd)
                    if created:  # so that the retry creates it again, sums and all
                        unlink_missing_ok(path)
                    raise
                break
            except OSError as e:
                if e.errno in OUT_OF_DESCRIPTORS and self._shed():
                    continue
                raise io_error(e, f"open object {oid_str(oid)}") from e
        if created:
            self._pending_drop.discard(oid)
            self._pending_new[oid] = (epoch, 1)
            self._dir_dirty = True
        self._fds[oid] = fd
        self._sum_fds[oid] = sfd
        self._blocks[oid] = blocks
        if len(self._fds) > self._max_open:
            self._evict()
        return fd

    def _open_sums(self, oid: int, fd: int, created: bool) -> int:
        """The object's sum file, rebuilt from its data when it has none."""
        path = self._sum_path(oid)
        if created:
            self._dir_dirty = True
            return os.open(path, REPLACE_FLAGS, 0o600)
        try:
            return os.open(path, OPEN_FLAGS)
        except FileNotFoundError:
            pass
        sfd = sumfile.rebuild(fd, path, self.object_size)
        self._dirty.add(oid)
        self._dir_dirty = True
        return sfd

    def space(self) -> Space:
        """How full this node's filesystem is."""
        return space_of(self.root, self.full_ratio)

    def _check_room(self) -> None:
        """Past the full ratio, no new object: what is left is for overwrites, and for
        etcd when it shares the disk."""
        space = self.space()
        if space.state == "full":
            raise NoSpace(f"this node's disk is {space.ratio:.0%} full (full ratio "
                          f"{self.full_ratio:.0%}): no new objects until space is freed")

    def _shed(self) -> bool:
        """Out of descriptors: close half the cached objects (the least recently used);
        False when none is cached, and the caller's error stands."""
        if not self._fds:
            return False
        log.warning("out of file descriptors with %d objects open; closing half of them "
                    "(raise the hard limit, ulimit -Hn)", len(self._fds))
        for _ in range((len(self._fds) + 1) // 2):
            self._evict()
        self._max_open = max(1, min(self._max_open, len(self._fds)))
        return True

    def _dup(self, fd: int | None) -> int | None:
        """A duplicate for the commit worker, or None (it then opens the file by path)."""
        while True:
            try:
                return dup_or_none(fd)
            except OSError as e:
                if e.errno not in OUT_OF_DESCRIPTORS or not self._shed():
                    return None

    def _evict(self) -> None:
        # A dirty evicted object stays in self._dirty; the commit reopens it by path (the
        # kernel reports an unseen writeback error to a new opener too).
        oid, fd = self._fds.popitem(last=False)
        blocks = self._blocks.pop(oid)
        try:
            if oid in self._stale:
                self._stale.discard(oid)
                self._used_blocks += os.fstat(fd).st_blocks - blocks
        finally:
            os.close(fd)
            os.close(self._sum_fds.pop(oid))

    def _account(self) -> None:
        for oid in self._stale:
            now = os.fstat(self._fds[oid]).st_blocks
            self._used_blocks += now - self._blocks[oid]
            self._blocks[oid] = now
        self._stale.clear()

    # -- data path (event loop thread) ----------------------------------------------------

    def write(
        self,
        oid: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        epoch: int = 0,
        create: bool = True,
        fresh: bool = False,
    ) -> None:
        """Write ``data`` at ``offset`` of the object, creating it (at ``epoch``) if absent.

        With ``create=False`` a missing object raises NoObject: a replica that lost an
        object must not silently grow a sparse copy that reads as zeros elsewhere. With
        ``fresh`` an existing object is emptied first, so a partial first write of a block
        never exposes leftovers of an interrupted earlier life of the same object id.
        """
        n = len(data)
        if offset < 0 or offset + n > self.object_size:
            raise OutOfRange(f"write [{offset}, {offset + n}) of a {self.object_size}-byte object")
        fd = self._fds.get(oid)
        if fd is None:
            fd = self._open(oid, create=create, epoch=epoch)
        else:
            self._fds.move_to_end(oid)
        if oid not in self._marked:
            self._mark(oid)
        self._dirty.add(oid)
        self._clean_since.pop(oid, None)
        self._stale.add(oid)
        if epoch and self._written.get(oid, 0) < epoch:
            self._note_write(oid, epoch)
        try:
            if fresh:
                os.ftruncate(fd, 0)
                os.ftruncate(self._sum_fds[oid], 0)
                self._torn.pop(oid, None)
            if self._torn:
                self._heal(oid, offset, n)
            if n:
                view = memoryview(data).cast("B")
                sfd = self._sum_fds[oid]
                sums = sumfile.after_write(oid, fd, sfd, offset, view, self.object_size)
                pwrite_full(fd, view, offset)
                os.pwrite(sfd, sums, offset // SUM_BLOCK * SUM_SIZE)
        except OSError as e:
            raise io_error(e, f"write object {oid_str(oid)}") from e

    def _note_write(self, oid: int, epoch: int) -> None:
        """Record that `oid` changed in `epoch`: recovery compares these epochs to tell a
        replica that missed writes (its node was away) from an up-to-date one."""
        known = self._written.get(oid)
        if known is None:
            pending = self._pending_new.get(oid)
            info = pending if pending is not None else self.meta.object_info(oid)
            known = info[0] if info is not None else 0
        if epoch > known:
            self._pending_new[oid] = (epoch, 1)
            known = epoch
        self._written[oid] = known

    def list_versions(self) -> list[tuple[int, int]]:
        """(oid, epoch of its last write) for every object of this node."""
        epochs = dict(self.meta.object_epochs())
        job = self._commits.job
        if job is not None and not job.finished:
            for oid in job.drop:
                epochs.pop(oid, None)
            epochs.update((oid, e) for oid, (e, _v) in job.new.items())
        for oid in self._pending_drop:
            epochs.pop(oid, None)
        epochs.update((oid, e) for oid, (e, _v) in self._pending_new.items())
        epochs.update((oid, e) for oid, e in self._written.items() if oid in epochs)
        return sorted(epochs.items())

    def _check_read(self, offset: int, length: int) -> None:
        if length < 0:
            raise InvalidParams(f"negative length {length}")
        if offset < 0 or offset + length > self.object_size:
            raise OutOfRange(
                f"read [{offset}, {offset + length}) of a {self.object_size}-byte object"
            )

    def digest(self, oid: int) -> int:
        """xxh3 of the whole object as it reads (verified; holes as zeros): replicas that
        read alike digest alike, whatever their holes."""
        return xxhash.xxh3_64_intdigest(self.read(oid, 0, self.object_size))

    def read(self, oid: int, offset: int, length: int, *, verify: bool = True) -> bytes:
        """Exactly ``length`` bytes at ``offset``; never-written ranges read as zeros.
        Raises Corrupt when a block fails its checksum (unless ``verify`` is off)."""
        self._check_read(offset, length)
        fd = self._fd(oid)
        if verify and length:
            first, count, start, end = block_span(offset, length, self.object_size)
        else:
            start, end = offset, offset + length
        try:
            data = os.pread(fd, end - start, start)  # short only at the end of the file
        except OSError as e:
            raise io_error(e, f"read object {oid_str(oid)}") from e
        if len(data) < end - start:
            data += bytes(end - start - len(data))
        if verify and length:
            sumfile.verify(oid, self._sum_fds[oid], memoryview(data), first, count)
        if start != offset or end != offset + length:
            return data[offset - start : offset - start + length]
        return data

    def readinto(self, oid: int, offset: int, buf: memoryview, *, verify: bool = True) -> None:
        """Fill ``buf`` from ``offset`` of the object (no intermediate copy when the range
        is whole checksum blocks; otherwise the blocks around it are read to verify)."""
        view = buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")
        length = len(view)
        self._check_read(offset, length)
        fd = self._fd(oid)
        try:
            if not verify or length == 0:
                pread_full(fd, view, offset)
                return
            first, count, start, end = block_span(offset, length, self.object_size)
            if start == offset and end == offset + length:
                pread_full(fd, view, offset)
                sumfile.verify(oid, self._sum_fds[oid], view, first, count)
                return
            around = memoryview(bytearray(end - start))
            pread_full(fd, around, start)
            sumfile.verify(oid, self._sum_fds[oid], around, first, count)
            view[:] = around[offset - start : offset - start + length]
        except OSError as e:
            raise io_error(e, f"read object {oid_str(oid)}") from e

    def _fd(self, oid: int) -> int:
        fd = self._fds.get(oid)
        if fd is None:
            return self._open(oid, create=False)
        self._fds.move_to_end(oid)
        return fd

    def check_object(self, oid: int) -> list[int]:
        """Every block of the object that fails its checksum."""
        return self.scan_object(oid)[0]

    def scan_object(self, oid: int) -> tuple[list[int], int]:
        """(every block that fails its checksum, the object's `digest` as it reads, bad
        blocks and all) from one read: what a scrub needs of each object."""
        fd = self._fd(oid)
        try:
            return sumfile.scan(fd, self._sum_fds[oid], self.object_size)
        except OSError as e:
            raise io_error(e, f"check object {oid_str(oid)}") from e

    def accept_torn(self, oid: int, blocks: list[int]) -> list[int]:
        """Accept the data of those of `blocks` that a crash tore (found on open) as it
        is: store the sums of what they hold now, when no replica has a block that
        verifies (checksum.py). The blocks accepted; any other block is rot and stays bad:
        its data is never re-stamped."""
        torn = self._torn.get(oid)
        accept = sorted(b for b in blocks if torn is not None and b in torn)
        if not accept:
            return []
        fd = self._fd(oid)
        if oid not in self._marked:
            self._mark(oid)
        try:
            for first, count in runs(accept):
                os.pwrite(self._sum_fds[oid],
                          sumfile.from_file(fd, first, count, self.object_size),
                          first * SUM_SIZE)
        except OSError as e:
            raise io_error(e, f"restamp object {oid_str(oid)}") from e
        self._dirty.add(oid)
        self._clean_since.pop(oid, None)
        assert torn is not None
        torn.difference_update(accept)
        if not torn:
            del self._torn[oid]
        return accept

    def condemn(self, oid: int, blocks: list[int]) -> None:
        """Make `blocks` of `oid` fail their checksums (INVALID_SUM) whatever they hold:
        data that verified nowhere (recovery installed it as it came) is an error to read,
        never data, and never accepted as torn, until a good copy or a write replaces it."""
        if not blocks:
            return
        self._fd(oid)  # opens its sum file too
        invalid = struct.pack("<Q", INVALID_SUM)
        try:
            for block in blocks:
                os.pwrite(self._sum_fds[oid], invalid, block * SUM_SIZE)
        except OSError as e:
            raise io_error(e, f"condemn blocks of object {oid_str(oid)}") from e
        torn = self._torn.get(oid)
        if torn is not None:
            torn.difference_update(blocks)
            if not torn:
                del self._torn[oid]
        self._dirty.add(oid)
        self._clean_since.pop(oid, None)

    def _invalidate(self, oid: int, *, sync: bool = False) -> None:
        """The object's fdatasync failed: what its blocks hold is no longer known to be
        on disk, so none of them verifies until rewritten from a good replica (loop
        thread, or close: then synced at once, as no commit follows)."""
        sfd = self._sum_fds.get(oid)
        try:
            own = os.open(self._sum_path(oid), OPEN_FLAGS) if sfd is None else None
        except FileNotFoundError:  # removed since
            return
        try:
            fd = sfd if own is None else own
            count = -(-self.object_size // SUM_BLOCK)
            sums = unpack_sums(os.pread(fd, count * SUM_SIZE, 0), count)
            os.pwrite(fd, struct.pack(f"<{count}Q", *(INVALID_SUM if v else 0 for v in sums)),
                      0)
            if sync:
                os.fdatasync(fd)
        finally:
            if own is not None:
                os.close(own)
        self._torn.pop(oid, None)
        self._dirty.add(oid)
        self._clean_since.pop(oid, None)

    def exists(self, oid: int) -> bool:
        return oid in self._fds or (0 <= oid <= MAX_OID and os.path.exists(self._path(oid)))

    def remove(self, oid: int) -> None:
        """Delete the object (NoObject if absent); the index forgets it at the next commit."""
        if self._closed:
            raise StoreIOError("object store is closed")
        if not 0 <= oid <= MAX_OID:
            raise InvalidParams(f"oid {oid} out of range")
        path = self._path(oid)
        fd = self._fds.pop(oid, None)
        try:
            if fd is not None:
                blocks = self._blocks.pop(oid)  # what usage has accounted for it so far
                self._stale.discard(oid)
                os.close(fd)
                os.close(self._sum_fds.pop(oid))
            else:
                try:
                    blocks = os.stat(path).st_blocks
                except FileNotFoundError:
                    raise NoObject(f"no object {oid_str(oid)}") from None
            # sums first: a crash in between leaves data without sums, which get rebuilt
            unlink_missing_ok(self._sum_path(oid))
            os.unlink(path)
        except FileNotFoundError:
            raise NoObject(f"no object {oid_str(oid)}") from None
        except OSError as e:
            raise io_error(e, f"remove object {oid_str(oid)}") from e
        self._used_blocks -= blocks
        self._dirty.discard(oid)
        self._torn.pop(oid, None)
        if oid in self._marked:
            self._unmark(oid)
        self._pending_new.pop(oid, None)
        self._written.pop(oid, None)
        self._pending_drop.add(oid)
        self._dir_dirty = True

    def discard(self, oid: int, offset: int, length: int, *, epoch: int = 0) -> None:
        """Deallocate a range (reads back as zeros); the whole range removes the object.

        Discarding from a missing object is a no-op.
        """
        self._check_read(offset, length)
        if offset == 0 and length == self.object_size:
            with contextlib.suppress(NoObject):
                self.remove(oid)
            return
        if length == 0:
            return
        try:
            fd = self._fd(oid)
        except NoObject:
            return
        if oid not in self._marked:
            self._mark(oid)
        self._dirty.add(oid)
        self._clean_since.pop(oid, None)
        self._stale.add(oid)
        if epoch and self._written.get(oid, 0) < epoch:
            self._note_write(oid, epoch)
        if self._torn:
            self._heal(oid, offset, length)
        try:
            deallocate(fd, offset, length)
            sumfile.after_discard(fd, self._sum_fds[oid], offset, length, self.object_size)
        except OSError as e:
            raise io_error(e, f"discard object {oid_str(oid)}") from e

    def list_oids(self) -> list[int]:
        """Every object of this node, ascending (index + pending creations - removals)."""
        oids = set(self.meta.list_objects())
        job = self._commits.job
        if job is not None and not job.finished:
            oids -= job.drop
            oids.update(job.new)
        oids -= self._pending_drop
        oids.update(self._pending_new)
        return sorted(oids)

    def usage(self) -> tuple[int, int]:
        """(bytes allocated to object files, bytes free on the node's filesystem)."""
        self._account()
        st = os.statvfs(self.root)
        return self._used_blocks * 512, st.f_bavail * st.f_frsize

    # -- group commit ---------------------------------------------------------------------

    def _has_work(self, fua_oids: set[int] | None) -> bool:
        if self._pending_new or self._pending_drop or self._dir_dirty:
            return True
        if fua_oids is None:
            return bool(self._dirty)
        return not self._dirty.isdisjoint(fua_oids)

    async def flush(self, fua_oids: Iterable[int] | None = None) -> None:
        """Make durable what was written before the call: every dirty object, or only
        ``fua_oids`` when given, plus all pending index changes. Group-committed."""
        if self._closed:
            raise StoreIOError("object store is closed")
        oids = None if fua_oids is None else set(fua_oids)
        if not self._has_work(oids):
            # whatever was dirty is already covered by the commit running now, if any
            await self._commits.wait_running()
            return
        await self._commits.commit(oids)

    def _take_job(self, full: bool, oids: set[int]) -> CommitJob:
        """Move what the next commit covers out of the store's state (loop thread)."""
        if full:
            take = self._dirty
            self._dirty = set()
        else:
            take = oids & self._dirty
            self._dirty -= take
        fds: list[tuple[int, int | None, int | None]] = []
        for oid in take:
            fds.append((oid, self._dup(self._fds.get(oid)), self._dup(self._sum_fds.get(oid))))
        job = CommitJob(take, fds, self._pending_new, self._pending_drop, self._dir_dirty)
        self._pending_new = {}
        self._pending_drop = set()
        self._dir_dirty = False
        return job

    def _finish_job(self, job: CommitJob) -> None:
        """A commit is over (loop thread, or close): a failed one's work goes back to
        pending, and the objects whose sync failed are no longer trusted."""
        for oid in sorted(job.failed):
            log.error("object %s: fdatasync failed; its data is no longer trusted and must "
                      "come back from another replica", oid_str(oid))
            try:
                self._invalidate(oid, sync=self._closed)
            except (OSError, SheepError) as e:
                log.error("object %s: cannot invalidate its sums: %s", oid_str(oid), e)
        if job.error is not None:
            self._dirty |= {oid for oid in job.oids if oid not in self._pending_drop}
            self._pending_new, self._pending_drop = merge_batches(
                job.new, job.drop, self._pending_new, self._pending_drop
            )
            self._dir_dirty |= job.sync_dir

    def _run_job(self, job: CommitJob) -> None:
        try:
            self._commit(job)
        except SheepError as e:
            job.error = e
        except OSError as e:
            job.error = io_error(e, "commit")
        except Exception as e:
            job.error = StoreIOError(f"commit: {e!r}")

    def _commit(self, job: CommitJob) -> None:
        """Sync data, then obj/, then write the index batch (worker thread, or close)."""
        first_error: OSError | None = None
        unopened: set[int] = set()  # no descriptor left to open them by: synced with syncfs
        for oid, fd, sfd in job.fds:
            for path, dup in ((self._path(oid), fd), (self._sum_path(oid), sfd)):
                try:
                    if dup is None:
                        try:
                            dup = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                        except FileNotFoundError:  # removed since
                            continue
                        except OSError as e:
                            if e.errno not in OUT_OF_DESCRIPTORS:
                                raise
                            unopened.add(oid)
                            continue
                    os.fdatasync(dup)
                except OSError as e:
                    first_error = first_error or e
                    job.failed.add(oid)
                finally:
                    if dup is not None:
                        os.close(dup)
        if unopened:
            try:
                syncfs(self._dirfd)
                syncfs(self._sumdirfd)
            except OSError as e:  # it cannot say whose write failed: none of them is trusted
                first_error = first_error or e
                job.failed |= unopened
        if first_error is not None:
            raise first_error
        if job.sync_dir:
            os.fsync(self._dirfd)
            os.fsync(self._sumdirfd)
        if job.new or job.drop:
            self.meta.update_objects(job.new, job.drop)
        self.commits += 1

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> None:
        """Commit everything synchronously, then release fds and LMDB. Idempotent."""
        if self._closed:
            return
        self._closed = True
        waiters = self._commits.shutdown()
        job = self._take_job(True, set())
        self._run_job(job)
        self._finish_job(job)
        job.finished = True
        if waiters is not None and not waiters.done():
            try:
                if job.error is None:
                    waiters.set_result(None)
                else:
                    waiters.set_exception(job.error)
            except RuntimeError:  # its loop is closed: nobody is waiting any more
                pass
        if job.error is None and not self._dirty:  # everything synced: nothing is torn now
            for oid in list(self._marked):
                if oid not in self._torn:
                    self._unmark(oid)
        for fd in (*self._fds.values(), *self._sum_fds.values()):
            os.close(fd)
        self._fds.clear()
        self._sum_fds.clear()
        self._blocks.clear()
        os.close(self._dirfd)
        os.close(self._sumdirfd)
        self._intents.close()
        self.meta.close()
        if job.error is not None:
            raise job.error

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
