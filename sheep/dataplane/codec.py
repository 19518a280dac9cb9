"""Sans-I/O framing of the data plane: bytes in, frames out; no sockets, no clock.

The decoder is sheep.framing's zero-copy PayloadDecoder: a large payload is received by
the kernel straight into the bytearray that becomes the frame's payload, no copy between
the socket and the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from sheep.errors import ProtocolError
from sheep.framing import DIRECT_THRESHOLD, PayloadDecoder

from .wire import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_LENGTH,
    REPLY_HAS_PAYLOAD,
    REQUEST_HAS_PAYLOAD,
    Opcode,
)


@dataclass(slots=True)
class Frame:
    opcode: int
    flags: int
    epoch: int
    result: int
    req_id: int
    oid: int
    offset: int
    length: int
    aux: int
    payload: bytes | bytearray | memoryview = b""
    token: int = 0  # the writer's fencing token (wire.py)


class FrameDecoder(PayloadDecoder[Frame]):
    """Turns a byte stream into Frames for one direction (requests or replies).

    Raises ProtocolError for input the stream cannot recover from (bad magic, a payload
    over the limit): the caller must drop that connection, and only that one. Unknown
    opcodes are not a framing error: without a payload they decode and the service
    replies UNKNOWN_OP.
    """

    header_size = HEADER_SIZE

    def __init__(self, *, replies: bool, max_length: int = MAX_LENGTH) -> None:
        super().__init__()
        self._payload_ops = REPLY_HAS_PAYLOAD if replies else REQUEST_HAS_PAYLOAD
        self._replies = replies
        self._max_length = max_length

    def decode_header(self, buf: bytearray, start: int) -> tuple[Frame, int]:
        (magic, opcode, flags, _pad, epoch, result, req_id, oid, offset, length, aux,
         token) = HEADER.unpack_from(buf, start)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic:#010x}")
        carries = opcode in self._payload_ops and (not self._replies or result == 0)
        size = length if carries else 0
        if size > self._max_length:
            raise ProtocolError(f"payload of {size} bytes over the limit {self._max_length}")
        return Frame(opcode, flags, epoch, result, req_id, oid, offset, length, aux,
                     token=token), size


def encode(frame_header: bytes, payload: bytes | bytearray | memoryview = b"") -> list:
    """Buffers to hand to one writelines() call: small frames are joined into one."""
    if not payload:
        return [frame_header]
    if len(payload) < DIRECT_THRESHOLD:
        return [frame_header + bytes(payload)]
    return [frame_header, payload]


def is_known_opcode(opcode: int) -> bool:
    return opcode in Opcode._value2member_map_


def coalesced(buffers: list) -> list:
    """The same bytes with every run of small buffers joined into one. For a TLS
    transport, where each buffer becomes at least one record (a header, a MAC, a cipher
    call): a pass's replies or requests go out in a few records instead of one each.
    Large payloads stay as they are (no copy)."""
    out: list = []
    run: list = []
    for buf in buffers:
        if len(buf) < DIRECT_THRESHOLD:
            run.append(buf)
            continue
        if run:
            out.append(b"".join(run) if len(run) > 1 else run[0])
            run = []
        out.append(buf)
    if run:
        out.append(b"".join(run) if len(run) > 1 else run[0])
    return out
