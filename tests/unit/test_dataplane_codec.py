"""The data-plane wire format, the sans-I/O FrameDecoder and ObjectService, byte for byte.

Pure: no sockets, no sleeps. Expected headers are spelled out as explicit bytes once
(`test_header_fields_sit_at_fixed_little_endian_offsets`); later tests build them with
`pack_header`, which that test pins down.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.dataplane.codec import (
    Frame,
    FrameDecoder,
    coalesced,
    encode,
    is_known_opcode,
)
from sheep.dataplane.wire import (
    HEADER_SIZE,
    MAGIC,
    MAX_LENGTH,
    REQUEST_HAS_PAYLOAD,
    Flags,
    Opcode,
    pack_header,
)
from sheep.errors import ProtocolError, Result
from sheep.framing import BUFFER_SIZE, DIRECT_THRESHOLD
from sheep.node.service import InProcess, ObjectService
from sheep.oid import data_oid
from sheep.store import ObjectStore

KiB = 1 << 10
MiB = 1 << 20
OID = data_oid(0x123456, 7)


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes that differ at every offset modulo 251 (a prime): misplaced bytes show."""
    return bytes((i + seed) % 251 for i in range(n))


def feed_buffered(dec: FrameDecoder, data: bytes, chunk: int) -> list[memoryview]:
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


def as_tuple(frame: Frame) -> tuple:
    return (
        frame.opcode,
        frame.flags,
        frame.epoch,
        frame.result,
        frame.req_id,
        frame.oid,
        frame.offset,
        frame.length,
        frame.aux,
        bytes(frame.payload),
    )


def mixed_request_stream() -> tuple[bytes, list[tuple]]:
    """Pipelined requests of every shape, and the frames they must decode into."""
    parts: list[bytes] = []
    expected: list[tuple] = []
    for i in range(40):
        op = [Opcode.WRITE, Opcode.READ, Opcode.CREATE, Opcode.GET_EPOCH, Opcode.FLUSH][i % 5]
        carries = op in REQUEST_HAS_PAYLOAD
        size = (i * 37) % 300 if carries else 0  # CREATE of i=10, 20... has none
        payload = pattern(size, seed=i)
        length = size if carries else 4096
        parts.append(
            pack_header(op, i + 1, epoch=3, oid=OID + i, offset=512 * i, length=length, aux=i)
            + payload
        )
        expected.append((op, 0, 3, 0, i + 1, OID + i, 512 * i, length, i, payload))
    return b"".join(parts), expected


# -- the header ------------------------------------------------------------------------------


def test_header_is_exactly_56_bytes() -> None:
    assert HEADER_SIZE == 56
    assert len(pack_header(Opcode.READ, 1)) == 56


def test_magic_is_shep_in_little_endian() -> None:
    assert MAGIC.to_bytes(4, "little") == b"SHEP"
    assert pack_header(Opcode.GET_EPOCH, 0)[0:4] == b"SHEP"


def test_header_fields_sit_at_fixed_little_endian_offsets() -> None:
    header = pack_header(
        Opcode.READ,
        0x1112131415161718,
        flags=Flags.FUA,
        epoch=0x01020304,
        result=0x0A0B0C0D,
        oid=0x2122232425262728,
        offset=0x3132333435363738,
        length=0x41424344,
        aux=0x51525354,
        token=0x6162636465666768,
    )
    expected = (
        b"SHEP"  # 0..4    magic
        + b"\x02"  # 4       opcode (READ)
        + b"\x01"  # 5       flags (FUA)
        + b"\x00\x00"  # 6..8    pad
        + b"\x04\x03\x02\x01"  # 8..12   epoch
        + b"\x0d\x0c\x0b\x0a"  # 12..16  result
        + b"\x18\x17\x16\x15\x14\x13\x12\x11"  # 16..24  req_id
        + b"\x28\x27\x26\x25\x24\x23\x22\x21"  # 24..32  oid
        + b"\x38\x37\x36\x35\x34\x33\x32\x31"  # 32..40  offset
        + b"\x44\x43\x42\x41"  # 40..44  length
        + b"\x54\x53\x52\x51"  # 44..48  aux
        + b"\x68\x67\x66\x65\x64\x63\x62\x61"  # 48..56  token
    )
    assert len(expected) == 56
    assert header == expected


def test_header_of_defaults_is_magic_opcode_and_req_id_only() -> None:
    expected = b"SHEP" + b"\x07" + bytes(11) + (5).to_bytes(8, "little") + bytes(32)
    assert pack_header(Opcode.GET_EPOCH, 5) == expected


