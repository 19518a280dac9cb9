"""Time for unit tests: a `sheep.clock.Clock` that moves only when the test says, so the
distributed logic's rules (lease refreshes, fencing, retries, throttles) are tested without
sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable


async def settle(rounds: int = 30) -> None:
    """Let every callback and task that is ready run (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- time ---------------------------------------------------------------------------------


class _Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A `sheep.clock.Clock` whose time moves only in `advance` and `run_until`. Sleepers
    and timeouts wake in order of their deadlines, each with the loop run in between."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []  # every sleep asked for, in order
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        timer = self.call_at(self.now + seconds,
                             lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            timer.cancel()

    @contextlib.asynccontextmanager
    async def timeout(self, seconds: float | None) -> AsyncIterator[None]:
        if seconds is None:
            yield
            return
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def fire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        timer = self.call_at(self.now + seconds, fire)
        try:
            yield
        except asyncio.CancelledError:
            if fired and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            timer.cancel()

    def _next(self) -> _Timer | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][2] if self._timers else None

    async def _fire_next(self) -> None:
        _when, _seq, timer = heapq.heappop(self._timers)
        self.now = max(self.now, timer.when)
        timer.callback()
        await settle()

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking every sleeper due on the way."""
        end = self.now + seconds
        await settle()
        while (timer := self._next()) is not None and timer.when <= end:
            await self._fire_next()
        self.now = end
        await settle()

    async def run_until(self, done: Callable[[], bool], *, limit: float = 3600.0) -> None:
        """Run the loop, jumping time to the next sleeper's deadline whenever nothing else
        is ready, until `done()`. Fails after `limit` fake seconds, or 10 real seconds
        without progress (the store's commits run in a thread, in real time)."""
        end = self.now + limit
        real_deadline = time.monotonic() + 10.0
        while True:
            await settle()
            if done():
                return
            await asyncio.sleep(0.001)  # a thread's work (the store's commit) may finish
            await settle()
            if done():
                return
            timer = self._next()
            if timer is not None and timer.when <= end:
                await self._fire_next()
            elif time.monotonic() > real_deadline or (timer is not None and timer.when > end):
                raise AssertionError(f"not done after {limit} fake seconds")
