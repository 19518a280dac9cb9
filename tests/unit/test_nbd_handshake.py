"""The NBD server handshake, byte for byte.

Pure: no sockets, no sleeps. Client bytes are built with struct from the numbers in the NBD
specification (not from sheep's own constants), and every server reply is compared with
bytes spelled out the same way, so a wrong constant or a wrong field order fails here.
"""

from __future__ import annotations

import struct

import pytest

from sheep.gateway.nbd import (
    BASE_ALLOCATION_ID,
    MAX_OPTION_DATA,
    MAX_OPTION_SKIP,
    Closed,
    ExportInfo,
    HandshakeDone,
    NeedData,
    ServerHandshake,
    transmission_flags,
    wire,
)

KiB = 1 << 10
MiB = 1 << 20

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9

# option codes, reply types and info types, as numbered by the spec
EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED_REPLY = 1, 2, 3, 5, 6, 7, 8
LIST_META_CONTEXT, SET_META_CONTEXT = 9, 10
ACK, SERVER, REP_INFO, META_CONTEXT = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ERR_SHUTDOWN, ERR_TOO_BIG = (
    2**31 + 1,
    2**31 + 3,
    2**31 + 6,
    2**31 + 7,
    2**31 + 9,
)
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

DISK = ExportInfo("disk", "a test disk", 1 << 30, read_only=False, can_multi_conn=True)
SNAP = ExportInfo("snap", "", 64 * MiB, read_only=True, can_multi_conn=False)

# transmission flags: HAS_FLAGS 0x1, READ_ONLY 0x2, SEND_FLUSH 0x4, SEND_FUA 0x8,
# SEND_TRIM 0x20, SEND_WRITE_ZEROES 0x40, SEND_DF 0x80, CAN_MULTI_CONN 0x100
DISK_FLAGS = 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100
DISK_FLAGS_STRUCTURED = DISK_FLAGS | 0x80
SNAP_FLAGS = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40


class Catalog:
    def __init__(self, *exports: ExportInfo) -> None:
        self.exports = {e.name: e for e in exports}

    def list(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self.exports.values()]

    def lookup(self, name: str) -> ExportInfo | None:
        return self.exports.get(name)


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def rep(code: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, code, rtype, len(data)) + data


