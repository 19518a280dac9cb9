"""Who a VDI's logical unit is to SCSI (unit serial, VPD 0x83 designators). Its target
name (IQN) follows the name rules in sheep/names.py."""

from __future__ import annotations

from sheep.gateway.scsi.model import LunIdentity
from sheep.vdi.registry import VdiRecord


def lun_identity(record: VdiRecord, read_only: bool) -> LunIdentity:
    """Who a VDI's logical unit is: a disk by its serial for life, a snapshot by its id."""
    return LunIdentity(name=record.label, read_only=read_only, snapshot=record.snapshot,
                       vdi_id=record.id if record.snapshot else record.disk_serial)
