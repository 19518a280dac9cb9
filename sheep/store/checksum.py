"""Per-block checksums of object data: an xxh3-64 sum for every 4 KiB block.

Sums live in a sidecar file per object (``sum/<oid>``, 8 bytes per block), beside the data
rather than in LMDB: a 4 KiB write then costs one extra 8-byte pwrite that the page cache
absorbs, and both files are made durable by the same group commit (fdatasync of each),
where an LMDB transaction per write would cost a sync of its own.

A stored 0 means "never written": the block must read as zeros. A sum that happens to be 0
is stored as 1, so the two never meet (a false match needs a 2^-64 collision anyway).

Data and sum are written one after the other, with no barrier between them, so a crash can
leave a block whose sum does not match its data (the kernel may write either page back
first, or only part of a data block). Such a torn block is told apart from rot by the
object's write-intent mark (objstore.py): an object is durably marked before its first
change after it was last synced clean, and unmarked only once synced and idle. After a
crash, the blocks of marked objects that fail their sums are torn writes, unacknowledged:
another replica's block is used if it verifies, and if none does they are accepted and
re-stamped. A mismatch anywhere else is rot (or lost writeback, see INVALID_SUM): repaired
from a replica that verifies, and an I/O error when none does. Never re-stamped.

INVALID_SUM is what an object whose fdatasync failed gets for every block it holds: the page
cache no longer vouches for the data, so no block of it verifies (nor counts as torn) until
it is rewritten from a good replica. A real sum equal to it still verifies; it only stops a
mismatch from being taken for a torn write (a 2^-64 chance).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import xxhash

SUM_BLOCK = 4096
SUM_SIZE = 8

_hash = xxhash.xxh3_64_intdigest


def block_sum(data: bytes | bytearray | memoryview) -> int:
    """The sum stored for a block with this content (never 0: 0 means never written)."""
    return _hash(data) or 1


ZERO_SUM = block_sum(bytes(SUM_BLOCK))
INVALID_SUM = (1 << 64) - 1


def pack_sums(view: memoryview) -> bytes:
    """Packed sums of consecutive blocks of `view` (the last may be short)."""
    sums = [_hash(view[i : i + SUM_BLOCK]) or 1 for i in range(0, len(view), SUM_BLOCK)]
    return struct.pack(f"<{len(sums)}Q", *sums)


def unpack_sums(raw: bytes, count: int) -> tuple[int, ...]:
    """`count` stored sums from what the sum file gave (short past its end: zeros)."""
    if len(raw) < count * SUM_SIZE:
        raw = raw + bytes(count * SUM_SIZE - len(raw))
    return struct.unpack(f"<{count}Q", raw[: count * SUM_SIZE])


def bad_blocks(view: memoryview, first: int, stored: tuple[int, ...]) -> list[int]:
    """Indexes of the blocks of `view` (block `first` onwards) that do not match `stored`."""
    got = tuple([_hash(view[i : i + SUM_BLOCK]) or 1 for i in range(0, len(view), SUM_BLOCK)])
    if got == stored:  # the common case, in one comparison
        return []
    bad = []
    for i, (have, want) in enumerate(zip(got, stored, strict=True)):
        if have != want and not (want == 0 and have == _zero_sum(len(view[i * SUM_BLOCK :
                                                                        (i + 1) * SUM_BLOCK]))):
            bad.append(first + i)
    return bad


def _zero_sum(length: int) -> int:
    return ZERO_SUM if length == SUM_BLOCK else block_sum(bytes(length))


def block_span(offset: int, length: int, object_size: int) -> tuple[int, int, int, int]:
    """(first block, block count, aligned start, aligned end) of the blocks a byte range
    touches; the end is clipped to the object."""
    first = offset // SUM_BLOCK
    last = (offset + length - 1) // SUM_BLOCK if length else first - 1
    start = first * SUM_BLOCK
    end = min((last + 1) * SUM_BLOCK, object_size)
    return first, last - first + 1, start, end


def runs(blocks: list[int]) -> Iterator[tuple[int, int]]:
    """(first block, count) of each run of consecutive block indexes (sorted input)."""
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        yield blocks[i], j - i + 1
        i = j + 1
