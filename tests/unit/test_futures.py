"""settle_when: the link the node's guards and the object client's local requests use."""

from __future__ import annotations

import asyncio

import pytest

from sheep.futures import settle_when


async def test_target_takes_the_outcome() -> None:
    loop = asyncio.get_running_loop()
    ok, failed, cancelled = loop.create_future(), loop.create_future(), loop.create_future()
    targets = [settle_when(f, loop.create_future()) for f in (ok, failed, cancelled)]
    ok.set_result(7)
    failed.set_exception(ValueError("x"))
    cancelled.cancel()
    await asyncio.sleep(0)
    assert targets[0].result() == 7
    with pytest.raises(ValueError):
        targets[1].result()
    assert targets[2].cancelled()


async def test_a_done_source_settles_at_once() -> None:
    source = asyncio.get_running_loop().create_future()
    source.set_result(1)
    assert settle_when(source).result() == 1


async def test_without_outcome_the_waiter_ends_with_none_and_is_not_the_work() -> None:
    loop = asyncio.get_running_loop()
    failed, running = loop.create_future(), loop.create_future()
    waiter = settle_when(failed, outcome=False)
    failed.set_exception(OSError("fetch failed"))
    await asyncio.sleep(0)
    assert waiter.result() is None
    dropped = settle_when(running, outcome=False)
    dropped.cancel()
    running.set_result(None)
    await asyncio.sleep(0)
    assert not running.cancelled()
