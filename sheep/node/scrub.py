"""Scrub: every so often, and on demand, a node proves its replicas whole.

A pass has two steps. First the node looks for objects it owns but lacks (recovery's
listing, run again within the epoch): a replica lost outside any membership change comes
back. Then it reads every object it holds and checks every block against its checksum; a
bad block is repaired from another replica (repair.py). Reads are paced by the same kind of
bound as recovery's, so a scrub never takes the machine from client I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from sheep.errors import NoObject
from sheep.node.recovery import Recovery
from sheep.node.repair import Repairer
from sheep.oid import oid_str
from sheep.store import ObjectStore

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


class Scrubber:
    def __init__(self, store: ObjectStore, recovery: Recovery, repairer: Repairer, *,
                 interval: float, throttle: int = 0) -> None:
        self.status = ScrubStatus()
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
                bad = self._store.check_object(oid)
            except NoObject:  # removed since the listing
                bad = []
            if bad:
                status.bad_blocks += len(bad)
                log.warning("scrub: object %s has %d bad block(s); repairing", oid_str(oid),
                            len(bad))
                await self._repairer.repair(oid, bad)
                status.repaired += len(bad) - len(self._store.check_object(oid))
            status.done += 1
            paced_until += self._store.object_size / self.throttle if self.throttle else 0
            await asyncio.sleep(max(0.0, paced_until - time.monotonic()))
        status.passes += 1
        status.finished = time.time()
        log.info("scrub pass %d: %d object(s), %d bad block(s), %d repaired", status.passes,
                 status.total, status.bad_blocks, status.repaired)
