"""The iSCSI wire format (RFC 7143 §11): the one place that defines it.

Every PDU starts with a 48-byte Basic Header Segment (BHS), then optional Additional Header
Segments (AHS, a multiple of 4 bytes), an optional header digest, the data segment padded
to a multiple of 4 bytes, and an optional data digest over data and padding. Everything is
big-endian except the CRC32C digests, which go on the wire least significant byte first
(RFC 7143 §13.1; what libiscsi and Linux do).

The BHS layout common to all opcodes:

    0     I bit (0x40) | opcode (6 bits)
    1     F bit (0x80) | opcode-specific flags
    2-3   opcode-specific
    4     TotalAHSLength (in 4-byte words)
    5-7   DataSegmentLength (bytes, without padding)
    8-15  LUN, or ISID+TSIH (login), or other opcode-specific fields
    16-19 Initiator Task Tag
    20-47 seven opcode-specific 32-bit fields

so one Struct packs and unpacks every header, and the field names below say which 32-bit
slot means what for each opcode. Encoders return lists of buffers for one writelines():
large payloads are passed through as slices, never copied.

Decoding keeps two kinds of failure apart: IscsiFramingError (the byte stream cannot be
trusted: the connection must end) and DataDigestError (the header was good, so the PDU can
be named in a Reject before the connection ends).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import crc32c as _crc32c

from sheep.errors import ProtocolError

BHS_SIZE = 48
NO_TAG = 0xFFFFFFFF  # "reserved tag": no Initiator/Target Transfer Tag
MAX_DATA_SEGMENT = (1 << 24) - 1
LOGIN_MAX_DATA = 8192  # a login PDU's data segment is at most this (RFC 7143 §6.1)
# one key=value text (login or Text request) continued over PDUs (C bit) is at most this:
# every key we know fits a few hundred bytes, CHAP's largest a few KiB
MAX_TEXT = 64 << 10

# opcode, flags, byte 2, byte 3, (TotalAHSLength << 24 | DataSegmentLength), bytes 8-15 as
# one u64, ITT, then the seven u32 slots at offsets 20, 24, ..., 44
BHS = struct.Struct(">BBBBIQIIIIIIII")
_DIGEST = struct.Struct("<I")

IMMEDIATE = 0x40
OPCODE_MASK = 0x3F
FINAL = 0x80


class Opcode(IntEnum):
    # initiator to target
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK = 0x10
    # target to initiator
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES = frozenset({Opcode.NOP_OUT, Opcode.SCSI_COMMAND, Opcode.TASK_MGMT_REQUEST,
                               Opcode.LOGIN_REQUEST, Opcode.TEXT_REQUEST, Opcode.DATA_OUT,
                               Opcode.LOGOUT_REQUEST, Opcode.SNACK})


class CommandFlag:
    """Byte 1 of a SCSI Command."""

    FINAL = 0x80
    READ = 0x40
    WRITE = 0x20
    ATTR_MASK = 0x07


class ResponseFlag:
    """Byte 1 of a SCSI Response and of a Data-In: residual flags (and Data-In's own)."""

    FINAL = 0x80
    ACK = 0x40  # Data-In A bit (DataACK, ERL >= 1 only: never set here)
    BIDI_OVERFLOW = 0x10
    BIDI_UNDERFLOW = 0x08
    OVERFLOW = 0x04
    UNDERFLOW = 0x02
    STATUS = 0x01  # Data-In S bit: this PDU carries the command's status


class LoginFlag:
    """Byte 1 of Login Request/Response: T, C, CSG (bits 3-2), NSG (bits 1-0)."""

    TRANSIT = 0x80
    CONTINUE = 0x40


class TextFlag:
    FINAL = 0x80
    CONTINUE = 0x40


class Stage(IntEnum):
    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


class Response(IntEnum):
    """SCSI Response byte 2."""

    COMPLETED = 0x00
    TARGET_FAILURE = 0x01


class LoginStatus(IntEnum):
    """Status-Class << 8 | Status-Detail of a Login Response (RFC 7143 §11.13.5)."""

    SUCCESS = 0x0000
    INITIATOR_ERROR = 0x0200
    AUTH_FAILED = 0x0201
    FORBIDDEN = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_UNSUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class TmfFunction(IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class LogoutReason(IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


class LogoutResponse(IntEnum):
    CLOSED = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class RejectReason(IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class AhsType(IntEnum):
    EXTENDED_CDB = 1
    BIDI_READ_LENGTH = 2


class IscsiFramingError(ProtocolError):
    """the initiator's byte stream cannot be parsed any further: end the connection"""


class HeaderDigestError(IscsiFramingError):
    """a header digest did not match: the PDU's length cannot be trusted"""


class DataDigestError(ProtocolError):
    """a data digest did not match; the header (for the Reject) is in `bhs`"""

    def __init__(self, bhs: bytes) -> None:
        super().__init__("data digest mismatch")
        self.bhs = bhs


def pad4(n: int) -> int:
    return -n % 4


def crc32c(*parts: bytes | bytearray | memoryview) -> int:
    value = 0
    for part in parts:
        value = _crc32c.crc32c(part, value)
    return value


def digest(*parts: bytes | bytearray | memoryview) -> bytes:
    return _DIGEST.pack(crc32c(*parts))


# -- decoded PDUs -------------------------------------------------------------------------


@dataclass(slots=True)
class Pdu:
    """One PDU from the initiator: its raw header (BHS + AHS) and its data segment without
    padding. Fields are read from the header on demand: most PDUs are looked at once."""

    bhs: bytes
    ahs: bytes
    data: bytes | bytearray | memoryview

    @property
    def opcode(self) -> int:
        return self.bhs[0] & OPCODE_MASK

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & IMMEDIATE)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & FINAL)

    def u8(self, offset: int) -> int:
        return self.bhs[offset]

    def u16(self, offset: int) -> int:
        return int.from_bytes(self.bhs[offset : offset + 2], "big")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.bhs[offset : offset + 4], "big")

    @property
    def lun(self) -> int:
        return int.from_bytes(self.bhs[8:16], "big")

    @property
    def itt(self) -> int:
        return self.u32(16)

    @property
    def ttt(self) -> int:
        return self.u32(20)

    @property
    def cmdsn(self) -> int:
        return self.u32(24)

    @property
    def expstatsn(self) -> int:
        return self.u32(28)

    # SCSI Command
    @property
    def edtl(self) -> int:
        return self.u32(20)

    @property
    def cdb(self) -> bytes:
        """The CDB: 16 bytes from the BHS, plus an Extended CDB AHS if there is one."""
        cdb = bytes(self.bhs[32:48])
        for kind, body in iter_ahs(self.ahs):
            if kind == AhsType.EXTENDED_CDB:
                cdb += body[1:]  # a reserved byte, then the CDB's bytes past the 16th
        return cdb

    # Data-Out
    @property
    def datasn(self) -> int:
        return self.u32(36)

    @property
    def buffer_offset(self) -> int:
        return self.u32(40)

    # Login Request
    @property
    def isid(self) -> int:
        return int.from_bytes(self.bhs[8:14], "big")

    @property
    def tsih(self) -> int:
        return self.u16(14)

    @property
    def cid(self) -> int:
        return self.u16(20)


def iter_ahs(ahs: bytes) -> list[tuple[int, bytes]]:
    """(type, type-specific bytes) of each AHS; a malformed AHS is a framing error."""
    out = []
    pos = 0
    while pos < len(ahs):
        if pos + 3 > len(ahs):
            raise IscsiFramingError("truncated AHS")
        length = int.from_bytes(ahs[pos : pos + 2], "big")
        kind = ahs[pos + 2]
        end = pos + 3 + length
        if end > len(ahs):
            raise IscsiFramingError("AHS longer than TotalAHSLength")
        out.append((kind, bytes(ahs[pos + 3 : end])))
        pos = end + pad4(3 + length)
    return out


class PduReader:
    """Cuts the initiator's byte stream into PDUs.

    `max_data` bounds the data segment it accepts (what we declared as our
    MaxRecvDataSegmentLength): a PDU announcing more is a framing error, so a peer cannot
    make us buffer at will. Digests are switched on by the owner once login negotiated
    them; they apply from the first PDU after the final Login Response.
    """

    def __init__(self, max_data: int = LOGIN_MAX_DATA) -> None:
        self.max_data = max_data
        self.header_digest = False
        self.data_digest = False
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_pdu(self) -> Pdu | None:
        """The next complete PDU, or None until more bytes arrive."""
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < BHS_SIZE:
            return None
        ahs_len = buf[pos + 4] * 4
        data_len = int.from_bytes(buf[pos + 5 : pos + 8], "big")
        if data_len > self.max_data:
            raise IscsiFramingError(
                f"data segment of {data_len} bytes over the {self.max_data} we accept")
        header_len = BHS_SIZE + ahs_len
        hd = 4 if self.header_digest else 0
        dd = 4 if self.data_digest and data_len else 0
        total = header_len + hd + data_len + pad4(data_len) + dd
        if avail < total:
            return None
        view = memoryview(buf)
        header = bytes(view[pos : pos + header_len])
        if hd and digest(header) != view[pos + header_len : pos + header_len + 4]:
            raise HeaderDigestError("header digest mismatch")
        start = pos + header_len + hd
        padded = data_len + pad4(data_len)
        data = bytes(view[start : start + data_len])
        if dd:
            got = bytes(view[start + padded : start + padded + 4])
            if digest(view[start : start + padded]) != got:
                self._consume(total, view)
                raise DataDigestError(header[:BHS_SIZE])
        self._consume(total, view)
        return Pdu(header[:BHS_SIZE], header[BHS_SIZE:], data)

    def _consume(self, n: int, view: memoryview) -> None:
        view.release()
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 1 << 20:
            del self._buf[: self._pos]
            self._pos = 0


# -- encoders -----------------------------------------------------------------------------


@dataclass(slots=True)
class Digests:
    """Which digests the connection negotiated, for the encoders."""

    header: bool = False
    data: bool = False


def frame(header: bytes, data: bytes | bytearray | memoryview = b"",
          digests: Digests | None = None) -> list:
    """One PDU as buffers for writelines(): header, header digest, data, padding, data
    digest. Small PDUs become one bytes object; a large data segment is passed through."""
    hd = digests is not None and digests.header
    dd = digests is not None and digests.data and len(data) > 0
    pad = b"\0" * pad4(len(data))
    head = header + digest(header) if hd else header
    tail = pad + digest(data, pad) if dd else pad
    if len(data) < 16384:
        return [head + bytes(data) + tail]
    return [head, data, tail] if tail else [head, data]


def pack_bhs(opcode: int, flags: int = 0, b2: int = 0, b3: int = 0, *, data_len: int = 0,
             lun: int = 0, itt: int = NO_TAG, f20: int = 0, f24: int = 0, f28: int = 0,
             f32: int = 0, f36: int = 0, f40: int = 0, f44: int = 0) -> bytes:
    """A 48-byte BHS without AHS (targets never send one here)."""
    return BHS.pack(opcode, flags, b2, b3, data_len, lun, itt, f20, f24, f28, f32, f36,
                    f40, f44)


@dataclass(slots=True)
class SeqNumbers:
    """The three numbers nearly every target PDU carries (bytes 24-35)."""

    statsn: int
    expcmdsn: int
    maxcmdsn: int


def scsi_response(itt: int, status: int, sn: SeqNumbers, *, sense: bytes = b"",
                  residual_flags: int = 0, residual: int = 0, expdatasn: int = 0,
                  response: int = Response.COMPLETED, digests: Digests | None = None) -> list:
    """A SCSI Response; sense data (for CHECK CONDITION) goes in the data segment after a
    2-byte SenseLength."""
    data = struct.pack(">H", len(sense)) + sense if sense else b""
    head = pack_bhs(Opcode.SCSI_RESPONSE, FINAL | residual_flags, response, status,
                    data_len=len(data), itt=itt, f20=0, f24=sn.statsn, f28=sn.expcmdsn,
                    f32=sn.maxcmdsn, f36=expdatasn, f40=0, f44=residual)
    return frame(head, data, digests)


def data_in(itt: int, lun: int, data: bytes | bytearray | memoryview, *, offset: int,
            datasn: int, sn: SeqNumbers, final: bool, status: int | None = None,
            residual_flags: int = 0, residual: int = 0,
            digests: Digests | None = None) -> list:
    """A Data-In PDU; with `status` set it also carries the command's status (S bit), and
    then StatSN and the residual count are meaningful."""
    flags = FINAL if final else 0
    b3 = 0
    statsn = 0
    if status is not None:
        flags |= FINAL | ResponseFlag.STATUS | residual_flags
        b3 = status
        statsn = sn.statsn
    else:
        residual = 0
    head = pack_bhs(Opcode.DATA_IN, flags, 0, b3, data_len=len(data), lun=lun, itt=itt,
                    f20=NO_TAG, f24=statsn, f28=sn.expcmdsn, f32=sn.maxcmdsn, f36=datasn,
                    f40=offset, f44=residual)
    return frame(head, data, digests)


def r2t(itt: int, lun: int, ttt: int, sn: SeqNumbers, *, r2tsn: int, offset: int,
        length: int, digests: Digests | None = None) -> list:
    """StatSN in an R2T is the next one to be used: it is not consumed."""
    head = pack_bhs(Opcode.R2T, FINAL, lun=lun, itt=itt, f20=ttt, f24=sn.statsn,
                    f28=sn.expcmdsn, f32=sn.maxcmdsn, f36=r2tsn, f40=offset, f44=length)
    return frame(head, b"", digests)


def nop_in(itt: int, ttt: int, lun: int, sn: SeqNumbers, data: bytes = b"",
           digests: Digests | None = None) -> list:
    head = pack_bhs(Opcode.NOP_IN, FINAL, data_len=len(data), lun=lun, itt=itt, f20=ttt,
                    f24=sn.statsn, f28=sn.expcmdsn, f32=sn.maxcmdsn)
    return frame(head, data, digests)


def tmf_response(itt: int, response: int, sn: SeqNumbers,
                 digests: Digests | None = None) -> list:
    head = pack_bhs(Opcode.TASK_MGMT_RESPONSE, FINAL, response, itt=itt, f24=sn.statsn,
                    f28=sn.expcmdsn, f32=sn.maxcmdsn)
    return frame(head, b"", digests)


def login_response(itt: int, isid: int, tsih: int, flags: int, sn: SeqNumbers,
                   status: int = LoginStatus.SUCCESS, data: bytes = b"") -> list:
    """Login PDUs never carry digests: those start after the login phase."""
    head = pack_bhs(Opcode.LOGIN_RESPONSE, flags, 0, 0, data_len=len(data),
                    lun=(isid << 16) | tsih, itt=itt, f24=sn.statsn, f28=sn.expcmdsn,
                    f32=sn.maxcmdsn, f36=status << 16)
    return frame(head, data)


def text_response(itt: int, ttt: int, flags: int, lun: int, sn: SeqNumbers, data: bytes,
                  digests: Digests | None = None) -> list:
    head = pack_bhs(Opcode.TEXT_RESPONSE, flags, data_len=len(data), lun=lun, itt=itt,
                    f20=ttt, f24=sn.statsn, f28=sn.expcmdsn, f32=sn.maxcmdsn)
    return frame(head, data, digests)


def logout_response(itt: int, response: int, sn: SeqNumbers, *, time2wait: int = 0,
                    time2retain: int = 0, digests: Digests | None = None) -> list:
    head = pack_bhs(Opcode.LOGOUT_RESPONSE, FINAL, response, itt=itt, f24=sn.statsn,
                    f28=sn.expcmdsn, f32=sn.maxcmdsn, f40=(time2wait << 16) | time2retain)
    return frame(head, b"", digests)


def reject(reason: int, rejected_bhs: bytes, sn: SeqNumbers, *, datasn: int = 0,
           digests: Digests | None = None) -> list:
    """A Reject carries the rejected PDU's header as its data."""
    head = pack_bhs(Opcode.REJECT, FINAL, reason, data_len=len(rejected_bhs), itt=NO_TAG,
                    f24=sn.statsn, f28=sn.expcmdsn, f32=sn.maxcmdsn, f36=datasn)
    return frame(head, rejected_bhs, digests)
