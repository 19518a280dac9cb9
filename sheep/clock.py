"""Time as the distributed logic sees it: one seam, so that tests can drive it.

Recovery polls, paces and retries by the clock, the object client gives up by it; in a
process that is the event loop's own time (`SYSTEM`), in unit tests a fake that moves only
when the test says (tests/unit/fakes.py). LevelDB's `Env` is the model.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (its zero means nothing)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once `seconds` have passed on this clock."""
        ...

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        """An `async with` block that raises TimeoutError once `seconds` have passed on
        this clock (None: never), as `asyncio.timeout` does."""
        ...


class SystemClock:
    """The event loop's time: what every process runs on."""

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(asyncio.sleep)
    timeout = staticmethod(asyncio.timeout)


SYSTEM: Clock = SystemClock()
