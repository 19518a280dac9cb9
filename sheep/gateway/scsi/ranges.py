"""A first-come-first-served range lock: what makes COMPARE AND WRITE atomic.

Writes take their range shared, so they never wait for one another; COMPARE AND WRITE
takes its range exclusive, so no write can land between its read and its write. Every
request joins the queue when it arrives and waits only for earlier requests it conflicts
with: a stream of writes cannot starve a waiting COMPARE AND WRITE, and since nobody
waits for a later arrival there is no deadlock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Hold:
    start: int
    end: int
    exclusive: bool
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def conflicts(self, other: _Hold) -> bool:
        return ((self.exclusive or other.exclusive)
                and self.start < other.end and other.start < self.end)


class RangeLock:
    def __init__(self) -> None:
        self._holds: list[_Hold] = []

    @asynccontextmanager
    async def hold(self, start: int, end: int, *, exclusive: bool = False
                   ) -> AsyncIterator[None]:
        mine = _Hold(start, end, exclusive)
        earlier = [h for h in self._holds if h.conflicts(mine)]
        self._holds.append(mine)
        try:
            for other in earlier:
                await other.released.wait()
            yield
        finally:
            self._holds.remove(mine)
            mine.released.set()

    def __len__(self) -> int:
        return len(self._holds)
