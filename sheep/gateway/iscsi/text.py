"""iSCSI text data (RFC 7143 §6) and the target's side of operational key negotiation.

Text data is a series of `key=value` strings, each ended by a NUL. Login and Text PDUs
carry it. This module parses and encodes it and answers the operational keys (§13): each
key has a result function (declarative, list, boolean AND/OR, numeric min/max) and the
target answers an offer with the result of applying that function to the offer and to the
target's own value. Security keys (AuthMethod, CHAP_*) belong to login.py; SendTargets to
the session.

The result of a negotiation is a `Params`: what both sides then obey. Values are checked:
a malformed or out-of-range value is answered `key=Reject` (and the default stays), an
unknown key `key=NotUnderstood`, as the RFC asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sheep.errors import ProtocolError

MAX_KEY = 63
MAX_VALUE = 8192 - 1

NOT_UNDERSTOOD = "NotUnderstood"
IRRELEVANT = "Irrelevant"
REJECT = "Reject"


class TextError(ProtocolError):
    """text data that is not key=value\\0 pairs"""


def parse(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """The key=value pairs of a text data segment, in order. Trailing NULs (padding some
    initiators add) are ignored; a last pair without its NUL is accepted."""
    raw = bytes(data).rstrip(b"\0")
    if not raw:
        return []
    pairs = []
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise TextError(f"not a key=value pair: {item[:64]!r}")
        if len(key) > MAX_KEY or len(value) > MAX_VALUE:
            raise TextError(f"key or value too long: {key[:64]!r}")
        try:
            pairs.append((key.decode("ascii"), value.decode("utf-8")))
        except UnicodeDecodeError:
            raise TextError(f"not UTF-8: {item[:64]!r}") from None
    return pairs


def encode(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


@dataclass
class Limits:
    """What this target accepts; the negotiated values never exceed these."""

    max_recv_data_segment_length: int = 256 << 10  # declared: the largest PDU data we take
    max_burst_length: int = 1 << 20
    first_burst_length: int = 256 << 10
    max_outstanding_r2t: int = 8
    digests: tuple[str, ...] = ("None", "CRC32C")


@dataclass
class Params:
    """The operational parameters in force, RFC 7143 defaults until negotiated."""

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    # the initiator's declared MaxRecvDataSegmentLength: bounds the PDUs we send it
    max_recv_data_segment_length: int = 8192
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    offered: set[str] = field(default_factory=set)  # keys the initiator has sent so far


def _number(value: str, low: int, high: int) -> int | None:
    if not value.isdigit() and not (value.lower().startswith("0x") and len(value) > 2):
        return None
    try:
        n = int(value, 0) if not value.isdigit() else int(value)
    except ValueError:
        return None
    return n if low <= n <= high else None


def _boolean(value: str) -> bool | None:
    return {"Yes": True, "No": False}.get(value)


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


# keys an initiator declares (or the target answers nothing for in login)
DECLARATIVE = frozenset({"InitiatorName", "InitiatorAlias", "TargetName", "SessionType"})
_UNIT = 1 << 24


def negotiate_key(key: str, value: str, params: Params, limits: Limits
                  ) -> tuple[str, str] | None:
    """The answer to one offered operational key (or None when none is due), applied to
    `params`. Keys the initiator must not send and keys we do not know get the RFC's
    NotUnderstood; keys known but obsolete (markers) are answered so old initiators go on.
    """
    params.offered.add(key)
    if key in ("HeaderDigest", "DataDigest"):
        choices = [v.strip() for v in value.split(",")]
        chosen = next((c for c in choices if c in limits.digests), None)
        if chosen is None:
            return key, REJECT
        if key == "HeaderDigest":
            params.header_digest = chosen == "CRC32C"
        else:
            params.data_digest = chosen == "CRC32C"
        return key, chosen
    if key == "MaxConnections":
        n = _number(value, 1, 65535)
        if n is None:
            return key, REJECT
        params.max_connections = 1
        return key, "1"
    if key in ("InitialR2T", "DataPDUInOrder", "DataSequenceInOrder"):
        b = _boolean(value)
        if b is None:
            return key, REJECT
        # result function OR: we accept either value for InitialR2T; data must come in order
        result = b if key == "InitialR2T" else True
        attr = {"InitialR2T": "initial_r2t", "DataPDUInOrder": "data_pdu_in_order",
                "DataSequenceInOrder": "data_sequence_in_order"}[key]
        setattr(params, attr, result)
        return key, _yes(result)
    if key == "ImmediateData":
        b = _boolean(value)
        if b is None:
            return key, REJECT
        params.immediate_data = b  # result function AND; ours is Yes
        return key, _yes(b)
    if key == "MaxRecvDataSegmentLength":
        n = _number(value, 512, _UNIT - 1)
        if n is None:
            return key, REJECT
        params.max_recv_data_segment_length = n  # declarative: no answer due
        return None
    if key in ("MaxBurstLength", "FirstBurstLength"):
        n = _number(value, 512, _UNIT - 1)
        if n is None:
            return key, REJECT
        if key == "MaxBurstLength":
            params.max_burst_length = min(n, limits.max_burst_length)
            params.first_burst_length = min(params.first_burst_length,
                                            params.max_burst_length)
            return key, str(params.max_burst_length)
        params.first_burst_length = min(n, limits.first_burst_length,
                                        params.max_burst_length)
        return key, str(params.first_burst_length)
    if key == "MaxOutstandingR2T":
        n = _number(value, 1, 65535)
        if n is None:
            return key, REJECT
        params.max_outstanding_r2t = min(n, limits.max_outstanding_r2t)
        return key, str(params.max_outstanding_r2t)
    if key == "DefaultTime2Wait":
        n = _number(value, 0, 3600)
        if n is None:
            return key, REJECT
        params.default_time2wait = max(n, 0)
        return key, str(params.default_time2wait)
    if key == "DefaultTime2Retain":
        n = _number(value, 0, 3600)
        if n is None:
            return key, REJECT
        params.default_time2retain = 0  # result function min; ERL 0 keeps no state
        return key, "0"
    if key == "ErrorRecoveryLevel":
        n = _number(value, 0, 2)
        if n is None:
            return key, REJECT
        params.error_recovery_level = 0
        return key, "0"
    if key in ("IFMarker", "OFMarker", "RDMAExtensions"):
        return key, "No" if _boolean(value) is not None else REJECT
    if key in ("IFMarkInt", "OFMarkInt"):
        return key, IRRELEVANT
    if key == "TaskReporting":
        return key, "RFC3720"
    if key == "iSCSIProtocolLevel":
        n = _number(value, 0, 31)
        return (key, REJECT) if n is None else (key, str(min(n, 1)))
    if key in DECLARATIVE:
        return None
    return key, NOT_UNDERSTOOD


def finish(params: Params) -> None:
    """Apply the cross-key rules once negotiation is over: FirstBurstLength never exceeds
    MaxBurstLength."""
    params.first_burst_length = min(params.first_burst_length, params.max_burst_length)
