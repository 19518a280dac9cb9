"""Host addresses as sheep's options and records carry them: an IPv4 or IPv6 literal, or a
name. One place knows that an IPv6 literal needs brackets beside a port and which family a
socket for it needs, so no caller writes `f"{host}:{port}"` and breaks on `::1`."""

from __future__ import annotations

import ipaddress
import socket

LOOPBACK_NAMES = frozenset({"localhost"})


def host_port(host: str, port: int) -> str:
    """`host:port`, or `[host]:port` for an IPv6 literal (what gRPC, URIs and iSCSI
    portals take)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` spells, or None for a name (which we never resolve here: what a
    name resolves to may change after we looked)."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def unmapped(addr: ipaddress.IPv4Address | ipaddress.IPv6Address
             ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address an IPv4-mapped IPv6 one (::ffff:a.b.c.d, how a dual-stack socket
    names an IPv4 peer) stands for; any other address as it is."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(host: str) -> bool:
    """This host's own: 127/8, ::1 (also written IPv4-mapped), or `localhost`."""
    addr = ip(host)
    return unmapped(addr).is_loopback if addr is not None else host.lower() in LOOPBACK_NAMES


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or ::, "every address of this host": a place to listen, never to dial."""
    addr = ip(host)
    return addr is not None and addr.is_unspecified


def family(host: str) -> socket.AddressFamily:
    """The socket family to bind `host` with: IPv6 for an IPv6 literal, else IPv4."""
    addr = ip(host)
    return socket.AF_INET6 if addr is not None and addr.version == 6 else socket.AF_INET
