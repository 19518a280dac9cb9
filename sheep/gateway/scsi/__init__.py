"""The SCSI block command set (SPC-4/SBC-3 subset) for the iSCSI gateway, transport-free.

The transport hands a `Lun` a CDB and its Data-Out and gets back a `ScsiResult`: status,
Data-In already cut to the allocation length, and fixed-format sense. Nothing here knows
about PDUs, sessions or sockets; the only I/O is through the `BlockBackend` protocol,
which sheep.vdi.volume.Volume satisfies.

    lun = Lun(volume, LunIdentity(name, vdi_id, read_only), object_size=4 << 20)
    n = lun.data_out_length(cdb)           # how much Data-Out to solicit
    result = await lun.execute(cdb, data_out, expected_length=edtl)

One `Lun` per exported VDI, shared by all sessions: COMPARE AND WRITE is atomic only
against writes that go through the same `Lun`. REPORT LUNS is answered as the single LUN
0; a transport with several LUNs answers it with `report_luns` and sends commands for
unmapped LUNs to `absent_lun`.
"""

from .cdb import COMMANDS, Command, Op, Sa
from .lun import BlockBackend, Lun, backend_error
from .luns import absent_lun, encode_lun, report_luns
from .model import BlockLimits, LunIdentity
from .sense import (
    Asc,
    FieldPointer,
    ScsiError,
    ScsiResult,
    SenseKey,
    Status,
    fixed_sense,
)

__all__ = [
    "COMMANDS",
    "Asc",
    "BlockBackend",
    "BlockLimits",
    "Command",
    "FieldPointer",
    "Lun",
    "LunIdentity",
    "Op",
    "Sa",
    "ScsiError",
    "ScsiResult",
    "SenseKey",
    "Status",
    "absent_lun",
    "backend_error",
    "encode_lun",
    "fixed_sense",
    "report_luns",
]
