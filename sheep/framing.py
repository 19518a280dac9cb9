"""Zero-copy decoding of a stream of fixed-size headers, each followed by a payload whose
length the header gives: the shape of the data plane's frames and of NBD's requests. Sans
I/O: bytes in, messages out; no sockets, no clock.

The decoder owns its receive buffer and hands slices of it to the transport
(`get_buffer`/`buffer_updated`, the shape of asyncio.BufferedProtocol), so a large payload
is received by the kernel straight into the bytearray that becomes the message's payload:
no copy between the socket and where the payload goes. Small messages are parsed out of one
shared buffer, so many pipelined messages cost one recv.

A protocol says how to read one header (`header_size`, `decode_header`); what it raises
there is a framing error, after which the stream cannot be trusted.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

Buffer = bytes | bytearray | memoryview

BUFFER_SIZE = 256 << 10
DIRECT_THRESHOLD = 64 << 10  # payloads at least this big are received in place


class Message(Protocol):
    payload: Buffer


M = TypeVar("M", bound=Message)


class PayloadDecoder(Generic[M]):
    header_size: int

    def decode_header(self, buf: bytearray, start: int) -> tuple[M, int]:
        """The message whose header starts at `start`, and its payload's size; raises the
        protocol's framing error for a header that cannot be trusted (checked before any
        payload is allocated: a peer cannot make us allocate what its header announces)."""
        raise NotImplementedError

    def __init__(self) -> None:
        self._buf = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self._pending: M | None = None  # header parsed, payload being received in place
        self._direct: bytearray | None = None
        self._direct_fill = 0
        self._messages: list[M] = []

    # -- transport side ---------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes go: the rest of an in-place payload, or the shared buffer."""
        if self._direct is not None:
            return memoryview(self._direct)[self._direct_fill :]
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were written at the start of the last get_buffer(); may raise the
        protocol's framing error."""
        if self._direct is not None:
            self._direct_fill += nbytes
            if self._direct_fill == len(self._direct):
                message = self._pending
                assert message is not None
                message.payload = self._direct
                self._messages.append(message)
                self._pending = None
                self._direct = None
            return
        self._end += nbytes
        self._parse()

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes that arrived by other means (tests, plain Protocols, a handshake's
        trailing data)."""
        view = memoryview(data)
        while view:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    # -- consumer side ----------------------------------------------------------------

    def messages(self) -> list[M]:
        """Messages decoded so far, oldest first; each is returned once."""
        out, self._messages = self._messages, []
        return out

    # -- internals --------------------------------------------------------------------

    def _compact(self) -> None:
        live = self._end - self._start
        if self._start:
            self._buf[:live] = self._buf[self._start : self._end]
        self._start, self._end = 0, live
        if live == len(self._buf):  # one message bigger than the buffer: grow it
            self._buf.extend(bytes(len(self._buf)))
            self._view = memoryview(self._buf)

    def _parse(self) -> None:
        buf, view, header_size = self._buf, self._view, self.header_size
        while True:
            avail = self._end - self._start
            if avail < header_size:
                break
            message, size = self.decode_header(buf, self._start)
            body = self._start + header_size
            if avail - header_size >= size:
                if size:
                    message.payload = bytes(view[body : body + size])
                self._start = body + size
                self._messages.append(message)
                continue
            if size >= DIRECT_THRESHOLD:
                have = self._end - body
                direct = bytearray(size)
                direct[:have] = view[body : self._end]
                self._pending, self._direct, self._direct_fill = message, direct, have
                self._start = self._end = 0
                return
            break
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start > len(buf) // 2:
            self._compact()
