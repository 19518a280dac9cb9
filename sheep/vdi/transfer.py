"""Raw image import and export, thin both ways: all-zero ranges of the file are not written
(the VDI stays thin), and unallocated or all-zero ranges of the VDI become holes in the file.

Zero detection works on CHUNK-sized pieces: fine enough that a sparse image's data lands in
as few bytes of objects as it has, coarse enough that the comparison is a memcmp.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from sheep.errors import InvalidParams

from .parallel import for_each
from .volume import Volume

CHUNK = 64 << 10
_PARALLEL = 4

Progress = Callable[[int, int], None]


def nonzero_runs(data: bytes | bytearray | memoryview, chunk: int = CHUNK
                 ) -> Iterator[tuple[int, int]]:
    """(offset, length) of the runs of chunks of `data` that hold a non-zero byte."""
    view = memoryview(data)
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


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Where a (possibly sparse) file has data, via SEEK_DATA/SEEK_HOLE."""
    ranges = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole from here on
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        ranges.append((start, min(end, size)))
        pos = end
    return ranges


async def import_file(volume: Volume, path: str, progress: Progress | None = None) -> int:
    """Copy the raw image at `path` into `volume`; returns the bytes written."""
    size = os.path.getsize(path)
    if size > volume.size:
        raise InvalidParams(f"{path} is {size} bytes, more than VDI {volume.name!r} "
                            f"({volume.size} bytes)")
    bs = volume.block_size
    written = 0
    done = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        data_at = _data_ranges(fd, size)

        async def block(index: int) -> None:
            nonlocal written, done
            start = index * bs
            n = min(bs, size - start)
            has_data = any(a < start + n and b > start for a, b in data_at)
            data = os.pread(fd, n, start) if has_data else b""
            if volume.table[index]:  # the VDI had data here: the file's zeros count too
                await volume.discard(start, n)
            for off, length in nonzero_runs(data):
                await volume.write(start + off, memoryview(data)[off : off + length])
                written += length
            done += n
            if progress is not None:
                progress(done, size)

        await for_each(range(-(-size // bs)), block, _PARALLEL)
        await volume.flush()
    finally:
        os.close(fd)
    return written


async def export_file(volume: Volume, path: str, progress: Progress | None = None) -> int:
    """Write `volume` to a raw image at `path`, with holes; returns the data bytes written."""
    size = volume.size
    bs = volume.block_size
    written = 0
    done = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)

        async def block(index: int) -> None:
            nonlocal written, done
            start = index * bs
            n = min(bs, size - start)
            if volume.table[index]:
                data = await volume.read(start, n)
                for off, length in nonzero_runs(data):
                    os.pwrite(fd, memoryview(data)[off : off + length], start + off)
                    written += length
            done += n
            if progress is not None:
                progress(done, size)

        await for_each(range(-(-size // bs)), block, _PARALLEL)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written