def test_opcode_numbers_are_fixed() -> None:
    assert {op.name: int(op) for op in Opcode} == {
        "WRITE": 1,
        "READ": 2,
        "REMOVE": 3,
        "DISCARD": 4,
        "FLUSH": 5,
        "LIST": 6,
        "GET_EPOCH": 7,
        "CREATE": 8,
        "EXISTS": 9,
        "LIST_EPOCHS": 10,
        "DIGEST": 11,
        "FENCE": 12,
    }
    assert int(Flags.FUA) == 1
    assert int(Flags.FRESH) == 2


def test_max_payload_is_64_mib() -> None:
    assert MAX_LENGTH == 67_108_864  # 64 MiB


# -- decoding one frame ----------------------------------------------------------------------


def test_write_request_with_payload_decodes_into_one_frame_with_exact_payload() -> None:
    payload = pattern(4096)
    dec = FrameDecoder(replies=False)
    dec.receive_data(
        pack_header(Opcode.WRITE, 9, flags=Flags.FUA, epoch=4, oid=OID, offset=8192, length=4096)
        + payload
    )
    frames = dec.messages()
    assert [as_tuple(f) for f in frames] == [
        (Opcode.WRITE, Flags.FUA, 4, 0, 9, OID, 8192, 4096, 0, payload)
    ]


def test_write_request_waits_for_its_whole_payload() -> None:
    dec = FrameDecoder(replies=False)
    data = pack_header(Opcode.WRITE, 1, oid=OID, length=100) + pattern(100)
    dec.receive_data(data[:-1])
    assert dec.messages() == []
    dec.receive_data(data[-1:])
    assert [bytes(f.payload) for f in dec.messages()] == [pattern(100)]


def test_create_request_with_empty_payload_decodes_with_no_payload() -> None:
    dec = FrameDecoder(replies=False)
    dec.receive_data(pack_header(Opcode.CREATE, 1, oid=OID) + pack_header(Opcode.FLUSH, 2))
    frames = dec.messages()
    assert [(f.opcode, f.req_id, bytes(f.payload)) for f in frames] == [
        (Opcode.CREATE, 1, b""),
        (Opcode.FLUSH, 2, b""),
    ]


def test_read_request_carries_no_payload() -> None:
    # `length` of a READ request is what to read: the bytes after the header are the
    # next frame, not a payload.
    dec = FrameDecoder(replies=False)
    dec.receive_data(
        pack_header(Opcode.READ, 1, oid=OID, length=4096) + pack_header(Opcode.GET_EPOCH, 2)
    )
    frames = dec.messages()
    assert [as_tuple(f) for f in frames] == [
        (Opcode.READ, 0, 0, 0, 1, OID, 0, 4096, 0, b""),
        (Opcode.GET_EPOCH, 0, 0, 0, 2, 0, 0, 0, 0, b""),
    ]


def test_read_request_length_over_max_is_not_a_framing_error() -> None:
    dec = FrameDecoder(replies=False, max_length=1024)
    dec.receive_data(pack_header(Opcode.READ, 1, length=0xFFFFFFFF))
    assert [f.length for f in dec.messages()] == [0xFFFFFFFF]


def test_read_reply_with_ok_result_carries_length_bytes() -> None:
    payload = pattern(4096, seed=3)
    dec = FrameDecoder(replies=True)
    dec.receive_data(
        pack_header(Opcode.READ, 5, epoch=2, oid=OID, offset=4096, length=4096) + payload
    )
    assert [as_tuple(f) for f in dec.messages()] == [
        (Opcode.READ, 0, 2, Result.OK, 5, OID, 4096, 4096, 0, payload)
    ]


def test_read_reply_with_error_result_carries_no_payload() -> None:
    dec = FrameDecoder(replies=True)
    dec.receive_data(
        pack_header(Opcode.READ, 5, result=Result.NO_OBJECT, oid=OID, length=4096)
        + pack_header(Opcode.GET_EPOCH, 6, epoch=2)
    )
    assert [as_tuple(f) for f in dec.messages()] == [
        (Opcode.READ, 0, 0, Result.NO_OBJECT, 5, OID, 0, 4096, 0, b""),
        (Opcode.GET_EPOCH, 0, 2, Result.OK, 6, 0, 0, 0, 0, b""),
    ]


def test_write_reply_carries_no_payload() -> None:
    dec = FrameDecoder(replies=True)
    dec.receive_data(pack_header(Opcode.WRITE, 1, length=4096) + pack_header(Opcode.FLUSH, 2))
    assert [(f.opcode, bytes(f.payload)) for f in dec.messages()] == [
        (Opcode.WRITE, b""),
        (Opcode.FLUSH, b""),
    ]


def test_list_reply_payload_is_little_endian_u64_oids() -> None:
    oids = [1, OID, (1 << 64) - 1]
    payload = b"".join(oid.to_bytes(8, "little") for oid in oids)
    assert payload == struct.pack("<3Q", *oids)
    dec = FrameDecoder(replies=True)
    dec.receive_data(pack_header(Opcode.LIST, 3, length=len(payload)) + payload)
    (frame,) = dec.messages()
    assert frame.opcode == Opcode.LIST and frame.length == 24
    assert bytes(frame.payload) == payload
    assert list(struct.unpack("<3Q", frame.payload)) == oids