def info_request(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_request(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def info_export(size: int, flags: int) -> bytes:
    return rep(GO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, flags))


def started(client_flags: int = 0b11, *exports: ExportInfo) -> ServerHandshake:
    """A handshake past the greeting and the client flags."""
    hs = ServerHandshake(Catalog(*(exports or (DISK, SNAP))))
    hs.initial_bytes()
    hs.receive_data(struct.pack(">I", client_flags))
    assert hs.data_to_send() == b""
    assert hs.next_event() == NeedData()
    return hs


def exchange(hs: ServerHandshake, data: bytes) -> bytes:
    hs.receive_data(data)
    return hs.data_to_send()


# -- the wire constants ---------------------------------------------------------------------


def test_wire_constants_are_the_specs() -> None:
    assert int.from_bytes(b"NBDMAGIC", "big") == wire.NBDMAGIC
    assert int.from_bytes(b"IHAVEOPT", "big") == wire.IHAVEOPT
    assert wire.OPT_REPLY_MAGIC == 0x3E889045565A9
    assert (wire.REQUEST_MAGIC, wire.SIMPLE_REPLY_MAGIC) == (0x25609513, 0x67446698)
    assert wire.STRUCTURED_REPLY_MAGIC == 0x668E33EF
    assert [int(o) for o in wire.Opt] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert [int(r) for r in wire.Rep] == [1, 2, 3, 4] + [2**31 + i for i in range(1, 10)]
    assert [int(f) for f in wire.TransmissionFlag] == [1 << i for i in range(12)]
    assert [int(c) for c in wire.Cmd] == list(range(8))
    assert [int(f) for f in wire.CmdFlag] == [1, 2, 4, 8, 16]
    assert [int(t) for t in wire.ReplyType] == [0, 1, 2, 5, 2**15 + 1, 2**15 + 2]
    assert [int(e) for e in wire.Errno] == [1, 5, 12, 22, 28, 75, 95, 108]
    assert (wire.StateFlag.HOLE, wire.StateFlag.ZERO, wire.ReplyFlag.DONE) == (1, 2, 1)


# -- greeting and client flags --------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    hs = ServerHandshake(Catalog(DISK))
    assert hs.initial_bytes() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert hs.data_to_send() == b""
    assert hs.next_event() == NeedData()


@pytest.mark.parametrize(
    ("flags", "reason"),
    [(0, "fixed newstyle"), (0b100, "unknown client flags"), (0x80000001, "unknown client")],
)
def test_client_flags_without_fixed_newstyle_or_unknown_close(flags: int, reason: str) -> None:
    hs = ServerHandshake(Catalog(DISK))
    hs.receive_data(struct.pack(">I", flags))
    event = hs.next_event()
    assert isinstance(event, Closed) and reason in event.reason and not event.clean
    assert hs.data_to_send() == b""


# -- NBD_OPT_EXPORT_NAME --------------------------------------------------------------------


def test_export_name_replies_size_flags_and_124_zeroes() -> None:
    hs = started(0b01)
    assert exchange(hs, opt(EXPORT_NAME, b"disk")) == (
        struct.pack(">QH", 1 << 30, DISK_FLAGS) + bytes(124)
    )
    assert hs.next_event() == HandshakeDone(DISK, False, None, False)


def test_export_name_with_no_zeroes_replies_size_and_flags_only() -> None:
    hs = started(0b11)
    assert exchange(hs, opt(EXPORT_NAME, b"snap")) == struct.pack(">QH", 64 * MiB, SNAP_FLAGS)
    assert hs.next_event() == HandshakeDone(SNAP, False, None, True)


def test_export_name_of_an_unknown_export_closes_without_reply() -> None:
    hs = started()
    assert exchange(hs, opt(EXPORT_NAME, b"nope")) == b""
    event = hs.next_event()
    assert isinstance(event, Closed) and "nope" in event.reason


def test_export_name_longer_than_a_string_may_be_closes_at_the_header() -> None:
    hs = started()
    hs.receive_data(struct.pack(">QII", IHAVEOPT, EXPORT_NAME, 4097))
    assert isinstance(hs.next_event(), Closed)


# -- NBD_OPT_LIST ---------------------------------------------------------------------------


def test_list_sends_one_server_reply_per_export_then_ack() -> None:
    hs = started()
    assert exchange(hs, opt(LIST)) == (
        rep(LIST, SERVER, b"\x00\x00\x00\x04disk" + b"a test disk")
        + rep(LIST, SERVER, b"\x00\x00\x00\x04snap")
        + rep(LIST, ACK)
    )
    assert hs.next_event() == NeedData()


def test_list_with_data_is_invalid_and_negotiation_continues() -> None:
    hs = started()
    assert exchange(hs, opt(LIST, b"xyz")) == rep(LIST, ERR_INVALID, b"unexpected data")
    assert exchange(hs, opt(LIST)).endswith(rep(LIST, ACK))


def test_options_wait_while_their_replies_are_not_taken_and_none_is_lost() -> None:
    """A 16-byte NBD_OPT_LIST is answered with the whole list: options sent without
    reading the answers must not queue answers without bound."""
    hs = started()
    one = exchange(hs, opt(LIST))
    hs.receive_data(opt(LIST) * 10000)
    first = hs.data_to_send()
    assert 0 < len(first) <= 64 * KiB + len(one) and hs.input_waiting
    total = len(first)
    while hs.input_waiting:
        total += len(exchange(hs, b""))
    assert total == 10000 * len(one)
    assert hs.next_event() == NeedData()


# -- NBD_OPT_INFO / NBD_OPT_GO --------------------------------------------------------------


def test_info_then_go_with_block_size_requested() -> None:
    hs = started()
    request = info_request("disk", INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE)
    block_size = struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)
    assert exchange(hs, opt(INFO, request)) == (
        rep(INFO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, 1 << 30, DISK_FLAGS))
        + rep(INFO, REP_INFO, struct.pack(">H", INFO_NAME) + b"disk")
        + rep(INFO, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + b"a test disk")
        + rep(INFO, REP_INFO, block_size)
        + rep(INFO, ACK)
    )
    assert hs.next_event() == NeedData()  # INFO keeps negotiating

    assert exchange(hs, opt(GO, info_request("disk", INFO_BLOCK_SIZE))) == (
        info_export(1 << 30, DISK_FLAGS) + rep(GO, REP_INFO, block_size) + rep(GO, ACK)
    )
    assert hs.next_event() == HandshakeDone(DISK, False, None, True)


