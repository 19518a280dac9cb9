"""asyncio adapter for the serving side of the data plane.

One BufferedProtocol per connection; frames go to an `ObjectService`, replies come back
through `send`. No Task is created for ordinary requests: the store calls run inline and
only durable writes wait for a group commit, through a future callback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Protocol

from sheep.errors import ProtocolError
from sheep.security.identity import Identity, Peer, peer_of_ssl
from sheep.tcp import ConnectionCap, accept_transport

from .codec import Frame, FrameDecoder, coalesced, encode
from .tls import CLIENT_ROLES, HANDSHAKE_TIMEOUT, SecureListener, refusal

log = logging.getLogger(__name__)


class FrameHandler(Protocol):
    def handle(self, frame: Frame, conn: ReplySink) -> None: ...


class ReplySink(Protocol):
    def send(self, header: bytes, payload: bytes | bytearray | memoryview = b"") -> None: ...


# Reply bytes a connection may have unsent (in the transport's buffer) before it stops
# handling requests: a peer that sends READs and never takes the replies costs this much,
# not an object per request it managed to send.
REPLY_BACKLOG = 8 << 20
MAX_CONNECTIONS = 256  # peers and clients at once (see sheep.fdlimit.RESERVED)


class DataPlaneServerProtocol(asyncio.BufferedProtocol):
    def __init__(self, handler: FrameHandler, cap: ConnectionCap | None = None) -> None:
        self._handler = handler
        self._cap = cap
        self._admitted = False
        self._decoder = FrameDecoder(replies=False)
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._waiting: deque[Frame] = deque()  # decoded, not yet handled
        self._stalled = False  # the peer is not taking replies: requests wait
        self._batch: list | None = None  # replies produced by the frames of one recv
        self._batched = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._cap is not None and not self._cap.admit(transport):
            return
        self.adopt(transport)

    def adopt(self, transport: asyncio.BaseTransport) -> None:
        """Serve a connection counted under the cap already (by connection_made, or by a
        TLS gate that authenticated it first)."""
        self._admitted = True
        self._transport = transport  # type: ignore[assignment] - uvloop's is no subclass
        self._peer = accept_transport(transport, write_high=REPLY_BACKLOG)

    @property
    def adopted(self) -> bool:
        return self._admitted

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            # requests that arrived intact before the garbage still get their replies
            self._waiting.extend(self._decoder.messages())
            self._handle_waiting()
            log.warning("closing data-plane connection from %s: %s", self._peer, exc)
            self.close()
            return
        self._waiting.extend(self._decoder.messages())
        self._handle_waiting()

    def _handle_waiting(self) -> None:
        """Handle decoded requests until none is left or the peer stops taking replies
        (then reading is paused, and resume_writing goes on from here)."""
        self._batch, self._batched = [], 0
        try:
            while self._waiting and not self._stalled:
                self._handler.handle(self._waiting.popleft(), self)
        finally:
            self._flush_batch()
            self._batch = None

    def _flush_batch(self) -> None:
        batch, self._batch, self._batched = self._batch, [], 0
        transport = self._transport
        if batch and transport is not None and not transport.is_closing():
            transport.writelines(batch)  # may pause_writing: that stalls the loop above

    def send(self, header: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
        """Replies made while a recv is being handled go out in one write at its end (or
        whenever REPLY_BACKLOG of them piled up); later ones (after a group commit) go at
        once."""
        if self._batch is not None:
            self._batch.extend(encode(header, payload))
            self._batched += len(header) + len(payload)
            if self._batched >= REPLY_BACKLOG:
                self._flush_batch()
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.writelines(encode(header, payload))

    def pause_writing(self) -> None:
        self._stalled = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._stalled = False
        if self._batch is None:  # not from inside _handle_waiting's own write
            self._handle_waiting()
        if not self._stalled and self._transport is not None and \
                not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted and self._cap is not None:
            self._cap.release()
        self._transport = None
        self._waiting.clear()


class _Refused:
    """The decoder of a connection refused after its handshake: what still arrives is
    dropped unparsed."""

    def __init__(self) -> None:
        self._scratch = memoryview(bytearray(16 << 10))

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        pass

    def messages(self) -> list[Frame]:
        return []


class AuthenticatedServerProtocol(DataPlaneServerProtocol):
    """The frame protocol behind a SecureListener: the listener counted the connection
    already, and the handshake is over when connection_made runs; the peer must hold a
    node or admin certificate, or the connection is closed before any frame is read.
    `peer` is set by the listener for a link in the clear (its TLS is closed already);
    an encrypted link's transport names the peer."""

    peer: Peer | None = None
    _encrypted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.adopt(transport)
        tls = transport.get_extra_info("ssl_object")
        self._encrypted = tls is not None
        why = refusal(self.peer if tls is None else peer_of_ssl(tls), CLIENT_ROLES)
        if why is not None:
            self._decoder = _Refused()  # type: ignore[assignment]
            log.warning("data plane: refusing %s: %s", self._peer, why)
            transport.abort()  # type: ignore[attr-defined]

    def _flush_batch(self) -> None:
        if self._batch and self._encrypted:  # the replies of one recv as few TLS records
            self._batch = coalesced(self._batch)
        super()._flush_batch()


class Listening(Protocol):
    def close(self) -> None: ...


async def serve(handler: FrameHandler, sock: socket.socket,
                max_connections: int = MAX_CONNECTIONS, *, identity: Identity | None = None,
                encrypt_loopback: bool = False,
                handshake_timeout: float = HANDSHAKE_TIMEOUT) -> Listening:
    """Serve the data plane on `sock`, bound and listening already (its port is part of
    what a node tells the cluster about itself before it serves). With an `identity`,
    only mutual-TLS peers holding a node or admin certificate of its CA get in
    (sheep/dataplane/tls.py), encrypted unless the link is loopback and not
    `encrypt_loopback` (link.py); without one, plain TCP, as fast as ever."""
    loop = asyncio.get_running_loop()
    cap = ConnectionCap(max_connections, "data plane")
    if identity is None:
        return await loop.create_server(lambda: DataPlaneServerProtocol(handler, cap),
                                        sock=sock)
    clear = None
    if not encrypt_loopback:
        clear = identity.server_ssl()
        clear.num_tickets = 0  # a session closed after its handshake resumes nothing
    return SecureListener(sock, identity.server_ssl(), cap,
                          lambda: AuthenticatedServerProtocol(handler, cap),
                          clear_context=clear, handshake_timeout=handshake_timeout)
