"""REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): the all-commands and one-command formats.

Both are generated from `cdb.COMMANDS`, the same table `check_cdb` enforces, so the CDB
usage data can never claim a bit the executor refuses (or the reverse).
"""

from __future__ import annotations

import struct

from .cdb import COMMANDS, SERVICE_ACTION_OPCODES, Command, find_command
from .sense import Buffer, invalid_field

ALL, ONE_OPCODE, ONE_SERVICE_ACTION, ONE_EITHER = 0, 1, 2, 3

SUPPORT_NOT_SUPPORTED = 0x01
SUPPORT_STANDARD = 0x03

# COMMAND TIMEOUTS DESCRIPTOR: length 0Ah, no command-specific data, and 0 (unspecified)
# for the nominal and recommended timeouts: the work a command does depends on the cluster
_TIMEOUTS = struct.pack(">HBBII", 0x0A, 0, 0, 0, 0)


def report_supported_opcodes(cdb: Buffer) -> bytes:
    """The whole response (not yet truncated to the allocation length)."""
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    opcode = cdb[3]
    service_action = int.from_bytes(cdb[4:6], "big")
    if options == ALL:
        return _all_commands(rctd)
    has_actions = opcode in SERVICE_ACTION_OPCODES
    if options == ONE_OPCODE:
        if has_actions:
            raise invalid_field(3, detail=f"opcode {opcode:#04x} has service actions")
        return _one_command(find_command(opcode, None), rctd)
    if options == ONE_SERVICE_ACTION:
        if not has_actions:
            raise invalid_field(3, detail=f"opcode {opcode:#04x} has no service actions")
        return _one_command(find_command(opcode, service_action), rctd)
    if options == ONE_EITHER:
        if not has_actions and service_action:
            raise invalid_field(4, detail=f"opcode {opcode:#04x} has no service actions")
        return _one_command(find_command(opcode, service_action), rctd)
    raise invalid_field(2, 2, f"reporting options {options} are not supported")


def _all_commands(rctd: bool) -> bytes:
    out = bytearray()
    for command in sorted(COMMANDS, key=lambda c: (c.opcode, c.service_action or 0)):
        flags = (0x02 if rctd else 0) | (0x01 if command.service_action is not None else 0)
        out += struct.pack(">BBHBBH", command.opcode, 0, command.service_action or 0, 0,
                           flags, command.length)
        if rctd:
            out += _TIMEOUTS
    return struct.pack(">I", len(out)) + out


def _one_command(command: Command | None, rctd: bool) -> bytes:
    if command is None:
        return bytes((0, SUPPORT_NOT_SUPPORTED, 0, 0))
    head = struct.pack(">BBH", 0, (0x80 if rctd else 0) | SUPPORT_STANDARD, command.length)
    return head + command.usage + (_TIMEOUTS if rctd else b"")
