"""Status codes, sense data, and the typed errors that become CHECK CONDITION.

Every problem a command can have is raised as a `ScsiError` somewhere below the executor
and turned into a `ScsiResult` in exactly one place (`Lun.execute`), so a handler never
builds sense bytes itself and can never forget the status that goes with them.

Sense data is always fixed format (response code 70h): the Control mode page reports
D_SENSE=0, and libiscsi checks that the format of a real error matches that bit. Only
REQUEST SENSE with DESC=1 asks for descriptor format, and it only ever reports NO SENSE.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

Buffer = bytes | bytearray | memoryview


class Status(IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    TASK_ABORTED = 0x40


@dataclass(frozen=True)
class ScsiResult:
    """What the transport sends back. `data` is the Data-In, already cut to the CDB's
    allocation length (bytes-like: a READ hands over the backend's buffer uncopied);
    `sense` is fixed-format sense data, empty unless the status is CHECK CONDITION."""

    status: Status
    data: Buffer = b""
    sense: bytes = b""


GOOD = ScsiResult(Status.GOOD)


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


class Asc(NamedTuple):
    """An additional sense code and its qualifier."""

    asc: int
    ascq: int


NO_ADDITIONAL_SENSE = Asc(0x00, 0x00)
WRITE_ERROR = Asc(0x0C, 0x00)
INVALID_FIELD_IN_COMMAND_IU = Asc(0x0E, 0x03)
UNRECOVERED_READ_ERROR = Asc(0x11, 0x00)
PARAMETER_LIST_LENGTH_ERROR = Asc(0x1A, 0x00)
MISCOMPARE_DURING_VERIFY = Asc(0x1D, 0x00)
INVALID_COMMAND_OPERATION_CODE = Asc(0x20, 0x00)
LBA_OUT_OF_RANGE = Asc(0x21, 0x00)
INVALID_FIELD_IN_CDB = Asc(0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = Asc(0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = Asc(0x26, 0x00)
WRITE_PROTECTED = Asc(0x27, 0x00)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = Asc(0x27, 0x07)
BUS_DEVICE_RESET_FUNCTION_OCCURRED = Asc(0x29, 0x03)
SAVING_PARAMETERS_NOT_SUPPORTED = Asc(0x39, 0x00)
INTERNAL_TARGET_FAILURE = Asc(0x44, 0x00)
DATA_PHASE_ERROR = Asc(0x4B, 0x00)

FIXED_SENSE_LENGTH = 18


@dataclass(frozen=True)
class FieldPointer:
    """Sense-key-specific field pointer: which byte (and bit) of the CDB or parameter list
    was wrong. libiscsi reads a pointer to byte 1 of a two-byte opcode as "not implemented",
    so every rejection of a supported command must point at the field that caused it."""

    byte: int
    bit: int | None = None
    in_cdb: bool = True

    def encode(self) -> bytes:
        first = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            first |= 0x08 | (self.bit & 0x07)
        return bytes((first,)) + struct.pack(">H", self.byte & 0xFFFF)


class ScsiError(Exception):
    """A command ends in CHECK CONDITION with this sense (or, for `status` BUSY and the
    like, in that status with no sense)."""

    def __init__(
        self,
        key: SenseKey,
        asc: Asc,
        *,
        information: int | None = None,
        field: FieldPointer | None = None,
        status: Status = Status.CHECK_CONDITION,
        detail: str = "",
    ) -> None:
        super().__init__(detail or f"{key.name} asc/ascq {asc.asc:02x}/{asc.ascq:02x}")
        self.key = key
        self.asc = asc
        self.information = information
        self.field = field
        self.status = status

    @property
    def sense(self) -> bytes:
        if self.status != Status.CHECK_CONDITION:
            return b""
        return fixed_sense(self.key, self.asc, information=self.information, field=self.field)

    def result(self) -> ScsiResult:
        return ScsiResult(self.status, b"", self.sense)


def fixed_sense(
    key: SenseKey,
    asc: Asc,
    *,
    information: int | None = None,
    field: FieldPointer | None = None,
) -> bytes:
    """18 bytes of fixed-format current sense. INFORMATION is only marked VALID when it
    fits the 4-byte field (a miscompare offset past 4 GiB cannot be expressed here)."""
    valid = information is not None and 0 <= information <= 0xFFFFFFFF
    return struct.pack(
        ">BBBIBIBBB3s",
        0x70 | (0x80 if valid else 0),
        0,
        key,
        information if valid else 0,
        FIXED_SENSE_LENGTH - 8,
        0,
        asc.asc,
        asc.ascq,
        0,
        field.encode() if field else bytes(3),
    )


def descriptor_sense(key: SenseKey, asc: Asc) -> bytes:
    """8 bytes of descriptor-format current sense with no descriptors."""
    return bytes((0x72, key, asc.asc, asc.ascq, 0, 0, 0, 0))


# -- the errors handlers raise ----------------------------------------------------------


def invalid_opcode() -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE,
                     field=FieldPointer(0, 7))


def invalid_field(byte: int, bit: int | None = None, detail: str = "") -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB,
                     field=FieldPointer(byte, bit), detail=detail)


def invalid_parameter(byte: int, bit: int | None = None, detail: str = "") -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST,
                     field=FieldPointer(byte, bit, in_cdb=False), detail=detail)


def parameter_list_length_error() -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


def lba_out_of_range() -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def write_protected() -> ScsiError:
    return ScsiError(SenseKey.DATA_PROTECT, WRITE_PROTECTED)


def miscompare(offset: int) -> ScsiError:
    """INFORMATION = byte offset of the first difference, as SBC-3 asks of VERIFY with
    BYTCHK and of COMPARE AND WRITE."""
    return ScsiError(SenseKey.MISCOMPARE, MISCOMPARE_DURING_VERIFY, information=offset)


def saving_not_supported(byte: int, bit: int) -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED,
                     field=FieldPointer(byte, bit))


def first_difference(a: Buffer, b: Buffer) -> int | None:
    """Offset of the first byte where a and b differ (over the shorter length), or None.
    Compares in halving chunks so a large equal prefix costs C-speed comparisons only."""
    n = min(len(a), len(b))
    va, vb = memoryview(a)[:n], memoryview(b)[:n]
    if va == vb:
        return None
    lo, hi = 0, n
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if va[lo:mid] != vb[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if va[i] != vb[i]:
            return i
    return None  # pragma: no cover - the views differ, so some byte does
