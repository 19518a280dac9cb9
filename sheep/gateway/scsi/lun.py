"""The SBC-3 executor: one `Lun` per exported VDI, shared by every session that sees it.

`execute` never raises for anything SCSI can express. Handlers raise `ScsiError`; backend
exceptions are translated at the one place each backend call is made (`_io`); the
executor turns both into CHECK CONDITION. Checks run in the order SBC-3 and libiscsi
expect: reserved bits and unsupported fields (INVALID FIELD IN CDB), transfer length
against the Block Limits page (INVALID FIELD IN CDB), the LBA range (LOGICAL BLOCK
ADDRESS OUT OF RANGE), write protection (DATA PROTECT), and only then the Data-Out.

Data-Out: `data_out` is whatever the initiator sent, and `expected_length` (when the
transport passes it) is the initiator's Expected Data Transfer Length. The two disagree
with the CDB in legal ways: a WRITE that got fewer bytes than its TRANSFER LENGTH writes the
whole blocks it did get and succeeds (iSCSI reports the residual; libiscsi's residual
tests require GOOD), extra bytes are ignored. WRITE SAME and COMPARE AND WRITE are the
exception: their Data-Out has one legal size, and anything else is refused.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from sheep.errors import NoSpace, ReadOnly, VdiLocked

from . import cdb as c
from .cdb import Op, Sa, be, lba_and_count
from .inquiry import standard, vpd_page
from .luns import report_luns_data
from .mode import mode_select, mode_sense
from .model import BlockLimits, LunIdentity
from .opcodes import report_supported_opcodes
from .ranges import RangeLock
from .sense import (
    GOOD,
    INVALID_FIELD_IN_CDB,
    NO_ADDITIONAL_SENSE,
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    Buffer,
    ScsiError,
    ScsiResult,
    SenseKey,
    Status,
    descriptor_sense,
    first_difference,
    fixed_sense,
    invalid_field,
    invalid_parameter,
    lba_out_of_range,
    miscompare,
    parameter_list_length_error,
    write_protected,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# GET LBA STATUS looks at most this many blocks ahead (8 GiB at 512 bytes): the
# allocation map is walked synchronously, and the initiator asks again from where we stop
LBA_STATUS_WINDOW = 1 << 24
LBA_STATUS_MAX_DESCRIPTORS = 512
MAPPED, DEALLOCATED = 0, 1
WRITE_SAME_CHUNK = 1 << 20  # bytes of repeated pattern per backend write


class BlockBackend(Protocol):
    """What a Lun needs of storage; sheep.vdi.volume.Volume satisfies it."""

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray: ...

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None: ...

    async def discard(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]: ...


class _DataOut:
    """The Data-Out of one command and the length the initiator said it would send."""

    __slots__ = ("data", "length")

    def __init__(self, data: Buffer, expected_length: int | None) -> None:
        self.data = memoryview(data).cast("B")  # slices of a large WRITE stay uncopied
        self.length = len(data) if expected_length is None else expected_length


Handler = Callable[[Buffer, _DataOut], Awaitable[ScsiResult]]


def _data_in(data: Buffer, allocation_length: int) -> ScsiResult:
    return ScsiResult(Status.GOOD, data[:allocation_length])


def backend_error(exc: Exception, *, reading: bool) -> ScsiError:
    """The sense for an exception out of the backend."""
    if isinstance(exc, (ReadOnly, VdiLocked)):
        return write_protected()
    if isinstance(exc, NoSpace):
        return ScsiError(SenseKey.DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    return ScsiError(SenseKey.MEDIUM_ERROR,
                     UNRECOVERED_READ_ERROR if reading else WRITE_ERROR, detail=str(exc))


class Lun:
    """One logical unit over one BlockBackend, with 512-byte (or `block_size`) logical
    blocks. `object_size` (the VDI's object size) becomes the optimal transfer length and
    granularity of the Block Limits page; `limits` overrides the whole page."""

    def __init__(
        self,
        backend: BlockBackend,
        identity: LunIdentity,
        *,
        block_size: int = 512,
        object_size: int | None = None,
        limits: BlockLimits | None = None,
    ) -> None:
        self.backend = backend
        self.identity = identity
        self.block_size = block_size
        self.limits = limits or BlockLimits.for_objects(block_size, object_size)
        if self.limits.block_size != block_size:
            raise ValueError("limits.block_size differs from block_size")
        self._writes = RangeLock()
        rw = ((c.READS, self._read), (c.WRITES, self._write),
              (c.WRITE_VERIFIES, self._write), (c.VERIFIES, self._verify),
              (c.WRITE_SAMES, self._write_same), (c.SYNCS, self._synchronize_cache))
        self._handlers: dict[tuple[int, int | None], Handler] = {
            (op, None): handler for ops, handler in rw for op in ops
        }
        self._handlers.update({
            (Op.TEST_UNIT_READY, None): self._test_unit_ready,
            (Op.REQUEST_SENSE, None): self._request_sense,
            (Op.INQUIRY, None): self._inquiry,
            (Op.MODE_SENSE_6, None): self._mode_sense,
            (Op.MODE_SENSE_10, None): self._mode_sense,
            (Op.MODE_SELECT_6, None): self._mode_select,
            (Op.MODE_SELECT_10, None): self._mode_select,
            (Op.START_STOP_UNIT, None): self._test_unit_ready,
            (Op.READ_CAPACITY_10, None): self._read_capacity_10,
            (Op.SERVICE_ACTION_IN_16, Sa.READ_CAPACITY_16): self._read_capacity_16,
            (Op.SERVICE_ACTION_IN_16, Sa.GET_LBA_STATUS): self._get_lba_status,
            (Op.UNMAP, None): self._unmap,
            (Op.COMPARE_AND_WRITE, None): self._compare_and_write,
            (Op.REPORT_LUNS, None): self._report_luns,
            (Op.MAINTENANCE_IN, Sa.REPORT_SUPPORTED_OPCODES): self._report_opcodes,
        })

    # -- facts ----------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.backend.size // self.block_size

    @property
    def read_only(self) -> bool:
        return self.identity.read_only or self.backend.read_only

    def data_out_length(self, cdb: bytes) -> int:
        """Bytes of Data-Out the CDB announces; 0 for a CDB that execute() will refuse."""
        return c.data_out_length(cdb, self.block_size)

    def data_in_length(self, cdb: bytes) -> int:
        """Bytes a READ's CDB asks for: what executing it holds in memory."""
        return c.data_in_length(cdb, self.block_size)

    # -- execution ------------------------------------------------------------------------

    async def execute(self, cdb: bytes, data_out: Buffer = b"", *,
                      expected_length: int | None = None) -> ScsiResult:
        """Run one command. Never raises for SCSI-level problems (cancellation passes).
        `expected_length`: the initiator's Expected Data Transfer Length for Data-Out, when
        the transport received less than that (see the module docstring)."""
        try:
            command = c.lookup(cdb)
            handler = self._handlers[(command.opcode, command.service_action)]
            return await handler(cdb, _DataOut(data_out, expected_length))
        except ScsiError as exc:
            return exc.result()

    async def _io(self, call: Awaitable[T], *, reading: bool) -> T:
        try:
            return await call
        except Exception as exc:
            log.warning("LUN %s: backend %s failed: %r", self.identity.name,
                        "read" if reading else "write", exc)
            raise backend_error(exc, reading=reading) from exc

    def _check_range(self, lba: int, count: int) -> None:
        if lba + count > self.num_blocks:
            raise lba_out_of_range()

    def _check_writable(self) -> None:
        if self.read_only:
            raise write_protected()

    def _addressed(self, cdb: Buffer) -> tuple[int, int]:
        lba, count = lba_and_count(cdb)
        if count > self.limits.max_transfer:
            raise invalid_field(c.count_field(cdb[0]),
                                detail=f"{count} blocks exceed the maximum transfer length")
        self._check_range(lba, count)
        return lba, count

    # -- SPC: inquiry, sense, mode pages, opcodes -----------------------------------------

    async def _test_unit_ready(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        # also START STOP UNIT: a VDI is never stopped, and is not removable (LOEJ no-op)
        return GOOD

    async def _request_sense(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        # sense is always delivered with its status (autosense): nothing is ever pending
        if cdb[1] & 0x01:
            data = descriptor_sense(SenseKey.NO_SENSE, NO_ADDITIONAL_SENSE)
        else:
            data = fixed_sense(SenseKey.NO_SENSE, NO_ADDITIONAL_SENSE)
        return _data_in(data, cdb[4])

    async def _inquiry(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        page = cdb[2]
        if cdb[1] & 0x01:
            data = vpd_page(page, self.identity, self.limits)
        elif page:
            raise invalid_field(2, detail="PAGE CODE without EVPD")
        else:
            data = standard()
        return _data_in(data, be(cdb, 3, 2))

    async def _mode_sense(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        ten = cdb[0] == Op.MODE_SENSE_10
        data = mode_sense(cdb, ten=ten, num_blocks=self.num_blocks,
                          block_size=self.block_size, read_only=self.read_only)
        return _data_in(data, be(cdb, 7, 2) if ten else cdb[4])

    async def _mode_select(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        mode_select(cdb, out.data, ten=cdb[0] == Op.MODE_SELECT_10, block_size=self.block_size)
        return GOOD

    async def _report_opcodes(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        return _data_in(report_supported_opcodes(cdb), be(cdb, 6, 4))

    async def _report_luns(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        return ScsiResult(Status.GOOD, report_luns_data([0], cdb))

    # -- SBC: capacity and provisioning ---------------------------------------------------

    def _last_lba(self) -> int:
        return max(self.num_blocks - 1, 0)

    async def _read_capacity_10(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        if be(cdb, 2, 4) and not cdb[8] & 0x01:
            raise invalid_field(2, detail="LOGICAL BLOCK ADDRESS without PMI")
        last = min(self._last_lba(), 0xFFFFFFFF)
        return ScsiResult(Status.GOOD, struct.pack(">II", last, self.block_size))

    async def _read_capacity_16(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        if be(cdb, 2, 8) and not cdb[14] & 0x01:
            raise invalid_field(2, detail="LOGICAL BLOCK ADDRESS without PMI")
        # no protection, one logical block per physical block, LBPME and LBPRZ
        data = struct.pack(">QIBBH16x", self._last_lba(), self.block_size, 0, 0, 0xC000)
        return _data_in(data, be(cdb, 10, 4))

    async def _get_lba_status(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        lba, allocation_length = be(cdb, 2, 8), be(cdb, 10, 4)
        if lba >= self.num_blocks:
            raise lba_out_of_range()
        limit = min(max(1, (allocation_length - 8) // 16), LBA_STATUS_MAX_DESCRIPTORS)
        count = min(self.num_blocks - lba, LBA_STATUS_WINDOW)
        bs = self.block_size
        try:
            runs = self.backend.block_status(lba * bs, count * bs)
        except Exception as exc:
            raise backend_error(exc, reading=True) from exc
        descriptors = b"".join(
            struct.pack(">QIB3x", start, length, state)
            for start, length, state in block_runs(runs, lba, bs)[:limit]
        )
        data = struct.pack(">I4x", len(descriptors) + 4) + descriptors
        return _data_in(data, allocation_length)

    # -- SBC: reads and writes ------------------------------------------------------------

    async def _read(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        lba, count = self._addressed(cdb)
        if not count:
            return GOOD
        bs = self.block_size
        data = await self._io(self.backend.read(lba * bs, count * bs), reading=True)
        return ScsiResult(Status.GOOD, data)

    async def _write(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        lba, count = self._addressed(cdb)
        self._check_writable()
        bs = self.block_size
        usable = min(len(out.data), count * bs) // bs * bs
        if not usable:
            return GOOD
        verify = cdb[0] in c.WRITE_VERIFIES
        # WRITE AND VERIFY: what is verified is what reached the medium, so it is FUA
        fua = verify or (cdb[0] != Op.WRITE_6 and bool(cdb[1] & 0x08))
        offset = lba * bs
        async with self._writes.hold(offset, offset + usable):
            await self._io(self.backend.write(offset, out.data[:usable], fua=fua),
                           reading=False)
            if verify:  # read back: the store checks every block against its checksum
                medium = await self._io(self.backend.read(offset, usable), reading=True)
                diff = first_difference(medium, out.data[:usable])
                if diff is not None:
                    raise miscompare(diff)
        return GOOD

    async def _verify(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        lba, count = self._addressed(cdb)
        check = c.bytchk(cdb)
        if check not in (c.BYTCHK_NONE, c.BYTCHK_COMPARE, c.BYTCHK_ONE_BLOCK):
            raise invalid_field(1, 2, f"BYTCHK {check} is reserved")
        if not count:
            return GOOD
        bs = self.block_size
        # reading is verifying the medium: the store checks every block's checksum (and
        # repairs a bad one from another replica); only an unreadable range fails
        medium = await self._io(self.backend.read(lba * bs, count * bs), reading=True)
        if check == c.BYTCHK_NONE:
            return GOOD
        if check == c.BYTCHK_ONE_BLOCK:
            expected = bytes(out.data[:bs]) * count if len(out.data) >= bs else b""
        else:
            expected = out.data
        diff = first_difference(medium, expected)
        if diff is not None:
            raise miscompare(diff)
        return GOOD

    async def _write_same(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        lba, count = lba_and_count(cdb)
        field = c.count_field(cdb[0])
        if count == 0:
            raise invalid_field(field, detail="WRITE SAME to the end of the medium (WSNZ)")
        if count > self.limits.max_write_same:
            raise invalid_field(field, detail=f"{count} blocks exceed MAXIMUM WRITE SAME LENGTH")
        self._check_range(lba, count)
        self._check_writable()
        bs = self.block_size
        unmap = bool(cdb[1] & 0x08)
        if cdb[0] == Op.WRITE_SAME_16 and cdb[1] & 0x01:  # NDOB: zeros, no Data-Out
            if out.length:
                raise ScsiError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB,
                                detail="NDOB with a Data-Out buffer")
            pattern = b""
        elif out.length != bs or len(out.data) != bs:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB,
                            detail=f"WRITE SAME needs exactly one block, got {out.length}")
        else:
            pattern = bytes(out.data)
        offset, length = lba * bs, count * bs
        async with self._writes.hold(offset, offset + length):
            if not pattern.strip(b"\0"):
                call = (self.backend.discard if unmap else self.backend.write_zeroes)
                await self._io(call(offset, length), reading=False)
                return GOOD
            chunk = pattern * max(1, min(count, WRITE_SAME_CHUNK // bs))
            pos, end = offset, offset + length
            while pos < end:
                n = min(len(chunk), end - pos)
                await self._io(self.backend.write(pos, chunk[:n]), reading=False)
                pos += n
        return GOOD

    async def _unmap(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        self._check_writable()
        extents = self._unmap_extents(be(cdb, 7, 2), out.data)
        bs = self.block_size
        for lba, count in extents:
            offset, length = lba * bs, count * bs
            async with self._writes.hold(offset, offset + length):
                await self._io(self.backend.discard(offset, length), reading=False)
        return GOOD

    def _unmap_extents(self, declared: int, data: Buffer) -> list[tuple[int, int]]:
        """The UNMAP parameter list (SBC-3 5.28.2), validated whole before anything is
        discarded. Lengths: PARAMETER LIST LENGTH 1..7 is an error, 0 is nothing to do; the
        shortest of it, the data received and the two header lengths decides how many whole
        descriptors there are, and a trailing partial descriptor is ignored."""
        if declared == 0:
            return []
        available = min(declared, len(data))
        if declared < 8 or available < 8:
            raise parameter_list_length_error()
        unmap_data_length, descriptor_length = be(data, 0, 2), be(data, 2, 2)
        if unmap_data_length < descriptor_length + 6:
            raise invalid_parameter(0, detail="UNMAP DATA LENGTH is shorter than the "
                                    "block descriptors")
        count = min(descriptor_length, available - 8) // 16
        if count > self.limits.max_unmap_descriptors:
            raise invalid_parameter(2, detail=f"{count} UNMAP block descriptors")
        extents: list[tuple[int, int]] = []
        total = 0
        for i in range(count):
            at = 8 + 16 * i
            lba, blocks = be(data, at, 8), be(data, at + 8, 4)
            self._check_range(lba, blocks)
            total += blocks
            if total > self.limits.max_unmap:
                raise invalid_parameter(at + 8, detail="MAXIMUM UNMAP LBA COUNT exceeded")
            if blocks:
                extents.append((lba, blocks))
        return extents

    async def _compare_and_write(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        lba, count = lba_and_count(cdb)
        if count == 0:
            if out.length:  # libiscsi expects a mismatched transfer refused, not ignored
                raise invalid_field(13, detail="Data-Out for zero blocks")
            return GOOD
        if count > self.limits.max_compare_and_write:
            raise invalid_field(13, detail=f"{count} blocks exceed MAXIMUM COMPARE AND "
                                "WRITE LENGTH")
        self._check_range(lba, count)
        self._check_writable()
        bs = self.block_size
        size = count * bs
        if out.length != 2 * size or len(out.data) != 2 * size:
            raise invalid_field(13, detail=f"Data-Out of {out.length} bytes for {count} "
                                "blocks")
        offset = lba * bs
        async with self._writes.hold(offset, offset + size, exclusive=True):
            medium = await self._io(self.backend.read(offset, size), reading=True)
            diff = first_difference(medium, out.data[:size])
            if diff is not None:
                raise miscompare(diff)
            await self._io(self.backend.write(offset, out.data[size:], fua=bool(cdb[1] & 0x08)),
                           reading=False)
        return GOOD

    async def _synchronize_cache(self, cdb: Buffer, out: _DataOut) -> ScsiResult:
        # IMMED is accepted, but status waits for the flush: errors are never deferred
        lba, count = lba_and_count(cdb)
        self._check_range(lba, count)
        await self._io(self.backend.flush(), reading=False)
        return GOOD


def block_runs(runs: list[tuple[int, bool]], first_lba: int, block_size: int
               ) -> list[tuple[int, int, int]]:
    """(lba, blocks, provisioning status) descriptors from byte runs that start at
    first_lba. A block partly allocated counts as mapped: deallocated means reads zeros."""
    merged: list[list] = []
    for length, allocated in runs:
        if length <= 0:
            continue
        if merged and merged[-1][1] == allocated:
            merged[-1][0] += length
        else:
            merged.append([length, allocated])
    out: list[tuple[int, int, int]] = []
    pos = first_lba * block_size
    for length, allocated in merged:
        start, end = pos, pos + length
        pos = end
        if allocated:
            b0, b1 = start // block_size, -(-end // block_size)
        else:
            b0, b1 = -(-start // block_size), end // block_size
        state = MAPPED if allocated else DEALLOCATED
        if out:
            b0 = max(b0, out[-1][0] + out[-1][1])
        if b1 <= b0:
            continue  # an unallocated sliver inside a block that is partly mapped
        if out and out[-1][2] == state:
            out[-1] = (out[-1][0], b1 - out[-1][0], state)
        else:
            out.append((b0, b1 - b0, state))
    return out
