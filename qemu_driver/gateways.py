"""Which node's gateway a VM's disks go through: one that serves the transport, preferring
the node that hosts the VM (its own gateway: a VM that migrates or is restarted elsewhere
changes gateway with its host, and the gateway's VDI lock moves with it), then one on this
host (no network hop between QEMU and the gateway)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable

from sheep.cluster.state import NodeInfo

from .errors import NoGateway
from .spec import Gateway


def local_hosts() -> set[str]:
    names = {"127.0.0.1", "::1", "localhost", socket.gethostname()}
    with contextlib.suppress(OSError):
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    return names


def choose_gateway(nodes: Iterable[NodeInfo], transport: str,
                   local: set[str] | None = None, prefer: str = "") -> Gateway:
    """`prefer`: the id of the node hosting the VM ("" when dog hosts it)."""
    local = local_hosts() if local is None else local
    serving = [(n, n.nbd_port if transport == "nbd" else n.iscsi_port) for n in nodes]
    serving = [(n, port) for n, port in serving if port]
    if not serving:
        raise NoGateway(f"no node serves {transport} (start one with "
                        f"`sheep run --{transport}-port PORT`)")
    serving.sort(key=lambda item: (item[0].node_id != prefer, item[0].host not in local,
                                   item[0].node_id))
    node, port = serving[0]
    return Gateway(transport, node.host, port,
                   chap_required=transport == "iscsi" and node.iscsi_chap,
                   tls_mode=node.nbd_tls if transport == "nbd" else "")
