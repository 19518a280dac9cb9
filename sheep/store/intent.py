"""Write-intent marks (DIR/intent/<oid>): which objects may hold torn writes after a crash.

Why marks, and when the store sets and clears them, is in objstore.py. This module makes
setting them cheap: a mark must be durable before the object's first changed page can
reach the disk, which takes an fsync of the directory, and one fsync per object would put
a disk flush on the event loop at the first write to every object (recovery installs
thousands). So marks are group-committed like the store's data: every mark asked for in
the same tick (and while a batch syncs, all the ones asked for meanwhile) is created and
made durable by one directory fsync, in a worker thread of its own (a long data commit
must not hold up a first write). Whoever changes an object waits for its batch.

Clearing a mark needs no sync: a mark that survives a crash only makes the store more
lenient about that object.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
from concurrent.futures import ThreadPoolExecutor

from sheep.errors import StoreIOError
from sheep.oid import oid_str

from .fileio import io_error, unlink_missing_ok


class IntentMarks:
    """The marks of one store's objects: `marked` holds the oids whose mark is durable."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.syncs = 0  # directory fsyncs made for marks (for tests and stats)
        self.marked: set[int] = set()
        self._dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._marking: dict[int, asyncio.Future[None]] = {}  # queued or syncing now
        self._next: tuple[set[int], asyncio.Future[None]] | None = None
        self._running = False
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    def names(self) -> list[str]:
        """The names of the marks on disk (what a crash or a failed sync left)."""
        with os.scandir(self.directory) as entries:
            return [entry.name for entry in entries]

    def wait(self, oid: int) -> asyncio.Future[None] | None:
        """None when `oid`'s mark is durable; else a future done when it is (failed with
        the store's error if the sync failed). Operations on one object that wait keep
        their order: they wait on the same future. With no event loop running (a tool, a
        synchronous test) None too: the change then marks the object itself, at once."""
        fut = self._marking.get(oid)  # first: waiters of a batch just done still go first
        if fut is not None:
            return fut
        if oid in self.marked:
            return None
        if self._closed:
            raise StoreIOError("object store is closed")
        if self._next is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return None
            fut = loop.create_future()
            self._next = (set(), fut)
            fut.add_done_callback(functools.partial(self._forget, self._next[0]))
            if not self._running:
                fut.get_loop().call_soon(self._start)
        oids, fut = self._next
        oids.add(oid)
        self._marking[oid] = fut
        return fut

    async def ready(self, oid: int) -> None:
        """Until `oid`'s mark is durable (a waiter's cancellation leaves the batch be)."""
        fut = self.wait(oid)
        if fut is not None:
            await asyncio.shield(fut)

    def mark_now(self, oid: int) -> None:
        """Mark `oid` durably before returning (for callers that cannot wait: off the hot
        path, which waits for a batch instead)."""
        self._create_and_sync({oid})
        self.marked.add(oid)

    def unmark(self, oid: int) -> None:
        self.marked.discard(oid)
        unlink_missing_ok(os.path.join(self.directory, oid_str(oid)))

    def _start(self) -> None:
        if self._running or self._next is None or self._closed:
            return
        oids, fut = self._next
        self._next = None
        self._running = True
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="sheep-intent")
        done = fut.get_loop().run_in_executor(self._executor, self._create_and_sync, oids)
        done.add_done_callback(functools.partial(self._done, oids, fut))

    def _done(self, oids: set[int], fut: asyncio.Future[None],
              done: asyncio.Future[None]) -> None:
        self._running = False
        exc = done.exception()
        if exc is None:
            self.marked |= oids
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
        self._start()

    def _forget(self, oids: set[int], fut: asyncio.Future[None]) -> None:
        """The batch's first callback: its waiters (queued before this) run next, in
        order; who asks after this finds the mark done."""
        for oid in oids:
            if self._marking.get(oid) is fut:
                del self._marking[oid]

    def _create_and_sync(self, oids: set[int]) -> None:
        """Create the marks and make them durable (a worker thread, or `mark_now`)."""
        try:
            for oid in oids:
                # mknod, not open: a mark takes no descriptor, so a node at its descriptor
                # limit (which the store answers by closing cached objects, on the loop's
                # thread, not this one) can still mark what it is about to change
                with contextlib.suppress(FileExistsError):
                    os.mknod(oid_str(oid), stat.S_IFREG | 0o600, dir_fd=self._dirfd)
            os.fsync(self._dirfd)
        except OSError as e:
            raise io_error(e, f"mark {len(oids)} object(s) about to change") from e
        self.syncs += 1

    def close(self) -> None:
        """Wait for the batch syncing now; the ones still queued fail."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        queued, self._next = self._next, None
        if queued is not None and not queued[1].done():
            with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits
                queued[1].set_exception(StoreIOError("object store is closed"))
        os.close(self._dirfd)
