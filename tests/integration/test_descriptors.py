"""A node under the default descriptor limit (`ulimit -n 1024`) once wedged after ~480
objects: writes failed with EIO, flushes failed, new clients were refused, until a
restart. Now it keeps a cache sized from its limit and serves any number of objects."""

from __future__ import annotations

from pathlib import Path

from sheep.etcd_server import EtcdServer

from ..cluster import Cluster, dog, free_port
from ..hostile import LimitedNode
from .test_nbd import NbdClient

OBJ = 4 << 20
OBJECTS = 4096


def test_a_node_limited_to_1024_descriptors_writes_and_reads_4096_objects(
        tmp_path: Path, etcd: EtcdServer) -> None:
    c = Cluster(tmp_path / "cluster", etcd.url)
    node = LimitedNode(c.root / "node0", free_port(), c.etcd_url,
                       ["--lease-ttl", "3", "--nbd-port", str(c.nbd_port)])
    c.nodes.append(node.start())
    try:
        node.wait_up()
        c.wait_members(1)
        c.format(1)
        dog("vdi", "create", "many", str(OBJECTS * OBJ), address=c.address)
        with NbdClient(c.nbd_port, "many", timeout=60) as client:
            for i in range(OBJECTS):
                client.write(i * OBJ, i.to_bytes(4, "little") * 1024)
            client.flush()
            for i in range(OBJECTS):
                assert client.read(i * OBJ, 4096) == i.to_bytes(4, "little") * 1024, i
        with NbdClient(c.nbd_port, "many") as later:  # new clients still come in
            assert later.read((OBJECTS - 1) * OBJ, 4) == (OBJECTS - 1).to_bytes(4, "little")
        assert "Too many open files" not in node.log()
    finally:
        c.stop()
