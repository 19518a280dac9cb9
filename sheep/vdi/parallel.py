"""Bounded fan-out for whole-VDI jobs (import, export, check, reclaim, preallocation)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def for_each(items: Iterable[T], job: Callable[[T], Awaitable[None]], parallel: int
                   ) -> None:
    """Run job(item) for every item with at most `parallel` running at once: memory stays
    bounded however many blocks a VDI has."""
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            await job(item)

    await asyncio.gather(*(worker() for _ in range(parallel)))
