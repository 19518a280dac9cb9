"""Who is at the other end of a loopback TCP connection: the uid that owns the client's
socket, so a gateway can serve unauthenticated loopback clients (plaintext NBD, iSCSI
without CHAP) only when they run as root or as the daemon's own user. Without this, any
local user could attach every disk through 127.0.0.1.

Linux has no SO_PEERCRED for TCP, but on loopback the client's socket lives in this very
kernel, and sock_diag (NETLINK_SOCK_DIAG, what `ss` uses) answers for one socket named by
its four addresses with its owner's uid. We ask for exactly that socket rather than read
/proc/net/tcp{,6}: the exact lookup is one hash lookup in the kernel and one ~100-byte
reply, whatever the number of sockets on the host, where the /proc files list every TCP
socket of the namespace (costing time and memory with each connection a busy host holds)
and would have to be parsed, twice for both families. It needs no privilege, and the
kernel answers within the send, so the reply is read without waiting.

The kernel reports a socket no process holds any more (the client closed it: FIN_WAIT,
TIME_WAIT; or a half-open request) as owned by uid 0 with inode 0. Such a socket tells
nothing of who opened it, so only a socket still attached to a file (inode != 0) counts,
and one that is gone, or any failure to ask, is None: the caller refuses.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct

from sheep.netaddr import unmapped

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_REQ_HEAD = struct.Struct("=BBBBI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_SOCKID = struct.Struct(">HH16s16s")  # inet_diag_sockid: ports and addresses, big-endian
_SOCKID_TAIL = struct.Struct("=III")  # interface, cookie (two words)
_MSG_HEAD = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retransmits
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_NO_COOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
_REPLY_MAX = 8192  # one inet_diag_msg and its attributes
_MSG_SOCKID_AT = _NLMSGHDR.size + _MSG_HEAD.size
_MSG_TAIL_AT = _MSG_SOCKID_AT + _SOCKID.size + _SOCKID_TAIL.size


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as the kernel keys the socket: an IPv4-mapped IPv6 address (a client of
    127.0.0.1 on a dual-stack listener) is the IPv4 socket it maps."""
    return unmapped(ipaddress.ip_address(host.split("%", 1)[0]))


def _on_loopback(remote: tuple) -> bool:
    try:
        return _ip(remote[0]).is_loopback
    except (IndexError, TypeError, ValueError):
        return False


def peer_uid(local: tuple, remote: tuple) -> int | None:
    """The uid owning the client socket of our TCP connection from `local` (our
    sockname) to `remote` (our peername), both on this host, as sockets give them:
    (host, port), or (host, port, flowinfo, scope id). None when that socket is gone or
    no longer held by a process, or the kernel cannot be asked."""
    ours, theirs = _ip(local[0]), _ip(remote[0])
    if ours.version != theirs.version:
        return None
    family = socket.AF_INET if theirs.version == 4 else socket.AF_INET6
    # the socket we want is the client's: its source is our peer, its destination us
    sockid = _SOCKID.pack(remote[1], local[1], theirs.packed.ljust(16, b"\0"),
                          ours.packed.ljust(16, b"\0"))
    request = (_REQ_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES) + sockid
               + _SOCKID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE))
    message = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY,
                             NLM_F_REQUEST, 1, 0) + request
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.sendto(message, (0, 0))
            reply = nl.recv(_REPLY_MAX, socket.MSG_DONTWAIT)
    except OSError as exc:
        log.warning("cannot ask the kernel who owns %s: %s", remote, exc)
        return None
    return _owner(reply, sockid)


def _owner(reply: bytes, sockid: bytes) -> int | None:
    """The uid in a sock_diag reply for the socket `sockid`; None for an error (ENOENT:
    gone), another socket, or one no process holds."""
    if len(reply) < _MSG_TAIL_AT + _MSG_TAIL.size:
        return None  # NLMSG_ERROR is shorter
    _length, kind, _flags, _seq, _port = _NLMSGHDR.unpack_from(reply)
    if kind != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket
    found = reply[_MSG_SOCKID_AT:_MSG_SOCKID_AT + _SOCKID.size]
    *_, uid, inode = _MSG_TAIL.unpack_from(reply, _MSG_TAIL_AT)
    if found != sockid or inode == 0:
        return None
    return uid


def _trusted_uids() -> frozenset[int]:
    """Who may use a gateway unauthenticated over loopback: root, and the daemon's user."""
    return frozenset({0, os.geteuid()})


def loopback_refusal(local: object, remote: object, what: str, remedy: str) -> str:
    """Why the client of the connection from `local` to `remote` (sockname, peername)
    may not use `what` (e.g. "plaintext NBD") without authenticating; "" when it may: its
    socket is root's or ours, or it is no loopback TCP client (a unix socket lies in a
    directory of ours; another host's client is what the node's exposure rules and TLS
    modes answer for, sheep/node/exposure.py)."""
    if not (isinstance(local, tuple) and isinstance(remote, tuple) and _on_loopback(remote)):
        return ""
    uid = peer_uid(local, remote)
    if uid in _trusted_uids():
        return ""
    me = os.geteuid()
    users = "root (uid 0)" if me == 0 else f"root and uid {me} (the daemon's user)"
    who = f"uid {uid}" if uid is not None else "a client whose owner is unknown"
    return f"{what} on loopback is only for {users}, not {who}; {remedy}"
