"""Target-level answers that belong to no single logical unit: REPORT LUNS, and what a
LUN number that maps to nothing must answer (SPC-4 6.6.2, 6.33; SAM-5 5.8.3).

The transport owns the LUN map; a `Lun` answers REPORT LUNS itself only as the single LUN 0
(the common case of one VDI per target). A transport exporting several LUNs intercepts
REPORT LUNS and calls `report_luns`, and sends commands for unmapped LUNs to `absent_lun`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .cdb import Op, be, lookup
from .inquiry import standard
from .sense import (
    LOGICAL_UNIT_NOT_SUPPORTED,
    Buffer,
    ScsiError,
    ScsiResult,
    SenseKey,
    Status,
    fixed_sense,
    invalid_field,
)

SELECT_ALL, SELECT_WELL_KNOWN, SELECT_ALL_ACCESSIBLE = 0x00, 0x01, 0x02
# peripheral qualifier 011b (no logical unit can be supported here), device type 1Fh
ABSENT_PERIPHERAL = 0x7F


def encode_lun(lun: int) -> bytes:
    """Eight-byte LUN: peripheral device addressing below 256, flat space up to 16383."""
    if 0 <= lun < 256:
        return bytes((0, lun)) + bytes(6)
    if lun < 0x4000:
        return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)
    raise ValueError(f"LUN {lun} cannot be addressed")


def report_luns_data(luns: Iterable[int], cdb: Buffer) -> bytes:
    select = cdb[2]
    if select == SELECT_WELL_KNOWN:
        entries = b""
    elif select in (SELECT_ALL, SELECT_ALL_ACCESSIBLE):
        entries = b"".join(encode_lun(lun) for lun in sorted(luns))
    else:
        raise invalid_field(2, detail=f"SELECT REPORT {select:#04x} is not supported")
    return (struct.pack(">I4x", len(entries)) + entries)[:be(cdb, 6, 4)]


def report_luns(luns: Iterable[int], cdb: Buffer) -> ScsiResult:
    try:
        lookup(cdb)
        if cdb[0] != Op.REPORT_LUNS:
            raise invalid_field(0, 7, "not a REPORT LUNS CDB")
        return ScsiResult(Status.GOOD, report_luns_data(luns, cdb))
    except ScsiError as exc:
        return exc.result()


def absent_lun(cdb: Buffer) -> ScsiResult:
    """The answer for a LUN that maps to no logical unit: INQUIRY reports qualifier 011b,
    REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED as its data, anything else fails with
    it (REPORT LUNS is the transport's, via `report_luns`)."""
    not_supported = ScsiError(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
    try:
        lookup(cdb)
    except ScsiError as exc:
        return exc.result()
    if cdb[0] == Op.INQUIRY and not cdb[1] & 0x01 and cdb[2] == 0:
        return ScsiResult(Status.GOOD, standard(peripheral=ABSENT_PERIPHERAL)[:be(cdb, 3, 2)])
    if cdb[0] == Op.REQUEST_SENSE:
        data = fixed_sense(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
        return ScsiResult(Status.GOOD, data[:cdb[4]])
    return not_supported.result()
