"""A hostile NBD client, over raw sockets against a real gateway: whatever it asks and
however little it reads, the gateway's memory stays bounded and other clients are served."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.etcd_server import EtcdServer

from ..cluster import Cluster, dog, start_cluster
from ..hostile import rss
from .test_nbd import (
    FLAG_FIXED_NEWSTYLE,
    IHAVEOPT,
    OPT_LIST,
    OPTION,
    REQUEST,
    REQUEST_MAGIC,
    NbdClient,
    greet,
)

MiB = 1 << 20
CMD_READ = 0
SIZE = 64 * MiB
LONG = "x" * 200  # names that make NBD_OPT_LIST's answer long


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Cluster]:
    """Three nodes, copies=1, node 0 serving NBD: most of a VDI's blocks live on the other
    two nodes, so the gateway reads them over the network (the path that holds buffers
    while replicas answer). "disk" is written whole; ten VDIs have 200-byte names."""
    c = start_cluster(tmp_path_factory.mktemp("hostilenbd") / "cluster", etcd.url, nodes=3,
                      copies=1, nbd=True)
    try:
        dog("vdi", "create", "disk", str(SIZE), address=c.address)
        with NbdClient(c.nbd_port, "disk") as client:
            for offset in range(0, SIZE, 4 * MiB):
                client.write(offset, bytes([offset // MiB + 1]) * (4 * MiB))
            client.flush()
        for i in range(10):
            dog("vdi", "create", f"{LONG}{i}", "1M", address=c.address)
        yield c
    finally:
        c.stop()


def gateway_rss(c: Cluster) -> int:
    assert c.nodes[0].proc is not None
    return rss(c.nodes[0].proc.pid)


def still_served(c: Cluster) -> None:
    assert c.nodes[0].alive, "the gateway died"
    with NbdClient(c.nbd_port, "disk") as client:
        assert client.read(5 * MiB, 4096) == bytes([5]) * 4096


def send_what_fits(sock: socket.socket, data: bytes) -> int:
    """Send without blocking until the peer stops taking bytes; how many went."""
    sock.setblocking(False)
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent : sent + (1 << 16)])
    except BlockingIOError:
        pass
    return sent


def test_remote_reads_whose_replies_are_never_taken_cost_a_bounded_amount(
        gw: Cluster, tmp_path: Path) -> None:
    """24 reads of 32 MiB of blocks on other nodes, none read back, once cost the gateway
    812 MiB: up to 128 such reads were in progress at once, each holding its buffer."""
    before = gateway_rss(gw)
    client = NbdClient(gw.nbd_port, "disk")
    try:
        send_what_fits(client.sock, b"".join(
            REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, i, (i % 2) * 32 * MiB, 32 * MiB)
            for i in range(24)))
        still_served(gw)  # others are served meanwhile
        grown = gateway_rss(gw) - before
        assert grown < 64 * MiB, f"the gateway grew by {grown >> 20} MiB"
    finally:
        client.sock.close()
    still_served(gw)


def test_option_lists_never_read_cost_a_bounded_amount(gw: Cluster) -> None:
    """A 16-byte NBD_OPT_LIST is answered with the whole export list (here ~3 KiB); 40000
    of them once queued ~120 MiB of answers for a client that reads none."""
    before = gateway_rss(gw)
    sock = greet(gw.nbd_port)
    try:
        sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE))
        sent = send_what_fits(sock, OPTION.pack(IHAVEOPT, OPT_LIST, 0) * 40000)
        still_served(gw)
        grown = gateway_rss(gw) - before
        assert grown < 64 * MiB, f"the gateway grew by {grown >> 20} MiB ({sent} bytes sent)"
    finally:
        sock.close()
    still_served(gw)
