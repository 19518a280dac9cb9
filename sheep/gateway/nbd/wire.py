"""The NBD wire format: the one place that defines it.

Values follow the NBD protocol specification (doc/proto.md of NetworkBlockDevice/nbd), fixed
newstyle negotiation only. Everything on the wire is big-endian ("network byte order").
Names drop the `NBD_` / `NBD_OPT_` / `NBD_REP_` prefixes because the enum class says which
family a value belongs to: `Opt.GO` is NBD_OPT_GO, `Rep.ERR_UNSUP` is NBD_REP_ERR_UNSUP.

Handshake (server first):

    S: NBDMAGIC u64 | IHAVEOPT u64 | handshake flags u16
    C: client flags u32
    C: IHAVEOPT u64 | option u32 | length u32 | data            (repeated)
    S: OPT_REPLY_MAGIC u64 | option u32 | reply type u32 | length u32 | data
    S: (NBD_OPT_EXPORT_NAME only) size u64 | transmission flags u16 | 124 zeroes unless NO_ZEROES

Transmission:

    C: REQUEST_MAGIC u32 | command flags u16 | command u16 | cookie u64 | offset u64 |
       length u32 | (length bytes for WRITE)
    S: SIMPLE_REPLY_MAGIC u32 | error u32 | cookie u64 | (length bytes for a good READ)
    S: STRUCTURED_REPLY_MAGIC u32 | flags u16 | type u16 | cookie u64 | length u32 | payload
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

from sheep.errors import ProtocolError

# -- magics ---------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # b"IHAVEOPT": the newstyle magic, also prefixes every option
OPT_REPLY_MAGIC = 0x3E889045565A9  # prefixes every fixed-newstyle option reply
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF


# -- handshake ------------------------------------------------------------------------------


class HandshakeFlag(IntFlag):
    """Sent by the server right after the magics (16 bits)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """The client's answer to the handshake flags (32 bits); unknown bits end the session."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(IntEnum):
    """Option codes a client sends during option haggling."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


_ERR = 1 << 31  # every option error reply type has bit 31 set


class Rep(IntEnum):
    """Option reply types."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9


class InfoType(IntEnum):
    """Information items a client may request in NBD_OPT_INFO / NBD_OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    """Per-export flags (16 bits) that tell the client which commands and flags it may use."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, data length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # OPT_REPLY_MAGIC, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (then the zero padding)
EXPORT_NAME_PADDING = 124  # zero bytes after EXPORT_NAME_REPLY unless NO_ZEROES was agreed
INFO_EXPORT = struct.Struct(">HQH")  # InfoType.EXPORT, size, transmission flags
INFO_TYPE = struct.Struct(">H")  # prefix of NAME / DESCRIPTION items (string follows)
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # InfoType.BLOCK_SIZE, minimum, preferred, maximum
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

MAX_STRING = 4096  # longest export name, query or error message the spec allows (bytes)
BASE_ALLOCATION = "base:allocation"  # the one metadata context this server offers


# -- transmission ---------------------------------------------------------------------------


class Cmd(IntEnum):
    """Request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    """Command flags (16 bits of every request)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(IntEnum):
    """Structured reply chunk types; bit 15 marks an error chunk."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class ReplyFlag(IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0  # last chunk of the reply to this cookie


class Errno(IntEnum):
    """The only error values a reply may carry (they happen to equal Linux errno)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(IntFlag):
    """Extent flags of the base:allocation metadata context."""

    HOLE = 1 << 0  # not allocated: writes there may hit ENOSPC
    ZERO = 1 << 1  # reads as zeroes


REQUEST = struct.Struct(">IHHQQI")  # magic, flags, command, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
OFFSET = struct.Struct(">Q")  # OFFSET_DATA payload prefix
OFFSET_HOLE = struct.Struct(">QI")  # offset, hole size
ERROR_PREFIX = struct.Struct(">IH")  # error, message length (message follows)
EXTENT = struct.Struct(">II")  # BLOCK_STATUS descriptor: length, StateFlag

DEFAULT_MAX_PAYLOAD = 32 << 20  # the spec's default maximum payload (2^25)


class NbdProtocolError(ProtocolError):
    """The NBD client broke the framing of the stream; this connection must end now."""