def test_go_without_info_requests_sends_only_info_export() -> None:
    hs = started(0b01)  # NO_ZEROES does not matter to GO: never any padding
    assert exchange(hs, opt(GO, info_request("snap"))) == (
        info_export(64 * MiB, SNAP_FLAGS) + rep(GO, ACK)
    )
    assert hs.next_event() == HandshakeDone(SNAP, False, None, False)


def test_go_sends_block_size_unasked_when_alignment_is_not_the_default() -> None:
    aligned = ExportInfo("a", "", 1 * MiB, False, False, min_block=512, max_block=4 * MiB)
    hs = started(0b11, aligned)
    assert exchange(hs, opt(GO, info_request("a"))) == (
        rep(GO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, 1 * MiB, 0x6D))
        + rep(GO, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 512, 4096, 4 * MiB))
        + rep(GO, ACK)
    )


def test_go_to_an_unknown_export_is_err_unknown_and_negotiation_continues() -> None:
    hs = started()
    assert exchange(hs, opt(GO, info_request("nope", INFO_BLOCK_SIZE))) == rep(
        GO, ERR_UNKNOWN, b"export 'nope' not found"
    )
    assert hs.next_event() == NeedData()
    assert exchange(hs, opt(GO, info_request("disk"))) == (
        info_export(1 << 30, DISK_FLAGS) + rep(GO, ACK)
    )
    assert isinstance(hs.next_event(), HandshakeDone)


@pytest.mark.parametrize(
    "data",
    [
        b"",  # shorter than the fixed fields
        b"\x00\x00\x00\x09disk\x00\x00",  # name longer than the data
        b"\x00\x00\x00\x04disk\x00\x02\x00\x03",  # 2 info requests announced, 1 sent
        b"\x00\x00\x00\x04disk\x00\x00\x00",  # a stray byte after the requests
        b"\x00\x00\x00\x02\xff\xfe\x00\x00",  # name not UTF-8
    ],
)
def test_malformed_go_is_err_invalid_and_negotiation_continues(data: bytes) -> None:
    hs = started()
    assert exchange(hs, opt(GO, data)) == rep(GO, ERR_INVALID, b"malformed request")
    assert hs.next_event() == NeedData()


# -- unknown options, STARTTLS --------------------------------------------------------------


@pytest.mark.parametrize(("code", "data"), [(42, b"some data"), (STARTTLS, b""), (11, b"")])
def test_unknown_option_is_err_unsup_and_negotiation_continues(code: int, data: bytes) -> None:
    hs = started()
    assert exchange(hs, opt(code, data)) == rep(code, ERR_UNSUP, b"unsupported option")
    assert exchange(hs, opt(LIST)).endswith(rep(LIST, ACK))


# -- structured replies and metadata contexts -----------------------------------------------


def test_structured_reply_then_set_meta_context_selects_base_allocation() -> None:
    hs = started()
    assert exchange(hs, opt(STRUCTURED_REPLY)) == rep(STRUCTURED_REPLY, ACK)
    set_meta = opt(SET_META_CONTEXT, meta_request("disk", "base:allocation"))
    assert exchange(hs, set_meta) == (
        rep(SET_META_CONTEXT, META_CONTEXT, struct.pack(">I", 1) + b"base:allocation")
        + rep(SET_META_CONTEXT, ACK)
    )
    assert exchange(hs, opt(GO, info_request("disk"))) == (
        info_export(1 << 30, DISK_FLAGS_STRUCTURED) + rep(GO, ACK)
    )
    assert hs.next_event() == HandshakeDone(DISK, True, BASE_ALLOCATION_ID, True)
    assert BASE_ALLOCATION_ID == 1


