"""The inode object's pure core: header codec, owner refs, byte-range splitting, allocation."""

from __future__ import annotations

from array import array

import pytest

from sheep.oid import MAX_COPIES, MAX_VDI_ID, ObjType, oid_copies, oid_index, oid_type, oid_vdi
from sheep.vdi.inode import (
    ENTRY_SIZE,
    HEADER_SIZE,
    MAX_NAME,
    InodeError,
    InodeHeader,
    allocation,
    block_oid,
    blocks_for,
    decode_table,
    make_ref,
    max_blocks,
    max_vdi_size,
    new_table,
    pack_entry,
    ref_copies,
    ref_vdi,
    spans,
    table_offset,
    unpack_entry,
)

MiB = 1 << 20
BS = 4 * MiB


def _header(**changes: object) -> InodeHeader:
    fields: dict = dict(vdi_id=42, name="disk", tag="", parent=7, size=10 * BS + 123, copies=3,
                        block_size=BS, created=1_700_000_000.25)
    fields.update(changes)
    return InodeHeader(**fields)


# -- header -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        _header(),
        _header(snapshot=True, tag="before-upgrade", snap_time=1_700_000_100.5),
        _header(name="ünïcødé-名前", tag="täg", snapshot=True, snap_time=1.0),
        _header(vdi_id=MAX_VDI_ID, parent=MAX_VDI_ID - 1, copies=MAX_COPIES,
                size=max_vdi_size(BS)),
        _header(name="n" * MAX_NAME, tag="t" * MAX_NAME, snapshot=True),
    ],
    ids=["working", "snapshot", "unicode", "limits", "longest-names"],
)
def test_header_encode_decode_round_trip(header: InodeHeader) -> None:
    raw = header.encode()
    assert len(raw) == HEADER_SIZE
    assert InodeHeader.decode(raw) == header


def test_header_decodes_from_a_whole_inode_object_with_a_table_behind_it() -> None:
    header = _header()
    raw = header.encode() + pack_entry(make_ref(42, 3)) * 10
    assert InodeHeader.decode(memoryview(raw)) == header
    assert InodeHeader.decode(bytearray(raw)) == header


def test_header_decode_refuses_bad_magic() -> None:
    raw = bytearray(_header().encode())
    raw[:4] = b"XXXX"
    with pytest.raises(InodeError, match="magic"):
        InodeHeader.decode(raw)


def test_header_decode_refuses_all_zero_bytes_as_not_an_inode() -> None:
    with pytest.raises(InodeError, match="magic"):
        InodeHeader.decode(bytes(HEADER_SIZE))


def test_header_decode_refuses_an_unknown_version() -> None:
    raw = bytearray(_header().encode())
    raw[4:6] = (99).to_bytes(2, "little")
    with pytest.raises(InodeError, match="version 99"):
        InodeHeader.decode(raw)


def test_header_decode_refuses_a_short_buffer() -> None:
    with pytest.raises(InodeError, match="shorter"):
        InodeHeader.decode(_header().encode()[:20])


def test_header_decode_refuses_a_name_that_is_not_utf8() -> None:
    header = _header(name="ab")
    raw = bytearray(header.encode())
    start = raw.index(b"ab")
    raw[start : start + 2] = b"\xff\xfe"
    with pytest.raises(InodeError, match="decode"):
        InodeHeader.decode(raw)


def test_inode_error_is_a_value_error() -> None:
    assert issubclass(InodeError, ValueError)


@pytest.mark.parametrize("field", ["name", "tag"])
def test_header_encode_refuses_names_over_255_bytes(field: str) -> None:
    with pytest.raises(InodeError, match="255"):
        _header(**{field: "x" * (MAX_NAME + 1)}).encode()
    with pytest.raises(InodeError):  # bytes count, not characters
        _header(**{field: "é" * 128}).encode()


# -- owner refs ---------------------------------------------------------------------------


def test_make_ref_round_trips_vdi_id_and_copies() -> None:
    for vdi_id, copies in [(1, 0), (1, 3), (12345, 2), (MAX_VDI_ID, MAX_COPIES)]:
        ref = make_ref(vdi_id, copies)
        assert ref != 0
        assert ref_vdi(ref) == vdi_id
        assert ref_copies(ref) == copies
        assert ref < 1 << (8 * ENTRY_SIZE)  # fits a table entry


@pytest.mark.parametrize(("vdi_id", "copies"),
                         [(0, 3), (-1, 3), (MAX_VDI_ID + 1, 3), (5, -1), (5, MAX_COPIES + 1)])
def test_make_ref_refuses_out_of_range_owners(vdi_id: int, copies: int) -> None:
    with pytest.raises(ValueError):
        make_ref(vdi_id, copies)


def test_block_oid_names_the_owners_data_object_with_its_copies() -> None:
    ref = make_ref(0xABCDE, 2)
    oid = block_oid(ref, 17)
    assert oid_type(oid) == ObjType.DATA
    assert oid_vdi(oid) == 0xABCDE
    assert oid_index(oid) == 17
    assert oid_copies(oid) == 2


