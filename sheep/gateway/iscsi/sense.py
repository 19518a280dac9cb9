"""The few SCSI conditions the transport reports itself, before a command reaches a LUN:
a LUN that does not exist, a unit attention left by a reset, Data-Out out of sequence.
Their codes and the sense format are the SCSI layer's (sheep.gateway.scsi); only when to
report them is the transport's.
"""

from __future__ import annotations

from sheep.gateway.scsi import sense as scsi
from sheep.gateway.scsi.sense import SenseKey, fixed_sense

LUN_NOT_SUPPORTED = fixed_sense(SenseKey.ILLEGAL_REQUEST, scsi.LOGICAL_UNIT_NOT_SUPPORTED)
# after a LOGICAL UNIT RESET / TARGET RESET (SAM-5)
RESET_OCCURRED = fixed_sense(SenseKey.UNIT_ATTENTION, scsi.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
# a command announcing more Data-Out than a connection buffers (see connection.py)
TOO_MUCH_DATA_OUT = fixed_sense(SenseKey.ILLEGAL_REQUEST, scsi.INVALID_FIELD_IN_CDB)
# the Data-Out of a command came out of sequence (ERL 0 cannot recover)
DATA_PHASE_ERROR = fixed_sense(SenseKey.ABORTED_COMMAND, scsi.DATA_PHASE_ERROR)