def test_set_meta_context_before_structured_replies_is_invalid() -> None:
    hs = started()
    set_meta = opt(SET_META_CONTEXT, meta_request("disk", "base:allocation"))
    assert exchange(hs, set_meta) == rep(
        SET_META_CONTEXT, ERR_INVALID, b"negotiate structured replies first"
    )
    exchange(hs, opt(STRUCTURED_REPLY))
    exchange(hs, opt(GO, info_request("disk")))
    assert hs.next_event() == HandshakeDone(DISK, True, None, True)


def test_structured_reply_twice_or_with_data_is_invalid() -> None:
    hs = started()
    assert exchange(hs, opt(STRUCTURED_REPLY, b"x")) == rep(
        STRUCTURED_REPLY, ERR_INVALID, b"unexpected data"
    )
    assert exchange(hs, opt(STRUCTURED_REPLY)) == rep(STRUCTURED_REPLY, ACK)
    assert exchange(hs, opt(STRUCTURED_REPLY)) == rep(
        STRUCTURED_REPLY, ERR_INVALID, b"structured replies already negotiated"
    )


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ((), True),  # no query: everything
        (("base:",), True),  # the namespace wildcard
        (("base:allocation",), True),
        (("qemu:dirty-bitmap:x", "base:nothing"), False),  # unknown: ignored, not an error
    ],
)
def test_list_meta_context(queries: tuple[str, ...], listed: bool) -> None:
    hs = started()
    exchange(hs, opt(STRUCTURED_REPLY))
    context = rep(LIST_META_CONTEXT, META_CONTEXT, b"\x00\x00\x00\x00base:allocation")
    assert exchange(hs, opt(LIST_META_CONTEXT, meta_request("disk", *queries))) == (
        (context if listed else b"") + rep(LIST_META_CONTEXT, ACK)
    )


def test_meta_context_for_an_unknown_export_is_err_unknown() -> None:
    hs = started()
    exchange(hs, opt(STRUCTURED_REPLY))
    assert exchange(hs, opt(SET_META_CONTEXT, meta_request("x", "base:allocation"))) == rep(
        SET_META_CONTEXT, ERR_UNKNOWN, b"export 'x' not found"
    )


def test_malformed_meta_context_request_is_invalid() -> None:
    hs = started()
    exchange(hs, opt(STRUCTURED_REPLY))
    bad = meta_request("disk", "base:allocation")[:-1]  # query runs past the data
    assert exchange(hs, opt(SET_META_CONTEXT, bad)) == rep(
        SET_META_CONTEXT, ERR_INVALID, b"malformed request"
    )


@pytest.mark.parametrize(
    ("second", "reply"),
    [
        (meta_request("disk"), rep(SET_META_CONTEXT, ACK)),  # zero queries select nothing
        (meta_request("disk", "base:"), rep(SET_META_CONTEXT, ACK)),  # no wildcard in SET
        # even a failed SET_META_CONTEXT replaces the selection
        (b"\x00", rep(SET_META_CONTEXT, ERR_INVALID, b"malformed request")),
    ],
)
def test_a_later_set_meta_context_replaces_the_selection(second: bytes, reply: bytes) -> None:
    hs = started()
    exchange(hs, opt(STRUCTURED_REPLY))
    exchange(hs, opt(SET_META_CONTEXT, meta_request("disk", "base:allocation")))
    assert exchange(hs, opt(SET_META_CONTEXT, second)) == reply
    exchange(hs, opt(GO, info_request("disk")))
    assert hs.next_event() == HandshakeDone(DISK, True, None, True)


def test_meta_context_selected_for_another_export_does_not_carry_over() -> None:
    hs = started()
    exchange(hs, opt(STRUCTURED_REPLY))
    exchange(hs, opt(SET_META_CONTEXT, meta_request("snap", "base:allocation")))
    exchange(hs, opt(GO, info_request("disk")))
    assert hs.next_event() == HandshakeDone(DISK, True, None, True)


# -- ending the negotiation -----------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_is_acked_then_closed_cleanly(data: bytes) -> None:
    hs = started()
    assert exchange(hs, opt(ABORT, data) + opt(LIST)) == rep(ABORT, ACK)
    assert hs.next_event() == Closed("client sent NBD_OPT_ABORT", clean=True)
    assert exchange(hs, opt(LIST)) == b""  # nothing more is answered


