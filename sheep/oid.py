"""Object ids: 64 bits = 8 type bits | 24-bit VDI id | 32-bit object index.

Placement hashes the whole id, so an object's replicas depend on nothing but its id.
"""

from __future__ import annotations

from enum import IntEnum

VDI_BITS = 24
INDEX_BITS = 32
MAX_VDI_ID = (1 << VDI_BITS) - 1
MAX_INDEX = (1 << INDEX_BITS) - 1


class ObjType(IntEnum):
    DATA = 0
    INODE = 1
    VDI_ATTR = 2


def make_oid(kind: ObjType, vdi_id: int, index: int = 0) -> int:
    if not 0 <= vdi_id <= MAX_VDI_ID:
        raise ValueError(f"VDI id {vdi_id} out of range")
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"object index {index} out of range")
    return (int(kind) << (VDI_BITS + INDEX_BITS)) | (vdi_id << INDEX_BITS) | index


def data_oid(vdi_id: int, index: int) -> int:
    return make_oid(ObjType.DATA, vdi_id, index)


def inode_oid(vdi_id: int) -> int:
    return make_oid(ObjType.INODE, vdi_id, 0)


def oid_type(oid: int) -> ObjType:
    return ObjType(oid >> (VDI_BITS + INDEX_BITS))


def oid_vdi(oid: int) -> int:
    return (oid >> INDEX_BITS) & MAX_VDI_ID


def oid_index(oid: int) -> int:
    return oid & MAX_INDEX


def oid_str(oid: int) -> str:
    return f"{oid:016x}"
