"""Server side of the NBD fixed newstyle handshake, sans-I/O: bytes in, bytes and events out.

No sockets, no clock, no asyncio: the adapter sends `initial_bytes()`, feeds whatever the
client sends to `receive_data()`, writes `data_to_send()` and then asks `next_event()` what
happened. Keeping the state machine pure is what lets the tests pin every reply byte for
byte and feed input one byte at a time.

What the server does with bad input follows the spec's split between errors it can report
and violations it cannot: an option the server does not know, or whose payload is
malformed, gets an error reply and negotiation continues (a client probes with options it
is unsure of); broken framing (bad magic, unknown client flags, an option length so large
that reading it would be a denial of service, an unknown name in NBD_OPT_EXPORT_NAME which
has no error reply) ends the session with `Closed`.

TLS (NBD_OPT_STARTTLS) follows the mode the server runs in (tls.py): under `require`
every option but STARTTLS and ABORT is refused with ERR_TLS_REQD until TLS is up; after
the ACK to STARTTLS the handshake waits (StartTls) until the adapter reports the TLS
session established, then forgets what was negotiated before it, as the spec demands.
Whether an export may be attached, and whether only over TLS, is the catalog's word
(ExportInfo.denied, ExportInfo.tls_only), since it depends on who the client is. A client
the adapter found may not speak plaintext at all (`plaintext_refused`: a loopback client
of another local user, sheep/netpeer.py) is answered as under `require`, with that reason,
until TLS is up; where no TLS is offered, with ERR_POLICY.

Option data is bounded: payloads this server has to parse are buffered up to
MAX_OPTION_DATA, payloads it ignores are discarded as they arrive, and anything announcing
more than MAX_OPTION_SKIP bytes closes the session at once, so garbage cannot make the
handshake hold more than one option's worth of memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from .tls import TlsMode
from .wire import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    DEFAULT_MAX_PAYLOAD,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_TYPE,
    MAX_STRING,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    U16,
    U32,
    ClientFlag,
    HandshakeFlag,
    InfoType,
    Opt,
    Rep,
    TransmissionFlag,
)

MAX_OPTION_DATA = 64 << 10  # largest option payload buffered for parsing
MAX_OPTION_SKIP = 1 << 20  # larger announced payloads close the session instead of being read
# Replies not yet taken by data_to_send() before no further option is parsed: a client that
# sends options (a 16-byte NBD_OPT_LIST gets the whole export list) and never reads the
# answers must not make us queue them without bound. Parsing goes on at the next
# receive_data(), which may bring no bytes.
MAX_PENDING_REPLIES = 64 << 10
BASE_ALLOCATION_ID = 1  # context id handed out for base:allocation by SET_META_CONTEXT

SERVER_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
# plain ints: `~` of an IntFlag only complements within its members, hiding unknown bits
_KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake needs to know about one export (one VDI).

    `min_block`, `preferred_block` and `max_block` are the NBD size constraints (minimum
    block, preferred block, maximum payload). The defaults are the spec's defaults, so a
    client that never asks for NBD_INFO_BLOCK_SIZE is still served correctly. They are
    checked here, because a wrong value is otherwise only noticed by a client.
    """

    name: str
    description: str
    size: int
    read_only: bool
    can_multi_conn: bool
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_PAYLOAD
    denied: str = ""  # why this client may not attach it (empty: it may)
    tls_only: bool = False  # it may only once TLS is up

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 64:
            raise ValueError(f"export size {self.size} does not fit in 64 bits")
        if not _power_of_two(self.min_block) or self.min_block > 1 << 16:
            raise ValueError(f"minimum block {self.min_block} is not a power of 2 <= 64 KiB")
        if not _power_of_two(self.preferred_block) or self.preferred_block < max(
            self.min_block, 512
        ):
            raise ValueError(f"preferred block {self.preferred_block} is not a power of 2 >= 512")
        if not self.preferred_block <= self.max_block < 1 << 32:
            raise ValueError(f"maximum payload {self.max_block} out of range")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class ExportCatalog(Protocol):
    """The exports this server offers; the gateway implements it over the VDI table.

    Called synchronously from inside `receive_data()`, so it must answer from memory.
    """

    def list(self) -> Sequence[tuple[str, str]]:
        """(name, description) of every export NBD_OPT_LIST should show."""
        ...

    def lookup(self, name: str) -> ExportInfo | None:
        """The export a client asked for by name ("" is the default export), or None."""
        ...


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeedData:
    """Nothing decided yet: feed more bytes (after sending data_to_send())."""


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """Transmission starts: send data_to_send() first, then hand the connection over.

    `meta_context_id` is the id of base:allocation when the client selected it for this
    very export (otherwise NBD_CMD_BLOCK_STATUS must be refused); `no_zeroes` only
    mattered for the NBD_OPT_EXPORT_NAME reply and is reported for logging.
    """

    export: ExportInfo
    structured_replies: bool
    meta_context_id: int | None
    no_zeroes: bool


