"""Sense data and the CDB table, byte for byte: fixed-format sense, field pointers,
reserved-bit checks, CDB field decoding and the Data-Out length each CDB announces.

Pure: CDBs are spelled out from the SBC-3/SPC-4 layouts with struct.
"""

from __future__ import annotations

import struct

import pytest

from sheep.gateway.scsi import FieldPointer, ScsiError, SenseKey, fixed_sense
from sheep.gateway.scsi.cdb import COMMANDS, data_out_length, lba_and_count, lookup
from sheep.gateway.scsi.sense import (
    INVALID_FIELD_IN_CDB,
    LBA_OUT_OF_RANGE,
    MISCOMPARE_DURING_VERIFY,
    first_difference,
    miscompare,
)

BS = 512


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x28, flags, lba, 0, blocks, 0)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, flags, lba, blocks, 0, 0)


def test_fixed_sense_layout():
    sense = fixed_sense(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
    assert sense == bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])


def test_fixed_sense_with_information_sets_valid():
    sense = miscompare(0x1234).sense
    assert sense[0] == 0xF0
    assert sense[2] == SenseKey.MISCOMPARE
    assert sense[3:7] == struct.pack(">I", 0x1234)
    assert (sense[12], sense[13]) == MISCOMPARE_DURING_VERIFY


def test_information_too_large_for_fixed_sense_is_not_valid():
    sense = miscompare(1 << 33).sense
    assert sense[0] == 0x70 and sense[3:7] == bytes(4)


def test_field_pointer_in_cdb_with_bit():
    sense = fixed_sense(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB,
                        field=FieldPointer(1, 5))
    assert sense[15:18] == bytes([0x80 | 0x40 | 0x08 | 5, 0, 1])


def test_field_pointer_in_parameter_list_without_bit():
    assert FieldPointer(0x102, in_cdb=False).encode() == bytes([0x80, 0x01, 0x02])


def test_unknown_opcode_is_invalid_command_operation_code():
    with pytest.raises(ScsiError) as err:
        lookup(bytes([0xFF]) + bytes(15))
    assert err.value.key == SenseKey.ILLEGAL_REQUEST
    assert err.value.asc == (0x20, 0x00)


def test_unknown_service_action_points_at_byte_1():
    with pytest.raises(ScsiError) as err:
        lookup(bytes([0x9E, 0x1F]) + bytes(14))
    assert err.value.asc == INVALID_FIELD_IN_CDB
    assert err.value.field == FieldPointer(1, 4)


def test_reserved_bit_is_refused_with_bit_pointer():
    with pytest.raises(ScsiError) as err:
        lookup(read10(0, 1, flags=0x20))  # RDPROTECT 1
    assert err.value.field == FieldPointer(1, 5)


def test_naca_in_control_byte_is_refused():
    cdb = bytearray(read10(0, 1))
    cdb[9] = 0x04
    with pytest.raises(ScsiError) as err:
        lookup(bytes(cdb))
    assert err.value.field == FieldPointer(9, 2)


def test_dpo_fua_and_fua_nv_are_accepted():
    assert lookup(read10(0, 1, flags=0x10 | 0x08 | 0x02)).name == "READ_10"


def test_short_cdb_is_invalid_field():
    with pytest.raises(ScsiError) as err:
        lookup(bytes([0x28, 0, 0]))
    assert err.value.asc == INVALID_FIELD_IN_CDB


def test_padded_cdb_is_accepted():
    assert lookup(bytes(6) + bytes(10)).name == "TEST_UNIT_READY"


def test_usage_data_length_matches_opcode_group():
    for command in COMMANDS:
        group = command.opcode >> 5
        assert command.length == {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}[group], command.name


def test_read6_transfer_length_zero_means_256():
    assert lba_and_count(bytes([0x08, 0x1F, 0xFF, 0xFF, 0, 0])) == (0x1FFFFF, 256)


def test_lba_and_count_16():
    assert lba_and_count(write16(0x0102030405060708, 0x11223344)) == (
        0x0102030405060708, 0x11223344)


def test_compare_and_write_count_is_byte_13():
    cdb = struct.pack(">BBQ3xBBB", 0x89, 0, 77, 3, 0, 0)
    assert lba_and_count(cdb) == (77, 3)


@pytest.mark.parametrize(
    ("cdb", "length"),
    [
        (write16(0, 8), 8 * BS),
        (bytes([0x0A, 0, 0, 0, 0, 0]), 256 * BS),  # WRITE(6), 0 = 256 blocks
        (struct.pack(">BBIBHB", 0x2F, 0x02, 0, 0, 4, 0), 4 * BS),  # VERIFY BYTCHK 01b
        (struct.pack(">BBIBHB", 0x2F, 0x06, 0, 0, 4, 0), BS),  # VERIFY BYTCHK 11b
        (struct.pack(">BBIBHB", 0x2F, 0x00, 0, 0, 4, 0), 0),  # VERIFY, no compare
        (struct.pack(">BBIBHB", 0x41, 0x08, 0, 0, 9, 0), BS),  # WRITE SAME(10)
        (struct.pack(">BBQIBB", 0x93, 0x09, 0, 9, 0, 0), 0),  # WRITE SAME(16) NDOB
        (struct.pack(">BBQ3xBBB", 0x89, 0, 0, 3, 0, 0), 6 * BS),  # COMPARE AND WRITE
        (struct.pack(">BB4xBHB", 0x42, 0, 0, 24, 0), 24),  # UNMAP
        (bytes([0x15, 0x10, 0, 0, 20, 0]), 20),  # MODE SELECT(6)
        (read10(0, 8), 0),
        (bytes([0xFF]) + bytes(9), 0),  # unknown: 0, and execute() will refuse it
        (read10(0, 1, flags=0x20), 0),  # malformed
    ],
)
def test_data_out_length(cdb: bytes, length: int):
    assert data_out_length(cdb, BS) == length


def test_first_difference_finds_first_byte():
    a = bytes(100_000)
    b = bytearray(a)
    b[76_543] = 1
    b[90_000] = 1
    assert first_difference(a, b) == 76_543
    assert first_difference(a, a) is None
