"""The NBD server: the asyncio adapter around the sans-I/O handshake and request decoder.

One BufferedProtocol per connection. During the handshake, bytes go to ServerHandshake;
after it, the kernel receives straight into the RequestDecoder's buffer (a large WRITE
payload lands in its own bytearray and travels to the object store without a copy). Each
request runs as one coroutine and its reply goes out in one writelines; replies may come
back out of order, as NBD allows. Errors become NBD errors on that request only: a bad
request never costs other requests their replies, and a framing error ends only its own
connection.

TLS (NBD_OPT_STARTTLS) upgrades the same connection with loop.start_tls once the handshake
has sent its ACK; the handshake then goes on inside TLS and the transmission phase runs
over the TLS transport with the same code (uvloop's TLS transport feeds a BufferedProtocol
as the TCP one does). Without TLS nothing here changes. The TLS handshake counts within
HANDSHAKE_TIMEOUT and within the connection cap, like every other part of the handshake.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from dataclasses import dataclass

from sheep.errors import (
    InvalidParams,
    NoSpace,
    OutOfRange,
    ReadOnly,
    SheepError,
    VdiLocked,
)
from sheep.gateway.exports import MAX_REQUEST, Export, ExportTable, VolumeCache
from sheep.netpeer import loopback_refusal
from sheep.security.identity import Peer, peer_of_ssl
from sheep.security.psk import PskServerContext
from sheep.tcp import ConnectionCap, accept_transport
from sheep.vdi.volume import Volume

from .handshake import Closed, ExportInfo, HandshakeDone, NeedData, ServerHandshake, StartTls
from .tls import TlsMode, access, psk_peer
from .transmission import (
    Request,
    RequestDecoder,
    error_reply,
    simple_reply,
    structured_block_status,
    structured_none,
    structured_offset_data,
    validate,
)
from .wire import Cmd, CmdFlag, Errno, NbdProtocolError, StateFlag

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # clients at once (see sheep.fdlimit.RESERVED)
HANDSHAKE_TIMEOUT = 10.0  # s from connect to an export chosen: idle sockets hold no slot
_MAX_INFLIGHT = 128  # requests in progress per connection before we stop reading
# Bytes of READs and WRITEs in progress per connection before we take no more (one request
# of any size is always taken): a read of blocks on other nodes holds its buffer while
# their replies come, and 128 such reads of 32 MiB would be 4 GiB.
_INFLIGHT_BYTES = 16 << 20
# Replies waiting to go out, per connection, before we stop taking requests: a client that
# sends requests but does not read the replies must not make us buffer without bound.
_WRITE_HIGH = 4 << 20  # the transport's high-water mark (pause_writing above it)
_OUTBOX_HIGH = 4 << 20  # replies of one loop pass not yet handed to the transport
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_HOLE = int(StateFlag.HOLE | StateFlag.ZERO)


def _bytes_of(req: Request) -> int:
    """The memory a request holds while in progress: its data, read or to write."""
    if req.command == Cmd.READ:
        return req.length
    return len(req.payload) if req.command == Cmd.WRITE else 0


def nbd_errno(exc: BaseException) -> int:
    if isinstance(exc, (ReadOnly, VdiLocked)):
        return Errno.EPERM
    if isinstance(exc, (InvalidParams, OutOfRange)):
        return Errno.EINVAL
    if isinstance(exc, NoSpace):
        return Errno.ENOSPC
    return Errno.EIO


@dataclass(frozen=True)
class NbdTls:
    """How a server offers TLS: its mode, and the context (the node's certificate, client
    certificates of the cluster's CA required, or with --nbd-tls-psk a PskServerContext
    that also admits a client by its pre-shared key) unless the mode is `off`."""

    mode: TlsMode = TlsMode.OFF
    context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if (self.mode is TlsMode.OFF) != (self.context is None):
            raise ValueError("an NBD TLS context goes with a mode other than off")

    def peer_of(self, ssl_object: ssl.SSLObject | None) -> Peer | None:
        """Who the client proved to be: its certificate's holder, or the PSK identity whose
        key it proved (None: neither)."""
        peer = peer_of_ssl(ssl_object)
        if peer is None and ssl_object is not None and \
                isinstance(self.context, PskServerContext):
            identity = self.context.psk_identity(ssl_object)
            if identity is not None:
                peer = psk_peer(identity)
        return peer


NO_TLS = NbdTls()


class _Catalog:
    """The handshake's synchronous view of the exports (see ExportTable), as this client
    may see them: `peer` is who it proved to be over TLS (None before TLS or without)."""

    def __init__(self, table: ExportTable, mode: TlsMode) -> None:
        self._table = table
        self._mode = mode
        self.peer: Peer | None = None
        self.chosen: dict[str, Export] = {}

    def list(self) -> list[tuple[str, str]]:
        out = []
        for name in self._table.names():
            export = self._table.find(name)
            if export is None:
                continue
            rule = access(self._mode, self.peer, export.nbd_allow)
            if not rule.denied and not rule.tls_only:
                out.append((name, export.description))
        return out

    def lookup(self, name: str) -> ExportInfo | None:
        export = self._table.find(name)
        if export is None:
            return None
        self.chosen[name] = export
        rule = access(self._mode, self.peer, export.nbd_allow)
        return ExportInfo(name=name, description=export.description, size=export.size,
                          read_only=export.read_only, can_multi_conn=True,
                          max_block=MAX_REQUEST, denied=rule.denied, tls_only=rule.tls_only)


class NbdConnection(asyncio.BufferedProtocol):
    def __init__(self, volumes: VolumeCache, cap: ConnectionCap | None = None,
                 tls: NbdTls = NO_TLS) -> None:
        self._volumes = volumes
        self._cap = cap
        self._tls = tls
        self._deadline = 0.0  # loop time by which an export must be chosen
        self._tls_setup = False  # between the ACK to STARTTLS and the handshake told
        self._early = bytearray()  # options that came in TLS before we were told
        self._admitted = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._plaintext_refused = ""  # why this client may not negotiate without TLS
        self._handshake: ServerHandshake | None = None
        self._catalog: _Catalog | None = None
        self._scratch = bytearray(64 << 10)
        self._decoder: RequestDecoder | None = None
        self._export: Export | None = None
        self._volume: Volume | None = None
        self._structured = False
        self._context: int | None = None
        self._inflight = 0
        self._inflight_bytes = 0
        self._closing = False
        self._lost = False
        self._tasks: set[asyncio.Future] = set()
        self._outbox: list = []  # replies of this loop pass: one writelines for all of them
        self._outbox_bytes = 0
        self._write_paused = False  # the transport's buffer is over _WRITE_HIGH
        self._backlog: deque[Request] = deque()  # decoded, not dispatched: replies back up
        self._reading_paused = True  # in transmission: whether we paused the transport
        self._pumping = False

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._cap is not None and not self._cap.admit(transport):
            return
        self._admitted = True
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._peer = accept_transport(transport, _WRITE_HIGH)
        self._plaintext_refused = self._plaintext_refusal(transport)
        self._deadline = self._loop.time() + HANDSHAKE_TIMEOUT
        self._handshake_timer = self._loop.call_later(
            HANDSHAKE_TIMEOUT, self._abort, f"no export chosen within {HANDSHAKE_TIMEOUT:.0f} s")
        transport.pause_reading()
        self._spawn(self._greet())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._decoder is not None:
            return self._decoder.get_buffer(sizehint)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._decoder is not None:
            try:
                self._decoder.buffer_updated(nbytes)
            except NbdProtocolError as exc:
                self._abort(f"protocol error: {exc}")
                return
            self._backlog.extend(self._decoder.messages())
            self._pump()
            return
        if self._tls_setup:  # the TLS layer may deliver before start_tls() returns
            self._early += memoryview(self._scratch)[:nbytes]
            return
        handshake = self._handshake
        assert handshake is not None
        handshake.receive_data(memoryview(self._scratch)[:nbytes])
        self._after_handshake_input()

    def eof_received(self) -> bool:
        if self._handshake is not None and self._decoder is None and not self._tls_setup:
            self._handshake.receive_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        if self._cap is not None:
            self._cap.release()
        self._end_handshake_timer()
        self._lost = True
        self._transport = None
        self._backlog.clear()  # nobody is left to answer
        self._maybe_release()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._decoder is None:  # in the handshake: options may wait for this
            handshake, transport = self._handshake, self._transport
            if handshake is None or transport is None or transport.is_closing() or \
                    not isinstance(handshake.next_event(), NeedData):
                return
            handshake.receive_data(b"")
            self._after_handshake_input()
            if not self._write_paused and isinstance(handshake.next_event(), NeedData):
                transport.resume_reading()
            return
        self._pump()

    # -- handshake ------------------------------------------------------------------------

    async def _greet(self) -> None:
        try:
            table = await self._volumes.table()
        except Exception as exc:
            log.warning("nbd %s: cannot read the VDI registry: %s", self._peer, exc)
            self._abort("registry unavailable")
            return
        if self._transport is None:
            return
        self._catalog = _Catalog(table, self._tls.mode)
        self._handshake = ServerHandshake(self._catalog, self._tls.mode,
                                          self._plaintext_refused)
        self._transport.write(self._handshake.initial_bytes())
        self._transport.resume_reading()

    def _plaintext_refusal(self, transport: asyncio.BaseTransport) -> str:
        """Any local user reaches a loopback port: plaintext is for root and the daemon's
        user only (sheep/netpeer.py), asked once here, at accept."""
        if self._tls.mode is TlsMode.REQUIRE:  # no plaintext for anyone
            return ""
        why = loopback_refusal(transport.get_extra_info("sockname"),
                               transport.get_extra_info("peername"), "plaintext NBD",
                               "use TLS" if self._tls.mode is TlsMode.ALLOW
                               else "this node serves no TLS")
        if why:
            log.info("nbd %s: %s", self._peer, why)
        return why

    def _after_handshake_input(self) -> None:
        """Send the handshake's replies; go on with options it held back, as long as the
        client takes the replies (reading waits while it does not)."""
        handshake = self._handshake
        assert handshake is not None and self._transport is not None
        while True:
            out = handshake.data_to_send()
            if out:
                self._transport.write(out)  # may pause_writing
            if self._write_paused or not handshake.input_waiting or not out:
                break
            handshake.receive_data(b"")
        event = handshake.next_event()
        if self._write_paused and isinstance(event, NeedData):
            self._transport.pause_reading()  # resume_writing goes on
            return
        if isinstance(event, Closed):
            self._transport.close()
        elif isinstance(event, StartTls):
            self._transport.pause_reading()
            self._tls_setup = True
            self._spawn(self._start_tls())
        elif isinstance(event, HandshakeDone):
            self._transport.pause_reading()
            self._spawn(self._enter_transmission(event))

    async def _start_tls(self) -> None:
        """The TLS handshake, as the server, on the connection the ACK went out on; a
        failure ends the connection (the spec leaves no way back to plaintext)."""
        raw, context = self._transport, self._tls.context
        assert raw is not None and context is not None
        try:
            transport = await self._loop.start_tls(
                raw, self, context, server_side=True,
                ssl_handshake_timeout=max(self._deadline - self._loop.time(), 0.1))
        except OSError as exc:  # ssl.SSLError, a reset, the timeout
            log.info("nbd %s: TLS handshake failed: %s", self._peer,
                     str(exc) or type(exc).__name__)
            raw.abort()  # type: ignore[attr-defined]
            return
        if transport is None or self._lost:
            return
        self._transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=_WRITE_HIGH)  # type: ignore[attr-defined]
        peer = self._tls.peer_of(transport.get_extra_info("ssl_object"))
        if peer is None:  # TLS up, and nobody to know the client by: never as plaintext
            self._abort("TLS without a client certificate or pre-shared key")
            return
        assert self._catalog is not None and self._handshake is not None
        self._catalog.peer = peer
        log.info("nbd %s: TLS as %s (%s)", self._peer, peer.name, peer.role)
        self._tls_setup = False
        self._handshake.tls_started()
        early, self._early = self._early, bytearray()
        self._handshake.receive_data(early)
        self._after_handshake_input()

    async def _enter_transmission(self, done: HandshakeDone) -> None:
        assert self._catalog is not None and self._handshake is not None
        export = self._catalog.chosen[done.export.name]
        try:
            self._volume = await self._volumes.acquire(export)
        except Exception as exc:
            # the lock went elsewhere between the handshake's look and our open
            log.warning("nbd %s: cannot open %s: %s", self._peer, export.name, exc)
            self._abort(str(exc))
            return
        self._export = export
        if self._lost:
            self._maybe_release()
            return
        self._structured = done.structured_replies
        self._context = done.meta_context_id
        self._decoder = RequestDecoder(max_payload=MAX_REQUEST)
        self._end_handshake_timer()
        log.info("nbd %s: transmission on %s", self._peer, export.name)
        trailing = self._handshake.trailing_data()
        self._handshake = None
        if trailing:
            try:
                self._decoder.receive_data(trailing)
            except NbdProtocolError as exc:
                self._abort(f"protocol error: {exc}")
                return
            self._backlog.extend(self._decoder.messages())
        self._reading_paused = True  # since the handshake ended
        self._pump()

    # -- transmission ---------------------------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        if self._closing:
            return
        vol = self._volume
        assert vol is not None
        if req.command == Cmd.DISC:
            self._closing = True
            if self._inflight == 0 and self._transport is not None:
                self._flush_outbox()
                self._transport.close()
            return
        err = validate(req, vol.size, vol.read_only, self._structured, self._context,
                       max_payload=MAX_REQUEST)
        if err:
            self._send(error_reply(req.cookie, err, self._structured))
            return
        if req.command == Cmd.READ:
            data = vol.read_now(req.offset, req.length)
            if data is not None:
                self._send(self._read_reply(req, data))
                return
        self._inflight += 1
        self._inflight_bytes += _bytes_of(req)
        self._spawn(self._serve(req, vol))

    async def _serve(self, req: Request, vol: Volume) -> None:
        try:
            reply = await self._execute(req, vol)
        except Exception as exc:
            if not isinstance(exc, SheepError):
                log.exception("nbd %s: request %d failed", self._peer, req.command)
            reply = error_reply(req.cookie, nbd_errno(exc), self._structured, str(exc)[:200])
        self._send(reply)
        self._inflight -= 1
        self._inflight_bytes -= _bytes_of(req)
        if self._backlog or self._reading_paused:
            self._pump()
        if self._inflight == 0:
            if self._closing and self._transport is not None:
                self._flush_outbox()
                self._transport.close()
            self._maybe_release()

    async def _execute(self, req: Request, vol: Volume) -> list:
        cmd = req.command
        fua = bool(req.flags & _FUA)
        if cmd == Cmd.READ:
            return self._read_reply(req, await vol.read(req.offset, req.length))
        if cmd == Cmd.WRITE:
            await vol.write(req.offset, req.payload, fua=fua)
        elif cmd == Cmd.FLUSH:
            await vol.flush()
        elif cmd == Cmd.TRIM:
            await vol.discard(req.offset, req.length, fua=fua)
        elif cmd == Cmd.WRITE_ZEROES:
            if req.flags & _NO_HOLE:
                await vol.write_zeroes(req.offset, req.length, fua=fua)
            else:
                await vol.discard(req.offset, req.length, fua=fua)
        elif cmd == Cmd.BLOCK_STATUS:
            runs = vol.block_status(req.offset, req.length)
            extents = [(n, 0 if allocated else _HOLE) for n, allocated in runs]
            if req.flags & _REQ_ONE:
                extents = extents[:1]
            assert self._context is not None
            return structured_block_status(req.cookie, self._context, extents)
        else:  # validate() lets nothing else through
            return error_reply(req.cookie, Errno.EINVAL, self._structured)
        return structured_none(req.cookie) if self._structured else simple_reply(req.cookie, 0)

    def _read_reply(self, req: Request, data: bytes | bytearray) -> list:
        if self._structured:
            return structured_offset_data(req.cookie, req.offset, data)
        return simple_reply(req.cookie, 0, data)

    # -- plumbing -------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, buffers: list) -> None:
        if not self._outbox:
            self._loop.call_soon(self._flush_outbox)
        self._outbox.extend(buffers)
        self._outbox_bytes += sum(map(len, buffers))

    def _flush_outbox(self) -> None:
        out, self._outbox = self._outbox, []
        self._outbox_bytes = 0
        if self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(out)  # may call pause_writing
        if self._backlog or self._reading_paused:
            self._pump()

    def _blocked(self) -> bool:
        """Take no more requests now: too many in progress, or too many replies waiting
        for the client to read them."""
        return (self._write_paused or self._inflight >= _MAX_INFLIGHT
                or self._inflight_bytes >= _INFLIGHT_BYTES
                or self._outbox_bytes >= _OUTBOX_HIGH)

    def _pump(self) -> None:
        """Dispatch decoded requests while replies can go out; read from the client only
        when none wait. Called whenever one of the reasons to wait may have gone."""
        if self._pumping or self._decoder is None:
            return
        self._pumping = True
        try:
            backlog = self._backlog
            while backlog and not self._blocked():
                self._dispatch(backlog.popleft())
            transport = self._transport
            if transport is None or transport.is_closing() or self._closing:
                return
            want = not backlog and not self._blocked()
            if want and self._reading_paused and self._inflight > _MAX_INFLIGHT // 2:
                want = False  # some slack first, or every completion toggles reading
            if want and self._reading_paused:
                self._reading_paused = False
                transport.resume_reading()
            elif not want and not self._reading_paused:
                self._reading_paused = True
                transport.pause_reading()
        finally:
            self._pumping = False

    def _end_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _abort(self, why: str) -> None:
        log.info("nbd %s: closing: %s", self._peer, why)
        if self._transport is not None:
            self._transport.close()

    def _maybe_release(self) -> None:
        """Give the volume back once the connection is gone and its requests are done:
        a client that vanishes mid-write still gets its acknowledged writes kept."""
        if self._lost and self._inflight == 0 and self._export is not None:
            export, self._export = self._export, None
            self._volume = None
            self._spawn(self._volumes.release(export))


async def serve_nbd(volumes: VolumeCache, host: str, port: int,
                    max_connections: int = MAX_CONNECTIONS,
                    tls: NbdTls = NO_TLS) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    cap = ConnectionCap(max_connections, "NBD")
    return await loop.create_server(lambda: NbdConnection(volumes, cap, tls), host, port,
                                    reuse_address=True)
