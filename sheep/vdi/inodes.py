"""Inode objects on the cluster: read a VDI's owner table, write a new inode, patch a header."""

from __future__ import annotations

from array import array

from sheep.errors import StoreIOError
from sheep.objclient import ObjectClient

from .inode import (
    ENTRY_SIZE,
    HEADER_SIZE,
    InodeError,
    InodeHeader,
    blocks_for,
    decode_table,
    table_offset,
    unpack_entry,
)
from .registry import VdiRecord


def nblocks(record: VdiRecord) -> int:
    return blocks_for(record.size, record.block_size)


async def read_table(client: ObjectClient, record: VdiRecord) -> array:
    """The VDI's owner table, after checking that the inode is the one the registry names."""
    n = nblocks(record)
    raw = await client.read(record.inode_oid, 0, HEADER_SIZE + ENTRY_SIZE * n)
    try:
        header = InodeHeader.decode(raw)
    except InodeError as exc:
        raise StoreIOError(f"inode of VDI {record.label} (id {record.id}): {exc}") from None
    if header.vdi_id != record.id:
        raise StoreIOError(f"inode of VDI {record.label} says id {header.vdi_id}, "
                           f"not {record.id}")
    return decode_table(memoryview(raw)[HEADER_SIZE:], n)


async def read_entry(client: ObjectClient, record: VdiRecord, index: int) -> int:
    if index >= nblocks(record):
        return 0
    return unpack_entry(await client.read(record.inode_oid, table_offset(index), ENTRY_SIZE))


async def write_inode(client: ObjectClient, record: VdiRecord, table: array | None = None, *,
                      token: int = 0) -> None:
    """Create the VDI's inode from scratch: header, then the table (absent = all zeros).
    `token`: the writer's lock token (0: no lock; sheep/node/fences.py)."""
    body = record.header().encode()
    if table is not None and any(table):
        body += table.tobytes()
    await client.write(record.inode_oid, 0, body, fresh=True, token=token)


async def write_header(client: ObjectClient, record: VdiRecord, *, token: int = 0) -> None:
    """Bring the inode's header in line with the registry after a change of record."""
    await client.write(record.inode_oid, 0, record.header().encode(), create=False,
                       token=token)
