"""The few SCSI conditions the transport reports itself, before a command reaches a LUN:
a LUN that does not exist, a unit attention left by a reset, Data-Out out of sequence.
Everything else is the SCSI layer's (sheep.gateway.scsi).
"""

from __future__ import annotations

CHECK_CONDITION = 0x02
GOOD = 0x00

ILLEGAL_REQUEST = 0x05
UNIT_ATTENTION = 0x06
ABORTED_COMMAND = 0x0B

INQUIRY = 0x12
REPORT_LUNS = 0xA0
REQUEST_SENSE = 0x03


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    """Fixed-format sense data (SPC-4 §4.5.3), current error, 18 bytes."""
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = key
    sense[7] = 10  # additional sense length
    sense[12] = asc
    sense[13] = ascq
    return bytes(sense)


LUN_NOT_SUPPORTED = fixed_sense(ILLEGAL_REQUEST, 0x25, 0x00)
# SAM: BUS DEVICE RESET FUNCTION OCCURRED, after a LOGICAL UNIT RESET / TARGET RESET
RESET_OCCURRED = fixed_sense(UNIT_ATTENTION, 0x29, 0x03)
# DATA PHASE ERROR: the Data-Out of a command came out of sequence (ERL 0 cannot recover)
DATA_PHASE_ERROR = fixed_sense(ABORTED_COMMAND, 0x4B, 0x00)
