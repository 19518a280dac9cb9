"""MODE SENSE(6)/(10) and MODE SELECT(6)/(10) (SPC-4 6.11-6.14, 7.5; SBC-3 6.4).

Three pages: Caching (08h) with WCE=1, since writes are acknowledged before they are
durable until SYNCHRONIZE CACHE or FUA; Control (0Ah); Informational Exceptions (1Ch).
Nothing is changeable (the changeable-values masks are all zero) and nothing is savable,
so MODE SELECT accepts a page only when it restates the current values: that is what a
host does when it writes back what it read, and any real change is refused with INVALID
FIELD IN PARAMETER LIST pointing at the first byte that differs.

The device-specific parameter carries WP for a read-only LUN and DPOFUA, which libiscsi
reads to decide whether DPO and FUA must be accepted or refused.
"""

from __future__ import annotations

import struct

from .sense import (
    Buffer,
    invalid_field,
    invalid_parameter,
    parameter_list_length_error,
    saving_not_supported,
)

PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_INFORMATIONAL_EXCEPTIONS = 0x1C
PAGE_ALL = 0x3F
SUBPAGE_ALL = 0xFF

PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = 0, 1, 2, 3

WP = 0x80
DPOFUA = 0x10

_CURRENT: dict[int, bytes] = {
    PAGE_CACHING: bytes((PAGE_CACHING, 0x12, 0x04)) + bytes(0x12 - 1),  # WCE
    # TST 0, D_SENSE 0 (fixed sense); QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering)
    PAGE_CONTROL: bytes((PAGE_CONTROL, 0x0A, 0x00, 0x10)) + bytes(0x0A - 2),
    PAGE_INFORMATIONAL_EXCEPTIONS: bytes((PAGE_INFORMATIONAL_EXCEPTIONS, 0x0A)) + bytes(0x0A),
}
PAGES = tuple(sorted(_CURRENT))


def page(code: int, control: int) -> bytes:
    current = _CURRENT[code]
    if control == PC_CHANGEABLE:
        return current[:2] + bytes(len(current) - 2)
    return current  # default == current; saved is refused before we get here


def mode_sense(
    cdb: Buffer,
    *,
    ten: bool,
    num_blocks: int,
    block_size: int,
    read_only: bool,
) -> bytes:
    """The whole mode parameter data for a MODE SENSE CDB (not yet truncated)."""
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    control, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if control == PC_SAVED:
        raise saving_not_supported(2, 7)
    if subpage not in (0, SUBPAGE_ALL):
        raise invalid_field(3, detail=f"mode subpage {subpage:#04x} is not supported")
    if code == PAGE_ALL:
        pages = b"".join(page(c, control) for c in PAGES)
    elif code in _CURRENT:
        pages = page(code, control)
    else:
        raise invalid_field(2, 5, f"mode page {code:#04x} is not supported")

    if dbd:
        descriptor = b""
    elif llbaa:
        descriptor = struct.pack(">QII", num_blocks, 0, block_size)
    else:
        descriptor = struct.pack(">I", min(num_blocks, 0xFFFFFFFF)) + block_size.to_bytes(4, "big")
    specific = DPOFUA | (WP if read_only else 0)
    if ten:
        length = 8 + len(descriptor) + len(pages) - 2
        header = struct.pack(">HBBBBH", length, 0, specific, 0x01 if llbaa else 0, 0,
                             len(descriptor))
    else:
        length = 4 + len(descriptor) + len(pages) - 1
        header = struct.pack(">BBBB", min(length, 0xFF), 0, specific, len(descriptor))
    return header + descriptor + pages


def mode_select(cdb: Buffer, data: Buffer, *, ten: bool, block_size: int) -> None:
    """Validate a MODE SELECT parameter list against the current (unchangeable) values."""
    if cdb[1] & 0x01:
        raise invalid_field(1, 0, "mode pages are not savable")
    declared = int.from_bytes(cdb[7:9], "big") if ten else cdb[4]
    if declared == 0:
        return
    if len(data) < declared:
        raise parameter_list_length_error()
    data = memoryview(data)[:declared]
    header_length = 8 if ten else 4
    if len(data) < header_length:
        raise parameter_list_length_error()
    if ten:
        descriptor_length = int.from_bytes(data[6:8], "big")
        long_lba = bool(data[4] & 0x01)
    else:
        descriptor_length, long_lba = data[3], False
    pos = header_length
    if descriptor_length:
        size = 16 if long_lba else 8
        if descriptor_length % size or pos + descriptor_length > len(data):
            raise parameter_list_length_error()
        for at in range(pos, pos + descriptor_length, size):
            length_at = at + (12 if long_lba else 5)
            width = 4 if long_lba else 3
            if int.from_bytes(data[length_at:length_at + width], "big") != block_size:
                raise invalid_parameter(length_at, detail="the block length cannot change")
        pos += descriptor_length
    while pos < len(data):
        if pos + 2 > len(data):
            raise parameter_list_length_error()
        code, spf = data[pos] & 0x3F, data[pos] & 0x40
        if spf or code not in _CURRENT:
            raise invalid_parameter(pos, 5, f"mode page {code:#04x} cannot be selected")
        current = _CURRENT[code]
        if data[pos + 1] != current[1] or pos + len(current) > len(data):
            raise invalid_parameter(pos + 1, detail="wrong mode page length")
        for i in range(2, len(current)):
            if data[pos + i] != current[i]:
                raise invalid_parameter(pos + i, detail=f"mode page {code:#04x} is not "
                                        "changeable")
        pos += len(current)
