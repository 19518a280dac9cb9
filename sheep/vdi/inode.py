"""A VDI's inode object: a fixed header and a flat owner table; pure, no I/O.

The table has one 32-bit entry per block (one data object's worth of bytes). An entry is an
*owner ref*: the id of the VDI whose data object holds that block, with that VDI's replica
count in the top bits, so the block's object id follows from the entry alone and a read never
walks a chain of parents. 0 means never written: the block reads as zeros (thin provisioning).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from sheep.oid import MAX_COPIES, MAX_VDI_ID, data_oid

HEADER_SIZE = 4096
ENTRY_SIZE = 4
MAGIC = b"SHVI"
VERSION = 1
MAX_NAME = 255
_HEADER = struct.Struct("<4sHHIIQIIddHH")
_FLAG_SNAPSHOT = 1
_COPIES_SHIFT = 24

assert sys.byteorder == "little", "owner tables are stored little-endian"


class InodeError(ValueError):
    """An inode object that does not decode: not an inode, or damaged."""


def make_ref(vdi_id: int, copies: int) -> int:
    """The owner ref of VDI `vdi_id` whose objects have `copies` replicas."""
    if not 0 < vdi_id <= MAX_VDI_ID or not 0 <= copies <= MAX_COPIES:
        raise ValueError(f"bad owner: vdi {vdi_id}, copies {copies}")
    return (copies << _COPIES_SHIFT) | vdi_id


def ref_vdi(ref: int) -> int:
    return ref & MAX_VDI_ID


def ref_copies(ref: int) -> int:
    return ref >> _COPIES_SHIFT


def block_oid(ref: int, index: int) -> int:
    """The data object that holds block `index` for owner `ref`."""
    return data_oid(ref & MAX_VDI_ID, index, ref >> _COPIES_SHIFT)


def max_blocks(object_size: int) -> int:
    """How many blocks one inode object's table can map."""
    return (object_size - HEADER_SIZE) // ENTRY_SIZE


def max_vdi_size(object_size: int) -> int:
    return max_blocks(object_size) * object_size


def blocks_for(size: int, block_size: int) -> int:
    return -(-size // block_size)


def table_offset(index: int) -> int:
    """Where entry `index` lives inside the inode object."""
    return HEADER_SIZE + ENTRY_SIZE * index


def pack_entry(ref: int) -> bytes:
    return ref.to_bytes(ENTRY_SIZE, "little")


def unpack_entry(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


@dataclass(frozen=True)
class InodeHeader:
    """What an inode says about itself; the etcd registry holds the same facts for lookups,
    the header lets an inode be identified and checked on its own."""

    vdi_id: int
    name: str
    tag: str
    parent: int
    size: int
    copies: int
    block_size: int
    created: float
    snapshot: bool = False
    snap_time: float = 0.0

    def encode(self) -> bytes:
        name = self.name.encode()
        tag = self.tag.encode()
        if len(name) > MAX_NAME or len(tag) > MAX_NAME:
            raise InodeError("name or tag longer than 255 bytes")
        head = _HEADER.pack(
            MAGIC, VERSION, _FLAG_SNAPSHOT if self.snapshot else 0, self.vdi_id, self.parent,
            self.size, self.block_size, self.copies, self.created, self.snap_time,
            len(name), len(tag),
        )
        raw = head + name + tag
        return raw + bytes(HEADER_SIZE - len(raw))

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview) -> InodeHeader:
        if len(raw) < _HEADER.size:
            raise InodeError("inode shorter than its header")
        (magic, version, flags, vdi_id, parent, size, block_size, copies, created, snap_time,
         name_len, tag_len) = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise InodeError("not an inode (bad magic)")
        if version != VERSION:
            raise InodeError(f"inode version {version} is not supported")
        start = _HEADER.size
        try:
            name = bytes(raw[start : start + name_len]).decode()
            tag = bytes(raw[start + name_len : start + name_len + tag_len]).decode()
        except UnicodeDecodeError as exc:
            raise InodeError(f"inode name does not decode: {exc}") from None
        return cls(vdi_id, name, tag, parent, size, copies, block_size, created,
                   bool(flags & _FLAG_SNAPSHOT), snap_time)


def new_table(nblocks: int) -> array:
    return array("I", bytes(ENTRY_SIZE * nblocks))


def decode_table(raw: bytes | bytearray | memoryview, nblocks: int) -> array:
    table = array("I")
    table.frombytes(bytes(raw[: ENTRY_SIZE * nblocks]))
    if len(table) < nblocks:
        table.extend([0] * (nblocks - len(table)))
    return table


def spans(offset: int, length: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Split a byte range into per-block pieces: (block index, offset in block, length,
    offset in the caller's buffer)."""
    pos = 0
    while pos < length:
        index, inner = divmod(offset + pos, block_size)
        n = min(block_size - inner, length - pos)
        yield index, inner, n, pos
        pos += n


def allocation(
    table: array, offset: int, length: int, block_size: int
) -> list[tuple[int, bool]]:
    """Runs of (length, allocated) covering [offset, offset+length): the owner table is the
    whole truth about which ranges can hold data."""
    runs: list[tuple[int, bool]] = []
    for index, _inner, n, _pos in spans(offset, length, block_size):
        allocated = index < len(table) and table[index] != 0
        if runs and runs[-1][1] == allocated:
            runs[-1] = (runs[-1][0] + n, allocated)
        else:
            runs.append((n, allocated))
    return runs