def test_block_oids_differ_by_owner_index_and_copies() -> None:
    oids = {block_oid(make_ref(v, c), i) for v in (1, 2) for c in (1, 3) for i in (0, 1)}
    assert len(oids) == 8


def test_table_entries_pack_little_endian_at_their_offsets() -> None:
    ref = make_ref(0x123456, 3)
    assert pack_entry(ref) == ref.to_bytes(4, "little")
    assert unpack_entry(pack_entry(ref)) == ref
    assert table_offset(0) == HEADER_SIZE
    assert table_offset(5) == HEADER_SIZE + 5 * ENTRY_SIZE


def test_decode_table_pads_a_short_table_with_holes() -> None:
    refs = [make_ref(3, 3), 0, make_ref(9, 1)]
    raw = array("I", refs).tobytes()
    assert list(decode_table(raw, 3)) == refs
    assert list(decode_table(raw, 5)) == [*refs, 0, 0]
    assert list(decode_table(raw + bytes(8), 2)) == refs[:2]
    assert list(new_table(4)) == [0, 0, 0, 0]


# -- sizes --------------------------------------------------------------------------------


def test_max_sizes_follow_from_what_one_inode_object_can_map() -> None:
    assert max_blocks(BS) == (BS - HEADER_SIZE) // ENTRY_SIZE == 1_047_552
    assert max_vdi_size(BS) == 1_047_552 * BS  # just under 4 TiB
    assert max_blocks(64 << 10) == 15_360
    assert max_vdi_size(64 << 10) == 15_360 * (64 << 10)
    # the whole table of the largest VDI fits in its inode object
    assert table_offset(max_blocks(BS) - 1) + ENTRY_SIZE <= BS


def test_blocks_for_rounds_up() -> None:
    assert blocks_for(1, BS) == 1
    assert blocks_for(BS, BS) == 1
    assert blocks_for(BS + 1, BS) == 2
    assert blocks_for(max_vdi_size(BS), BS) == max_blocks(BS)


# -- spans --------------------------------------------------------------------------------


def test_spans_of_a_range_inside_one_block() -> None:
    assert list(spans(BS + 100, 50, BS)) == [(1, 100, 50, 0)]


def test_spans_split_a_range_straddling_a_block_boundary() -> None:
    assert list(spans(BS - 3, 10, BS)) == [(0, BS - 3, 3, 0), (1, 0, 7, 3)]


def test_spans_of_a_range_covering_several_whole_blocks() -> None:
    assert list(spans(BS, 3 * BS, BS)) == [(1, 0, BS, 0), (2, 0, BS, BS), (3, 0, BS, 2 * BS)]


def test_spans_with_ragged_ends_on_both_sides() -> None:
    bs = 16
    assert list(spans(10, 40, bs)) == [(0, 10, 6, 0), (1, 0, 16, 6), (2, 0, 16, 22),
                                       (3, 0, 2, 38)]


def test_spans_of_an_empty_range_is_empty() -> None:
    assert list(spans(12345, 0, BS)) == []


def test_spans_cover_every_byte_exactly_once() -> None:
    bs = 8
    for offset in range(0, 20):
        for length in range(0, 30):
            pieces = list(spans(offset, length, bs))
            covered = [index * bs + inner + i for index, inner, n, _ in pieces for i in range(n)]
            assert covered == list(range(offset, offset + length))
            assert [pos for *_, pos in pieces] == [sum(p[2] for p in pieces[:k])
                                                   for k in range(len(pieces))]
            assert all(0 < n <= bs and inner + n <= bs for _, inner, n, _ in pieces)


# -- allocation ---------------------------------------------------------------------------


def test_allocation_merges_runs_of_the_same_kind() -> None:
    r = make_ref(1, 3)
    table = array("I", [r, r, 0, 0, make_ref(2, 3), 0])
    assert allocation(table, 0, 6 * BS, BS) == [(2 * BS, True), (2 * BS, False), (BS, True),
                                                (BS, False)]


def test_allocation_of_a_partial_range_counts_only_its_bytes() -> None:
    table = array("I", [0, make_ref(1, 3), 0])
    assert allocation(table, BS - 10, 20, BS) == [(10, False), (10, True)]
    assert allocation(table, BS + 5, 5, BS) == [(5, True)]


def test_allocation_of_a_thin_table_is_one_hole() -> None:
    assert allocation(new_table(4), 0, 4 * BS, BS) == [(4 * BS, False)]


def test_allocation_past_the_table_is_a_hole() -> None:
    table = array("I", [make_ref(1, 3)])
    assert allocation(table, 0, 3 * BS, BS) == [(BS, True), (2 * BS, False)]


def test_allocation_of_an_empty_range_has_no_runs() -> None:
    assert allocation(new_table(2), BS, 0, BS) == []
