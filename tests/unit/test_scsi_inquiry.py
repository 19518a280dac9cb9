"""Standard INQUIRY data and the VPD pages, byte for byte, and the identifiers' stability.

Pure: the builders take a LunIdentity and BlockLimits; no backend.
"""

from __future__ import annotations

import struct

import pytest

from sheep.gateway.scsi import BlockLimits, LunIdentity, ScsiError
from sheep.gateway.scsi.inquiry import standard, vpd_page

IDENTITY = LunIdentity("disk", 0x00ABCD, False)
LIMITS = BlockLimits.for_objects(512, 4 << 20)


def page(code: int, identity: LunIdentity = IDENTITY) -> bytes:
    return vpd_page(code, identity, LIMITS)


def designators(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 4
    while pos < len(data):
        length = data[pos + 3]
        out.append((data[pos] & 0x0F, data[pos + 1] & 0x0F, data[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return out


def test_standard_inquiry_header():
    data = standard()
    assert len(data) == 96
    assert data[0] == 0x00  # connected, direct access block device
    assert data[1] == 0x00  # not removable
    assert data[2] == 0x06  # SPC-4
    assert data[3] == 0x12  # HISUP, response data format 2
    assert data[4] == len(data) - 5
    assert data[7] & 0x02  # CMDQUE


def test_standard_inquiry_strings():
    data = standard()
    assert data[8:16] == b"SHEEP   "
    assert data[16:32] == b"VDI".ljust(16)
    assert all(0x20 <= b <= 0x7E for b in data[32:36])


def test_standard_inquiry_claims_sam5_spc4_sbc3():
    descriptors = struct.unpack(">8H", standard()[58:74])
    assert {0x00A0, 0x0460, 0x04C0} <= set(descriptors)


def test_supported_pages_are_ascending_and_complete():
    data = page(0x00)
    assert data[:2] == b"\x00\x00"
    pages = list(data[4:4 + struct.unpack(">H", data[2:4])[0]])
    assert pages == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]


def test_unit_serial_number_is_ascii_from_vdi_id():
    data = page(0x80)
    assert data[1] == 0x80
    assert data[4:] == b"00abcd"
    assert struct.unpack(">H", data[2:4])[0] == len(data) - 4


def test_device_identification_has_naa6_and_t10_designators():
    found = designators(page(0x83))
    naa = [value for code_set, kind, value in found if kind == 3]
    t10 = [value for code_set, kind, value in found if kind == 1]
    assert len(naa) == 1 and len(naa[0]) == 16 and naa[0][0] >> 4 == 6
    assert [code_set for code_set, kind, _ in found if kind == 3] == [1]  # binary
    assert len(t10) == 1 and t10[0].startswith(b"SHEEP   ")


def test_identifiers_are_stable_for_a_vdi():
    again = LunIdentity("renamed", IDENTITY.vdi_id, True)
    assert page(0x83, again) == page(0x83) and page(0x80, again) == page(0x80)


def test_identifiers_differ_per_vdi_and_per_cluster():
    other_vdi = LunIdentity("disk", IDENTITY.vdi_id + 1, False)
    other_cluster = LunIdentity("disk", IDENTITY.vdi_id, False, cluster_id=99)
    assert len({page(0x83), page(0x83, other_vdi), page(0x83, other_cluster)}) == 3
    assert len({page(0x80), page(0x80, other_vdi), page(0x80, other_cluster)}) == 3


def test_a_snapshot_never_shares_the_identity_of_the_disk_with_the_same_number():
    snapshot = LunIdentity("disk@t", IDENTITY.vdi_id, True, snapshot=True)
    assert page(0x83, snapshot) != page(0x83) and page(0x80, snapshot) != page(0x80)
    assert page(0x80, snapshot)[4:] == b"s00abcd"


def test_block_limits_layout():
    data = page(0xB0)
    assert len(data) == 64 and struct.unpack(">H", data[2:4])[0] == 0x3C
    (wsnz, max_caw, granularity, max_transfer, optimal, _prefetch, max_unmap, max_desc,
     unmap_granularity, alignment, max_ws) = struct.unpack(">BBHIIIIIIIQ", data[4:44])
    assert wsnz == 1
    assert max_caw == 255
    assert granularity == optimal == (4 << 20) // 512
    assert max_transfer == 65536
    assert max_unmap == 1 << 20 and max_desc == 256
    assert unmap_granularity == 8 and alignment == 0x80000000
    assert max_ws == 1 << 20


def test_block_limits_without_object_size_has_no_granularity():
    data = vpd_page(0xB0, IDENTITY, BlockLimits.for_objects(512))
    assert data[6:8] == b"\x00\x00" and data[12:16] == bytes(4)


def test_block_device_characteristics_non_rotating():
    data = page(0xB1)
    assert len(data) == 64 and data[4:6] == b"\x00\x01"


def test_logical_block_provisioning_thin_with_unmap_and_write_same():
    data = page(0xB2)
    assert data[:4] == b"\x00\xb2\x00\x04"
    assert data[5] == 0x80 | 0x40 | 0x20 | 0x04  # LBPU LBPWS LBPWS10 LBPRZ, no ANC_SUP
    assert data[6] & 0x07 == 2  # thin


def test_unsupported_vpd_page_is_invalid_field_at_byte_2():
    with pytest.raises(ScsiError) as err:
        page(0x89)
    assert err.value.asc == (0x24, 0x00) and err.value.field.byte == 2
