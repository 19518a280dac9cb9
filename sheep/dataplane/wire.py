"""The data-plane wire format: the one place that defines it.

Every frame is a fixed 56-byte little-endian header, followed by a payload whose size is
the header's `length` when the (opcode, direction) pair carries one:

    magic u32 | opcode u8 | flags u8 | pad u16 | epoch u32 | result u32 |
    req_id u64 | oid u64 | offset u64 | length u32 | aux u32 | token u64

`token` is the writer's fencing token (sheep/node/fences.py): on a mutation of a VDI's
objects, the etcd revision that granted the writer the VDI's lock (0: a writer with no
lock); on FENCE, the token to refuse older ones below.

Requests and replies share the header so a reply can echo the request's fields; replies
are matched to requests by `req_id` and may arrive in any order (pipelining).
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

from sheep.oid import MAX_OBJECT_SIZE

MAGIC = 0x50454853  # b"SHEP" read as little-endian u32
HEADER = struct.Struct("<IBBHIIQQQIIQ")
HEADER_SIZE = HEADER.size
MAX_LENGTH = MAX_OBJECT_SIZE  # largest payload a peer may announce: one whole object


class Opcode(IntEnum):
    WRITE = 1  # payload -> existing object at offset
    READ = 2  # reply carries `length` bytes
    REMOVE = 3
    DISCARD = 4  # punch a hole [offset, offset+length)
    FLUSH = 5  # make every acknowledged write durable
    LIST = 6  # reply payload: little-endian u64 oids
    GET_EPOCH = 7  # reply `epoch` = node's epoch
    CREATE = 8  # create the object if absent, then write the payload (may be empty)
    EXISTS = 9  # reply `aux` = 1 if the object exists
    LIST_EPOCHS = 10  # reply payload: little-endian (u64 oid, u64 epoch of its last write)
    DIGEST = 11  # reply payload: u64 little-endian xxh3 of the whole object (verified)
    FENCE = 12  # refuse mutations of oid's VDI with a token below `token` from now on


class Flags(IntFlag):
    NONE = 0
    FUA = 1  # the write is durable before the reply
    FRESH = 2  # CREATE starts from an empty object: no leftover bytes survive around it
    RAW = 4  # READ skips checksum verification (the last resort when no replica verifies)


REQUEST_HAS_PAYLOAD = frozenset({Opcode.WRITE, Opcode.CREATE})
REPLY_HAS_PAYLOAD = frozenset({Opcode.READ, Opcode.LIST, Opcode.LIST_EPOCHS, Opcode.DIGEST})
DIGEST = struct.Struct("<Q")
MUTATIONS = frozenset({Opcode.WRITE, Opcode.CREATE, Opcode.REMOVE, Opcode.DISCARD})
EPOCH_CHECKED = frozenset(
    {Opcode.WRITE, Opcode.READ, Opcode.REMOVE, Opcode.DISCARD, Opcode.CREATE, Opcode.EXISTS}
)


def pack_header(
    opcode: int,
    req_id: int,
    *,
    flags: int = 0,
    epoch: int = 0,
    result: int = 0,
    oid: int = 0,
    offset: int = 0,
    length: int = 0,
    aux: int = 0,
    token: int = 0,
) -> bytes:
    return HEADER.pack(MAGIC, opcode, flags, 0, epoch, result, req_id, oid, offset, length, aux,
                       token)
