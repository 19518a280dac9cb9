"""The upkeep of one object's sum file (`sum/<oid>`, see checksum.py for why sums live
there): the sums a write or a discard leaves, verification of what a read returns, and the
rebuild of a missing sum file. Functions of the object's two descriptors and its size; the
store owns the descriptors."""

from __future__ import annotations

import os

import xxhash

from sheep.errors import Corrupt
from sheep.oid import oid_str

from .checksum import SUM_BLOCK, SUM_SIZE, bad_blocks, block_span, pack_sums, unpack_sums
from .fileio import REPLACE_FLAGS, pread_full

CHECK_CHUNK = 1 << 20  # bytes summed at a time by check() and rebuild()


def whole_blocks(offset: int, end: int, object_size: int) -> tuple[int, int, int, int]:
    """(first, last, lo, hi) of the byte range [offset, end): it touches blocks first..last,
    and covers blocks [lo, hi) whole (the object's last block counts as whole when the
    range reaches the object's end)."""
    first, last = offset // SUM_BLOCK, (end - 1) // SUM_BLOCK
    lo = -(-offset // SUM_BLOCK)
    hi = last + 1 if end == object_size else end // SUM_BLOCK
    return first, last, lo, hi


def verify(oid: int, sfd: int, view: memoryview, first: int, count: int) -> None:
    """Corrupt (with the bad block indexes) unless `view`, blocks `first` onwards, matches
    its stored sums."""
    stored = unpack_sums(os.pread(sfd, count * SUM_SIZE, first * SUM_SIZE), count)
    bad = bad_blocks(view, first, stored)
    if bad:
        raise Corrupt(f"object {oid_str(oid)}: block(s) {bad} fail their checksums", bad)


def check(oid: int, fd: int, sfd: int, object_size: int) -> list[int]:
    """Every block of the object that fails its checksum."""
    return scan(fd, sfd, object_size)[0]


def scan(fd: int, sfd: int, object_size: int) -> tuple[list[int], int]:
    """(every block that fails its checksum, xxh3 of the whole object as it reads) from
    one read of the object: a scrub checks the sums and compares replicas by the digest,
    and reading 4 MiB twice per object would double its disk time."""
    bad: list[int] = []
    digest = xxhash.xxh3_64()
    buf = memoryview(bytearray(min(CHECK_CHUNK, object_size)))
    for start in range(0, object_size, CHECK_CHUNK):
        view = buf[: min(CHECK_CHUNK, object_size - start)]
        pread_full(fd, view, start)
        digest.update(view)
        first, count, _s, _e = block_span(start, len(view), object_size)
        stored = unpack_sums(os.pread(sfd, count * SUM_SIZE, first * SUM_SIZE), count)
        bad += bad_blocks(view, first, stored)
    return bad, digest.intdigest()


def from_file(fd: int, first: int, count: int, object_size: int) -> bytes:
    """Sums of what blocks first.. hold now."""
    start = first * SUM_BLOCK
    buf = bytearray(min(count * SUM_BLOCK, object_size - start))
    pread_full(fd, memoryview(buf), start)
    return pack_sums(memoryview(buf))


def rebuild(fd: int, path: str, object_size: int) -> int:
    """A sum file for an object that has none (a crash between creating the two files, or
    an object older than checksums): sums of the data it holds, built aside and renamed
    into place. Its descriptor."""
    building = path + ".new"
    sfd = os.open(building, REPLACE_FLAGS, 0o600)
    try:
        size = min(-(-os.fstat(fd).st_size // SUM_BLOCK) * SUM_BLOCK, object_size)
        buf = bytearray(CHECK_CHUNK)
        for start in range(0, size, CHECK_CHUNK):
            view = memoryview(buf)[: min(CHECK_CHUNK, size - start)]
            pread_full(fd, view, start)
            os.pwrite(sfd, pack_sums(view), start // SUM_BLOCK * SUM_SIZE)
        os.rename(building, path)
    except OSError:
        os.close(sfd)
        raise
    return sfd


def after_write(oid: int, fd: int, sfd: int, offset: int, view: memoryview,
                object_size: int) -> bytes:
    """The sums the blocks a write touches will have. Blocks the write covers whole are
    summed from its bytes; a partly written block is read first and verified (a write must
    not launder rot in the rest of its block into a valid sum: Corrupt refuses it until the
    block is repaired), then patched and summed."""
    first, last, lo, hi = whole_blocks(offset, offset + len(view), object_size)
    if hi <= lo:
        return _patched(oid, fd, sfd, first, last - first + 1, offset, view, object_size)
    head = _patched(oid, fd, sfd, first, lo - first, offset, view, object_size) \
        if lo > first else b""
    whole = pack_sums(view[lo * SUM_BLOCK - offset : min(hi * SUM_BLOCK, object_size) - offset])
    tail = _patched(oid, fd, sfd, hi, last + 1 - hi, offset, view, object_size) \
        if last >= hi else b""
    return head + whole + tail


def _patched(oid: int, fd: int, sfd: int, first: int, count: int, offset: int,
             view: memoryview, object_size: int) -> bytes:
    start = first * SUM_BLOCK
    old = memoryview(bytearray(min(count * SUM_BLOCK, object_size - start)))
    pread_full(fd, old, start)
    verify(oid, sfd, old, first, count)
    lo, hi = max(offset, start), min(offset + len(view), start + len(old))
    old[lo - start : hi - start] = view[lo - offset : hi - offset]
    return pack_sums(old)


def after_discard(fd: int, sfd: int, offset: int, length: int, object_size: int) -> None:
    """Re-sum the blocks of a discarded range: wholly discarded ones are "never written"
    (0), partly discarded ones are summed from the file."""
    first, last, lo, hi = whole_blocks(offset, offset + length, object_size)
    sums = bytearray((last - first + 1) * SUM_SIZE)
    for block in range(first, last + 1):
        if not lo <= block < hi:
            at = (block - first) * SUM_SIZE
            sums[at : at + SUM_SIZE] = from_file(fd, block, 1, object_size)
    os.pwrite(sfd, sums, first * SUM_SIZE)
