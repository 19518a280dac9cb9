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

from sheep.errors import InvalidParams, NoObject, NoSpace, OutOfRange, SheepError, StoreIOError
from sheep.oid import oid_str
from sheep.store.meta import NodeMeta

DEFAULT_OBJECT_SIZE = 4 << 20
MAX_OID = (1 << 64) - 1

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
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
        fds: list[tuple[int, int | None]],
        new: dict[int, tuple[int, int]],
        drop: set[int],
        sync_dir: bool,
    ) -> None:
        self.oids = oids
        self.fds = fds  # (oid, dup'ed fd or None = open by path)
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
        os.makedirs(self._objdir, exist_ok=True)
        self._dirfd = os.open(self._objdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.meta = NodeMeta(self.root)
        self._closed = False

        # fd cache (LRU, oldest first) and, per cached oid, st_blocks last accounted in usage
        self._fds: OrderedDict[int, int] = OrderedDict()
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

    def set_object_size(self, n: int) -> None:
        if n <= 0:
            raise InvalidParams(f"object size {n} must be positive")
        self.object_size = n

    # -- fd cache -------------------------------------------------------------------------

    def _path(self, oid: int) -> str:
        return os.path.join(self._objdir, oid_str(oid))

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
        self._blocks[oid] = blocks
        if len(self._fds) > self._max_open:
            self._evict()
        return fd

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
            done = os.pwrite(fd, data, offset)
            if done < n:
                view = memoryview(data).cast("B")
                while done < n:
                    done += os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise _io_error(e, f"write object {oid_str(oid)}") from e

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

    def read(self, oid: int, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; never-written ranges read as zeros."""
        self._check_read(offset, length)
        fd = self._fds.get(oid)
        if fd is None:
            fd = self._open(oid, create=False)
        else:
            self._fds.move_to_end(oid)
        try:
            data = os.pread(fd, length, offset)
            if len(data) < length:
                parts = [data]
                got = len(data)
                while got < length:
                    chunk = os.pread(fd, length - got, offset + got)
                    if not chunk:  # past EOF of the sparse file
                        parts.append(bytes(length - got))
                        break
                    parts.append(chunk)
                    got += len(chunk)
                data = b"".join(parts)
        except OSError as e:
            raise _io_error(e, f"read object {oid_str(oid)}") from e
        return data

    def readinto(self, oid: int, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset`` of the object (no intermediate copy)."""
        view = buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")
        length = len(view)
        self._check_read(offset, length)
        fd = self._fds.get(oid)
        if fd is None:
            fd = self._open(oid, create=False)
        else:
            self._fds.move_to_end(oid)
        try:
            got = os.preadv(fd, [view], offset)
            while got < length:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:  # past EOF of the sparse file
                    view[got:] = bytes(length - got)
                    break
                got += n
        except OSError as e:
            raise _io_error(e, f"read object {oid_str(oid)}") from e

    def file_descriptor(self, oid: int) -> int:
        """The object's open fd, for a caller that reads it right now and in this thread
        (sendfile): it may be closed by any later store call."""
        fd = self._fds.get(oid)
        if fd is None:
            return self._open(oid, create=False)
        self._fds.move_to_end(oid)
        return fd

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
            else:
                try:
                    blocks = os.stat(path).st_blocks
                except FileNotFoundError:
                    raise NoObject(f"no object {oid_str(oid)}") from None
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
        fd = self._fds.get(oid)
        if fd is None:
            try:
                fd = self._open(oid, create=False)
            except NoObject:
                return
        else:
            self._fds.move_to_end(oid)
        self._dirty.add(oid)
        self._stale.add(oid)
        if epoch and self._written.get(oid, 0) < epoch:
            self._note_write(oid, epoch)
        try:
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
        except OSError as e:
            raise _io_error(e, f"discard object {oid_str(oid)}") from e

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
        fds: list[tuple[int, int | None]] = []
        for oid in take:
            fd = self._fds.get(oid)
            if fd is not None:
                try:
                    fd = os.dup(fd)
                except OSError:
                    fd = None  # the worker opens it by path
            fds.append((oid, fd))
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
        for oid, fd in job.fds:
            try:
                if fd is None:
                    try:
                        fd = os.open(self._path(oid), os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:  # removed since
                        continue
                os.fdatasync(fd)
            except OSError as e:
                first_error = first_error or e
            finally:
                if fd is not None:
                    os.close(fd)
        if first_error is not None:
            raise first_error
        if job.sync_dir:
            os.fsync(self._dirfd)
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
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._blocks.clear()
        os.close(self._dirfd)
        self.meta.close()
        if job.error is not None:
            raise job.error

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