def test_garbage_option_magic_closes() -> None:
    hs = started()
    assert exchange(hs, b"GET / HTTP/1.1\r\n\r\n") == b""
    event = hs.next_event()
    assert isinstance(event, Closed) and "magic" in event.reason
    assert len(hs._buf) == 0  # the rest of the garbage is not kept


def test_huge_option_length_closes_at_the_header_without_buffering() -> None:
    hs = started()
    hs.receive_data(struct.pack(">QII", IHAVEOPT, GO, 0xFFFFFFFF))
    assert isinstance(hs.next_event(), Closed)
    hs.receive_data(bytes(MiB))
    assert len(hs._buf) == 0 and hs.trailing_data() == b""
    assert hs.data_to_send() == b""


def test_option_data_over_the_parse_limit_is_discarded_as_it_arrives() -> None:
    hs = started()
    length = MAX_OPTION_DATA + 1
    assert length <= MAX_OPTION_SKIP
    hs.receive_data(struct.pack(">QII", IHAVEOPT, GO, length))
    for _ in range(length // (4 * KiB)):
        hs.receive_data(bytes(4 * KiB))
        assert len(hs._buf) == 0  # never accumulated
    assert hs.data_to_send() == b""
    assert exchange(hs, b"\x00") == rep(GO, ERR_TOO_BIG, b"option data too big")
    assert exchange(hs, opt(LIST)).endswith(rep(LIST, ACK))


def test_one_byte_at_a_time_gives_the_same_bytes_and_event() -> None:
    session = (
        struct.pack(">I", 0b11)
        + opt(LIST)
        + opt(42, b"?")
        + opt(STRUCTURED_REPLY)
        + opt(SET_META_CONTEXT, meta_request("disk", "base:allocation"))
        + opt(INFO, info_request("snap", INFO_NAME))
        + opt(GO, info_request("disk", INFO_BLOCK_SIZE))
    )
    whole = ServerHandshake(Catalog(DISK, SNAP))
    expected = exchange(whole, session)
    assert whole.next_event() == HandshakeDone(DISK, True, 1, True)

    bytewise = ServerHandshake(Catalog(DISK, SNAP))
    out = b""
    for i in range(len(session)):
        out += exchange(bytewise, session[i : i + 1])
        if i < len(session) - 1:
            assert bytewise.next_event() == NeedData()
    assert out == expected
    assert bytewise.next_event() == whole.next_event()


def test_bytes_after_go_are_kept_for_the_transmission_phase() -> None:
    hs = started()
    early = b"\x25\x60\x95\x13" + bytes(24)
    hs.receive_data(opt(GO, info_request("disk")) + early[:10])
    hs.receive_data(early[10:])
    assert isinstance(hs.next_event(), HandshakeDone)
    assert hs.trailing_data() == early


def test_shutdown_refuses_options_but_still_acks_abort() -> None:
    hs = started()
    hs.begin_shutdown()
    assert exchange(hs, opt(GO, info_request("disk"))) == rep(
        GO, ERR_SHUTDOWN, b"server shutting down"
    )
    assert exchange(hs, opt(ABORT)) == rep(ABORT, ACK)
    assert isinstance(hs.next_event(), Closed)


def test_end_of_file_during_the_handshake_closes() -> None:
    hs = started()
    hs.receive_data(opt(LIST)[:5])
    hs.receive_eof()
    event = hs.next_event()
    assert isinstance(event, Closed) and not event.clean


# -- export descriptions --------------------------------------------------------------------


def test_transmission_flags_follow_the_export() -> None:
    assert transmission_flags(DISK, structured=False) == DISK_FLAGS
    assert transmission_flags(DISK, structured=True) == DISK_FLAGS_STRUCTURED
    assert transmission_flags(SNAP, structured=False) == SNAP_FLAGS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": -1},
        {"size": 1 << 64},
        {"min_block": 3},
        {"min_block": 1 << 17},
        {"preferred_block": 256},
        {"min_block": 8192, "preferred_block": 4096},
        {"max_block": 2048},
        {"max_block": 1 << 32},
    ],
)
def test_export_info_rejects_impossible_size_constraints(kwargs: dict[str, int]) -> None:
    fields = {"size": MiB, **kwargs}
    with pytest.raises(ValueError):
        ExportInfo("x", "", read_only=False, can_multi_conn=False, **fields)
