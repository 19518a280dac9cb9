"""Finding the data in a buffer that is mostly zeros, so copies of it stay sparse.

Zero detection works on CHUNK-sized pieces: fine enough that sparse data lands in as few
bytes as it has, coarse enough that each comparison is one memcmp.
"""

from __future__ import annotations

from collections.abc import Iterator

CHUNK = 64 << 10


def nonzero_runs(data: bytes | bytearray | memoryview, chunk: int = CHUNK
                 ) -> Iterator[tuple[int, int]]:
    """(offset, length) of the runs of chunks of `data` that hold a non-zero byte."""
    view = memoryview(data).cast("B")
    zero = bytes(chunk)
    start = None
    for pos in range(0, len(view), chunk):
        piece = view[pos : pos + chunk]
        empty = piece == zero[: len(piece)]
        if not empty and start is None:
            start = pos
        elif empty and start is not None:
            yield start, pos - start
            start = None
    if start is not None:
        yield start, len(view) - start