def test_list_request_carries_no_payload() -> None:
    dec = FrameDecoder(replies=False)
    dec.receive_data(pack_header(Opcode.LIST, 1, length=24) + pack_header(Opcode.FLUSH, 2))
    assert [f.opcode for f in dec.messages()] == [Opcode.LIST, Opcode.FLUSH]


def test_unknown_opcode_without_payload_decodes() -> None:
    dec = FrameDecoder(replies=False)
    dec.receive_data(pack_header(200, 1, oid=OID, length=4096) + pack_header(0, 2))
    assert [(f.opcode, f.req_id, bytes(f.payload)) for f in dec.messages()] == [
        (200, 1, b""),
        (0, 2, b""),
    ]
    assert not is_known_opcode(200)
    assert not is_known_opcode(0)
    assert all(is_known_opcode(op) for op in Opcode)


def test_frames_are_returned_once() -> None:
    dec = FrameDecoder(replies=False)
    dec.receive_data(pack_header(Opcode.FLUSH, 1))
    assert len(dec.messages()) == 1
    assert dec.messages() == []


# -- streams ---------------------------------------------------------------------------------


def test_pipelined_frames_in_one_chunk_decode_in_order() -> None:
    data, expected = mixed_request_stream()
    dec = FrameDecoder(replies=False)
    dec.receive_data(data)
    assert [as_tuple(f) for f in dec.messages()] == expected


def test_stream_fed_one_byte_at_a_time_decodes_identically() -> None:
    data, expected = mixed_request_stream()
    dec = FrameDecoder(replies=False)
    got: list[tuple] = []
    for i in range(len(data)):
        dec.receive_data(data[i : i + 1])
        got.extend(as_tuple(f) for f in dec.messages())
    assert got == expected


def test_stream_fed_one_byte_per_buffer_updated_decodes_identically() -> None:
    data, expected = mixed_request_stream()
    dec = FrameDecoder(replies=False)
    feed_buffered(dec, data, chunk=1)
    assert [as_tuple(f) for f in dec.messages()] == expected


@pytest.mark.parametrize("split", range(1, HEADER_SIZE))
def test_header_split_across_two_buffer_updated_calls_decodes(split: int) -> None:
    header = pack_header(Opcode.READ, 77, epoch=6, oid=OID, offset=4096, length=512, aux=1)
    dec = FrameDecoder(replies=False)
    buf = dec.get_buffer(-1)
    buf[:split] = header[:split]
    dec.buffer_updated(split)
    assert dec.messages() == []
    buf = dec.get_buffer(-1)
    buf[: HEADER_SIZE - split] = header[split:]
    dec.buffer_updated(HEADER_SIZE - split)
    assert [as_tuple(f) for f in dec.messages()] == [
        (Opcode.READ, 0, 6, 0, 77, OID, 4096, 512, 1, b"")
    ]


def test_small_frames_crossing_the_buffer_end_decode_intact() -> None:
    # Frames just under the direct threshold, fed in odd chunks, wrap the 256 KiB receive
    # buffer many times (compaction).
    size = DIRECT_THRESHOLD - 1
    payloads = [pattern(size, seed=i) for i in range(12)]
    data = b"".join(
        pack_header(Opcode.WRITE, i, oid=OID, length=size) + p for i, p in enumerate(payloads)
    )
    dec = FrameDecoder(replies=False)
    feed_buffered(dec, data, chunk=50_003)
    frames = dec.messages()
    assert [f.req_id for f in frames] == list(range(12))
    assert [bytes(f.payload) for f in frames] == payloads


def test_every_frame_under_the_direct_threshold_fits_the_receive_buffer() -> None:
    # A frame that is parsed out of the shared buffer must fit in it whole; bigger payloads
    # go to their own buffer, so the receive buffer never has to grow.
    assert HEADER_SIZE + DIRECT_THRESHOLD - 1 <= BUFFER_SIZE


# -- large payloads: received in place -------------------------------------------------------


def test_large_payload_lands_in_place_in_the_buffer_handed_out() -> None:
    payload = pattern(MiB, seed=5)
    header = pack_header(Opcode.WRITE, 1, oid=OID, length=MiB)
    dec = FrameDecoder(replies=False)
    feed_buffered(dec, header, chunk=HEADER_SIZE)
    assert dec.messages() == []
    handed = feed_buffered(dec, payload, chunk=64 * KiB)
    (frame,) = dec.messages()
    # every buffer handed out for the payload is a window on the frame's payload object
    assert isinstance(frame.payload, bytearray)
    assert all(buf.obj is frame.payload for buf in handed)
    assert len(handed) == MiB // (64 * KiB)
    assert frame.payload == payload


