"""Sans-I/O framing of the data plane: bytes in, frames out; no sockets, no clock.

The decoder owns its receive buffer and hands slices of it to the transport
(`get_buffer`/`buffer_updated`, the shape of asyncio.BufferedProtocol), so a large payload
is received by the kernel straight into the bytearray that becomes the frame's payload:
no copy between the socket and the store. Small frames are parsed out of one shared
buffer, so many pipelined frames cost one recv.
"""

from __future__ import annotations

from dataclasses import dataclass

from sheep.errors import ProtocolError

from .wire import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_LENGTH,
    REPLY_HAS_PAYLOAD,
    REQUEST_HAS_PAYLOAD,
    Opcode,
)

_BUFFER_SIZE = 256 << 10
_DIRECT_THRESHOLD = 64 << 10  # payloads at least this big are received in place


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


class FrameDecoder:
    """Turns a byte stream into Frames for one direction (requests or replies).

    Raises ProtocolError for input the stream cannot recover from (bad magic, a payload
    over the limit): the caller must drop that connection, and only that one. Unknown
    opcodes are not a framing error: without a payload they decode and the service
    replies UNKNOWN_OP.
    """

    def __init__(self, *, replies: bool, max_length: int = MAX_LENGTH) -> None:
        self._payload_ops = REPLY_HAS_PAYLOAD if replies else REQUEST_HAS_PAYLOAD
        self._replies = replies
        self._max_length = max_length
        self._buf = bytearray(_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self._pending: Frame | None = None  # header parsed, payload being received in place
        self._direct: bytearray | None = None
        self._direct_fill = 0
        self._frames: list[Frame] = []

    # -- transport side ---------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._direct is not None:
            return memoryview(self._direct)[self._direct_fill :]
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None:
            self._direct_fill += nbytes
            if self._direct_fill == len(self._direct):
                frame = self._pending
                assert frame is not None
                frame.payload = self._direct
                self._frames.append(frame)
                self._pending = None
                self._direct = None
            return
        self._end += nbytes
        self._parse()

    def receive_data(self, data: bytes) -> None:
        """Feed bytes that arrived by other means (tests, plain Protocols)."""
        view = memoryview(data)
        while view:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    # -- consumer side ----------------------------------------------------------------

    def frames(self) -> list[Frame]:
        """Frames decoded so far, oldest first; each is returned once."""
        out, self._frames = self._frames, []
        return out

    # -- internals --------------------------------------------------------------------

    def _compact(self) -> None:
        live = self._end - self._start
        if self._start:
            self._buf[:live] = self._buf[self._start : self._end]
        self._start, self._end = 0, live
        if live == len(self._buf):  # one frame bigger than the buffer: grow it
            self._buf.extend(bytes(len(self._buf)))
            self._view = memoryview(self._buf)

    def _parse(self) -> None:
        buf, view = self._buf, self._view
        while True:
            avail = self._end - self._start
            if avail < HEADER_SIZE:
                break
            (magic, opcode, flags, _pad, epoch, result, req_id, oid, offset, length, aux) = (
                HEADER.unpack_from(buf, self._start)
            )
            if magic != MAGIC:
                raise ProtocolError(f"bad magic {magic:#010x}")
            carries = opcode in self._payload_ops and (not self._replies or result == 0)
            size = length if carries else 0
            if size > self._max_length:
                raise ProtocolError(f"payload of {size} bytes over the limit {self._max_length}")
            frame = Frame(opcode, flags, epoch, result, req_id, oid, offset, length, aux)
            body = self._start + HEADER_SIZE
            if avail - HEADER_SIZE >= size:
                if size:
                    frame.payload = bytes(view[body : body + size])
                self._start = body + size
                self._frames.append(frame)
                continue
            if size >= _DIRECT_THRESHOLD:
                have = self._end - body
                direct = bytearray(size)
                direct[:have] = view[body : self._end]
                self._pending, self._direct, self._direct_fill = frame, direct, have
                self._start = self._end = 0
                return
            break
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start > len(buf) // 2:
            self._compact()


def encode(frame_header: bytes, payload: bytes | bytearray | memoryview = b"") -> list:
    """Buffers to hand to one writelines() call: small frames are joined into one."""
    if not payload:
        return [frame_header]
    if len(payload) < _DIRECT_THRESHOLD:
        return [frame_header + bytes(payload)]
    return [frame_header, payload]


def is_known_opcode(opcode: int) -> bool:
    return opcode in Opcode._value2member_map_
