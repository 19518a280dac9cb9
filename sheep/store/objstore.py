"""ObjectStore: one sparse file per object under DIR/obj, indexed in LMDB (DIR/meta.lmdb).

Threading model. The synchronous methods (write, read, readinto, discard, remove, ...) run on
the event loop thread: a pwrite/pread that hits the page cache is cheaper than a thread hop.
Everything that can block for long (fdatasync, the LMDB commit of the object index, the fsync
of obj/) runs in one dedicated worker thread, and is group-committed by ``flush``: a caller
that arrives while a commit runs waits for the next commit, which covers everything dirty when
it starts, so any number of concurrent flushes costs at most two commits.

State shared with the worker is handed over, never shared: a commit takes a snapshot of the
dirty set and of the pending index batch on the loop thread, and syncs duplicates (os.dup) of
the cached fds, so the loop may close or evict fds while the worker syncs them.

Every 4 KiB block of an object has an xxh3 sum in the object's sidecar file under
DIR/sum (see checksum.py for why there and how crashes are handled); reads verify them and
raise Corrupt, which the node answers by repairing the block from another replica.

Nothing is cached that the page cache caches: no object data is kept in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import stat
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sheep.errors import (
    Corrupt,
    InvalidParams,
    NoObject,
    NoSpace,
    OutOfRange,
    SheepError,
    StoreIOError,
)
from sheep.oid import DEFAULT_OBJECT_SIZE, oid_str
from sheep.store.checksum import (
    SUM_BLOCK,
    SUM_SIZE,
    bad_blocks,
    block_span,
    pack_sums,
    runs,
    unpack_sums,
)
from sheep.store.meta import NodeMeta

MAX_OID = (1 << 64) - 1

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_REPLACE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
_CHECK_CHUNK = 1 << 20  # bytes verified at a time by check_object
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _io_error(e: OSError, what: str) -> SheepError:
    if e.errno in _NO_SPACE_ERRNOS:
        return NoSpace(f"{what}: {e.strerror}")
    return StoreIOError(f"{what}: {e}")


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `offset`; what lies past the end of the (sparse) file reads as 0."""
    length = len(view)
    got = os.preadv(fd, [view], offset)
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            view[got:] = bytes(length - got)
            return
        got += n


def _dup(fd: int | None) -> int | None:
    """A duplicate for the commit worker, or None: the worker then opens it by path."""
    if fd is None:
        return None
    try:
        return os.dup(fd)
    except OSError:
        return None