@dataclass(frozen=True, slots=True)
class Closed:
    """The session ends: send data_to_send() (it may hold the ACK to NBD_OPT_ABORT), then
    close. `clean` is True for a client's soft disconnect (NBD_OPT_ABORT), False for a
    protocol violation or end of file."""

    reason: str
    clean: bool = False


@dataclass(frozen=True, slots=True)
class StartTls:
    """The client's NBD_OPT_STARTTLS was acknowledged: send data_to_send() (the ACK), read
    nothing more in plaintext, run the TLS handshake as the server, then call
    tls_started() (or close the connection if TLS failed: the spec leaves no way back)."""


Event = NeedData | StartTls | HandshakeDone | Closed


# -- the state machine ----------------------------------------------------------------------


class _State(Enum):
    CLIENT_FLAGS = auto()
    OPTION_HEADER = auto()
    OPTION_DATA = auto()
    TLS_PENDING = auto()  # STARTTLS acknowledged, the TLS handshake not yet done
    FINISHED = auto()


class ServerHandshake:
    """One connection's negotiation, from the greeting to HandshakeDone or Closed."""

    def __init__(self, exports: ExportCatalog, tls: TlsMode = TlsMode.OFF,
                 plaintext_refused: str = "") -> None:
        self._exports = exports
        self._tls_mode = tls
        self._plaintext_refused = plaintext_refused
        self._tls_up = False
        self._state = _State.CLIENT_FLAGS
        self._buf = bytearray()
        self._out = bytearray()
        self._terminal: HandshakeDone | Closed | None = None
        self._trailing = bytearray()
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None  # export base:allocation was selected for
        self._shutting_down = False
        # the option whose data is being received
        self._option = 0
        self._need = 0  # data bytes still to come
        self._collect = False  # keep them (True) or discard them as they arrive
        self._on_data: Callable[[bytes], None] = _ignore

    # -- transport side ---------------------------------------------------------------

    def initial_bytes(self) -> bytes:
        """The server greeting, to send as soon as the connection is accepted."""
        return GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_FLAGS)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client; replies accumulate for data_to_send(). Options
        wait while MAX_PENDING_REPLIES of replies do: feed b"" after taking them."""
        if self._terminal is not None:
            if isinstance(self._terminal, HandshakeDone):
                self._trailing += data  # early transmission requests: see trailing_data()
            return
        if self._state is _State.TLS_PENDING:
            if data:
                self._close("client sent data before the TLS handshake")
            return
        self._buf += data
        self._advance()

    def receive_eof(self) -> None:
        """The client closed its side."""
        if self._terminal is None:
            self._close("client closed the connection during the handshake")

    @property
    def input_waiting(self) -> bool:
        """Whether received option bytes wait for the replies to be taken."""
        return self._terminal is None and bool(self._buf)

    def data_to_send(self) -> bytes:
        """Bytes to write to the client now (each returned once)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event:
        """NeedData until the handshake ends, then its terminal event on every call;
        StartTls while a TLS handshake is due."""
        if self._terminal is not None:
            return self._terminal
        return StartTls() if self._state is _State.TLS_PENDING else NeedData()

    def tls_started(self) -> None:
        """The TLS session is up: negotiation starts afresh inside it."""
        if self._state is not _State.TLS_PENDING:
            raise RuntimeError("tls_started() without a StartTls event")
        self._tls_up = True
        self._structured = False
        self._meta_export = None
        self._state = _State.OPTION_HEADER
        self._advance()

    @property
    def tls_active(self) -> bool:
        return self._tls_up

    def trailing_data(self) -> bytes:
        """Bytes received after the handshake ended: the start of the transmission phase,
        to feed to the RequestDecoder (a client should not send any before our reply,
        but nothing may be lost if it does)."""
        return bytes(self._trailing)

    def begin_shutdown(self) -> None:
        """The server is stopping: from now on every option but ABORT gets ERR_SHUTDOWN,
        which tells the client to disconnect."""
        self._shutting_down = True

    # -- parsing ------------------------------------------------------------------------

    def _advance(self) -> None:
        buf = self._buf
        while self._terminal is None:
            if self._state is _State.CLIENT_FLAGS:
                if len(buf) < CLIENT_FLAGS.size:
                    return
                (flags,) = CLIENT_FLAGS.unpack_from(buf)
                del buf[: CLIENT_FLAGS.size]
                self._client_flags(flags)
            elif self._state is _State.OPTION_HEADER:
                if len(buf) < OPTION_HEADER.size or len(self._out) >= MAX_PENDING_REPLIES:
                    return
                magic, option, length = OPTION_HEADER.unpack_from(buf)
                del buf[: OPTION_HEADER.size]
                if magic != IHAVEOPT:
                    self._close(f"bad option magic {magic:#018x}")
                    break
                self._begin_option(option, length)
            elif self._state is _State.OPTION_DATA:
                if self._collect:
                    if len(buf) < self._need:
                        return
                    data = bytes(buf[: self._need])
                    del buf[: self._need]
                else:
                    n = min(self._need, len(buf))
                    del buf[:n]
                    self._need -= n
                    if self._need:
                        return
                    data = b""
                self._state = _State.OPTION_HEADER
                self._on_data(data)
            else:  # TLS_PENDING, FINISHED
                return
        # ended: whatever follows belongs to the transmission phase (or is dropped)
        if isinstance(self._terminal, HandshakeDone):
            self._trailing += buf
        buf.clear()

    def _client_flags(self, flags: int) -> None:
        if flags & ~_KNOWN_CLIENT_FLAGS:
            self._close(f"unknown client flags {flags:#010x}")
        elif not flags & ClientFlag.FIXED_NEWSTYLE:
            self._close("client does not speak fixed newstyle negotiation")
        else:
            self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self._state = _State.OPTION_HEADER

    def _begin_option(self, option: int, length: int) -> None:
        """Decide, from the header alone, whether the data is parsed, discarded or refused."""
        if length > MAX_OPTION_SKIP:
            self._close(f"option {option} announces {length} bytes of data")
            return
        self._option = option
        if option == Opt.ABORT:  # data SHOULD be ignored
            self._expect(length, False, self._opt_abort)
        elif self._shutting_down:
            if option == Opt.EXPORT_NAME:  # cannot be answered with an error
                self._close("server shutting down")
            else:
                self._expect(length, False, self._refuse(Rep.ERR_SHUTDOWN, "server shutting down"))
        elif option == Opt.STARTTLS and self._tls_mode is not TlsMode.OFF:
            if self._tls_up:
                self._expect(length, False, self._refuse(Rep.ERR_INVALID, "TLS already started"))
            elif length:
                self._expect(length, False, self._refuse(Rep.ERR_INVALID, "unexpected data"))
            else:
                self._expect(0, False, self._opt_starttls)
        elif self._tls_mode is TlsMode.REQUIRE and not self._tls_up:
            if option == Opt.EXPORT_NAME:  # cannot be answered with an error
                self._close("NBD_OPT_EXPORT_NAME before TLS, which this server requires")
            else:
                self._expect(length, False, self._refuse(Rep.ERR_TLS_REQD, "TLS required"))
        elif self._plaintext_refused and not self._tls_up:
            if option == Opt.EXPORT_NAME:
                self._close(f"NBD_OPT_EXPORT_NAME refused: {self._plaintext_refused}")
            else:  # ERR_TLS_REQD only where STARTTLS is offered
                rep = Rep.ERR_POLICY if self._tls_mode is TlsMode.OFF else Rep.ERR_TLS_REQD
                self._expect(length, False, self._refuse(rep, self._plaintext_refused))
        elif option == Opt.EXPORT_NAME:
            if length > MAX_STRING:
                self._close(f"export name of {length} bytes")
            else:
                self._expect(length, True, self._opt_export_name)
        elif option in (Opt.LIST, Opt.STRUCTURED_REPLY):  # these carry no data
            if length:
                self._expect(length, False, self._refuse(Rep.ERR_INVALID, "unexpected data"))
            elif option == Opt.LIST:
                self._expect(0, False, self._opt_list)
            else:
                self._expect(0, False, self._opt_structured_reply)
        elif option in (Opt.INFO, Opt.GO, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if option == Opt.SET_META_CONTEXT:
                self._meta_export = None  # replaced even if this request fails
            if length > MAX_OPTION_DATA:
                self._expect(length, False, self._refuse(Rep.ERR_TOO_BIG, "option data too big"))
            elif option in (Opt.INFO, Opt.GO):
                self._expect(length, True, self._opt_info_go)
            else:
                self._expect(length, True, self._opt_meta_context)
        else:  # STARTTLS (under `off`) and every option this server does not know
            self._expect(length, False, self._refuse(Rep.ERR_UNSUP, "unsupported option"))

    def _expect(self, length: int, collect: bool, on_data: Callable[[bytes], None]) -> None:
        self._state = _State.OPTION_DATA
        self._need, self._collect, self._on_data = length, collect, on_data

    # -- options ------------------------------------------------------------------------

    def _opt_abort(self, _data: bytes) -> None:
        self._reply(Rep.ACK)
        self._close("client sent NBD_OPT_ABORT", clean=True)

    def _opt_starttls(self, _data: bytes) -> None:
        self._reply(Rep.ACK)
        self._state = _State.TLS_PENDING
        if self._buf:  # a client must wait for the ACK: these bytes are no TLS of ours
            self._close("client sent data before the TLS handshake")

    def _opt_export_name(self, data: bytes) -> None:
        name = _decode(data)
        export = self._exports.lookup(name) if name is not None else None
        if export is None:  # NBD_OPT_EXPORT_NAME has no error reply: the spec says hang up
            self._close(f"unknown export {name!r} in NBD_OPT_EXPORT_NAME")
            return
        refusal = self._refusal(export)
        if refusal is not None:
            self._close(f"export {name!r} in NBD_OPT_EXPORT_NAME: {refusal[1]}")
            return
        self._out += EXPORT_NAME_REPLY.pack(
            export.size, transmission_flags(export, self._structured)
        )
        if not self._no_zeroes:
            self._out += bytes(EXPORT_NAME_PADDING)
        self._finish(export)

    def _opt_list(self, _data: bytes) -> None:
        for name, description in self._exports.list():
            raw = name.encode()
            self._reply(Rep.SERVER, U32.pack(len(raw)) + raw + description.encode())
        self._reply(Rep.ACK)

    def _opt_structured_reply(self, _data: bytes) -> None:
        if self._structured:
            self._error(Rep.ERR_INVALID, "structured replies already negotiated")
        else:
            self._structured = True
            self._reply(Rep.ACK)

    def _opt_info_go(self, data: bytes) -> None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._error(Rep.ERR_INVALID, "malformed request")
            return
        name, requested = parsed
        export = self._exports.lookup(name)
        if export is None:
            self._error(Rep.ERR_UNKNOWN, f"export {name!r} not found")
            return
        refusal = self._refusal(export)
        if refusal is not None:
            self._error(*refusal)
            return
        flags = transmission_flags(export, self._structured)
        self._reply(Rep.INFO, INFO_EXPORT.pack(InfoType.EXPORT, export.size, flags))
        if InfoType.NAME in requested:
            self._reply(Rep.INFO, INFO_TYPE.pack(InfoType.NAME) + export.name.encode())
        if InfoType.DESCRIPTION in requested:
            description = export.description.encode()
            self._reply(Rep.INFO, INFO_TYPE.pack(InfoType.DESCRIPTION) + description)
        # Also sent unasked when the export needs more than the default 1-byte alignment,
        # which the spec permits and which lets a careful client honour it anyway.
        if InfoType.BLOCK_SIZE in requested or export.min_block != 1:
            self._reply(
                Rep.INFO,
                INFO_BLOCK_SIZE.pack(
                    InfoType.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block
                ),
            )
        self._reply(Rep.ACK)
        if self._option == Opt.GO:
            self._finish(export)

    def _opt_meta_context(self, data: bytes) -> None:
        setting = self._option == Opt.SET_META_CONTEXT
        if not self._structured:
            self._error(Rep.ERR_INVALID, "negotiate structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._error(Rep.ERR_INVALID, "malformed request")
            return
        name, queries = parsed
        export = self._exports.lookup(name)
        if export is None:
            self._error(Rep.ERR_UNKNOWN, f"export {name!r} not found")
            return
        refusal = self._refusal(export)
        if refusal is not None:
            self._error(*refusal)
            return
        if setting:
            # "base:" is a wildcard only for LIST; SET selects exact names.
            selected = BASE_ALLOCATION in queries
        else:
            selected = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        if selected:
            context_id = BASE_ALLOCATION_ID if setting else 0  # LIST ids are reserved: 0
            self._reply(Rep.META_CONTEXT, U32.pack(context_id) + BASE_ALLOCATION.encode())
            if setting:
                self._meta_export = export.name
        self._reply(Rep.ACK)

    def _refusal(self, export: ExportInfo) -> tuple[Rep, str] | None:
        """Why this client may not use `export` now, as an error reply (None: it may).
        ERR_TLS_REQD only where the spec allows it: never once TLS is up, never under
        `off`."""
        if export.denied:
            return Rep.ERR_POLICY, export.denied
        if export.tls_only and not self._tls_up:
            if self._tls_mode is TlsMode.OFF:
                return Rep.ERR_POLICY, "export needs TLS, which this server does not offer"
            return Rep.ERR_TLS_REQD, f"export {export.name!r} needs TLS"
        return None

    def _refuse(self, rep: Rep, message: str) -> Callable[[bytes], None]:
        return lambda _data: self._error(rep, message)

    # -- output -------------------------------------------------------------------------

    def _reply(self, rep: Rep, payload: bytes = b"") -> None:
        self._out += OPTION_REPLY_HEADER.pack(OPT_REPLY_MAGIC, self._option, rep, len(payload))
        self._out += payload

    def _error(self, rep: Rep, message: str) -> None:
        """Error replies carry a message a human sees (qemu-img prints it)."""
        self._reply(rep, message.encode()[:MAX_STRING])

    def _finish(self, export: ExportInfo) -> None:
        meta_id = BASE_ALLOCATION_ID if self._meta_export == export.name else None
        self._terminal = HandshakeDone(export, self._structured, meta_id, self._no_zeroes)
        self._state = _State.FINISHED

    def _close(self, reason: str, *, clean: bool = False) -> None:
        self._terminal = Closed(reason, clean)
        self._state = _State.FINISHED


def transmission_flags(export: ExportInfo, structured: bool) -> int:
    """The 16 transmission flags for an export: what the client may send it.

    SEND_DF is only legal with structured replies; SEND_FAST_ZERO and SEND_CACHE are not
    offered (the volume layer cannot promise either), so those requests are refused.
    """
    flags = (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.SEND_TRIM
        | TransmissionFlag.SEND_WRITE_ZEROES
    )
    if structured:
        flags |= TransmissionFlag.SEND_DF
    if export.read_only:
        flags |= TransmissionFlag.READ_ONLY
    if export.can_multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return int(flags)


# -- payload parsers: None means malformed ---------------------------------------------------


def _ignore(_data: bytes) -> None:
    pass


def _decode(raw: bytes) -> str | None:
    if len(raw) > MAX_STRING:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _parse_info_request(data: bytes) -> tuple[str, set[int]] | None:
    """INFO/GO: name length u32 | name | count u16 | count x info type u16."""
    if len(data) < 6:
        return None
    (name_len,) = U32.unpack_from(data)
    if name_len > len(data) - 6:
        return None
    name = _decode(data[4 : 4 + name_len])
    pos = 4 + name_len
    (count,) = U16.unpack_from(data, pos)
    pos += 2
    if name is None or len(data) - pos != 2 * count:
        return None
    return name, {U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)}


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """LIST/SET_META_CONTEXT: name length u32 | name | count u32 | count x (u32 | query)."""
    if len(data) < 8:
        return None
    (name_len,) = U32.unpack_from(data)
    if name_len > len(data) - 8:
        return None
    name = _decode(data[4 : 4 + name_len])
    pos = 4 + name_len
    (count,) = U32.unpack_from(data, pos)
    pos += 4
    if name is None or count > (len(data) - pos) // 4:
        return None
    queries = []
    for _ in range(count):
        if len(data) - pos < 4:
            return None
        (query_len,) = U32.unpack_from(data, pos)
        pos += 4
        if query_len > len(data) - pos:
            return None
        query = _decode(data[pos : pos + query_len])
        if query is None:
            return None
        queries.append(query)
        pos += query_len
    if pos != len(data):
        return None
    return name, queries
