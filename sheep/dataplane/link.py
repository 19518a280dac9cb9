"""How a secure data-plane connection protects its frames: encrypted, or authenticated and
then in the clear when both ends are on this host.

Every secure connection is authenticated by mutual TLS. What follows depends on where it
runs. Across a network the frames stay inside TLS: encrypted and integrity-checked
against anyone on the path. Between two processes of one host (loopback at both ends)
nothing is on the path: no other party can read or inject loopback TCP without the
privileges that would also read the keys. Encrypting there buys nothing and costs most of
a core per GB/s, on the same cores that serve the I/O. So such a link runs the TLS
handshake, checks the certificate, closes TLS (close_notify both ways) and carries its
frames in the clear on the same TCP connection: Ceph's msgr2 "crc mode", applied only
where no network can reach. A node started with --encrypt-loopback keeps every link
encrypted (the benchmark's way to measure what encryption costs on one host).

Before TLS starts, the client sends one byte, its wish (ASK_ENCRYPTED or ASK_CLEAR), and the
server answers with the mode they will use. The server grants clear only when asked and
when the connection is loopback at its end too; the client asks for it only when dialing
loopback, and takes any answer but ENCRYPTED to its ENCRYPTED wish as a broken peer. So a
network peer can never talk either end out of encryption.

The clear mode's handshake reads the socket one TLS record at a time (header, then exactly
its length), so not a byte of the frames that follow close_notify is read into TLS.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Callable

from sheep.errors import ProtocolError
from sheep.netaddr import is_loopback

ASK_ENCRYPTED = b"E"
ASK_CLEAR = b"A"  # authenticated, then clear
MODES = frozenset({ASK_ENCRYPTED, ASK_CLEAR})

_RECORD_HEADER = struct.Struct(">BHH")  # content type, legacy version, length
MAX_RECORD = (1 << 14) + 256  # TLSCiphertext.length limit (RFC 8446, 5.2)


def is_loopback_link(sock: socket.socket) -> bool:
    """Both ends of a connected socket on this host."""
    try:
        return is_loopback(sock.getsockname()[0]) and is_loopback(sock.getpeername()[0])
    except OSError:
        return False


def client_wish(sock: socket.socket, encrypt_loopback: bool) -> bytes:
    return ASK_CLEAR if not encrypt_loopback and is_loopback_link(sock) else ASK_ENCRYPTED


def server_answer(wish: bytes, sock: socket.socket, encrypt_loopback: bool) -> bytes:
    """The mode a server grants to `wish` (raises ProtocolError for a byte that is no
    wish: a client that is not a secure sheep client)."""
    if wish not in MODES:
        raise ProtocolError(f"expected a link mode byte, got {wish!r}")
    if wish == ASK_CLEAR and not encrypt_loopback and is_loopback_link(sock):
        return ASK_CLEAR
    return ASK_ENCRYPTED


def check_answer(wish: bytes, answer: bytes) -> bytes:
    """The mode to use after the server's `answer`; ProtocolError if it is none the client
    may accept (clear when it asked for encryption, or garbage)."""
    if answer == ASK_ENCRYPTED or (answer == ASK_CLEAR and wish == ASK_CLEAR):
        return answer
    raise ProtocolError(f"server answered {answer!r} to link mode {wish!r}")


async def recv_exact(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection during the handshake")
        data += chunk
    return data


async def _recv_record(sock: socket.socket) -> bytes:
    header = await recv_exact(sock, _RECORD_HEADER.size)
    _type, _version, length = _RECORD_HEADER.unpack(header)
    if length > MAX_RECORD:
        raise ProtocolError(f"TLS record of {length} bytes")
    return header + await recv_exact(sock, length)


async def _pump(sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                outgoing: ssl.MemoryBIO, step: str) -> None:
    """Run `obj.<step>()` to its end, sending what it writes and feeding it one record
    at a time."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            getattr(obj, step)()
            done = True
        except ssl.SSLWantReadError:
            done = False
        out = outgoing.read()
        if out:
            await loop.sock_sendall(sock, out)
        if done:
            return
        incoming.write(await _recv_record(sock))


async def authenticate_then_clear(sock: socket.socket, context: ssl.SSLContext,
                                  vet: Callable[[ssl.SSLObject], None], *, server_side: bool,
                                  server_hostname: str | None = None) -> None:
    """Mutual TLS handshake on `sock`; `vet` sees the peer's certificate (and raises to
    refuse it) before TLS is closed both ways; the socket carries plaintext from here. The
    caller bounds the time."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side=server_side,
                           server_hostname=server_hostname)
    await _pump(sock, obj, incoming, outgoing, "do_handshake")
    vet(obj)
    await _pump(sock, obj, incoming, outgoing, "unwrap")
    if incoming.pending:  # cannot happen with record-sized reads: a broken peer
        raise ProtocolError("data after close_notify inside a TLS record read")
