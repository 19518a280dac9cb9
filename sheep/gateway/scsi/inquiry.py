"""Standard INQUIRY data and the vital product data pages (SPC-4 6.6, 7.8; SBC-3 6.6).

Each builder returns the whole page; the executor truncates to the allocation length. The
standard data claims SPC-4 and SBC-3 in its version descriptors: libiscsi decides from the
SBC-3 descriptor whether READ CAPACITY(16) is mandatory and whether the Block Limits page
must be the 3Ch-byte SBC-3 one.
"""

from __future__ import annotations

import struct

from .model import BlockLimits, LunIdentity
from .sense import invalid_field

VENDOR = "SHEEP"
PRODUCT = "VDI"
REVISION = "0001"

VERSION_SPC4 = 0x06
DESCRIPTOR_SAM5 = 0x00A0
DESCRIPTOR_SPC4 = 0x0460
DESCRIPTOR_SBC3 = 0x04C0

# sheep has no IEEE assignment: this company id has the locally-administered bit set
COMPANY_ID = 0x5EEE9E

PAGE_SUPPORTED = 0x00
PAGE_UNIT_SERIAL = 0x80
PAGE_DEVICE_ID = 0x83
PAGE_BLOCK_LIMITS = 0xB0
PAGE_BLOCK_CHARACTERISTICS = 0xB1
PAGE_PROVISIONING = 0xB2
SUPPORTED_PAGES = (PAGE_SUPPORTED, PAGE_UNIT_SERIAL, PAGE_DEVICE_ID, PAGE_BLOCK_LIMITS,
                   PAGE_BLOCK_CHARACTERISTICS, PAGE_PROVISIONING)

STANDARD_LENGTH = 96


def _ascii(text: str, width: int) -> bytes:
    return text.encode("ascii")[:width].ljust(width)


def standard(*, peripheral: int = 0x00) -> bytes:
    """96 bytes: direct-access block device, SPC-4, HISUP, response format 2, CMDQUE.
    `peripheral` is byte 0 (qualifier and device type), 7Fh for an absent LUN."""
    data = bytearray(STANDARD_LENGTH)
    data[0] = peripheral
    data[2] = VERSION_SPC4
    data[3] = 0x10 | 0x02  # HISUP, RESPONSE DATA FORMAT 2
    data[4] = STANDARD_LENGTH - 5
    data[7] = 0x02  # CMDQUE
    data[8:16] = _ascii(VENDOR, 8)
    data[16:32] = _ascii(PRODUCT, 16)
    data[32:36] = _ascii(REVISION, 4)
    data[58:64] = struct.pack(">HHH", DESCRIPTOR_SAM5, DESCRIPTOR_SPC4, DESCRIPTOR_SBC3)
    return bytes(data)


def _page(code: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0x00, code, len(payload)) + payload


def unit_serial(identity: LunIdentity) -> str:
    """ASCII: [cluster-]serial for a disk, [cluster-]s<id> for a snapshot."""
    number = f"{'s' if identity.snapshot else ''}{identity.vdi_id:06x}"
    return f"{identity.cluster_id:x}-{number}" if identity.cluster_id else number


def naa(identity: LunIdentity) -> bytes:
    """NAA 6 (IEEE registered extended): company id; as the 36-bit vendor specific
    identifier, a snapshot bit above the 24-bit VDI id; the cluster id as the extension."""
    vendor = (int(identity.snapshot) << 35) | (identity.vdi_id & (2**35 - 1))
    value = ((0x6 << 124) | (COMPANY_ID << 100) | (vendor << 64)
             | (identity.cluster_id & (2**64 - 1)))
    return value.to_bytes(16, "big")


def _designator(code_set: int, kind: int, value: bytes) -> bytes:
    # protocol identifier 0, PIV 0, association 0 (the logical unit)
    return struct.pack(">BBBB", code_set, kind, 0, len(value)) + value


def vpd_page(code: int, identity: LunIdentity, limits: BlockLimits) -> bytes:
    if code == PAGE_SUPPORTED:
        return _page(code, bytes(SUPPORTED_PAGES))
    if code == PAGE_UNIT_SERIAL:
        return _page(code, unit_serial(identity).encode("ascii"))
    if code == PAGE_DEVICE_ID:
        t10 = _ascii(VENDOR, 8) + f"VDI-{unit_serial(identity)}".encode("ascii")
        return _page(code, _designator(0x01, 0x03, naa(identity))
                     + _designator(0x02, 0x01, t10))
    if code == PAGE_BLOCK_LIMITS:
        body = struct.pack(
            ">BBHIIIIIIIQ",
            0x01,  # WSNZ
            limits.max_compare_and_write,
            limits.optimal_granularity,
            limits.max_transfer,
            limits.optimal_granularity,  # OPTIMAL TRANSFER LENGTH: one object
            0,  # MAXIMUM PREFETCH LENGTH
            limits.max_unmap,
            limits.max_unmap_descriptors,
            limits.unmap_granularity,
            0x80000000,  # UGAVALID, UNMAP GRANULARITY ALIGNMENT 0
            limits.max_write_same,
        )
        return _page(code, body.ljust(0x3C, b"\0"))
    if code == PAGE_BLOCK_CHARACTERISTICS:
        return _page(code, struct.pack(">H", 0x0001).ljust(0x3C, b"\0"))  # non-rotating
    if code == PAGE_PROVISIONING:
        # LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type 2 (thin)
        return _page(code, bytes((0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00)))
    raise invalid_field(2, detail=f"VPD page {code:#04x} is not supported")
