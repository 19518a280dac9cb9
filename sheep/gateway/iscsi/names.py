"""Target names: one IQN per export (RFC 7143 §4.2.7, RFC 3722).

    VDI NAME            iqn.2026-11.io.sheep:NAME
    snapshot NAME@TAG   iqn.2026-11.io.sheep:NAME:TAG       (read-only)

An iSCSI name may only hold lower-case letters, digits, '-', '.' and ':' (others are
either folded to lower case by stringprep or forbidden, '@' among them), and initiators
compare names case-insensitively. VDI names are freer (upper case, '_', '@'-free UTF-8).
So a name or tag made only of [a-z0-9.-] and not starting with '.' is used as it is (the
usual case: `disk1`, `vm-3.root`), and any other is spelled '.' followed by the hex of its
UTF-8 bytes (`MyDisk` -> `.4d794469736b`): unambiguous, reversible, and a valid IQN. ':'
never appears in an encoded part, so it is free to separate a snapshot's tag. Two exports
never share a target name, whatever the case.

An initiator may send a name in any case, and it names the same target. Sent as
`...:Disk`, it means `...:disk`, which may well be another VDI than `Disk` (whose target is
`...:.4469736b`): such a spelling is served only while no export is literally named as it
was sent (`spelled_export`), so a misspelt case never reaches the wrong disk.
"""

from __future__ import annotations

import re

from sheep.gateway.scsi.model import LunIdentity
from sheep.vdi.registry import VdiRecord

PREFIX = "iqn.2026-11.io.sheep:"
_PLAIN = re.compile(r"[a-z0-9-][a-z0-9.-]*\Z")


def _encode(part: str) -> str:
    return part if _PLAIN.match(part) else "." + part.encode().hex()


def _decode(part: str) -> str | None:
    if _PLAIN.match(part):
        return part
    if part.startswith(".") and len(part) > 1:
        try:
            return bytes.fromhex(part[1:]).decode()
        except ValueError:
            return None
    return None


def target_name(export: str) -> str:
    """The IQN of an export named as NBD names it: NAME or NAME@TAG."""
    name, sep, tag = export.partition("@")
    return PREFIX + _encode(name) + (":" + _encode(tag) if sep else "")


def spelled_export(iqn: str) -> str | None:
    """The export an IQN spells literally, as a user who typed a VDI name into it means it
    (`...:Disk` -> `Disk`), when that differs from what the IQN names (`disk`); else None."""
    if not iqn.lower().startswith(PREFIX):
        return None
    name, sep, tag = iqn[len(PREFIX):].partition(":")
    literal = f"{name}@{tag}" if sep else name
    if name.startswith(".") or tag.startswith(".") or literal == export_name(iqn):
        return None
    return literal


def export_name(iqn: str) -> str | None:
    """NAME or NAME@TAG for one of our IQNs (any case), None for anything else."""
    iqn = iqn.lower()
    if not iqn.startswith(PREFIX):
        return None
    name, sep, tag = iqn[len(PREFIX) :].partition(":")
    vdi = _decode(name)
    if vdi is None:
        return None
    if not sep:
        return vdi
    snap = _decode(tag)
    return None if snap is None else f"{vdi}@{snap}"


def lun_identity(record: VdiRecord, read_only: bool) -> LunIdentity:
    """Who a VDI's logical unit is: a disk by its serial for life, a snapshot by its id."""
    return LunIdentity(name=record.label, read_only=read_only, snapshot=record.snapshot,
                       vdi_id=record.id if record.snapshot else record.disk_serial)
