"""NBD over TLS, the policy half: in which mode a node serves NBD, and who may attach an
export. Pure functions; the handshake (handshake.py) applies the mode to the option
haggling, the adapter (server.py) does the TLS itself.

The modes are the spec's (doc/proto.md, "TLS support"): `off` is NOTLS (no STARTTLS, as
before TLS existed here), `require` is FORCEDTLS (every option but STARTTLS and ABORT is
refused until TLS is up), `allow` is SELECTIVETLS (plaintext clients are served, except
exports with an allow-list, which are TLS-only). Once TLS is up the client is known by
its certificate, which must chain to the cluster's CA (the TLS layer checks that) and
carry a role that attaches disks, or, on a node with --nbd-tls-psk, by the identity whose
pre-shared key it proved (sheep/security/psk.py): a PSK client has role `client` and the
name `psk:IDENTITY`, so that allow-lists tell the two kinds apart (`--nbd-allow
vmhost1,psk:vmhost2`); the CA issues no certificate named `psk:...`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from sheep.security.identity import Peer
from sheep.security.pki import PSK_PREFIX

ATTACHING_ROLES = frozenset({"client", "admin", "node"})  # not `etcd`: it serves, never dials


def psk_peer(identity: bytes) -> Peer:
    """Who a client that proved the key of `identity` is (the file's identities are UTF-8
    text: sheep/security/pskfile.py)."""
    return Peer("client", PSK_PREFIX + identity.decode())


class TlsMode(StrEnum):
    OFF = "off"
    ALLOW = "allow"
    REQUIRE = "require"


def is_loopback(host: str) -> bool:
    """Whether a bind address only takes connections from this host."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def choose_mode(requested: str | None, bind: str, has_identity: bool) -> TlsMode:
    """The mode a node serves NBD in: `requested`, or by default `require` on a
    non-loopback bind, `allow` on loopback with an identity and `off` without one (an
    open loopback node serves exactly as before). Raises ValueError, one line, for a
    mode the node cannot serve."""
    if requested is None:
        if not has_identity:
            if not is_loopback(bind):
                raise ValueError(f"NBD on {bind} would serve every disk to anyone: give the "
                                 "node an identity (--ca/--cert/--key) or --nbd-tls off")
            return TlsMode.OFF
        return TlsMode.ALLOW if is_loopback(bind) else TlsMode.REQUIRE
    mode = TlsMode(requested)
    if mode is not TlsMode.OFF and not has_identity:
        raise ValueError(f"--nbd-tls {mode.value} needs the node's certificate "
                         "(--ca/--cert/--key)")
    return mode


@dataclass(frozen=True, slots=True)
class Access:
    """What one client may do with one export: `denied` says why not (empty: it may);
    `tls_only` means it may once it has started TLS."""

    denied: str = ""
    tls_only: bool = False


OPEN = Access()


def access(mode: TlsMode, peer: Peer | None, allow: frozenset[str] | None) -> Access:
    """Whether `peer` (None: no TLS yet) may attach an export whose allow-list (certificate
    names) is `allow` (None: any certificate of the cluster)."""
    if peer is None:
        if mode is TlsMode.REQUIRE:
            return Access(tls_only=True)
        if allow is None:
            return OPEN
        if mode is TlsMode.OFF:  # an allow-list nobody checks would be a false promise
            return Access(denied="export has an NBD allow-list and this node serves NBD "
                                 "without TLS")
        return Access(tls_only=True)
    if peer.role not in ATTACHING_ROLES:
        return Access(denied=f"a certificate of role {peer.role} may not attach disks")
    if allow is not None and peer.name not in allow:
        return Access(denied=f"{peer.name} is not on the export's NBD allow-list")
    return OPEN