def test_large_payload_started_in_the_shared_buffer_continues_in_place() -> None:
    payload = pattern(MiB, seed=9)
    data = pack_header(Opcode.WRITE, 1, oid=OID, length=MiB) + payload
    dec = FrameDecoder(replies=False)
    feed_buffered(dec, data[: HEADER_SIZE + 100 * KiB], chunk=len(data))
    rest = dec.get_buffer(-1)
    assert len(rest) == MiB - 100 * KiB  # exactly what is missing of the payload
    handed = feed_buffered(dec, data[HEADER_SIZE + 100 * KiB :], chunk=len(data))
    (frame,) = dec.messages()
    assert rest.obj is frame.payload
    assert all(buf.obj is frame.payload for buf in handed)
    assert frame.payload == payload


def test_large_payload_fed_through_receive_data_in_odd_chunks_is_identical() -> None:
    payload = pattern(MiB + 7, seed=1)
    data = pack_header(Opcode.CREATE, 1, oid=OID, length=len(payload)) + payload
    dec = FrameDecoder(replies=False)
    for i in range(0, len(data), 65_537):
        dec.receive_data(data[i : i + 65_537])
    (frame,) = dec.messages()
    assert frame.length == len(payload)
    assert frame.payload == payload


def test_large_read_reply_is_received_in_place() -> None:
    payload = pattern(256 * KiB)
    dec = FrameDecoder(replies=True)
    feed_buffered(dec, pack_header(Opcode.READ, 4, length=len(payload)), chunk=HEADER_SIZE)
    handed = feed_buffered(dec, payload, chunk=len(payload))
    (frame,) = dec.messages()
    assert handed[0].obj is frame.payload
    assert frame.payload == payload


def test_small_frames_around_a_large_payload_keep_their_order() -> None:
    big = pattern(300 * KiB, seed=2)
    data = (
        pack_header(Opcode.GET_EPOCH, 1)
        + pack_header(Opcode.WRITE, 2, length=5)
        + b"hello"
        + pack_header(Opcode.WRITE, 3, length=len(big))
        + big
        + pack_header(Opcode.READ, 4, length=4096)
        + pack_header(Opcode.WRITE, 5, length=3)
        + b"bye"
    )
    for chunk in (len(data), 1000, 65_536):
        dec = FrameDecoder(replies=False)
        feed_buffered(dec, data, chunk=chunk)
        frames = dec.messages()
        assert [(f.req_id, bytes(f.payload)) for f in frames] == [
            (1, b""),
            (2, b"hello"),
            (3, big),
            (4, b""),
            (5, b"bye"),
        ]


# -- errors ----------------------------------------------------------------------------------


def test_bad_magic_raises_protocol_error() -> None:
    header = bytearray(pack_header(Opcode.READ, 1))
    header[0:4] = b"PEHS"
    dec = FrameDecoder(replies=False)
    with pytest.raises(ProtocolError, match="magic"):
        dec.receive_data(bytes(header))


def test_garbage_raises_protocol_error() -> None:
    dec = FrameDecoder(replies=False)
    with pytest.raises(ProtocolError):
        dec.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(48))


def test_fewer_than_48_bytes_of_garbage_are_not_yet_an_error() -> None:
    dec = FrameDecoder(replies=False)
    dec.receive_data(b"x" * (HEADER_SIZE - 1))
    assert dec.messages() == []
    with pytest.raises(ProtocolError):
        dec.receive_data(b"x")


def test_bad_magic_after_a_good_frame_raises() -> None:
    dec = FrameDecoder(replies=False)
    with pytest.raises(ProtocolError):
        dec.receive_data(pack_header(Opcode.FLUSH, 1) + b"\0" * HEADER_SIZE)


def test_announced_payload_over_max_length_raises_protocol_error() -> None:
    dec = FrameDecoder(replies=False)
    with pytest.raises(ProtocolError, match="limit"):
        dec.receive_data(pack_header(Opcode.WRITE, 1, length=MAX_LENGTH + 1))


def test_announced_reply_payload_over_max_length_raises_protocol_error() -> None:
    dec = FrameDecoder(replies=True, max_length=4096)
    with pytest.raises(ProtocolError):
        dec.receive_data(pack_header(Opcode.READ, 1, length=4097))


def test_payload_of_exactly_max_length_is_accepted() -> None:
    dec = FrameDecoder(replies=False, max_length=100)
    dec.receive_data(pack_header(Opcode.WRITE, 1, length=100) + pattern(100))
    assert [bytes(f.payload) for f in dec.messages()] == [pattern(100)]


