"""Group commit: what makes the store's writes durable, off the event loop and shared.

At most one commit runs, in one worker thread (fdatasync, the fsync of a directory and the
LMDB commit of the index all block). A flush that arrives while a commit runs waits for the
next one, which covers everything dirty when it starts, so any number of concurrent
flushes costs at most two commits. What a commit covers is taken from the store on the loop
thread when it starts (`take`), run in the worker (`run`), and retired on the loop thread
(`finish`, which gives a failed commit's work back to the store).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sheep.errors import SheepError

IndexBatch = dict[int, tuple[int, int]]  # oid -> (epoch, version) to write in the index


class CommitJob:
    """One commit: what it syncs and writes, taken from the store's state when it starts."""

    __slots__ = ("drop", "error", "failed", "fds", "finished", "new", "oids", "sync_dir")

    def __init__(self, oids: set[int], fds: list[tuple[int, int | None, int | None]],
                 new: IndexBatch, drop: set[int], sync_dir: bool) -> None:
        self.oids = oids
        self.fds = fds  # (oid, dup'ed data fd, dup'ed sums fd); None = open by path
        self.new = new
        self.drop = drop
        self.sync_dir = sync_dir
        self.error: SheepError | None = None
        self.finished = False
        self.failed: set[int] = set()  # objects whose fdatasync failed: their data is gone


def merge_batches(old_new: IndexBatch, old_drop: set[int], new_new: IndexBatch,
                  new_drop: set[int]) -> tuple[IndexBatch, set[int]]:
    """Combine two index batches, the second one later (its operations win)."""
    merged_new = {oid: v for oid, v in old_new.items() if oid not in new_drop}
    merged_new.update(new_new)
    merged_drop = (old_drop - new_new.keys()) | new_drop
    return merged_new, merged_drop


class GroupCommit:
    def __init__(self, take: Callable[[bool, set[int]], CommitJob],
                 run: Callable[[CommitJob], None], finish: Callable[[CommitJob], None]
                 ) -> None:
        self._take, self._run, self._finish = take, run, finish
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sheep-store")
        self.job: CommitJob | None = None  # the commit running now
        self._running_fut: asyncio.Future[None] | None = None
        self._next_fut: asyncio.Future[None] | None = None
        self._next_full = False
        self._next_oids: set[int] = set()
        self._closed = False

    async def wait_running(self) -> None:
        """Until the commit running now (if any) is done."""
        if self._running_fut is not None:
            await asyncio.shield(self._running_fut)

    async def commit(self, oids: set[int] | None) -> None:
        """Until a commit that started after this call is done: of everything dirty, or
        at least of `oids` when given."""
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

    def _start_next(self) -> None:
        fut = self._next_fut
        assert fut is not None and self._running_fut is None
        job = self._take(self._next_full, self._next_oids)
        self._next_fut = None
        self._next_full = False
        self._next_oids = set()
        self.job = job
        self._running_fut = fut
        done = fut.get_loop().run_in_executor(self._executor, self._run, job)
        done.add_done_callback(functools.partial(self._job_done, job, fut))

    def _job_done(self, job: CommitJob, fut: asyncio.Future[None],
                  _done: asyncio.Future[None]) -> None:
        self._retire(job)
        if self._running_fut is fut:
            self._running_fut = None
        if not fut.done():
            if job.error is None:
                fut.set_result(None)
            else:
                fut.set_exception(job.error)
        if self._next_fut is not None and not self._closed:
            self._start_next()

    def _retire(self, job: CommitJob) -> None:
        if job.finished:
            return
        self._finish(job)
        job.finished = True
        if self.job is job:
            self.job = None

    def shutdown(self) -> asyncio.Future[None] | None:
        """Wait for the running commit and retire it; no commit starts after this. The
        future of the callers waiting for the next commit, for the store to settle once it
        has committed the rest itself."""
        self._closed = True
        self._executor.shutdown(wait=True)
        if self.job is not None:
            self._retire(self.job)
        waiters, self._next_fut = self._next_fut, None
        return waiters