def _unlink_missing_ok(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _merge_batches(
    old_new: dict[int, tuple[int, int]],
    old_drop: set[int],
    new_new: dict[int, tuple[int, int]],
    new_drop: set[int],
) -> tuple[dict[int, tuple[int, int]], set[int]]:
    """Combine two index batches, the second one later (its operations win)."""
    merged_new = {oid: v for oid, v in old_new.items() if oid not in new_drop}
    merged_new.update(new_new)
    merged_drop = (old_drop - new_new.keys()) | new_drop
    return merged_new, merged_drop


class _Job:
    """One commit: what it syncs and writes, taken from the store's state when it starts."""

    __slots__ = ("drop", "error", "fds", "finished", "new", "oids", "sync_dir")

    def __init__(
        self,
        oids: set[int],
        fds: list[tuple[int, int | None, int | None]],
        new: dict[int, tuple[int, int]],
        drop: set[int],
        sync_dir: bool,
    ) -> None:
        self.oids = oids
        self.fds = fds  # (oid, dup'ed data fd, dup'ed sums fd); None = open by path
        self.new = new
        self.drop = drop
        self.sync_dir = sync_dir
        self.error: SheepError | None = None
        self.finished = False


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
        max_open_files: int = 1024,
    ) -> None:
        if object_size <= 0:
            raise InvalidParams(f"object size {object_size} must be positive")
        if max_open_files <= 0:
            raise InvalidParams(f"max_open_files {max_open_files} must be positive")
        self.root = Path(root)
        self.object_size = object_size
        self.commits = 0  # completed group commits (for tests and stats)
        self._max_open = max_open_files
        self._objdir = str(self.root / "obj")
        self._sumdir = str(self.root / "sum")
        os.makedirs(self._objdir, exist_ok=True)
        os.makedirs(self._sumdir, exist_ok=True)
        self._dirfd = os.open(self._objdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._sumdirfd = os.open(self._sumdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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

        # group commit
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sheep-store")
        self._job: _Job | None = None
        self._running_fut: asyncio.Future[None] | None = None
        self._next_fut: asyncio.Future[None] | None = None
        self._next_full = False
        self._next_oids: set[int] = set()

        try:
            self._reconcile()
        except BaseException:
            self.meta.close()
            os.close(self._dirfd)
            os.close(self._sumdirfd)
            self._executor.shutdown()
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
                    _unlink_missing_ok(entry.path)

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
        created = False
        try:
            try:
                fd = os.open(path, _OPEN_FLAGS)
            except FileNotFoundError:
                if not create:
                    raise NoObject(f"no object {oid_str(oid)}") from None
                fd = os.open(path, _CREATE_FLAGS, 0o644)
                created = True
            try:
                blocks = 0 if created else os.fstat(fd).st_blocks
                sfd = self._open_sums(oid, fd, created)
            except OSError:
                os.close(fd)
                raise
        except OSError as e:
            raise _io_error(e, f"open object {oid_str(oid)}") from e
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
        """The object's sum file. An object without one (a crash between creating the two
        files, or an object older than checksums) gets sums of the data it holds."""
        path = self._sum_path(oid)
        if created:
            self._dir_dirty = True
            return os.open(path, _REPLACE_FLAGS, 0o644)
        try:
            return os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            pass
        building = path + ".new"
        sfd = os.open(building, _REPLACE_FLAGS, 0o644)
        try:
            size = min(-(-os.fstat(fd).st_size // SUM_BLOCK) * SUM_BLOCK, self.object_size)
            buf = bytearray(_CHECK_CHUNK)
            for start in range(0, size, _CHECK_CHUNK):
                view = memoryview(buf)[: min(_CHECK_CHUNK, size - start)]
                _pread_full(fd, view, start)
                os.pwrite(sfd, pack_sums(view), start // SUM_BLOCK * SUM_SIZE)
            os.rename(building, path)
        except OSError:
            os.close(sfd)
            raise
        self._dirty.add(oid)
        self._dir_dirty = True
        return sfd

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
        self._dirty.add(oid)
        self._stale.add(oid)
        if epoch and self._written.get(oid, 0) < epoch:
            self._note_write(oid, epoch)
        try:
            if fresh:
                os.ftruncate(fd, 0)
                os.ftruncate(self._sum_fds[oid], 0)
            view = memoryview(data).cast("B")
            sums = self._sums_after_write(oid, fd, offset, view) if n else b""
            done = os.pwrite(fd, view, offset)
            while done < n:
                done += os.pwrite(fd, view[done:], offset + done)
            if n:
                os.pwrite(self._sum_fds[oid], sums, offset // SUM_BLOCK * SUM_SIZE)
        except OSError as e:
            raise _io_error(e, f"write object {oid_str(oid)}") from e

    def _sums_after_write(self, oid: int, fd: int, offset: int, view: memoryview) -> bytes:
        """The sums the blocks a write touches will have. Blocks the write covers whole
        are summed from its bytes; a partly written block is read first and verified (a
        write must not launder rot in the rest of its block into a valid sum: Corrupt
        refuses it until the block is repaired), then patched and summed."""
        end = offset + len(view)
        first, last = offset // SUM_BLOCK, (end - 1) // SUM_BLOCK
        lo = -(-offset // SUM_BLOCK)  # blocks [lo, hi) lie wholly inside the write
        hi = last + 1 if end == self.object_size else end // SUM_BLOCK
        if hi <= lo:
            return self._patched_sums(oid, fd, first, last - first + 1, offset, view)
        head = self._patched_sums(oid, fd, first, lo - first, offset, view) if lo > first else b""
        whole = pack_sums(view[lo * SUM_BLOCK - offset :
                               min(hi * SUM_BLOCK, self.object_size) - offset])
        tail = self._patched_sums(oid, fd, hi, last + 1 - hi, offset, view) if last >= hi else b""
        return head + whole + tail

    def _patched_sums(self, oid: int, fd: int, first: int, count: int, offset: int,
                      view: memoryview) -> bytes:
        start = first * SUM_BLOCK
        old = memoryview(bytearray(min(count * SUM_BLOCK, self.object_size - start)))
        _pread_full(fd, old, start)
        self._verify(oid, old, first, count)
        lo, hi = max(offset, start), min(offset + len(view), start + len(old))
        old[lo - start : hi - start] = view[lo - offset : hi - offset]
        return pack_sums(old)

    def _sums_from_file(self, fd: int, first: int, count: int) -> bytes:
        start = first * SUM_BLOCK
        buf = bytearray(min(count * SUM_BLOCK, self.object_size - start))
        _pread_full(fd, memoryview(buf), start)
        return pack_sums(memoryview(buf))

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
        job = self._job
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
            raise _io_error(e, f"read object {oid_str(oid)}") from e
        if len(data) < end - start:
            data += bytes(end - start - len(data))
        if verify and length:
            self._verify(oid, memoryview(data), first, count)
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
                _pread_full(fd, view, offset)
                return
            first, count, start, end = block_span(offset, length, self.object_size)
            if start == offset and end == offset + length:
                _pread_full(fd, view, offset)
                self._verify(oid, view, first, count)
                return
            around = memoryview(bytearray(end - start))
            _pread_full(fd, around, start)
            self._verify(oid, around, first, count)
            view[:] = around[offset - start : offset - start + length]
        except OSError as e:
            raise _io_error(e, f"read object {oid_str(oid)}") from e

    def _fd(self, oid: int) -> int:
        fd = self._fds.get(oid)
        if fd is None:
            return self._open(oid, create=False)
        self._fds.move_to_end(oid)
        return fd

    def _verify(self, oid: int, view: memoryview, first: int, count: int) -> None:
        stored = unpack_sums(os.pread(self._sum_fds[oid], count * SUM_SIZE, first * SUM_SIZE),
                             count)
        bad = bad_blocks(view, first, stored)
        if bad:
            raise Corrupt(f"object {oid_str(oid)}: block(s) {bad} fail their checksums", bad)

    def check_object(self, oid: int) -> list[int]:
        """Every block of the object that fails its checksum (scrub)."""
        fd = self._fd(oid)
        bad: list[int] = []
        buf = memoryview(bytearray(min(_CHECK_CHUNK, self.object_size)))
        try:
            for start in range(0, self.object_size, _CHECK_CHUNK):
                view = buf[: min(_CHECK_CHUNK, self.object_size - start)]
                _pread_full(fd, view, start)
                first, count, _s, _e = block_span(start, len(view), self.object_size)
                stored = unpack_sums(
                    os.pread(self._sum_fds[oid], count * SUM_SIZE, first * SUM_SIZE), count)
                bad += bad_blocks(view, first, stored)
        except OSError as e:
            raise _io_error(e, f"check object {oid_str(oid)}") from e
        return bad

    def restamp(self, oid: int, blocks: list[int]) -> None:
        """Accept the data of `blocks` as it is: store the sums of what they hold now (when
        no replica has a block that verifies, see checksum.py)."""
        fd = self._fd(oid)
        try:
            for first, count in runs(sorted(blocks)):
                os.pwrite(self._sum_fds[oid], self._sums_from_file(fd, first, count),
                          first * SUM_SIZE)
        except OSError as e:
            raise _io_error(e, f"restamp object {oid_str(oid)}") from e
        self._dirty.add(oid)

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
            _unlink_missing_ok(self._sum_path(oid))
            os.unlink(path)
        except FileNotFoundError:
            raise NoObject(f"no object {oid_str(oid)}") from None
        except OSError as e:
            raise _io_error(e, f"remove object {oid_str(oid)}") from e
        self._used_blocks -= blocks
        self._dirty.discard(oid)
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
        self._dirty.add(oid)
        self._stale.add(oid)
        if epoch and self._written.get(oid, 0) < epoch:
            self._note_write(oid, epoch)
        try:
            self._discard_range(oid, fd, offset, length)
        except OSError as e:
            raise _io_error(e, f"discard object {oid_str(oid)}") from e

    def _discard_range(self, oid: int, fd: int, offset: int, length: int) -> None:
        """Punch the range, then re-sum its blocks: wholly discarded ones are "never
        written" (0), partly discarded ones are summed from the file."""
        try:
            _punch_hole(fd, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # no hole punching here: write zeros over the part of the range in the file
            end = min(offset + length, os.fstat(fd).st_size)
            if end > offset:
                zeros = bytes(end - offset)
                done = 0
                while done < len(zeros):
                    done += os.pwrite(fd, memoryview(zeros)[done:], offset + done)
        end = offset + length
        first, last = offset // SUM_BLOCK, (end - 1) // SUM_BLOCK
        lo = -(-offset // SUM_BLOCK)
        hi = last + 1 if end == self.object_size else end // SUM_BLOCK
        sums = bytearray((last - first + 1) * SUM_SIZE)
        for block in range(first, last + 1):
            if not lo <= block < hi:
                at = (block - first) * SUM_SIZE
                sums[at : at + SUM_SIZE] = self._sums_from_file(fd, block, 1)
        os.pwrite(self._sum_fds[oid], sums, first * SUM_SIZE)

    def list_oids(self) -> list[int]:
        """Every object of this node, ascending (index + pending creations - removals)."""
        oids = set(self.meta.list_objects())
        job = self._job
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
            if self._running_fut is not None:
                await asyncio.shield(self._running_fut)
            return
        if oids is None:
            self._next_full = True
        else:
            self._next_oids |= oids
        fut = self._next_fut
        if fut is None:
            fut = self._next_fut = asyncio.get_running_loop().create_future()
        if self._running_fut is None:
            self._start_next()
        await asyncio.shield(fut)

    def _take_job(self, full: bool, oids: set[int]) -> _Job:
        """Move what the next commit covers out of the store's state (loop thread)."""
        if full:
            take = self._dirty
            self._dirty = set()
        else:
            take = oids & self._dirty
            self._dirty -= take
        fds: list[tuple[int, int | None, int | None]] = []
        for oid in take:
            fds.append((oid, _dup(self._fds.get(oid)), _dup(self._sum_fds.get(oid))))
        job = _Job(take, fds, self._pending_new, self._pending_drop, self._dir_dirty)
        self._pending_new = {}
        self._pending_drop = set()
        self._dir_dirty = False
        return job

    def _start_next(self) -> None:
        fut = self._next_fut
        assert fut is not None and self._running_fut is None
        job = self._take_job(self._next_full, self._next_oids)
        self._next_fut = None
        self._next_full = False
        self._next_oids = set()
        self._job = job
        self._running_fut = fut
        done = fut.get_loop().run_in_executor(self._executor, self._run_job, job)
        done.add_done_callback(functools.partial(self._job_done, job, fut))

    def _job_done(self, job: _Job, fut: asyncio.Future[None], _done: asyncio.Future[None]) -> None:
        self._finish_job(job)
        if self._running_fut is fut:
            self._running_fut = None
        if not fut.done():
            if job.error is None:
                fut.set_result(None)
            else:
                fut.set_exception(job.error)
        if self._next_fut is not None and not self._closed:
            self._start_next()

    def _finish_job(self, job: _Job) -> None:
        """Retire a job (loop thread, or close); a failed job's work goes back to pending."""
        if job.finished:
            return
        job.finished = True
        if self._job is job:
            self._job = None
        if job.error is not None:
            self._dirty |= {oid for oid in job.oids if oid not in self._pending_drop}
            self._pending_new, self._pending_drop = _merge_batches(
                job.new, job.drop, self._pending_new, self._pending_drop
            )
            self._dir_dirty |= job.sync_dir

    def _run_job(self, job: _Job) -> None:
        try:
            self._commit(job)
        except SheepError as e:
            job.error = e
        except OSError as e:
            job.error = _io_error(e, "commit")
        except Exception as e:
            job.error = StoreIOError(f"commit: {e!r}")

    def _commit(self, job: _Job) -> None:
        """Sync data, then obj/, then write the index batch (worker thread, or close)."""
        first_error: OSError | None = None
        for oid, fd, sfd in job.fds:
            for path, dup in ((self._path(oid), fd), (self._sum_path(oid), sfd)):
                try:
                    if dup is None:
                        try:
                            dup = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                        except FileNotFoundError:  # removed since
                            continue
                    os.fdatasync(dup)
                except OSError as e:
                    first_error = first_error or e
                finally:
                    if dup is not None:
                        os.close(dup)
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
        self._executor.shutdown(wait=True)
        if self._job is not None:
            self._finish_job(self._job)
        job = self._take_job(True, set())
        self._run_job(job)
        job.finished = True
        waiters = self._next_fut
        self._next_fut = None
        if waiters is not None and not waiters.done():
            try:
                if job.error is None:
                    waiters.set_result(None)
                else:
                    waiters.set_exception(job.error)
            except RuntimeError:  # its loop is closed: nobody is waiting any more
                pass
        for fd in (*self._fds.values(), *self._sum_fds.values()):
            os.close(fd)
        self._fds.clear()
        self._sum_fds.clear()
        self._blocks.clear()
        os.close(self._dirfd)
        os.close(self._sumdirfd)
        self.meta.close()
        if job.error is not None:
            raise job.error

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
