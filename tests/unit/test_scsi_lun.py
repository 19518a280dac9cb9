"""The executor: each command against an in-memory backend, checking status, sense bytes,
Data-In and what reached the backend.

Pure: the backend is a sparse dict of 512-byte blocks with allocation tracked per 4 KiB
"object"; no sockets, no sleeps (asyncio.sleep(0) only yields to other tasks).
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from sheep.errors import Corrupt, NoSpace, ReadOnly
from sheep.gateway.scsi import (
    BlockLimits,
    Lun,
    LunIdentity,
    SenseKey,
    Status,
    absent_lun,
    report_luns,
)
from sheep.gateway.scsi.ranges import RangeLock

BS = 512
CHUNK = 4096  # the fake's allocation granularity
SIZE = 1 << 20  # 2048 blocks
BLOCKS = SIZE // BS


class MemoryBackend:
    def __init__(self, size: int = SIZE, *, read_only: bool = False) -> None:
        self._size = size
        self._read_only = read_only
        self.blocks: dict[int, bytes] = {}
        self.allocated: set[int] = set()
        self.calls: list[tuple] = []
        self.fail: Exception | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def read(self, offset: int, length: int) -> bytes:
        self._check()
        self.calls.append(("read", offset, length))
        out = bytearray()
        for block in range(offset // BS, (offset + length) // BS):
            out += self.blocks.get(block, bytes(BS))
        return bytes(out)

    async def write(self, offset: int, data, *, fua: bool = False) -> None:
        self._check()
        self.calls.append(("write", offset, len(data), fua))
        data = bytes(data)
        for i in range(0, len(data), BS):
            self.blocks[(offset + i) // BS] = data[i:i + BS]
        self.allocated.update(range(offset // CHUNK, -(-(offset + len(data)) // CHUNK)))

    async def discard(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check()
        self.calls.append(("discard", offset, length))
        for block in range(offset // BS, (offset + length) // BS):
            self.blocks.pop(block, None)
        for chunk in range(-(-offset // CHUNK), (offset + length) // CHUNK):
            self.allocated.discard(chunk)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.calls.append(("write_zeroes", offset, length))
        await self.write(offset, bytes(length), fua=fua)
        self.calls.pop()

    async def flush(self) -> None:
        self._check()
        self.calls.append(("flush",))

    def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]:
        runs: list[tuple[int, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            n = min(CHUNK - pos % CHUNK, end - pos)
            state = pos // CHUNK in self.allocated
            if runs and runs[-1][1] == state:
                runs[-1] = (runs[-1][0] + n, state)
            else:
                runs.append((n, state))
            pos += n
        return runs


def make(read_only: bool = False, size: int = SIZE, **kwargs) -> tuple[Lun, MemoryBackend]:
    backend = MemoryBackend(size, read_only=read_only)
    return Lun(backend, LunIdentity("disk", 42, read_only), **kwargs), backend


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def rw10(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", opcode, flags, lba, 0, blocks, 0)


def rw16(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", opcode, flags, lba, blocks, 0, 0)


def caw(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, blocks, 0, 0)


def unmap_cdb(length: int, anchor: bool = False) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, 1 if anchor else 0, 0, length, 0)


def unmap_list(*extents: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in extents)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def sense_of(result) -> tuple[int, int, int]:
    assert result.status == Status.CHECK_CONDITION
    assert result.sense[0] & 0x7F == 0x70 and len(result.sense) == 18
    return result.sense[2] & 0x0F, result.sense[12], result.sense[13]


ILLEGAL = SenseKey.ILLEGAL_REQUEST
INVALID_FIELD = (ILLEGAL, 0x24, 0x00)
LBA_OOB = (ILLEGAL, 0x21, 0x00)
WRITE_PROTECTED = (SenseKey.DATA_PROTECT, 0x27, 0x00)


# -- SPC commands ---------------------------------------------------------------------


async def test_test_unit_ready_is_good():
    lun, _ = make()
    assert (await lun.execute(bytes(6))).status == Status.GOOD


async def test_unknown_opcode_is_invalid_command_operation_code():
    lun, _ = make()
    assert sense_of(await lun.execute(bytes([0x04]) + bytes(5))) == (ILLEGAL, 0x20, 0x00)


async def test_inquiry_truncates_to_allocation_length():
    lun, _ = make()
    result = await lun.execute(bytes([0x12, 0, 0, 0, 7, 0]))
    assert result.status == Status.GOOD and len(result.data) == 7


async def test_inquiry_page_code_without_evpd_is_invalid_field():
    lun, _ = make()
    result = await lun.execute(bytes([0x12, 0, 0x80, 0, 255, 0]))
    assert sense_of(result) == INVALID_FIELD
    assert result.sense[15:18] == bytes([0xC0, 0, 2])


async def test_inquiry_cmddt_is_invalid_field():
    lun, _ = make()
    assert sense_of(await lun.execute(bytes([0x12, 0x02, 0, 0, 255, 0]))) == INVALID_FIELD


async def test_inquiry_block_limits_through_lun_uses_object_size():
    lun, _ = make(object_size=4 << 20)
    data = (await lun.execute(bytes([0x12, 1, 0xB0, 0, 255, 0]))).data
    assert struct.unpack(">H", data[6:8])[0] == 8192


async def test_request_sense_reports_no_sense():
    lun, _ = make()
    result = await lun.execute(bytes([0x03, 0, 0, 0, 252, 0]))
    assert result.status == Status.GOOD
    assert result.data[0] == 0x70 and result.data[2] == 0 and result.data[12:14] == b"\0\0"


async def test_request_sense_descriptor_format():
    lun, _ = make()
    result = await lun.execute(bytes([0x03, 1, 0, 0, 252, 0]))
    assert bytes(result.data) == bytes([0x72, 0, 0, 0, 0, 0, 0, 0])


async def test_start_stop_unit_is_accepted():
    lun, _ = make()
    assert (await lun.execute(bytes([0x1B, 1, 0, 0, 0x02, 0]))).status == Status.GOOD


async def test_mode_sense_reports_write_protect_for_read_only_lun():
    lun, _ = make(read_only=True)
    data = (await lun.execute(bytes([0x1A, 0, 0x3F, 0, 255, 0]))).data
    assert data[2] & 0x80


async def test_mode_sense_truncates_to_allocation_length():
    lun, _ = make()
    assert len((await lun.execute(bytes([0x1A, 0, 0x3F, 0, 4, 0]))).data) == 4


async def test_report_luns_single_lun_zero():
    lun, _ = make()
    result = await lun.execute(struct.pack(">BBB3xIBB", 0xA0, 0, 0, 256, 0, 0))
    assert bytes(result.data) == struct.pack(">I4x", 8) + bytes(8)


def test_report_luns_encodes_peripheral_and_flat_addressing():
    result = report_luns([300, 1], struct.pack(">BBB3xIBB", 0xA0, 0, 0, 256, 0, 0))
    assert bytes(result.data) == (struct.pack(">I4x", 16) + bytes([0, 1]) + bytes(6)
                                  + bytes([0x41, 0x2C]) + bytes(6))


def test_report_luns_bad_select_report_is_invalid_field():
    assert sense_of(report_luns([0], struct.pack(">BBB3xIBB", 0xA0, 0, 9, 256, 0, 0))) == \
        INVALID_FIELD


def test_absent_lun_inquiry_reports_qualifier_011b():
    result = absent_lun(bytes([0x12, 0, 0, 0, 96, 0]))
    assert result.status == Status.GOOD and result.data[0] == 0x7F


def test_absent_lun_other_commands_fail_with_lun_not_supported():
    assert sense_of(absent_lun(bytes(6))) == (ILLEGAL, 0x25, 0x00)


async def test_report_supported_opcodes_truncates_to_allocation_length():
    lun, _ = make()
    cdb = struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0, 0, 0, 16, 0, 0)
    assert len((await lun.execute(cdb)).data) == 16


async def test_data_out_length_through_lun():
    lun, _ = make()
    assert lun.data_out_length(caw(0, 2)) == 4 * BS


# -- capacity ---------------------------------------------------------------------------


async def test_read_capacity_10():
    lun, _ = make()
    data = (await lun.execute(bytes([0x25]) + bytes(9))).data
    assert bytes(data) == struct.pack(">II", BLOCKS - 1, BS)


async def test_read_capacity_10_saturates_past_2tib():
    lun, _ = make(size=(1 << 33) * BS)
    data = (await lun.execute(bytes([0x25]) + bytes(9))).data
    assert bytes(data) == struct.pack(">II", 0xFFFFFFFF, BS)


async def test_read_capacity_10_lba_without_pmi_is_invalid_field():
    lun, _ = make()
    assert sense_of(await lun.execute(bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]))) == \
        INVALID_FIELD


async def test_read_capacity_16_reports_thin_provisioning():
    lun, _ = make(size=(1 << 33) * BS)
    cdb = struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0)
    data = (await lun.execute(cdb)).data
    assert len(data) == 32
    assert struct.unpack(">QI", data[:12]) == ((1 << 33) - 1, BS)
    assert data[12] == 0 and data[13] == 0  # no protection, LBPPBE 0
    assert data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ


async def test_read_capacity_16_truncates_to_allocation_length():
    lun, _ = make()
    cdb = struct.pack(">BBQIBB", 0x9E, 0x10, 0, 5, 0, 0)
    assert len((await lun.execute(cdb)).data) == 5


# -- reads and writes -------------------------------------------------------------------


async def test_write_then_read_round_trip():
    lun, backend = make()
    data = pattern(4 * BS)
    assert (await lun.execute(rw10(0x2A, 10, 4), data)).status == Status.GOOD
    result = await lun.execute(rw10(0x28, 10, 4))
    assert bytes(result.data) == data
    assert ("write", 10 * BS, 4 * BS, False) in backend.calls


async def test_read6_and_write6():
    lun, _ = make()
    data = pattern(2 * BS)
    assert (await lun.execute(bytes([0x0A, 0, 0, 5, 2, 0]), data)).status == Status.GOOD
    assert bytes((await lun.execute(bytes([0x08, 0, 0, 5, 2, 0]))).data) == data


async def test_write_fua_reaches_backend():
    lun, backend = make()
    await lun.execute(rw16(0x8A, 0, 1, flags=0x08), pattern(BS))
    assert backend.calls[-1] == ("write", 0, BS, True)


async def test_write_and_verify_writes_through_then_reads_back():
    lun, backend = make()
    assert (await lun.execute(rw10(0x2E, 3, 1, flags=0x02), pattern(BS))).status == Status.GOOD
    assert backend.calls[-2:] == [("write", 3 * BS, BS, True), ("read", 3 * BS, BS)]


class ForgetfulBackend(MemoryBackend):
    """A medium that acknowledges writes it does not keep."""

    async def write(self, offset: int, data, *, fua: bool = False) -> None:
        self.calls.append(("write", offset, len(data), fua))


async def test_write_and_verify_reports_a_miscompare_when_the_medium_lost_the_data():
    backend = ForgetfulBackend(SIZE)
    lun = Lun(backend, LunIdentity("disk", 42, False))
    result = await lun.execute(rw10(0x2E, 3, 1, flags=0x02), pattern(BS))
    assert sense_of(result)[0] == SenseKey.MISCOMPARE


async def test_read_zero_blocks_is_good_without_io():
    lun, backend = make()
    result = await lun.execute(rw10(0x28, 0, 0))
    assert result.status == Status.GOOD and not result.data and not backend.calls


@pytest.mark.parametrize(("lba", "blocks"), [(BLOCKS, 1), (BLOCKS - 1, 2), (BLOCKS + 1, 0),
                                             (0xFFFFFFFF, 1)])
async def test_read_beyond_end_is_lba_out_of_range(lba: int, blocks: int):
    lun, _ = make()
    assert sense_of(await lun.execute(rw10(0x28, lba, blocks))) == LBA_OOB


async def test_read16_huge_lba_is_lba_out_of_range():
    lun, _ = make()
    assert sense_of(await lun.execute(rw16(0x88, 1 << 63, 1))) == LBA_OOB


async def test_transfer_over_maximum_is_invalid_field_at_length():
    lun, _ = make(limits=BlockLimits(max_transfer=8))
    result = await lun.execute(rw10(0x28, 0, 9))
    assert sense_of(result) == INVALID_FIELD
    assert result.sense[15:18] == bytes([0xC0, 0, 7])


async def test_rdprotect_is_invalid_field():
    lun, _ = make()
    assert sense_of(await lun.execute(rw10(0x28, 0, 1, flags=0x20))) == INVALID_FIELD


async def test_write_to_read_only_is_write_protected():
    lun, backend = make(read_only=True)
    assert sense_of(await lun.execute(rw10(0x2A, 0, 1), pattern(BS))) == WRITE_PROTECTED
    assert not backend.calls


async def test_write_beyond_end_on_read_only_is_lba_out_of_range_first():
    lun, _ = make(read_only=True)
    assert sense_of(await lun.execute(rw10(0x2A, BLOCKS, 1), pattern(BS))) == LBA_OOB


async def test_write_with_short_data_out_writes_whole_blocks_received():
    lun, _ = make()
    await lun.execute(rw10(0x2A, 0, 2), pattern(2 * BS, seed=9))
    assert (await lun.execute(rw10(0x2A, 0, 2), pattern(BS + 100))).status == Status.GOOD
    data = bytes((await lun.execute(rw10(0x28, 0, 2))).data)
    assert data[:BS] == pattern(BS) and data[BS:] == pattern(2 * BS, seed=9)[BS:]


async def test_write_with_no_data_out_is_good_and_writes_nothing():
    lun, backend = make()
    assert (await lun.execute(rw10(0x2A, 0, 1))).status == Status.GOOD
    assert not backend.calls


# -- verify -----------------------------------------------------------------------------


async def test_verify_bytchk_matching_is_good():
    lun, _ = make()
    await lun.execute(rw10(0x2A, 8, 2), pattern(2 * BS))
    assert (await lun.execute(rw10(0x2F, 8, 2, flags=0x02), pattern(2 * BS))).status == \
        Status.GOOD


async def test_verify_miscompare_reports_offset_of_first_difference():
    lun, _ = make()
    await lun.execute(rw10(0x2A, 8, 2), pattern(2 * BS))
    bad = bytearray(pattern(2 * BS))
    bad[700] ^= 0xFF
    result = await lun.execute(rw10(0x2F, 8, 2, flags=0x02), bytes(bad))
    assert sense_of(result) == (SenseKey.MISCOMPARE, 0x1D, 0x00)
    assert result.sense[0] & 0x80 and result.sense[3:7] == struct.pack(">I", 700)


async def test_verify_without_bytchk_reads_the_range():
    lun, backend = make()
    assert (await lun.execute(rw16(0x8F, 0, 4))).status == Status.GOOD
    assert backend.calls == [("read", 0, 4 * BS)]
    assert sense_of(await lun.execute(rw16(0x8F, BLOCKS, 1))) == LBA_OOB


async def test_verify_without_bytchk_of_an_unreadable_range_is_a_medium_error():
    lun, backend = make()
    backend.fail = OSError("gone")
    assert sense_of(await lun.execute(rw16(0x8F, 0, 4))) == (SenseKey.MEDIUM_ERROR, 0x11, 0)


async def test_verify_bytchk_one_block_compares_each_block():
    lun, _ = make()
    block = pattern(BS)
    await lun.execute(rw10(0x2A, 0, 3), block * 3)
    assert (await lun.execute(rw10(0x2F, 0, 3, flags=0x06), block)).status == Status.GOOD
    await lun.execute(rw10(0x2A, 2, 1), pattern(BS, seed=5))
    result = await lun.execute(rw10(0x2F, 0, 3, flags=0x06), block)
    assert sense_of(result)[0] == SenseKey.MISCOMPARE


async def test_verify_reserved_bytchk_is_invalid_field():
    lun, _ = make()
    assert sense_of(await lun.execute(rw10(0x2F, 0, 1, flags=0x04), pattern(BS))) == \
        INVALID_FIELD


async def test_verify_vrprotect_is_invalid_field():
    lun, _ = make()
    assert sense_of(await lun.execute(rw10(0x2F, 0, 1, flags=0x22), pattern(BS))) == \
        INVALID_FIELD


# -- write same -------------------------------------------------------------------------


async def test_write_same_replicates_pattern():
    lun, _ = make()
    block = pattern(BS, seed=3)
    assert (await lun.execute(rw10(0x41, 100, 5), block)).status == Status.GOOD
    assert bytes((await lun.execute(rw10(0x28, 100, 5))).data) == block * 5


async def test_write_same_zeros_with_unmap_discards():
    lun, backend = make()
    await lun.execute(rw16(0x93, 8, 16, flags=0x08), bytes(BS))
    assert backend.calls[-1] == ("discard", 8 * BS, 16 * BS)


async def test_write_same_zeros_without_unmap_writes_zeroes():
    lun, backend = make()
    await lun.execute(rw10(0x41, 8, 16), bytes(BS))
    assert backend.calls[-1] == ("write_zeroes", 8 * BS, 16 * BS)


async def test_write_same_16_ndob_needs_no_data():
    lun, backend = make()
    assert (await lun.execute(rw16(0x93, 1, 7, flags=0x09))).status == Status.GOOD
    assert backend.calls[-1] == ("discard", BS, 7 * BS)


async def test_write_same_zero_blocks_is_refused_wsnz():
    lun, _ = make()
    result = await lun.execute(rw10(0x41, 0, 0), bytes(BS))
    assert sense_of(result) == INVALID_FIELD and result.sense[15:18] == bytes([0xC0, 0, 7])


async def test_write_same_over_maximum_is_invalid_field():
    lun, _ = make(limits=BlockLimits(max_write_same=4))
    assert sense_of(await lun.execute(rw10(0x41, 0, 5), bytes(BS))) == INVALID_FIELD


@pytest.mark.parametrize("size", [0, BS // 2, 2 * BS])
async def test_write_same_wrong_data_out_size_is_illegal_request(size: int):
    lun, backend = make()
    assert sense_of(await lun.execute(rw10(0x41, 0, 1, flags=0x08), bytes(size)))[0] == ILLEGAL
    assert not backend.calls


async def test_write_same_expected_length_mismatch_is_illegal_request():
    lun, _ = make()
    result = await lun.execute(rw10(0x41, 0, 1), bytes(BS), expected_length=2 * BS)
    assert sense_of(result)[0] == ILLEGAL


async def test_write_same_anchor_is_invalid_field():
    lun, _ = make()
    assert sense_of(await lun.execute(rw10(0x41, 0, 1, flags=0x18), bytes(BS))) == \
        INVALID_FIELD


async def test_write_same_beyond_end_is_lba_out_of_range():
    lun, _ = make()
    assert sense_of(await lun.execute(rw10(0x41, BLOCKS - 1, 2), bytes(BS))) == LBA_OOB


async def test_write_same_on_read_only_is_write_protected_even_without_data():
    lun, _ = make(read_only=True)
    assert sense_of(await lun.execute(rw10(0x41, 0, 1, flags=0x08))) == WRITE_PROTECTED


# -- unmap ------------------------------------------------------------------------------


async def test_unmap_discards_each_extent():
    lun, backend = make()
    params = unmap_list((0, 8), (100, 3))
    assert (await lun.execute(unmap_cdb(len(params)), params)).status == Status.GOOD
    assert backend.calls == [("discard", 0, 8 * BS), ("discard", 100 * BS, 3 * BS)]


async def test_unmap_reads_back_zeros():
    lun, _ = make()
    await lun.execute(rw10(0x2A, 0, 2), pattern(2 * BS))
    params = unmap_list((0, 2))
    await lun.execute(unmap_cdb(len(params)), params)
    assert bytes((await lun.execute(rw10(0x28, 0, 2))).data) == bytes(2 * BS)


async def test_unmap_zero_parameter_list_is_good():
    lun, backend = make()
    assert (await lun.execute(unmap_cdb(0))).status == Status.GOOD and not backend.calls


@pytest.mark.parametrize("length", [1, 7])
async def test_unmap_short_parameter_list_is_length_error(length: int):
    lun, _ = make()
    assert sense_of(await lun.execute(unmap_cdb(length), bytes(length))) == (ILLEGAL, 0x1A, 0)


async def test_unmap_header_only_is_good():
    lun, backend = make()
    params = unmap_list()
    assert (await lun.execute(unmap_cdb(len(params)), params)).status == Status.GOOD
    assert not backend.calls


async def test_unmap_zero_blocks_at_end_of_medium_is_good():
    lun, _ = make()
    params = unmap_list((BLOCKS, 0))
    assert (await lun.execute(unmap_cdb(len(params)), params)).status == Status.GOOD


async def test_unmap_beyond_end_discards_nothing():
    lun, backend = make()
    params = unmap_list((0, 1), (BLOCKS - 1, 2))
    assert sense_of(await lun.execute(unmap_cdb(len(params)), params)) == LBA_OOB
    assert not backend.calls


async def test_unmap_too_many_descriptors_is_invalid_parameter():
    lun, _ = make(limits=BlockLimits(max_unmap_descriptors=2))
    params = unmap_list((0, 1), (1, 1), (2, 1))
    result = await lun.execute(unmap_cdb(len(params)), params)
    assert sense_of(result) == (ILLEGAL, 0x26, 0x00)
    assert result.sense[15] & 0x40 == 0  # points into the parameter list


async def test_unmap_over_maximum_lba_count_is_invalid_parameter():
    lun, _ = make(limits=BlockLimits(max_unmap=10))
    params = unmap_list((0, 6), (100, 5))
    assert sense_of(await lun.execute(unmap_cdb(len(params)), params)) == (ILLEGAL, 0x26, 0)


async def test_unmap_inconsistent_data_length_is_invalid_parameter():
    lun, _ = make()
    params = bytearray(unmap_list((0, 1)))
    params[0:2] = struct.pack(">H", 8)
    assert sense_of(await lun.execute(unmap_cdb(len(params)), bytes(params))) == \
        (ILLEGAL, 0x26, 0)


async def test_unmap_trailing_partial_descriptor_is_ignored():
    lun, backend = make()
    params = unmap_list((0, 1), (50, 1))[:-4]
    params = struct.pack(">HH", len(params) - 2, len(params) - 8) + params[4:]
    assert (await lun.execute(unmap_cdb(len(params)), params)).status == Status.GOOD
    assert backend.calls == [("discard", 0, BS)]


async def test_unmap_anchor_is_invalid_field():
    lun, _ = make()
    params = unmap_list((0, 1))
    assert sense_of(await lun.execute(unmap_cdb(len(params), anchor=True), params)) == \
        INVALID_FIELD


async def test_unmap_on_read_only_is_write_protected():
    lun, _ = make(read_only=True)
    params = unmap_list((0, 1))
    assert sense_of(await lun.execute(unmap_cdb(len(params)), params)) == WRITE_PROTECTED


# -- get lba status ---------------------------------------------------------------------


def get_lba_status(lba: int, allocation: int = 1024) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, allocation, 0, 0)


def lba_descriptors(data: bytes) -> list[tuple[int, int, int]]:
    length = struct.unpack(">I", data[:4])[0]
    assert length == len(data) - 4
    return [struct.unpack(">QIB3x", data[i:i + 16]) for i in range(8, len(data), 16)]


async def test_get_lba_status_reports_mapped_and_deallocated_runs():
    lun, _ = make()
    await lun.execute(rw10(0x2A, 8, 8), pattern(8 * BS))  # the 2nd 4 KiB chunk
    data = (await lun.execute(get_lba_status(0))).data
    assert lba_descriptors(bytes(data)) == [(0, 8, 1), (8, 8, 0), (16, BLOCKS - 16, 1)]


async def test_get_lba_status_first_descriptor_starts_at_requested_lba():
    lun, _ = make()
    await lun.execute(rw10(0x2A, 0, 16), pattern(16 * BS))
    assert lba_descriptors(bytes((await lun.execute(get_lba_status(5))).data))[0] == (5, 11, 0)


async def test_get_lba_status_truncates_to_allocation_length():
    lun, _ = make()
    await lun.execute(rw10(0x2A, 8, 8), pattern(8 * BS))
    data = (await lun.execute(get_lba_status(0, 24))).data
    assert len(data) == 24 and struct.unpack(">QIB", data[8:21]) == (0, 8, 1)


@pytest.mark.parametrize("lba", [BLOCKS, 1 << 63, (1 << 64) - 1])
async def test_get_lba_status_beyond_end_is_lba_out_of_range(lba: int):
    lun, _ = make()
    assert sense_of(await lun.execute(get_lba_status(lba))) == LBA_OOB


# -- compare and write ------------------------------------------------------------------


async def test_compare_and_write_writes_when_equal():
    lun, backend = make()
    old, new = pattern(2 * BS), pattern(2 * BS, seed=4)
    await lun.execute(rw10(0x2A, 6, 2), old)
    assert (await lun.execute(caw(6, 2, flags=0x08), old + new)).status == Status.GOOD
    assert bytes((await lun.execute(rw10(0x28, 6, 2))).data) == new
    assert backend.calls[-2] == ("write", 6 * BS, 2 * BS, True)


async def test_compare_and_write_miscompare_reports_offset_and_writes_nothing():
    lun, _ = make()
    old = pattern(2 * BS)
    await lun.execute(rw10(0x2A, 6, 2), old)
    wrong = bytearray(old)
    wrong[2 * BS - 27] ^= 1
    result = await lun.execute(caw(6, 2), bytes(wrong) + pattern(2 * BS, seed=4))
    assert sense_of(result) == (SenseKey.MISCOMPARE, 0x1D, 0x00)
    assert result.sense[3:7] == struct.pack(">I", 2 * BS - 27)
    assert bytes((await lun.execute(rw10(0x28, 6, 2))).data) == old


async def test_compare_and_write_over_maximum_is_invalid_field():
    lun, _ = make(limits=BlockLimits(max_compare_and_write=1))
    result = await lun.execute(caw(0, 2), bytes(4 * BS))
    assert sense_of(result) == INVALID_FIELD and result.sense[15:18] == bytes([0xC0, 0, 13])


async def test_compare_and_write_zero_blocks_with_data_is_invalid_field():
    lun, _ = make()
    assert sense_of(await lun.execute(caw(0, 0), bytes(4 * BS))) == INVALID_FIELD
    assert sense_of(await lun.execute(caw(0, 0), b"", expected_length=BS)) == INVALID_FIELD


async def test_compare_and_write_zero_blocks_without_data_is_good():
    lun, _ = make()
    assert (await lun.execute(caw(0, 0))).status == Status.GOOD


@pytest.mark.parametrize("size", [2 * BS, 6 * BS])
async def test_compare_and_write_wrong_data_out_size_is_illegal_request(size: int):
    lun, backend = make()
    assert sense_of(await lun.execute(caw(0, 2), bytes(size)))[0] == ILLEGAL
    assert not backend.calls


async def test_compare_and_write_on_read_only_is_write_protected():
    lun, _ = make(read_only=True)
    assert sense_of(await lun.execute(caw(0, 1), bytes(2 * BS))) == WRITE_PROTECTED


async def test_compare_and_write_beyond_end_is_lba_out_of_range():
    lun, _ = make()
    assert sense_of(await lun.execute(caw(BLOCKS - 1, 2), bytes(4 * BS))) == LBA_OOB


async def test_compare_and_write_is_atomic_against_a_concurrent_write():
    lun, backend = make()
    old = pattern(BS)
    await lun.execute(rw10(0x2A, 0, 1), old)
    entered, release = asyncio.Event(), asyncio.Event()
    real_read = backend.read

    async def slow_read(offset: int, length: int) -> bytes:
        data = await real_read(offset, length)
        entered.set()
        await release.wait()
        return data

    backend.read = slow_read
    compare = asyncio.create_task(lun.execute(caw(0, 1), old + pattern(BS, seed=8)))
    await entered.wait()
    write = asyncio.create_task(lun.execute(rw10(0x2A, 0, 1), pattern(BS, seed=9)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not write.done()  # held back while COMPARE AND WRITE is between read and write
    release.set()
    assert (await compare).status == Status.GOOD and (await write).status == Status.GOOD
    assert backend.blocks[0] == pattern(BS, seed=9)


# -- synchronize cache ------------------------------------------------------------------


async def test_synchronize_cache_flushes():
    lun, backend = make()
    assert (await lun.execute(rw10(0x35, 0, 0))).status == Status.GOOD
    assert backend.calls == [("flush",)]


async def test_synchronize_cache_beyond_end_is_lba_out_of_range():
    lun, _ = make()
    assert sense_of(await lun.execute(rw16(0x91, BLOCKS + 1, 0))) == LBA_OOB


# -- backend failures -------------------------------------------------------------------


async def test_backend_read_error_is_unrecovered_read_error():
    lun, backend = make()
    backend.fail = OSError("replica lost")
    assert sense_of(await lun.execute(rw10(0x28, 0, 1))) == (SenseKey.MEDIUM_ERROR, 0x11, 0)


async def test_data_bad_on_every_replica_is_unrecovered_read_error():
    lun, backend = make()
    backend.fail = Corrupt("block(s) [0] fail their checksums on every replica", [0])
    assert sense_of(await lun.execute(rw10(0x28, 0, 1))) == (SenseKey.MEDIUM_ERROR, 0x11, 0)


def test_data_bad_on_every_replica_is_eio_over_nbd():
    from sheep.gateway.nbd.server import nbd_errno
    from sheep.gateway.nbd.wire import Errno

    assert nbd_errno(Corrupt("lost", [0])) == Errno.EIO


async def test_backend_write_error_is_write_error():
    lun, backend = make()
    backend.fail = RuntimeError("boom")
    assert sense_of(await lun.execute(rw10(0x2A, 0, 1), pattern(BS))) == \
        (SenseKey.MEDIUM_ERROR, 0x0C, 0)


async def test_backend_read_only_error_is_write_protected():
    lun, backend = make()
    backend.fail = ReadOnly("snapshot")
    assert sense_of(await lun.execute(rw10(0x2A, 0, 1), pattern(BS))) == WRITE_PROTECTED


async def test_backend_no_space_is_space_allocation_failed():
    lun, backend = make()
    backend.fail = NoSpace("full")
    assert sense_of(await lun.execute(rw10(0x2A, 0, 1), pattern(BS))) == \
        (SenseKey.DATA_PROTECT, 0x27, 0x07)


async def test_cancellation_propagates():
    lun, backend = make()
    backend.fail = asyncio.CancelledError()
    with pytest.raises(asyncio.CancelledError):
        await lun.execute(rw10(0x28, 0, 1))


# -- range lock -------------------------------------------------------------------------


async def test_range_lock_shared_holds_do_not_wait():
    lock = RangeLock()
    async with lock.hold(0, 10), lock.hold(5, 15):
        assert len(lock) == 2


async def test_range_lock_later_exclusive_waits_for_earlier_overlap_only():
    lock = RangeLock()
    order: list[str] = []
    release = asyncio.Event()

    async def writer() -> None:
        async with lock.hold(0, 10):
            await release.wait()
            order.append("write")

    async def exclusive(name: str, start: int, end: int) -> None:
        async with lock.hold(start, end, exclusive=True):
            order.append(name)

    w = asyncio.create_task(writer())
    await asyncio.sleep(0)
    overlapping = asyncio.create_task(exclusive("overlap", 9, 12))
    await asyncio.wait_for(exclusive("disjoint", 12, 20), 5)  # nothing earlier overlaps it
    assert order == ["disjoint"]
    release.set()
    await asyncio.gather(w, overlapping)
    assert order.index("write") < order.index("overlap")
    assert len(lock) == 0
