"""CDB decoding: the supported commands, their CDB usage data, and field extraction.

One table drives two things that must agree: REPORT SUPPORTED OPERATION CODES returns each
command's CDB USAGE DATA, and `check_cdb` rejects any CDB bit that the usage data does not
list. A field this target does not implement (RDPROTECT, ANCHOR, PBDATA, NACA in the control
byte, ...) is therefore absent from the bitmap *and* refused with INVALID FIELD IN CDB and a
bit-precise field pointer, which is exactly what libiscsi checks for both.

Service actions (SERVICE ACTION IN(16), MAINTENANCE IN) carry their value in byte 1 bits
4-0; per SPC-4 the usage data holds the service action value there, not a mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .sense import Buffer, ScsiError, invalid_field, invalid_opcode


class Op(IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF


class Sa(IntEnum):
    READ_CAPACITY_16 = 0x10  # SERVICE ACTION IN(16)
    GET_LBA_STATUS = 0x12  # SERVICE ACTION IN(16)
    REPORT_SUPPORTED_OPCODES = 0x0C  # MAINTENANCE IN


SERVICE_ACTION_OPCODES = frozenset({Op.SERVICE_ACTION_IN_16, Op.MAINTENANCE_IN})
SA_MASK = 0x1F


@dataclass(frozen=True)
class Command:
    opcode: int
    service_action: int | None
    name: str
    usage: bytes  # CDB USAGE DATA; its length is the CDB length

    @property
    def length(self) -> int:
        return len(self.usage)


def _cmd(opcode: Op, usage: str, sa: Sa | None = None) -> Command:
    data = bytearray(bytes.fromhex(usage))
    data[0] = opcode
    if sa is not None:
        data[1] = (data[1] & ~SA_MASK) | sa
    name = (sa or opcode).name
    return Command(int(opcode), None if sa is None else int(sa), name, bytes(data))


# Byte 0 is filled in from the opcode. Flags in byte 1 of the READ/WRITE family:
# DPO 10h, FUA 08h, FUA_NV 02h (accepted, ignored); BYTCHK 06h for VERIFY (00b, 01b, 11b),
# 02h for WRITE AND VERIFY; UNMAP 08h and NDOB 01h for WRITE SAME. Group numbers (1Fh)
# are accepted and ignored. Every control byte is 00h: NACA and LINK are not supported.
_LBA4, _LBA8 = "ffffffff", "ffffffffffffffff"
COMMANDS: tuple[Command, ...] = (
    _cmd(Op.TEST_UNIT_READY, "00 00000000 00"),
    _cmd(Op.REQUEST_SENSE, "00 01 0000 ff 00"),
    _cmd(Op.READ_6, "00 1f ffff ff 00"),
    _cmd(Op.WRITE_6, "00 1f ffff ff 00"),
    _cmd(Op.INQUIRY, "00 01 ff ffff 00"),
    _cmd(Op.MODE_SELECT_6, "00 11 0000 ff 00"),
    _cmd(Op.MODE_SENSE_6, "00 08 ff ff ff 00"),
    _cmd(Op.START_STOP_UNIT, "00 01 00 0f f7 00"),
    _cmd(Op.READ_CAPACITY_10, f"00 00 {_LBA4} 0000 01 00"),
    _cmd(Op.READ_10, f"00 1a {_LBA4} 1f ffff 00"),
    _cmd(Op.WRITE_10, f"00 1a {_LBA4} 1f ffff 00"),
    _cmd(Op.WRITE_AND_VERIFY_10, f"00 12 {_LBA4} 1f ffff 00"),
    _cmd(Op.VERIFY_10, f"00 16 {_LBA4} 1f ffff 00"),
    _cmd(Op.SYNCHRONIZE_CACHE_10, f"00 06 {_LBA4} 1f ffff 00"),
    _cmd(Op.WRITE_SAME_10, f"00 08 {_LBA4} 1f ffff 00"),
    _cmd(Op.UNMAP, "00 00 00000000 1f ffff 00"),
    _cmd(Op.MODE_SELECT_10, "00 11 0000000000 ffff 00"),
    _cmd(Op.MODE_SENSE_10, "00 18 ff ff 000000 ffff 00"),
    _cmd(Op.READ_16, f"00 1a {_LBA8} ffffffff 1f 00"),
    _cmd(Op.COMPARE_AND_WRITE, f"00 1a {_LBA8} 000000 ff 1f 00"),
    _cmd(Op.WRITE_16, f"00 1a {_LBA8} ffffffff 1f 00"),
    _cmd(Op.WRITE_AND_VERIFY_16, f"00 12 {_LBA8} ffffffff 1f 00"),
    _cmd(Op.VERIFY_16, f"00 16 {_LBA8} ffffffff 1f 00"),
    _cmd(Op.SYNCHRONIZE_CACHE_16, f"00 06 {_LBA8} ffffffff 1f 00"),
    _cmd(Op.WRITE_SAME_16, f"00 09 {_LBA8} ffffffff 1f 00"),
    _cmd(Op.SERVICE_ACTION_IN_16, f"00 00 {_LBA8} ffffffff 01 00", Sa.READ_CAPACITY_16),
    _cmd(Op.SERVICE_ACTION_IN_16, f"00 00 {_LBA8} ffffffff 00 00", Sa.GET_LBA_STATUS),
    _cmd(Op.REPORT_LUNS, "00 00 ff 000000 ffffffff 00 00"),
    _cmd(Op.MAINTENANCE_IN, "00 00 87 ff ffff ffffffff 00 00", Sa.REPORT_SUPPORTED_OPCODES),
    _cmd(Op.READ_12, f"00 1a {_LBA4} ffffffff 1f 00"),
    _cmd(Op.WRITE_12, f"00 1a {_LBA4} ffffffff 1f 00"),
    _cmd(Op.WRITE_AND_VERIFY_12, f"00 12 {_LBA4} ffffffff 1f 00"),
    _cmd(Op.VERIFY_12, f"00 16 {_LBA4} ffffffff 1f 00"),
)

_BY_KEY: dict[tuple[int, int | None], Command] = {
    (c.opcode, c.service_action): c for c in COMMANDS
}


def find_command(opcode: int, service_action: int | None) -> Command | None:
    """The table entry, with service_action ignored for opcodes that have none."""
    if opcode not in SERVICE_ACTION_OPCODES:
        service_action = None
    return _BY_KEY.get((opcode, service_action))


def lookup(cdb: Buffer) -> Command:
    """The command a CDB names, its length and reserved bits checked."""
    if not cdb:
        raise invalid_opcode()
    opcode = cdb[0]
    if opcode in SERVICE_ACTION_OPCODES:
        if len(cdb) < 2:
            raise invalid_field(1, 4)
        command = _BY_KEY.get((opcode, cdb[1] & SA_MASK))
        if command is None:
            # libiscsi (and SPC-4's own advice) reads this as "not implemented"
            raise invalid_field(1, 4, "unsupported service action")
    else:
        command = _BY_KEY.get((opcode, None))
        if command is None:
            raise invalid_opcode()
    check_cdb(command, cdb)
    return command


def check_cdb(command: Command, cdb: Buffer) -> None:
    if len(cdb) < command.length:
        raise invalid_field(len(cdb), detail=f"{command.name} CDB is too short")
    for i in range(1, command.length):
        allowed = command.usage[i]
        if i == 1 and command.service_action is not None:
            allowed = (allowed & ~SA_MASK) | SA_MASK
        bad = cdb[i] & ~allowed & 0xFF
        if bad:
            raise invalid_field(i, bad.bit_length() - 1,
                                f"{command.name}: unsupported bits {bad:#04x} in byte {i}")


def be(cdb: Buffer, start: int, size: int) -> int:
    return int.from_bytes(cdb[start:start + size], "big")


# -- block addressing ---------------------------------------------------------------------

# opcode -> (LBA offset, LBA size, transfer length offset, transfer length size)
_ADDRESSING: dict[int, tuple[int, int, int, int]] = {}
for _ops, _layout in (
    ((Op.READ_10, Op.WRITE_10, Op.WRITE_AND_VERIFY_10, Op.VERIFY_10,
      Op.SYNCHRONIZE_CACHE_10, Op.WRITE_SAME_10), (2, 4, 7, 2)),
    ((Op.READ_12, Op.WRITE_12, Op.WRITE_AND_VERIFY_12, Op.VERIFY_12), (2, 4, 6, 4)),
    ((Op.READ_16, Op.WRITE_16, Op.WRITE_AND_VERIFY_16, Op.VERIFY_16,
      Op.SYNCHRONIZE_CACHE_16, Op.WRITE_SAME_16), (2, 8, 10, 4)),
    ((Op.COMPARE_AND_WRITE,), (2, 8, 13, 1)),
):
    for _op in _ops:
        _ADDRESSING[_op] = _layout


def lba_and_count(cdb: Buffer) -> tuple[int, int]:
    """LBA and NUMBER OF LOGICAL BLOCKS / TRANSFER LENGTH, as the CDB states them
    (READ(6)/WRITE(6): 21-bit LBA, and a transfer length of 0 means 256)."""
    opcode = cdb[0]
    if opcode in (Op.READ_6, Op.WRITE_6):
        return ((cdb[1] & 0x1F) << 16) | be(cdb, 2, 2), cdb[4] or 256
    lba_at, lba_size, count_at, count_size = _ADDRESSING[opcode]
    return be(cdb, lba_at, lba_size), be(cdb, count_at, count_size)


def count_field(opcode: int) -> int:
    """Byte offset of the transfer length field, for field pointers."""
    return 4 if opcode in (Op.READ_6, Op.WRITE_6) else _ADDRESSING[opcode][2]


READS = frozenset({Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16})
READS = frozenset({Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16})
WRITES = frozenset({Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16})
WRITE_VERIFIES = frozenset({Op.WRITE_AND_VERIFY_10, Op.WRITE_AND_VERIFY_12,
                            Op.WRITE_AND_VERIFY_16})
VERIFIES = frozenset({Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16})
WRITE_SAMES = frozenset({Op.WRITE_SAME_10, Op.WRITE_SAME_16})
SYNCS = frozenset({Op.SYNCHRONIZE_CACHE_10, Op.SYNCHRONIZE_CACHE_16})

# VERIFY BYTCHK (SBC-4 numbering, byte 1 bits 2-1)
BYTCHK_NONE, BYTCHK_COMPARE, BYTCHK_ONE_BLOCK = 0, 1, 3


def bytchk(cdb: Buffer) -> int:
    return (cdb[1] >> 1) & 0x03


def data_in_length(cdb: Buffer, block_size: int) -> int:
    """Bytes of Data-In a READ's CDB asks for (what its buffer will hold); 0 for other
    commands, whose answers are at most an allocation length (64 KiB)."""
    if not cdb or cdb[0] not in READS:
        return 0
    try:
        return lba_and_count(cdb)[1] * block_size
    except (IndexError, KeyError):
        return 0


def data_out_length(cdb: Buffer, block_size: int) -> int:
    """Bytes of Data-Out the CDB itself announces; 0 for anything malformed."""
    try:
        command = lookup(cdb)
    except ScsiError:
        return 0
    opcode = command.opcode
    if opcode in WRITES or opcode in WRITE_VERIFIES:
        return lba_and_count(cdb)[1] * block_size
    if opcode in VERIFIES:
        check, count = bytchk(cdb), lba_and_count(cdb)[1]
        if check == BYTCHK_COMPARE:
            return count * block_size
        if check == BYTCHK_ONE_BLOCK and count:
            return block_size
        return 0
    if opcode == Op.WRITE_SAME_10:
        return block_size
    if opcode == Op.WRITE_SAME_16:
        return 0 if cdb[1] & 0x01 else block_size
    if opcode == Op.COMPARE_AND_WRITE:
        return 2 * cdb[13] * block_size
    if opcode == Op.UNMAP:
        return be(cdb, 7, 2)
    if opcode == Op.MODE_SELECT_6:
        return cdb[4]
    if opcode == Op.MODE_SELECT_10:
        return be(cdb, 7, 2)
    return 0
