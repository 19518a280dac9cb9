"""The NBD transmission phase: RequestDecoder, validate() and the reply encoders, byte for byte.

Pure: no sockets, no sleeps. Requests are built with struct from the numbers in the NBD
specification, and every encoder's output is compared with bytes spelled out the same way.
"""

from __future__ import annotations

import struct

import pytest

from sheep.errors import ProtocolError
from sheep.framing import BUFFER_SIZE, DIRECT_THRESHOLD
from sheep.gateway.nbd import (
    NbdProtocolError,
    Request,
    RequestDecoder,
    error_reply,
    simple_reply,
    structured_block_status,
    structured_error,
    structured_error_offset,
    structured_none,
    structured_offset_data,
    structured_offset_hole,
    validate,
)

KiB = 1 << 10
MiB = 1 << 20

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EINVAL, ENOSPC, EOVERFLOW = 1, 22, 28, 75
SIMPLE, STRUCTURED = 0x67446698, 0x668E33EF
COOKIE = 0x0102030405060708


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes that differ at every offset modulo 251 (a prime): misplaced bytes show."""
    return bytes((i + seed) % 251 for i in range(n))


def request(
    command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, command, cookie, offset, length) + data


def as_tuple(req: Request) -> tuple:
    return (req.command, req.flags, req.cookie, req.offset, req.length, bytes(req.payload))


def feed_buffered(dec: RequestDecoder, data: bytes, chunk: int) -> list[memoryview]:
    """Deliver `data` as asyncio's BufferedProtocol would: into get_buffer(), at most
    `chunk` bytes per buffer_updated(). Returns every buffer handed out."""
    handed: list[memoryview] = []
    view = memoryview(data)
    while view:
        buf = dec.get_buffer(-1)
        assert len(buf) > 0
        handed.append(buf)
        n = min(len(buf), len(view), chunk)
        buf[:n] = view[:n]
        dec.buffer_updated(n)
        view = view[n:]
    return handed


def mixed_stream() -> tuple[bytes, list[tuple]]:
    """Every command, small and large writes, as one pipelined byte stream."""
    big = pattern(DIRECT_THRESHOLD + 4 * KiB, seed=3)
    small = pattern(4 * KiB, seed=7)
    items = [
        (READ, 0, 1, 4096, 8192, b""),
        (WRITE, FUA, 2, 0, len(small), small),
        (WRITE, 0, 3, 1 * MiB, len(big), big),
        (FLUSH, 0, 4, 0, 0, b""),
        (TRIM, 0, 5, 8192, 4096, b""),
        (WRITE_ZEROES, NO_HOLE, 6, 0, 64 * MiB, b""),
        (BLOCK_STATUS, REQ_ONE, 7, 0, 1 * MiB, b""),
        (WRITE, 0, 8, 512, 1, b"z"),
        (99, 0, 9, 0, 0, b""),  # unknown command: no payload, decodes anyway
        (DISC, 0, 10, 0, 0, b""),
    ]
    stream = b"".join(request(c, k, o, n, f, d) for c, f, k, o, n, d in items)
    return stream, [(c, f, k, o, n, d) for c, f, k, o, n, d in items]


# -- RequestDecoder --------------------------------------------------------------------------


def test_request_fields_sit_at_fixed_big_endian_offsets() -> None:
    dec = RequestDecoder()
    dec.receive_data(bytes.fromhex("25609513000100000102030405060708000000000000100000000200"))
    assert [as_tuple(r) for r in dec.messages()] == [(READ, FUA, COOKIE, 4096, 512, b"")]
    assert dec.messages() == []  # each request is returned once


def test_pipelined_requests_in_one_feed() -> None:
    stream, expected = mixed_stream()
    dec = RequestDecoder()
    dec.receive_data(stream)
    assert [as_tuple(r) for r in dec.messages()] == expected


@pytest.mark.parametrize("chunk", [1, 7, 28, 29, 4096, 65536])
def test_requests_split_across_feeds(chunk: int) -> None:
    stream, expected = mixed_stream()
    dec = RequestDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        dec.receive_data(stream[i : i + chunk])
        got += dec.messages()
    assert [as_tuple(r) for r in got] == expected


@pytest.mark.parametrize("chunk", [1000, 4096, 65536, BUFFER_SIZE])
def test_requests_through_get_buffer(chunk: int) -> None:
    stream, expected = mixed_stream()
    dec = RequestDecoder()
    feed_buffered(dec, stream, chunk)
    assert [as_tuple(r) for r in dec.messages()] == expected


def test_large_write_payload_is_received_in_place() -> None:
    data = pattern(1 * MiB, seed=5)
    dec = RequestDecoder()
    head = request(WRITE, COOKIE, 4 * MiB, len(data), FUA) + data[:1000]
    buf = dec.get_buffer(-1)
    buf[: len(head)] = head
    dec.buffer_updated(len(head))
    assert dec.messages() == []

    handed = feed_buffered(dec, data[1000:], 64 * KiB)
    (req,) = dec.messages()
    assert isinstance(req.payload, bytearray)
    # every buffer handed out after the header is a window on the payload itself
    assert all(view.obj is req.payload for view in handed)
    assert as_tuple(req) == (WRITE, FUA, COOKIE, 4 * MiB, len(data), data)

    # the stream goes on in the shared buffer afterwards
    dec.receive_data(request(FLUSH, 2))
    assert [as_tuple(r) for r in dec.messages()] == [(FLUSH, 0, 2, 0, 0, b"")]
    assert dec.get_buffer(-1).obj is not req.payload


def test_small_write_payload_is_copied_out_of_the_shared_buffer() -> None:
    dec = RequestDecoder()
    dec.receive_data(request(WRITE, 1, 0, 4, data=b"abcd") + request(READ, 2, 0, 4))
    first, _ = dec.messages()
    assert first.payload == b"abcd" and isinstance(first.payload, bytes)


def test_bad_magic_is_a_protocol_error() -> None:
    dec = RequestDecoder()
    with pytest.raises(NbdProtocolError, match="magic"):
        dec.receive_data(b"\x21\xe4\x1c\x71" + bytes(24))  # the extended-header magic
    assert issubclass(NbdProtocolError, ProtocolError)


def test_write_over_the_maximum_payload_is_a_protocol_error() -> None:
    dec = RequestDecoder(max_payload=1 * MiB)
    dec.receive_data(request(WRITE, 1, 0, 1 * MiB))  # exactly the limit is fine
    assert len(dec.get_buffer(-1)) == 1 * MiB  # ...and is being received in place
    dec = RequestDecoder(max_payload=1 * MiB)
    with pytest.raises(NbdProtocolError, match="maximum payload"):
        dec.receive_data(request(WRITE, 1, 0, 1 * MiB + 1))


def test_huge_lengths_without_payload_are_not_framing_errors() -> None:
    dec = RequestDecoder(max_payload=1 * MiB)
    dec.receive_data(request(READ, 1, 0, 0xFFFFFFFF) + request(TRIM, 2, 0, 0xFFFFFFFF))
    assert [r.length for r in dec.messages()] == [0xFFFFFFFF, 0xFFFFFFFF]


# -- validate() ------------------------------------------------------------------------------

SIZE = 1 * MiB


def req(command: int, offset: int = 0, length: int = 4096, flags: int = 0) -> Request:
    return Request(command, flags, COOKIE, offset, length)


@pytest.mark.parametrize(
    ("request_", "kwargs", "errno"),
    [
        # fine
        (req(READ), {}, 0),
        (req(READ, SIZE - 4096), {}, 0),
        (req(WRITE, flags=FUA), {}, 0),
        (req(FLUSH, 0, 0), {}, 0),
        (req(FLUSH, 0, 0, FUA), {}, 0),
        (req(TRIM), {}, 0),
        (req(WRITE_ZEROES, flags=NO_HOLE | FUA), {}, 0),
        (req(BLOCK_STATUS, flags=REQ_ONE), {"structured": True, "meta": 1}, 0),
        (req(READ, flags=DF), {"structured": True}, 0),
        (req(DISC, 5, 5), {}, 0),  # no reply anyway
        (req(WRITE_ZEROES, 0, SIZE), {"max_payload": 4096}, 0),  # no payload: any length
        # unknown, unadvertised, misused commands and flags
        (req(99), {}, EINVAL),
        (req(CACHE), {}, EINVAL),
        (req(WRITE_ZEROES, flags=FAST_ZERO), {}, EINVAL),
        (req(READ, flags=DF), {}, EINVAL),  # DF needs structured replies
        (req(WRITE, flags=NO_HOLE), {}, EINVAL),
        (req(READ, flags=0x100), {}, EINVAL),
        (req(FLUSH, 0, 4096), {}, EINVAL),
        (req(BLOCK_STATUS), {"structured": True}, EINVAL),  # no context selected
        (req(BLOCK_STATUS), {"meta": 1}, EINVAL),  # no structured replies
        # zero lengths and alignment
        (req(READ, 0, 0), {}, EINVAL),
        (req(WRITE, 0, 0), {}, EINVAL),
        (req(READ, 512, 4096), {"min_block": 4096}, EINVAL),
        (req(WRITE, 0, 512), {"min_block": 4096}, EINVAL),
        (req(READ, 4096, 4096), {"min_block": 4096}, 0),
        # past the end: writes ENOSPC, the rest EINVAL
        (req(READ, SIZE - 4095), {}, EINVAL),
        (req(TRIM, SIZE), {}, EINVAL),
        (req(BLOCK_STATUS, SIZE - 1, 2), {"structured": True, "meta": 1}, EINVAL),
        (req(WRITE, SIZE - 1, 2), {}, ENOSPC),
        (req(WRITE_ZEROES, SIZE, 1), {}, ENOSPC),
        # read-only exports: EPERM for anything that writes, even past the end
        (req(WRITE), {"read_only": True}, EPERM),
        (req(WRITE, SIZE, 1), {"read_only": True}, EPERM),
        (req(TRIM), {"read_only": True}, EPERM),
        (req(WRITE_ZEROES), {"read_only": True}, EPERM),
        (req(READ), {"read_only": True}, 0),
        (req(FLUSH, 0, 0), {"read_only": True}, 0),
        # reads over the maximum payload
        (req(READ, 0, 8192), {"max_payload": 4096, "structured": True}, EOVERFLOW),
        (req(READ, 0, 8192), {"max_payload": 4096}, EINVAL),
    ],
)
def test_validate(request_: Request, kwargs: dict, errno: int) -> None:
    got = validate(
        request_,
        SIZE,
        kwargs.pop("read_only", False),
        kwargs.pop("structured", False),
        kwargs.pop("meta", None),
        **kwargs,
    )
    assert got == errno


# -- reply encoders --------------------------------------------------------------------------

COOKIE_BYTES = bytes.fromhex("0102030405060708")


def test_simple_reply() -> None:
    assert simple_reply(COOKIE, 0) == [bytes.fromhex("6744669800000000") + COOKIE_BYTES]
    assert simple_reply(COOKIE, 28) == [bytes.fromhex("674466980000001c") + COOKIE_BYTES]
    assert simple_reply(COOKIE, 0, b"data") == [
        bytes.fromhex("6744669800000000") + COOKIE_BYTES + b"data"
    ]
    with pytest.raises(ValueError):
        simple_reply(COOKIE, 5, b"data")


def test_simple_reply_passes_a_large_payload_through_uncopied() -> None:
    payload = bytearray(pattern(DIRECT_THRESHOLD))
    head, body = simple_reply(COOKIE, 0, payload)
    assert head == struct.pack(">IIQ", SIMPLE, 0, COOKIE) and body is payload


def test_structured_offset_data() -> None:
    assert structured_offset_data(COOKIE, 4096, b"abc", done=True) == [
        bytes.fromhex("668e33ef00010001")
        + COOKIE_BYTES
        + bytes.fromhex("0000000b0000000000001000")
        + b"abc"
    ]
    assert structured_offset_data(COOKIE, 0, b"x", done=False)[0][4:6] == b"\x00\x00"
    payload = memoryview(pattern(MiB))
    head, body = structured_offset_data(COOKIE, 2**40, payload, True)
    assert head == struct.pack(">IHHQIQ", STRUCTURED, 1, 1, COOKIE, 8 + MiB, 2**40)
    assert body is payload
    with pytest.raises(ValueError):
        structured_offset_data(COOKIE, 0, b"", True)


def test_structured_offset_hole() -> None:
    assert structured_offset_hole(COOKIE, 8192, 65536, done=False) == [
        bytes.fromhex("668e33ef00000002")
        + COOKIE_BYTES
        + bytes.fromhex("0000000c000000000000200000010000")
    ]
    with pytest.raises(ValueError):
        structured_offset_hole(COOKIE, 0, 0, True)


def test_structured_error() -> None:
    assert structured_error(COOKIE, 5, "disk on fire") == [
        bytes.fromhex("668e33ef00018001")
        + COOKIE_BYTES
        + bytes.fromhex("0000001200000005000c")
        + b"disk on fire"
    ]
    assert structured_error(COOKIE, 22) == [
        bytes.fromhex("668e33ef00018001") + COOKIE_BYTES + bytes.fromhex("00000006000000160000")
    ]
    (long,) = structured_error(COOKIE, 5, "é" * 3000)  # 6000 bytes: cut at a character
    assert struct.unpack_from(">H", long, 24) == (4096,)
    with pytest.raises(ValueError):
        structured_error(COOKIE, 0)


def test_structured_error_offset() -> None:
    assert structured_error_offset(COOKIE, 5, 4096, "bad", done=False) == [
        bytes.fromhex("668e33ef00008002")
        + COOKIE_BYTES
        + bytes.fromhex("00000011000000050003")
        + b"bad"
        + bytes.fromhex("0000000000001000")
    ]


def test_structured_none() -> None:
    assert structured_none(COOKIE) == [bytes.fromhex("668e33ef00010000") + COOKIE_BYTES + bytes(4)]


def test_structured_block_status() -> None:
    assert structured_block_status(COOKIE, 1, [(65536, 0), (4096, 3)]) == [
        bytes.fromhex("668e33ef00010005")
        + COOKIE_BYTES
        + bytes.fromhex("000000140000000100010000000000000000100000000003")
    ]
    with pytest.raises(ValueError):
        structured_block_status(COOKIE, 1, [])
    with pytest.raises(ValueError):
        structured_block_status(COOKIE, 1, [(0, 1)])


def test_error_reply_matches_the_negotiated_reply_style() -> None:
    assert error_reply(COOKIE, 1, structured=False, message="ignored") == simple_reply(COOKIE, 1)
    assert error_reply(COOKIE, 1, structured=True, message="ro") == structured_error(
        COOKIE, 1, "ro"
    )
