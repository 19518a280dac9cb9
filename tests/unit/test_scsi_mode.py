"""MODE SENSE(6)/(10) and MODE SELECT, byte for byte. Pure: the builders take the CDB."""

from __future__ import annotations

import struct

import pytest

from sheep.gateway.scsi import ScsiError
from sheep.gateway.scsi.mode import mode_select, mode_sense

BLOCKS = 2048


def sense6(page: int, pc: int = 0, dbd: bool = False, subpage: int = 0) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, 255, 0])


def sense10(page: int, llbaa: bool = False, dbd: bool = False) -> bytes:
    return struct.pack(">BBBB3xHB", 0x5A, (0x10 if llbaa else 0) | (0x08 if dbd else 0),
                       page, 0, 0xFFFF, 0)


def run(cdb: bytes, read_only: bool = False) -> bytes:
    return mode_sense(cdb, ten=cdb[0] == 0x5A, num_blocks=BLOCKS, block_size=512,
                      read_only=read_only)


def pages(data: bytes, header: int) -> dict[int, bytes]:
    pos = header + (data[3] if header == 4 else struct.unpack(">H", data[6:8])[0])
    out = {}
    while pos < len(data):
        out[data[pos] & 0x3F] = data[pos:pos + 2 + data[pos + 1]]
        pos += 2 + data[pos + 1]
    return out


def test_all_pages_header_and_block_descriptor():
    data = run(sense6(0x3F))
    assert data[0] == len(data) - 1
    assert data[1] == 0 and data[2] == 0x10  # DPOFUA, not write protected
    assert data[3] == 8
    assert data[4:12] == struct.pack(">I", BLOCKS) + b"\x00\x00\x02\x00"
    assert sorted(pages(data, 4)) == [0x08, 0x0A, 0x1C]


def test_caching_page_has_wce():
    page = pages(run(sense6(0x08)), 4)[0x08]
    assert page[:3] == b"\x08\x12\x04" and len(page) == 20


def test_control_page_uses_fixed_sense_and_is_consistent_with_all_pages():
    control = pages(run(sense6(0x0A)), 4)[0x0A]
    assert len(control) == 12 and not control[2] & 0x04  # D_SENSE 0
    assert pages(run(sense6(0x3F)), 4)[0x0A] == control


def test_read_only_sets_wp():
    assert run(sense6(0x3F), read_only=True)[2] == 0x80 | 0x10


def test_dbd_omits_block_descriptor():
    data = run(sense6(0x08, dbd=True))
    assert data[3] == 0 and data[4] == 0x08


def test_changeable_values_are_all_zero():
    page = pages(run(sense6(0x08, pc=1)), 4)[0x08]
    assert page[:2] == b"\x08\x12" and not any(page[2:])


def test_default_values_equal_current():
    assert run(sense6(0x3F, pc=2)) == run(sense6(0x3F))


def test_saved_values_are_not_supported():
    with pytest.raises(ScsiError) as err:
        run(sense6(0x08, pc=3))
    assert err.value.asc == (0x39, 0x00)


def test_unsupported_page_is_invalid_field():
    with pytest.raises(ScsiError) as err:
        run(sense6(0x19))
    assert err.value.asc == (0x24, 0x00) and err.value.field.byte == 2


def test_unsupported_subpage_is_invalid_field():
    with pytest.raises(ScsiError) as err:
        run(sense6(0x0A, subpage=1))
    assert err.value.field.byte == 3


def test_all_subpages_is_accepted():
    assert run(sense6(0x3F, subpage=0xFF)) == run(sense6(0x3F))


def test_mode_sense10_long_lba_descriptor():
    data = run(sense10(0x08, llbaa=True))
    assert struct.unpack(">H", data[:2])[0] == len(data) - 2
    assert data[4] & 0x01 and struct.unpack(">H", data[6:8])[0] == 16
    assert data[8:24] == struct.pack(">QII", BLOCKS, 0, 512)


def test_mode_select_restating_current_values_is_accepted():
    current = run(sense6(0x08, dbd=True))
    params = bytes(4) + current[4:]
    mode_select(bytes([0x15, 0x10, 0, 0, len(params), 0]), params, ten=False, block_size=512)


def test_mode_select_changing_wce_is_refused_at_that_byte():
    params = bytearray(bytes(4) + run(sense6(0x08, dbd=True))[4:])
    params[4 + 2] = 0x00  # WCE off
    with pytest.raises(ScsiError) as err:
        mode_select(bytes([0x15, 0x10, 0, 0, len(params), 0]), bytes(params), ten=False,
                    block_size=512)
    assert err.value.asc == (0x26, 0x00) and err.value.field.byte == 6


def test_mode_select_save_pages_is_refused():
    with pytest.raises(ScsiError):
        mode_select(bytes([0x15, 0x11, 0, 0, 0, 0]), b"", ten=False, block_size=512)


def test_mode_select_short_parameter_list_is_length_error():
    with pytest.raises(ScsiError) as err:
        mode_select(bytes([0x15, 0x10, 0, 0, 3, 0]), bytes(3), ten=False, block_size=512)
    assert err.value.asc == (0x1A, 0x00)
