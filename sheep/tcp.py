"""What every TCP connection of ours gets before it speaks its protocol: gateways and the
data plane alike (request/reply protocols, replies written whole)."""

from __future__ import annotations

import asyncio
import socket


def accept_transport(transport: asyncio.BaseTransport, write_high: int | None = None) -> str:
    """Small messages go out at once (no Nagle delay on request/reply protocols), and with
    `write_high` the write buffer pauses the protocol above it; returns the peer as
    "host:port". A unix socket (dog's private gateway) has no Nagle to turn off."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if write_high is not None:
        transport.set_write_buffer_limits(high=write_high)  # type: ignore[attr-defined]
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
