"""What every TCP connection of ours gets before it speaks its protocol: gateways and the
data plane alike (request/reply protocols, replies written whole)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from sheep.netaddr import host_port

log = logging.getLogger(__name__)

WARN_EVERY = 10.0  # seconds between two warnings of one full plane


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
    return host_port(peer[0], peer[1]) if isinstance(peer, tuple) else "?"


class ConnectionCap:
    """At most `limit` connections of one plane at once. Every connection holds a
    descriptor; a plane without a cap lets idle clients take them all, and then the
    node's own replication cannot accept its peers (each plane is capped apart, and the
    sum stays within the descriptors sheep.fdlimit keeps for connections)."""

    def __init__(self, limit: int, plane: str) -> None:
        self.limit = limit
        self.plane = plane
        self.open = 0
        self.refused = 0
        self._warned = -WARN_EVERY

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection in, or close it at once (False) when the plane is full:
        a client learns at once, instead of waiting in the listen backlog."""
        if self.open >= self.limit:
            self.refused += 1
            now = time.monotonic()
            if now - self._warned >= WARN_EVERY:
                self._warned = now
                log.warning("%s: %d connections open, the most it takes; refusing new ones "
                            "(%d refused so far)", self.plane, self.open, self.refused)
            transport.abort()  # type: ignore[attr-defined]
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1
