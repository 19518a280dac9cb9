"""Raw image import and export, thin both ways: all-zero ranges of the file are not written
(the VDI stays thin), and unallocated or all-zero ranges of the VDI become holes in the file.

"""

from __future__ import annotations

import os
from collections.abc import Callable

from sheep.errors import InvalidParams
from sheep.zeros import nonzero_runs

from .parallel import for_each
from .volume import Volume

_PARALLEL = 4

Progress = Callable[[int, int], None]


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
