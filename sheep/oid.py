"""Object ids: 64 bits = 4 copies bits | 4 type bits | 24-bit VDI id | 32-bit object index.

Placement hashes the whole id, so an object's replicas depend on nothing but its id. The
copies nibble carries a VDI's own replica count (0 = the cluster's default), so every node
and client places, writes and recovers an object without looking its VDI up.
"""

from __future__ import annotations

from enum import IntEnum

from sheep.errors import InvalidParams

VDI_BITS = 24
INDEX_BITS = 32
TYPE_SHIFT = VDI_BITS + INDEX_BITS
COPIES_SHIFT = TYPE_SHIFT + 4
MAX_VDI_ID = (1 << VDI_BITS) - 1
MAX_INDEX = (1 << INDEX_BITS) - 1
MAX_COPIES = 15  # the copies nibble: a cluster (or VDI) cannot ask for more

DEFAULT_OBJECT_SIZE = 4 << 20
MIN_OBJECT_SIZE = 64 << 10
MAX_OBJECT_SIZE = 64 << 20  # also the data plane's largest payload


def validate_copies(copies: int) -> int:
    """A replica count an object id can carry: the one limit for clusters and VDIs."""
    if not 1 <= copies <= MAX_COPIES:
        raise InvalidParams(f"copies must be 1..{MAX_COPIES}, not {copies}")
    return copies


def validate_object_size(size: int) -> int:
    if not MIN_OBJECT_SIZE <= size <= MAX_OBJECT_SIZE or size & (size - 1):
        raise InvalidParams(f"object size must be a power of two from {MIN_OBJECT_SIZE} to "
                            f"{MAX_OBJECT_SIZE} bytes, not {size}")
    return size


class ObjType(IntEnum):
    DATA = 0
    INODE = 1
    VDI_ATTR = 2


def make_oid(kind: ObjType, vdi_id: int, index: int = 0, copies: int = 0) -> int:
    if not 0 <= vdi_id <= MAX_VDI_ID:
        raise ValueError(f"VDI id {vdi_id} out of range")
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"object index {index} out of range")
    if not 0 <= copies <= MAX_COPIES:
        raise ValueError(f"copies {copies} out of range (0..{MAX_COPIES})")
    return (copies << COPIES_SHIFT) | (int(kind) << TYPE_SHIFT) | (vdi_id << INDEX_BITS) | index


def data_oid(vdi_id: int, index: int, copies: int = 0) -> int:
    return make_oid(ObjType.DATA, vdi_id, index, copies)


def inode_oid(vdi_id: int, copies: int = 0) -> int:
    return make_oid(ObjType.INODE, vdi_id, 0, copies)


def oid_type(oid: int) -> ObjType:
    return ObjType((oid >> TYPE_SHIFT) & 0xF)


def oid_copies(oid: int) -> int:
    """The object's own replica count; 0 means the cluster's default."""
    return oid >> COPIES_SHIFT


def oid_vdi(oid: int) -> int:
    return (oid >> INDEX_BITS) & MAX_VDI_ID


def oid_index(oid: int) -> int:
    return oid & MAX_INDEX


def oid_str(oid: int) -> str:
    return f"{oid:016x}"
