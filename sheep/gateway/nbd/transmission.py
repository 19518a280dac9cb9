"""The NBD transmission phase, sans-I/O: a request decoder, request validation, reply encoders.

The decoder is sheep.framing's zero-copy PayloadDecoder, as the data plane's is: a large
NBD_CMD_WRITE payload is received by the kernel straight into the bytearray that becomes
`Request.payload` and then travels to the volume client without a copy.

Two kinds of bad input are kept apart on purpose. Framing errors (bad magic, a write
payload over the limit) mean the byte stream can no longer be trusted: the decoder raises
NbdProtocolError and the connection must end. Everything else (an unknown command, a range
past the end, a write to a read-only export) is a request the client gets an error reply
to, decided by the pure function `validate`.

The reply encoders return lists of buffers for one `writelines()` call: small replies are
joined into one bytes object, large payloads are passed through untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sheep.framing import DIRECT_THRESHOLD, Buffer, PayloadDecoder

from .wire import (
    DEFAULT_MAX_PAYLOAD,
    ERROR_PREFIX,
    EXTENT,
    MAX_STRING,
    OFFSET,
    OFFSET_HOLE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    U32,
    Cmd,
    CmdFlag,
    Errno,
    NbdProtocolError,
    ReplyFlag,
    ReplyType,
)

REQUEST_SIZE = REQUEST.size  # 28 bytes


@dataclass(slots=True)
class Request:
    """One decoded request. `payload` is only set for NBD_CMD_WRITE: bytes for a small
    write, the bytearray the kernel received into for a large one."""

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    payload: Buffer = b""


class RequestDecoder(PayloadDecoder[Request]):
    """Turns the client's byte stream into Requests.

    `max_payload` should be the export's advertised maximum payload: a WRITE announcing
    more is a framing error (reading it would let a client make us allocate at will), while
    commands without a payload may name any length and are judged by `validate`.
    """

    header_size = REQUEST_SIZE

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        super().__init__()
        self._max_payload = max_payload

    def decode_header(self, buf: bytearray, start: int) -> tuple[Request, int]:
        magic, flags, command, cookie, offset, length = REQUEST.unpack_from(buf, start)
        if magic != REQUEST_MAGIC:
            raise NbdProtocolError(f"bad request magic {magic:#010x}")
        size = length if command == Cmd.WRITE else 0
        if size > self._max_payload:
            raise NbdProtocolError(
                f"write of {size} bytes over the maximum payload {self._max_payload}"
            )
        return Request(command, flags, cookie, offset, length), size


# -- validation ------------------------------------------------------------------------------

# Flags each command accepts, as plain ints (`~` of an IntFlag would only complement within
# its members and so miss unknown bits). FUA is valid on every command once SEND_FUA is
# advertised; DF needs structured replies, which validate() checks.
_ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: int(CmdFlag.FUA | CmdFlag.DF),
    Cmd.WRITE: int(CmdFlag.FUA),
    Cmd.FLUSH: int(CmdFlag.FUA),
    Cmd.TRIM: int(CmdFlag.FUA),
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE),
    Cmd.BLOCK_STATUS: int(CmdFlag.FUA | CmdFlag.REQ_ONE),
}
_WRITES = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})


def validate(
    req: Request,
    export_size: int,
    read_only: bool,
    structured: bool,
    meta_context_id: int | None,
    *,
    min_block: int = 1,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> int:
    """0 if the request may be executed, else the NBD error to reply with.

    Pass what was negotiated (HandshakeDone and its ExportInfo). Errors follow the spec's
    SHOULDs: EINVAL for unknown or unadvertised commands and flags (CACHE, FAST_ZERO are not
    advertised), misalignment, reads/trims/block status past the end and zero lengths;
    EPERM for anything that writes to a read-only export; ENOSPC for writes past the end;
    EOVERFLOW for a structured READ over the maximum payload (the client may retry
    smaller). NBD_CMD_DISC is always 0: it gets no reply, the adapter just closes.
    """
    command, flags = req.command, req.flags
    if command == Cmd.DISC:
        return 0
    allowed = _ALLOWED_FLAGS.get(command)
    if allowed is None:  # unknown, or not advertised (CACHE)
        return Errno.EINVAL
    if not structured:
        allowed &= ~int(CmdFlag.DF)
    if flags & ~allowed:
        return Errno.EINVAL
    if command in _WRITES and read_only:
        return Errno.EPERM
    if command == Cmd.FLUSH:
        return Errno.EINVAL if req.offset or req.length else 0
    if command == Cmd.BLOCK_STATUS and (not structured or meta_context_id is None):
        return Errno.EINVAL
    if req.length == 0 or req.offset % min_block or req.length % min_block:
        return Errno.EINVAL
    if req.offset + req.length > export_size:
        return Errno.ENOSPC if command in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
    if command == Cmd.READ and req.length > max_payload:
        return Errno.EOVERFLOW if structured else Errno.EINVAL
    return 0


# -- reply encoders ---------------------------------------------------------------------------


def _frame(head: bytes, payload: Buffer) -> list[Buffer]:
    """Small replies become one buffer; large payloads are passed through, not copied."""
    if not payload:
        return [head]
    if len(payload) < DIRECT_THRESHOLD:
        return [head + bytes(payload)]
    return [head, payload]


def _chunk_header(cookie: int, kind: ReplyType, length: int, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def simple_reply(cookie: int, error: int, payload: Buffer | None = None) -> list[Buffer]:
    """The only reply without structured replies; with them, still fine for anything but
    READ. The payload (READ data) is only allowed with error 0."""
    if payload is not None and error:
        raise ValueError("a simple reply with an error carries no data")
    return _frame(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie), payload or b"")


def structured_offset_data(
    cookie: int, offset: int, payload: Buffer, done: bool = True
) -> list[Buffer]:
    """READ data found at `offset` (at least one byte)."""
    if not payload:
        raise ValueError("an OFFSET_DATA chunk carries at least one byte")
    head = _chunk_header(cookie, ReplyType.OFFSET_DATA, OFFSET.size + len(payload), done)
    return _frame(head + OFFSET.pack(offset), payload)


def structured_offset_hole(
    cookie: int, offset: int, length: int, done: bool = True
) -> list[Buffer]:
    """`length` bytes at `offset` read as zeroes: sent instead of the zeroes themselves."""
    if not 0 < length < 1 << 32:
        raise ValueError(f"hole length {length} out of range")
    head = _chunk_header(cookie, ReplyType.OFFSET_HOLE, OFFSET_HOLE.size, done)
    return [head + OFFSET_HOLE.pack(offset, length)]


def structured_error(cookie: int, errno: int, message: str = "", done: bool = True) -> list[Buffer]:
    """The request failed as a whole; `message` is shown to the user by the client."""
    body = _error_body(errno, message)
    return [_chunk_header(cookie, ReplyType.ERROR, len(body), done) + body]


def structured_error_offset(
    cookie: int, errno: int, offset: int, message: str = "", done: bool = True
) -> list[Buffer]:
    """The request failed at `offset` (within it): data chunks before it stay valid."""
    body = _error_body(errno, message) + OFFSET.pack(offset)
    return [_chunk_header(cookie, ReplyType.ERROR_OFFSET, len(body), done) + body]


def _error_body(errno: int, message: str) -> bytes:
    if not errno:
        raise ValueError("an error chunk needs a nonzero error")
    raw = message.encode()[:MAX_STRING].decode(errors="ignore").encode()  # whole characters
    return ERROR_PREFIX.pack(errno, len(raw)) + raw


def structured_none(cookie: int) -> list[Buffer]:
    """Final chunk with nothing in it: success for anything but READ and BLOCK_STATUS."""
    return [_chunk_header(cookie, ReplyType.NONE, 0, True)]


def structured_block_status(
    cookie: int, context_id: int, extents: Sequence[tuple[int, int]], done: bool = True
) -> list[Buffer]:
    """Consecutive (length, StateFlag) extents from the request's offset, for one context."""
    if not extents:
        raise ValueError("a BLOCK_STATUS chunk needs at least one extent")
    body = bytearray(U32.pack(context_id))
    for length, flags in extents:
        if not 0 < length < 1 << 32:
            raise ValueError(f"extent length {length} out of range")
        body += EXTENT.pack(length, flags)
    return [_chunk_header(cookie, ReplyType.BLOCK_STATUS, len(body), done) + bytes(body)]


def error_reply(cookie: int, errno: int, structured: bool, message: str = "") -> list[Buffer]:
    """An error in whichever form the connection negotiated: with structured replies a
    READ must not get a simple reply, and the message reaches the user."""
    if structured:
        return structured_error(cookie, errno, message)
    return simple_reply(cookie, errno)
