"""What a node may expose, decided before it binds anything: a pure policy over its
options, so every refusal is a unit-tested one-line reason rather than a half-started
node.

A node on loopback may stay open (the README's examples and `make run` rely on it). A node
any other host can reach must authenticate its peers: it needs its identity from the
cluster CA (`--ca/--cert/--key`), and an iSCSI gateway there needs CHAP, since iSCSI
initiators present no certificate. A node listening on every address (0.0.0.0, ::) must
say which address its peers dial (`--advertise`): its records would otherwise tell them
to dial 0.0.0.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sheep.netaddr import ip, is_loopback, is_unspecified

# a DNS name: labels of letters, digits and hyphens, dot-separated
_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


@dataclass(frozen=True)
class Exposure:
    """The options of `sheep run` that decide who can reach the node."""

    bind: str
    advertise: str = ""
    identity: bool = False  # --ca/--cert/--key given
    iscsi: bool = False  # --iscsi-port given
    iscsi_chap: bool = False  # --iscsi-chap-file given


def _concrete(host: str) -> bool:
    """An address a peer can dial: a literal that is not "every address", or a name."""
    addr = ip(host)
    if addr is not None:
        return not addr.is_unspecified and not addr.is_multicast
    return bool(_NAME.match(host))


def refusals(e: Exposure) -> list[str]:
    """Why a node with these options must not start; empty when it may."""
    out = []
    if e.advertise and not _concrete(e.advertise):
        out.append(f"--advertise {e.advertise} is not an address peers can dial: give "
                   "this node's own address (no port, no brackets)")
    if is_unspecified(e.bind) and not e.advertise:
        out.append(f"--bind {e.bind} listens on every address: peers need --advertise "
                   "ADDRESS, the one they can dial")
    if not is_loopback(e.bind):
        if not e.identity:
            out.append(f"--bind {e.bind} is not a loopback address: a node others can "
                       "reach needs its identity (--ca, --cert, --key)")
        if e.iscsi and not e.iscsi_chap:
            out.append(f"--bind {e.bind} is not a loopback address: iSCSI there needs CHAP "
                       "(--iscsi-chap-file)")
    return out


def refusal(e: Exposure) -> str | None:
    """The refusals as one line, or None."""
    found = refusals(e)
    return "; ".join(found) if found else None
