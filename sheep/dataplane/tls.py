"""Mutual TLS in front of the data plane: who may speak frames to a node, and the asyncio
adapter that lets only them through (encrypted, or in the clear after authentication on a
loopback link: link.py).

A secure listener accepts sockets itself and counts each against the plane's cap before
any TLS work (so a flood of handshakes that never finish holds at most the cap's
descriptors, and connections beyond it cost nothing but an accept and a close), runs the
server handshake with a time bound, and gives the connection to the frame protocol only
once the handshake is over; that protocol checks the role in the peer's certificate in
connection_made, before a byte of application data is delivered.

Why not create_server(ssl=...): it tells the protocol nothing about a handshake that fails,
so a handshake in progress could be counted but never released. Why not start_tls after a
plain accept: uvloop starts reading as soon as the protocol is connected, so a ClientHello
sent with the connection could be consumed by the plain protocol and lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Protocol

from sheep.security.identity import Peer, peer_of_ssl
from sheep.tcp import ConnectionCap

from .link import ASK_CLEAR, authenticate_then_clear, recv_exact, server_answer

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0  # seconds from accept to an authenticated peer
CLIENT_ROLES = frozenset({"node", "admin"})  # who may connect: peers and dog's bulk I/O
SERVER_ROLES = frozenset({"node"})  # whom a client accepts as the node it dialed


def refusal(peer: Peer | None, roles: frozenset[str]) -> str | None:
    """Why `peer` may not use the data plane (None: it may). The chain to our CA was
    checked by the handshake; what is left is the role."""
    if peer is None:
        return "no client certificate"
    if peer.role not in roles:
        return f"{peer.name!r} holds a {peer.role!r} certificate, not one of " \
               f"{', '.join(sorted(roles))}"
    return None


class Gated(Protocol):
    """The frame protocol of a secure listener: `adopted` once connection_made ran (the
    handshake succeeded), from when on it gives the connection's place back when lost;
    `peer` is who a link in the clear authenticated as (an encrypted link's transport
    tells it)."""

    adopted: bool
    peer: Peer | None


class Refused(Exception):
    """A peer whose certificate may not use the data plane."""


def _vet(protocol: Gated, obj: ssl.SSLObject) -> None:
    """Check a clear link's peer before TLS closes, and tell the protocol who it is."""
    peer = peer_of_ssl(obj)
    why = refusal(peer, CLIENT_ROLES)
    if why is not None:
        raise Refused(why)
    protocol.peer = peer


class _Closer:
    """What ConnectionCap closes when a socket is over the cap: with a RST, at once."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._sock.close()


class SecureListener:
    """Accepts on `sock` (bound and listening) and authenticates every connection by mutual
    TLS with `context` before `protocol()` (a Gated buffered protocol) gets it."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, cap: ConnectionCap,
                 protocol: Callable[[], Gated], *, clear_context: ssl.SSLContext | None = None,
                 plane: str = "data plane", handshake_timeout: float = HANDSHAKE_TIMEOUT
                 ) -> None:
        self._sock = sock
        self._context = context
        self._clear_context = clear_context  # None: every link encrypted (link.py)
        self._cap = cap
        self._protocol = protocol
        self._plane = plane
        self._timeout = handshake_timeout
        self._handshakes: set[asyncio.Task] = set()
        sock.setblocking(False)
        self._accepting = asyncio.ensure_future(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of descriptors, say: the loop must go on
                log.warning("%s: accept failed: %s", self._plane, exc)
                await asyncio.sleep(0.1)
                continue
            if not self._cap.admit(_Closer(conn)):  # type: ignore[arg-type]
                continue
            task = asyncio.ensure_future(self._handshake(conn, addr))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, addr: tuple) -> None:
        """The place under the cap is given back exactly once: here if the handshake
        fails, by the protocol's connection_lost if it succeeded."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol = self._protocol()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        handed = False  # the socket is the transport's to close from then on
        try:
            async with asyncio.timeout_at(deadline):
                mode = server_answer(await recv_exact(conn, 1), conn,
                                     encrypt_loopback=self._clear_context is None)
                await loop.sock_sendall(conn, mode)
                if mode == ASK_CLEAR:
                    assert self._clear_context is not None
                    await authenticate_then_clear(
                        conn, self._clear_context, functools.partial(_vet, protocol),
                        server_side=True)
            handed = True
            if mode == ASK_CLEAR:
                await loop.connect_accepted_socket(lambda: protocol, conn)  # type: ignore
            else:
                await loop.connect_accepted_socket(
                    lambda: protocol, conn, ssl=self._context,  # type: ignore[arg-type,return-value]
                    ssl_handshake_timeout=max(0.1, deadline - loop.time()))
        except BaseException as exc:
            if not protocol.adopted:
                self._cap.release()
                if not handed:
                    conn.close()
            if isinstance(exc, Refused):
                log.warning("%s: refusing %s:%s: %s", self._plane, addr[0], addr[1], exc)
            elif isinstance(exc, Exception):
                log.info("%s: handshake with %s:%s failed: %s", self._plane, addr[0],
                         addr[1], str(exc) or type(exc).__name__)
            else:
                raise

    def close(self) -> None:
        """Stop accepting; handshakes under way end by themselves (bounded by the
        timeout); the socket is the caller's."""
        self._accepting.cancel()
