"""Typed errors shared by every layer.

Each error carries the numeric result code that the data plane puts on the wire, so a
failure raised deep in the store reaches the client as the same type, and a gateway can map
it to its own protocol's code without string matching.
"""

from __future__ import annotations

from enum import IntEnum


class Result(IntEnum):
    """Result codes of the data plane (the `result` field of a reply header)."""

    OK = 0
    NO_OBJECT = 1
    INVALID_PARAMS = 2
    OUT_OF_RANGE = 3
    IO_ERROR = 4
    NO_SPACE = 5
    OLD_EPOCH = 6
    NEW_EPOCH = 7
    NOT_FORMATTED = 8
    UNKNOWN_OP = 9
    TOO_LARGE = 10
    BUSY = 11
    SHUTTING_DOWN = 12
    NO_VDI = 13
    VDI_EXISTS = 14
    VDI_LOCKED = 15
    READ_ONLY = 16
    FENCED = 17
    CORRUPT = 18
    STALE_LOCK = 19


class SheepError(Exception):
    """Base of every error sheep raises on purpose."""

    code: Result = Result.IO_ERROR

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code.name)


class NoObject(SheepError):
    """no such object"""

    code = Result.NO_OBJECT


class InvalidParams(SheepError):
    """invalid parameters"""

    code = Result.INVALID_PARAMS


class OutOfRange(SheepError):
    """offset or length past the end of the object"""

    code = Result.OUT_OF_RANGE


class StoreIOError(SheepError):
    """I/O error in the object store"""

    code = Result.IO_ERROR


class NoSpace(SheepError):
    """no space left on the node"""

    code = Result.NO_SPACE


class OldEpoch(SheepError):
    """the request carries an epoch older than the node's"""

    code = Result.OLD_EPOCH


class NewEpoch(SheepError):
    """the request carries an epoch newer than the node's"""

    code = Result.NEW_EPOCH


class NotFormatted(SheepError):
    """the cluster is not formatted"""

    code = Result.NOT_FORMATTED


class UnknownOp(SheepError):
    """unknown opcode"""

    code = Result.UNKNOWN_OP


class TooLarge(SheepError):
    """request length over the limit"""

    code = Result.TOO_LARGE


class Busy(SheepError):
    """resource busy"""

    code = Result.BUSY


class ShuttingDown(SheepError):
    """the node is shutting down"""

    code = Result.SHUTTING_DOWN


class Fenced(SheepError):
    """the node lost its cluster lease; it takes no writes until it is a member again"""

    code = Result.FENCED


class StaleLock(SheepError):
    """the VDI's write lock moved to a newer holder; this writer's changes are refused"""

    code = Result.STALE_LOCK


class Corrupt(SheepError):
    """the replica's data does not match its checksums"""

    code = Result.CORRUPT

    def __init__(self, message: str = "", blocks: list[int] | None = None) -> None:
        super().__init__(message)
        self.blocks = blocks or []  # the checksum blocks that failed, when known


class ProtocolError(SheepError):
    """the peer broke the wire protocol; the connection cannot continue"""

    code = Result.INVALID_PARAMS


class ClusterError(SheepError):
    """a cluster-level operation failed (no replicas reachable, bad configuration...)"""

    code = Result.IO_ERROR


class NoVdi(SheepError):
    """no such VDI"""

    code = Result.NO_VDI


class VdiExists(SheepError):
    """the VDI already exists"""

    code = Result.VDI_EXISTS


class VdiLocked(SheepError):
    """the VDI is open for writing elsewhere"""

    code = Result.VDI_LOCKED


class ReadOnly(SheepError):
    """the VDI is read-only (a snapshot, or opened read-only)"""

    code = Result.READ_ONLY


_BY_CODE: dict[int, type[SheepError]] = {
    cls.code: cls
    for cls in (
        NoObject,
        InvalidParams,
        OutOfRange,
        StoreIOError,
        NoSpace,
        OldEpoch,
        NewEpoch,
        NotFormatted,
        UnknownOp,
        TooLarge,
        Busy,
        ShuttingDown,
        Fenced,
        StaleLock,
        Corrupt,
        NoVdi,
        VdiExists,
        VdiLocked,
        ReadOnly,
    )
}


def error_for(code: int, message: str = "") -> SheepError:
    """Build the typed error for a result code received from a peer."""
    cls = _BY_CODE.get(code, StoreIOError)
    return cls(message or f"{cls.__doc__} (result {code})")
