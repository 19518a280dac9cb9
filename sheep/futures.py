"""A future that settles when another settles.

The node's guards hand an operation a future to wait on instead of the fetch or repair
itself (cancelling the waiter must not cancel the work, and the work's failure is not the
operation's), and the object client hands out a future for a local request it has not
started yet. Both are this one link between two futures.
"""

from __future__ import annotations

import asyncio
from typing import Any


def settle_when(source: asyncio.Future[Any], target: asyncio.Future[Any] | None = None, *,
                outcome: bool = True) -> asyncio.Future[Any]:
    """Settle `target` (a new future if None) once `source` is done, at once if it already
    is, and return it. With `outcome`, `target` takes `source`'s result, exception or
    cancellation; without, it ends with None however `source` ended (and `source`'s
    exception counts as retrieved: whoever runs `source` reports it). A `target` that is
    already done, i.e. cancelled by its waiter, is left alone; `source` never hears of it.
    """
    if target is None:
        target = source.get_loop().create_future()

    def settle(done: asyncio.Future[Any]) -> None:
        failure = None if done.cancelled() else done.exception()
        if target.done():
            return
        if not outcome:
            target.set_result(None)
        elif done.cancelled():
            target.cancel()
        elif failure is not None:
            target.set_exception(failure)
        else:
            target.set_result(done.result())

    if source.done():
        settle(source)
    else:
        source.add_done_callback(settle)
    return target