def test_announced_payload_over_max_length_raises_before_any_payload_arrives() -> None:
    dec = FrameDecoder(replies=False)
    with pytest.raises(ProtocolError):
        dec.receive_data(pack_header(Opcode.CREATE, 1, length=0xFFFFFFFF))


# -- encode ----------------------------------------------------------------------------------


def test_encode_header_only_is_one_buffer() -> None:
    header = pack_header(Opcode.FLUSH, 1)
    assert encode(header) == [header]


def test_encode_joins_a_small_frame_into_one_buffer() -> None:
    header = pack_header(Opcode.WRITE, 1, length=4096)
    payload = pattern(4096)
    out = encode(header, payload)
    assert len(out) == 1
    assert bytes(out[0]) == header + payload


def test_encode_joins_a_memoryview_payload() -> None:
    header = pack_header(Opcode.WRITE, 1, length=3)
    assert [bytes(b) for b in encode(header, memoryview(b"xyzw")[:3])] == [header + b"xyz"]


def test_encode_keeps_a_large_payload_separate_and_uncopied() -> None:
    header = pack_header(Opcode.WRITE, 1, length=MiB)
    payload = bytearray(pattern(MiB))
    out = encode(header, payload)
    assert len(out) == 2
    assert out[0] == header
    assert out[1] is payload


def test_encode_threshold_is_64_kib() -> None:
    header = pack_header(Opcode.WRITE, 1)
    assert len(encode(header, bytes(64 * KiB - 1))) == 1
    assert len(encode(header, bytes(64 * KiB))) == 2


def test_encoded_frames_decode_back() -> None:
    small, large = pattern(10), pattern(200 * KiB)
    wire = b"".join(
        bytes(b)
        for b in encode(pack_header(Opcode.WRITE, 1, length=10), small)
        + encode(pack_header(Opcode.WRITE, 2, length=len(large)), large)
    )
    dec = FrameDecoder(replies=False)
    dec.receive_data(wire)
    assert [bytes(f.payload) for f in dec.messages()] == [small, large]


# -- ObjectService over a real ObjectStore ---------------------------------------------------

EPOCH = 5


