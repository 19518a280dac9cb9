"""Connections and descriptors against a node limited to 1024 descriptors: idle sockets
on a gateway's port once took every descriptor, so new NBD clients hung and the other
nodes' data-plane connections to it were reset. Each plane now caps its connections and
drops sockets that never finish their handshake."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.etcd_server import EtcdServer

from ..cluster import Cluster, dog, dog_bytes, dog_json, free_port, start_cluster
from ..hostile import LimitedNode
from .test_nbd import NbdClient

MiB = 1 << 20


@pytest.fixture
def limited(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    """Three nodes, VDI "disk" with copies=3; node 0 (1024 descriptors) serves NBD and
    iSCSI."""
    c = start_cluster(tmp_path / "cluster", etcd.url, nodes=2, copies=1)
    node = LimitedNode(c.root / "node2", free_port(), c.etcd_url,
                       ["--lease-ttl", "3", "--nbd-port", str(c.nbd_port),
                        "--iscsi-port", str(c.iscsi_port)])
    c.nodes.insert(0, node.start())
    try:
        node.wait_up()
        c.wait_members(3)
        dog("vdi", "create", "disk", "16M", "-c", "3", address=c.address)
        yield c
    finally:
        c.stop()


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes `sock` (EOF or reset) within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b"" or closed_by_peer(sock, timeout)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_a_thousand_idle_gateway_sockets_leave_replication_and_new_clients_working(
        limited: Cluster) -> None:
    c = limited
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", c.nbd_port), timeout=10))
        # a write with copies=3 reaches node 0 over the data plane (the test's own pool)
        dog_bytes("vdi", "write", "disk", "0", address=c.nodes[1].address, input=b"x" * 4096)
        data = dog_bytes("vdi", "read", "disk", "0", "4096", address=c.nodes[1].address).stdout
        assert data == b"x" * 4096
        assert c.nodes[0].alive
        refused = socket.create_connection(("127.0.0.1", c.nbd_port), timeout=10)
        assert closed_by_peer(refused, 10), "a client over the cap must be told at once"
        refused.close()
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30
    while True:  # the gateway notices the closed sockets; a new client then gets in
        try:
            with NbdClient(c.nbd_port, "disk") as client:
                assert client.read(0, 4096) == b"x" * 4096
            break
        except (ConnectionError, OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    nodes = dog_json("node", "list", address=c.nodes[1].address)["nodes"]
    assert len(nodes) == 3


@pytest.mark.parametrize("plane", ["nbd", "iscsi"])
def test_a_socket_that_never_finishes_its_handshake_is_closed(
        limited: Cluster, plane: str) -> None:
    port = limited.nbd_port if plane == "nbd" else limited.iscsi_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert closed_by_peer(sock, 30)
    finally:
        sock.close()


def test_idle_control_sockets_are_capped_and_dropped_and_dog_is_served_after(
        limited: Cluster) -> None:
    """The control plane (gRPC) caps its connections and drops those that never finish
    their handshake (sheep/control/service.py: 64, 10 s), as the other planes do."""
    c = limited
    port = int(c.address.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10)
            for _ in range(100)]
    try:
        assert all(closed_by_peer(sock, 30) for sock in idle)
    finally:
        for sock in idle:
            sock.close()
    assert dog_json("node", "info", address=c.address)["nodes"]
