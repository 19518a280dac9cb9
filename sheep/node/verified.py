"""The blocks of one peer's copy of an object that verify there, found with few reads.

A peer answers a read CORRUPT as a whole when any block in its range fails its checksum,
and says nothing of which. When no source of an object verifies as a whole (recovery), the
blocks that are good on some source must still be told from those good on none: the first
are data, the second are lost. Halving each range that fails costs about two reads of the
object plus a few small ones per bad block, where asking block by block would cost a
thousand requests per 4 MiB object.
"""

from __future__ import annotations

from sheep.dataplane.client import PeerPool
from sheep.errors import Corrupt
from sheep.store.checksum import SUM_BLOCK, runs


async def fill_verified(pool: PeerPool, addr: tuple[str, int], oid: int, data: bytearray,
                        blocks: list[int]) -> list[int]:
    """Read `blocks` (sorted) of `oid` from the peer at `addr`, verified, into `data` (the
    whole object); the blocks that fail there are left as they are and returned. Any other
    error of the peer (it is gone, it has no such object) is raised."""
    bad: list[int] = []
    todo = list(runs(blocks))
    while todo:
        first, count = todo.pop()
        start = first * SUM_BLOCK
        length = min(count * SUM_BLOCK, len(data) - start)
        try:
            got = await pool.read_replica(addr, oid, start, length)
        except Corrupt:
            if count == 1:
                bad.append(first)
            else:
                half = count // 2
                todo += [(first + half, count - half), (first, half)]
            continue
        data[start : start + length] = got
    return sorted(bad)
