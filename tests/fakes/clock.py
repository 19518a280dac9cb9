"""A clock that moves only when the test says so, and a `sleep` that waits for it."""

from __future__ import annotations

import asyncio
import heapq


async def settle(rounds: int = 20) -> None:
    """Let every task that can run without real time passing run (the fakes never block:
    a task's step ends at its next fake sleep)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    """Monotonic seconds, `clock()`; `sleep(s)` returns once `advance` has moved time past
    its deadline. Give `clock` and `clock.sleep` to what takes a clock and a sleep."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), self._seq, future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time on by `seconds`: each sleeper wakes at its own deadline, in order, and
        runs until it sleeps again before time moves further."""
        target = self.now + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, deadline)
            if not future.done():
                future.set_result(None)
                await settle()
        self.now = target
        await settle()
