"""REPORT SUPPORTED OPERATION CODES, byte for byte, and its agreement with what the
executor's CDB check accepts."""

from __future__ import annotations

import struct

import pytest

from sheep.gateway.scsi import COMMANDS, ScsiError
from sheep.gateway.scsi.cdb import lookup
from sheep.gateway.scsi.opcodes import report_supported_opcodes


def rsoc(options: int, opcode: int = 0, sa: int = 0, rctd: bool = False) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, options | (0x80 if rctd else 0), opcode, sa,
                       0xFFFF, 0, 0)


def descriptors(data: bytes) -> list[tuple[int, int, int, int]]:
    length = struct.unpack(">I", data[:4])[0]
    assert length == len(data) - 4
    out, pos = [], 4
    while pos < len(data):
        opcode, sa, flags, cdb_length = struct.unpack(">BxHxBH", data[pos:pos + 8])
        out.append((opcode, sa, flags, cdb_length))
        pos += 8 + (12 if flags & 0x02 else 0)
    return out


def test_all_commands_lists_every_command_once():
    found = descriptors(report_supported_opcodes(rsoc(0)))
    assert len(found) == len(COMMANDS)
    assert {(op, sa) for op, sa, _, _ in found} == {
        (c.opcode, c.service_action or 0) for c in COMMANDS}


def test_all_commands_marks_service_actions():
    found = {(op, sa): flags for op, sa, flags, _ in descriptors(report_supported_opcodes(rsoc(0)))}
    assert found[(0x9E, 0x10)] == 0x01 and found[(0x9E, 0x12)] == 0x01
    assert found[(0xA3, 0x0C)] == 0x01
    assert found[(0x28, 0)] == 0x00


def test_all_commands_with_rctd_has_timeout_descriptors():
    data = report_supported_opcodes(rsoc(0, rctd=True))
    found = descriptors(data)
    assert all(flags & 0x02 for _, _, flags, _ in found)
    assert data[12:14] == b"\x00\x0a"  # the first timeouts descriptor's length


def test_one_command_read10_usage_data():
    data = report_supported_opcodes(rsoc(1, 0x28))
    assert data[:4] == b"\x00\x03\x00\x0a"  # supported per standard, CDB size 10
    assert data[4:] == bytes.fromhex("28 1a ffffffff 1f ffff 00")


def test_one_command_with_rctd_appends_timeouts():
    data = report_supported_opcodes(rsoc(1, 0x2A, rctd=True))
    assert data[1] == 0x80 | 0x03 and len(data) == 4 + 10 + 12


def test_one_command_unsupported_opcode_reports_not_supported():
    assert report_supported_opcodes(rsoc(1, 0x04)) == b"\x00\x01\x00\x00"


def test_one_command_service_action_usage_holds_the_service_action():
    data = report_supported_opcodes(rsoc(2, 0x9E, 0x10))
    assert data[4] == 0x9E and data[5] == 0x10 and len(data) == 4 + 16


def test_opcode_format_for_service_action_opcode_is_invalid_field():
    with pytest.raises(ScsiError) as err:
        report_supported_opcodes(rsoc(1, 0x9E))
    assert err.value.asc == (0x24, 0x00) and err.value.field.byte != 1


def test_service_action_format_for_plain_opcode_is_invalid_field():
    with pytest.raises(ScsiError) as err:
        report_supported_opcodes(rsoc(2, 0x28))
    assert err.value.asc == (0x24, 0x00) and err.value.field.byte != 1


def test_reserved_reporting_option_is_invalid_field():
    with pytest.raises(ScsiError):
        report_supported_opcodes(rsoc(5))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_usage_data_is_accepted_by_the_cdb_check(command):
    # every bit the usage data claims must pass check_cdb (service action bits excepted)
    assert lookup(command.usage) is command


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_bits_outside_usage_data_are_refused(command):
    for i in range(1, command.length):
        unused = ~command.usage[i] & 0xFF
        if command.service_action is not None and i == 1:
            unused &= 0xE0
        if not unused:
            continue
        cdb = bytearray(command.usage[:2]) + bytes(command.length - 2)
        cdb[i] |= unused
        with pytest.raises(ScsiError) as err:
            lookup(bytes(cdb))
        assert err.value.field.byte == i
