"""NBD gateway: the sans-I/O protocol core (handshake, transmission) and its wire format."""

from .handshake import (
    BASE_ALLOCATION_ID,
    MAX_OPTION_DATA,
    MAX_OPTION_SKIP,
    Closed,
    Event,
    ExportCatalog,
    ExportInfo,
    HandshakeDone,
    NeedData,
    ServerHandshake,
    StartTls,
    transmission_flags,
)
from .tls import TlsMode
from .transmission import (
    Request,
    RequestDecoder,
    error_reply,
    simple_reply,
    structured_block_status,
    structured_error,
    structured_error_offset,
    structured_none,
    structured_offset_data,
    structured_offset_hole,
    validate,
)
from .wire import NbdProtocolError

__all__ = [
    "BASE_ALLOCATION_ID",
    "MAX_OPTION_DATA",
    "MAX_OPTION_SKIP",
    "Closed",
    "Event",
    "ExportCatalog",
    "ExportInfo",
    "HandshakeDone",
    "NbdProtocolError",
    "NeedData",
    "Request",
    "RequestDecoder",
    "ServerHandshake",
    "StartTls",
    "TlsMode",
    "error_reply",
    "simple_reply",
    "structured_block_status",
    "structured_error",
    "structured_error_offset",
    "structured_none",
    "structured_offset_data",
    "structured_offset_hole",
    "transmission_flags",
    "validate",
]