class RecordingSink:
    """A ReplySink that records what would go on the wire."""

    def __init__(self, store: ObjectStore | None = None) -> None:
        self.replies: list[tuple[bytes, bytes]] = []
        self.commits_at_reply: list[int] = []
        self.replied = asyncio.Event()
        self._store = store

    def send(self, header: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
        self.replies.append((bytes(header), bytes(payload)))
        if self._store is not None:
            self.commits_at_reply.append(self._store.commits)
        self.replied.set()


class NodeEpoch:
    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    s = ObjectStore(tmp_path)
    yield s
    s.close()


@pytest.fixture
def epoch() -> NodeEpoch:
    return NodeEpoch(EPOCH)


@pytest.fixture
def service(store: ObjectStore, epoch: NodeEpoch) -> ObjectService:
    return ObjectService(store, epoch)


def request(
    opcode: int,
    req_id: int,
    *,
    payload: bytes = b"",
    **fields: int,
) -> Frame:
    """A request frame as the server's decoder would produce it from the wire (of the
    service's epoch unless told otherwise)."""
    fields.setdefault("epoch", EPOCH)
    if opcode in REQUEST_HAS_PAYLOAD:
        fields["length"] = len(payload)
    dec = FrameDecoder(replies=False)
    dec.receive_data(pack_header(opcode, req_id, **fields) + payload)
    (frame,) = dec.messages()
    return frame


def call(service: ObjectService, frame: Frame) -> list[tuple[bytes, bytes]]:
    sink = RecordingSink()
    service.handle(frame, sink)
    return sink.replies


async def answered(service: ObjectService, frame: Frame) -> list[tuple[bytes, bytes]]:
    """The replies to `frame` once it has one (a first write waits for its object's
    write-intent mark, synced in a thread, when an event loop runs)."""
    sink = RecordingSink()
    service.handle(frame, sink)
    await asyncio.wait_for(sink.replied.wait(), 5)
    return sink.replies


def test_service_write_to_missing_object_replies_no_object(service: ObjectService) -> None:
    replies = call(
        service, request(Opcode.WRITE, 1, epoch=EPOCH, oid=OID, offset=4096, payload=b"data")
    )
    assert replies == [
        (
            pack_header(
                Opcode.WRITE, 1, epoch=EPOCH, result=Result.NO_OBJECT, oid=OID, offset=4096
            ),
            b"",
        )
    ]


def test_service_no_object_reply_bytes_are_exact(service: ObjectService) -> None:
    ((header, payload),) = call(service, request(Opcode.WRITE, 0x42, oid=OID, payload=b"x"))
    assert header == (
        b"SHEP\x01\x00\x00\x00"
        + EPOCH.to_bytes(4, "little")
        + Result.NO_OBJECT.to_bytes(4, "little")
        + (0x42).to_bytes(8, "little")
        + OID.to_bytes(8, "little")
        + bytes(8 + 4 + 4 + 8)
    )
    assert payload == b""


def test_service_create_then_read_returns_the_data(
    service: ObjectService, store: ObjectStore
) -> None:
    data = pattern(3000)
    created = call(
        service, request(Opcode.CREATE, 1, epoch=EPOCH, oid=OID, offset=100, payload=data)
    )
    assert created == [(pack_header(Opcode.CREATE, 1, epoch=EPOCH, oid=OID, offset=100), b"")]
    read = call(service, request(Opcode.READ, 2, epoch=EPOCH, oid=OID, offset=100, length=3000))
    assert read == [
        (pack_header(Opcode.READ, 2, epoch=EPOCH, oid=OID, offset=100, length=3000), data)
    ]
    assert store.read(OID, 100, 3000) == data


def test_service_read_of_unwritten_range_returns_zeros(service: ObjectService) -> None:
    call(service, request(Opcode.CREATE, 1, oid=OID, payload=b"abc"))
    ((_, payload),) = call(service, request(Opcode.READ, 2, oid=OID, offset=0, length=8))
    assert payload == b"abc" + bytes(5)


def test_service_write_to_existing_object_replies_ok(service: ObjectService) -> None:
    call(service, request(Opcode.CREATE, 1, oid=OID))
    assert call(service, request(Opcode.WRITE, 2, oid=OID, offset=8, payload=b"xy")) == [
        (pack_header(Opcode.WRITE, 2, epoch=EPOCH, oid=OID, offset=8), b"")
    ]
    ((_, payload),) = call(service, request(Opcode.READ, 3, oid=OID, offset=8, length=2))
    assert payload == b"xy"


def test_service_read_of_missing_object_replies_no_object_without_payload(
    service: ObjectService,
) -> None:
    assert call(service, request(Opcode.READ, 1, oid=OID, length=4096)) == [
        (pack_header(Opcode.READ, 1, epoch=EPOCH, result=Result.NO_OBJECT, oid=OID), b"")
    ]


@pytest.mark.parametrize(
    ("request_epoch", "result"), [(EPOCH - 1, Result.OLD_EPOCH), (EPOCH + 1, Result.NEW_EPOCH)]
)
@pytest.mark.parametrize(
    "opcode",
    [Opcode.WRITE, Opcode.CREATE, Opcode.READ, Opcode.REMOVE, Opcode.DISCARD, Opcode.EXISTS],
)
def test_service_epoch_mismatch_replies_old_or_new_epoch_with_the_node_epoch(
    service: ObjectService, store: ObjectStore, opcode: Opcode, request_epoch: int, result: Result
) -> None:
    replies = call(service, request(opcode, 3, epoch=request_epoch, oid=OID, offset=0, length=1))
    assert replies == [(pack_header(opcode, 3, epoch=EPOCH, result=result, oid=OID), b"")]
    assert store.list_oids() == []  # nothing was done


def test_service_read_of_epoch_zero_skips_the_check(service: ObjectService) -> None:
    call(service, request(Opcode.CREATE, 1, oid=OID, payload=b"z"))
    assert call(service, request(Opcode.READ, 2, epoch=0, oid=OID, length=1)) == [
        (pack_header(Opcode.READ, 2, epoch=EPOCH, oid=OID, length=1), b"z")
    ]


@pytest.mark.parametrize("opcode", [Opcode.WRITE, Opcode.CREATE, Opcode.REMOVE, Opcode.DISCARD])
def test_service_refuses_a_change_of_data_without_an_epoch(
    service: ObjectService, store: ObjectStore, opcode: Opcode
) -> None:
    payload = b"z" if opcode in REQUEST_HAS_PAYLOAD else b""
    replies = call(service, request(opcode, 1, epoch=0, oid=OID, length=1, payload=payload))
    assert replies == [(pack_header(opcode, 1, epoch=EPOCH, result=Result.OLD_EPOCH, oid=OID),
                        b"")]
    assert store.list_oids() == []


def test_service_get_epoch_replies_the_node_epoch_whatever_the_request_epoch(
    service: ObjectService, epoch: NodeEpoch
) -> None:
    assert call(service, request(Opcode.GET_EPOCH, 1, epoch=99)) == [
        (pack_header(Opcode.GET_EPOCH, 1, epoch=EPOCH), b"")
    ]
    epoch.value = 8
    assert call(service, request(Opcode.GET_EPOCH, 2)) == [
        (pack_header(Opcode.GET_EPOCH, 2, epoch=8), b"")
    ]


@pytest.mark.parametrize("opcode", [0, 13, 200, 255])
def test_service_unknown_opcode_replies_unknown_op(service: ObjectService, opcode: int) -> None:
    assert call(service, request(opcode, 11, epoch=EPOCH, oid=OID, offset=9, length=4)) == [
        (
            pack_header(opcode, 11, epoch=EPOCH, result=Result.UNKNOWN_OP, oid=OID, offset=9),
            b"",
        )
    ]


def test_service_read_past_the_object_end_replies_out_of_range(
    service: ObjectService, store: ObjectStore
) -> None:
    call(service, request(Opcode.CREATE, 1, oid=OID, payload=b"a"))
    end = store.object_size
    assert call(service, request(Opcode.READ, 2, oid=OID, offset=end - 10, length=11)) == [
        (
            pack_header(
                Opcode.READ, 2, epoch=EPOCH, result=Result.OUT_OF_RANGE, oid=OID, offset=end - 10
            ),
            b"",
        )
    ]


def test_service_read_with_offset_past_the_object_end_replies_out_of_range(
    service: ObjectService, store: ObjectStore
) -> None:
    call(service, request(Opcode.CREATE, 1, oid=OID, payload=b"a"))
    offset = (1 << 64) - 1
    ((header, payload),) = call(service, request(Opcode.READ, 2, oid=OID, offset=offset, length=1))
    assert header == pack_header(
        Opcode.READ, 2, epoch=EPOCH, result=Result.OUT_OF_RANGE, oid=OID, offset=offset
    )
    assert payload == b""


def test_service_read_of_4_gib_replies_out_of_range(service: ObjectService) -> None:
    # the largest length a header can announce is refused before anything is allocated
    call(service, request(Opcode.CREATE, 1, oid=OID, payload=b"a"))
    assert call(service, request(Opcode.READ, 2, oid=OID, length=0xFFFFFFFF)) == [
        (pack_header(Opcode.READ, 2, epoch=EPOCH, result=Result.OUT_OF_RANGE, oid=OID), b"")
    ]


def test_service_write_past_the_object_end_replies_out_of_range(
    service: ObjectService, store: ObjectStore
) -> None:
    offset = store.object_size - 1
    assert call(service, request(Opcode.CREATE, 1, oid=OID, offset=offset, payload=b"ab")) == [
        (
            pack_header(
                Opcode.CREATE, 1, epoch=EPOCH, result=Result.OUT_OF_RANGE, oid=OID, offset=offset
            ),
            b"",
        )
    ]
    assert store.list_oids() == []


@pytest.mark.parametrize(
    "opcode",
    [Opcode.WRITE, Opcode.CREATE, Opcode.READ, Opcode.REMOVE, Opcode.DISCARD, Opcode.EXISTS],
)
def test_service_not_formatted_replies_not_formatted(
    service: ObjectService, epoch: NodeEpoch, opcode: Opcode
) -> None:
    epoch.value = 0
    assert call(service, request(opcode, 4, oid=OID, length=1)) == [
        (pack_header(opcode, 4, epoch=0, result=Result.NOT_FORMATTED, oid=OID), b"")
    ]


def test_service_exists_replies_aux(service: ObjectService) -> None:
    assert call(service, request(Opcode.EXISTS, 1, oid=OID)) == [
        (pack_header(Opcode.EXISTS, 1, epoch=EPOCH, oid=OID, aux=0), b"")
    ]
    call(service, request(Opcode.CREATE, 2, oid=OID))
    assert call(service, request(Opcode.EXISTS, 3, oid=OID)) == [
        (pack_header(Opcode.EXISTS, 3, epoch=EPOCH, oid=OID, aux=1), b"")
    ]


def test_service_remove_deletes_and_then_replies_no_object(service: ObjectService) -> None:
    call(service, request(Opcode.CREATE, 1, oid=OID, payload=b"q"))
    assert call(service, request(Opcode.REMOVE, 2, oid=OID)) == [
        (pack_header(Opcode.REMOVE, 2, epoch=EPOCH, oid=OID), b"")
    ]
    assert call(service, request(Opcode.REMOVE, 3, oid=OID)) == [
        (pack_header(Opcode.REMOVE, 3, epoch=EPOCH, result=Result.NO_OBJECT, oid=OID), b"")
    ]


def test_service_discard_zeroes_the_range(service: ObjectService) -> None:
    call(service, request(Opcode.CREATE, 1, oid=OID, payload=b"\xff" * 8192))
    assert call(service, request(Opcode.DISCARD, 2, oid=OID, offset=0, length=4096)) == [
        (pack_header(Opcode.DISCARD, 2, epoch=EPOCH, oid=OID), b"")
    ]
    ((_, payload),) = call(service, request(Opcode.READ, 3, oid=OID, length=8192))
    assert payload == bytes(4096) + b"\xff" * 4096


def test_service_list_replies_little_endian_u64_oids(service: ObjectService) -> None:
    oids = [OID + 2, OID, 3]
    for i, oid in enumerate(oids):
        call(service, request(Opcode.CREATE, i + 1, oid=oid))
    expected = struct.pack("<3Q", *sorted(oids))
    assert call(service, request(Opcode.LIST, 9)) == [
        (pack_header(Opcode.LIST, 9, epoch=EPOCH, length=24), expected)
    ]


def test_service_list_of_an_empty_store_is_an_empty_payload(service: ObjectService) -> None:
    assert call(service, request(Opcode.LIST, 1)) == [
        (pack_header(Opcode.LIST, 1, epoch=EPOCH), b"")
    ]


async def test_service_fua_write_replies_only_after_the_flush(
    service: ObjectService, store: ObjectStore
) -> None:
    await answered(service, request(Opcode.CREATE, 1, oid=OID))
    await store.flush()
    commits = store.commits
    sink = RecordingSink(store)
    service.handle(
        request(Opcode.WRITE, 2, flags=Flags.FUA, oid=OID, offset=4, payload=b"durable"), sink
    )
    assert sink.replies == []  # not before the commit
    await asyncio.wait_for(sink.replied.wait(), 5)
    assert sink.replies == [(pack_header(Opcode.WRITE, 2, epoch=EPOCH, oid=OID, offset=4), b"")]
    assert sink.commits_at_reply == [commits + 1]  # the reply came after a commit finished


async def test_service_fua_create_replies_only_after_the_flush(
    service: ObjectService, store: ObjectStore
) -> None:
    sink = RecordingSink(store)
    service.handle(request(Opcode.CREATE, 1, flags=Flags.FUA, oid=OID, payload=b"new"), sink)
    assert sink.replies == []
    await asyncio.wait_for(sink.replied.wait(), 5)
    assert sink.replies == [(pack_header(Opcode.CREATE, 1, epoch=EPOCH, oid=OID), b"")]
    assert sink.commits_at_reply == [1]
    assert OID in store.meta.list_objects()  # the index commit is durable too


async def test_service_flush_replies_after_the_commit(
    service: ObjectService, store: ObjectStore
) -> None:
    await answered(service, request(Opcode.CREATE, 1, oid=OID, payload=b"x"))
    sink = RecordingSink(store)
    service.handle(request(Opcode.FLUSH, 2), sink)
    assert sink.replies == []
    await asyncio.wait_for(sink.replied.wait(), 5)
    assert sink.replies == [(pack_header(Opcode.FLUSH, 2, epoch=EPOCH), b"")]
    assert sink.commits_at_reply == [1]


def test_service_non_fua_write_replies_at_once(service: ObjectService, store: ObjectStore) -> None:
    call(service, request(Opcode.CREATE, 1, oid=OID))
    sink = RecordingSink(store)
    service.handle(request(Opcode.WRITE, 2, oid=OID, payload=b"fast"), sink)
    assert sink.replies == [(pack_header(Opcode.WRITE, 2, epoch=EPOCH, oid=OID), b"")]
    assert sink.commits_at_reply == [0]


# -- the node's own service, in process ----------------------------------------------------


async def test_an_in_process_request_takes_the_services_path_and_returns_its_reply(
        service: ObjectService) -> None:
    local = InProcess(service)
    oid = data_oid(7, 0)
    written = await local.request(Opcode.CREATE, oid=oid, offset=0, payload=b"x" * 4096,
                                  epoch=EPOCH)
    assert written.result == 0
    read = await local.request(Opcode.READ, oid=oid, offset=0, length=4096, epoch=EPOCH)
    assert read.result == 0 and bytes(read.payload) == b"x" * 4096
    stale = await local.request(Opcode.WRITE, oid=oid, offset=0, payload=b"y", epoch=EPOCH - 1)
    assert stale.result == Result.OLD_EPOCH  # the epoch rule holds in process too


async def test_a_read_now_answers_only_what_the_service_would_answer_at_once(
        service: ObjectService) -> None:
    local = InProcess(service)
    oid = data_oid(7, 1)
    await local.request(Opcode.CREATE, oid=oid, offset=0, payload=b"z" * 512, epoch=EPOCH)
    assert local.read_now(oid, 0, 512, EPOCH) == b"z" * 512
    assert local.read_now(oid, 0, 512, EPOCH + 1) is None  # another epoch: ask properly
    assert local.read_now(data_oid(7, 2), 0, 512, EPOCH) is None  # missing: ask properly


def test_coalescing_joins_runs_of_small_buffers_and_leaves_large_payloads_alone() -> None:
    big = memoryview(bytearray(DIRECT_THRESHOLD))
    out = coalesced([b"a", b"bc", big, b"d", b"e"])
    assert out == [b"abc", big, b"de"] and out[1] is big


def test_coalescing_keeps_a_lone_buffer_as_it_is() -> None:
    one = bytearray(b"frame")
    assert coalesced([one])[0] is one and coalesced([]) == []
