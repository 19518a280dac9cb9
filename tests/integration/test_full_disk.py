"""A node whose disk fills up: past the full ratio it takes no new objects (NBD ENOSPC),
while reads, overwrites of allocated blocks and deletes go on, so space can be freed; dog
warns; and etcd on the same disk keeps the cluster's coordination up. (`sheep up` on a
200 MiB filesystem once let client writes take the last byte, etcd died of ENOSPC, and
every dog command failed after.)"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.etcd_server import EtcdServer
from sheep.localcluster import free_port

from ..cluster import Cluster, dog, dog_json
from .test_nbd import ENOSPC, NbdClient, NbdError

MiB = 1 << 20
DISK = 320 * MiB


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Cluster]:
    """One node (NBD gateway) and its etcd, both on a 320 MiB filesystem of their own."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(disk)],
                   check=True, timeout=30)
    etcd = EtcdServer(disk / "etcd", free_port(), free_port(), tmp_path / "etcd.log")
    try:
        etcd.start()
        c = Cluster(disk / "cluster", etcd.url)
        try:
            c.add_node("--nbd-port", str(c.nbd_port))
            c.wait_members(1)
            c.format(1)
            yield c
        finally:
            c.stop()
    finally:
        etcd.stop()
        subprocess.run(["umount", "-l", str(disk)], check=False, timeout=30)


def fill(c: Cluster, name: str, size: int) -> int:
    """Write `name` block by block until the node refuses; how many bytes went in."""
    dog("vdi", "create", name, str(size), address=c.address)
    with NbdClient(c.nbd_port, name, timeout=60) as client:
        for offset in range(0, size, 4 * MiB):
            try:
                client.write(offset, b"\xee" * (4 * MiB))
            except NbdError as exc:
                assert exc.errno == ENOSPC, exc
                return offset
    return size


def test_a_full_node_refuses_new_objects_and_keeps_everything_else_working(
        small: Cluster) -> None:
    c = small
    first = fill(c, "first", 100 * MiB)
    assert first == 100 * MiB
    second = fill(c, "second", 1024 * MiB)
    assert 0 < second < 1024 * MiB, "the node never said it was full"

    [node] = dog_json("node", "list", address=c.address)["nodes"]
    assert node["space"] == "full" and 0.95 <= node["space_used"] < 1.0
    warnings = dog_json("cluster", "info", address=c.address)["warnings"]
    assert len(warnings) == 1 and "is full: it takes no new objects" in warnings[0]
    assert "FULL" in dog("node", "list", address=c.address).stdout

    with NbdClient(c.nbd_port, "second") as client:  # reads and overwrites go on
        assert client.read(0, 4096) == b"\xee" * 4096
        client.write(0, b"\x11" * 4096)
        client.flush()
        assert client.read(0, 4096) == b"\x11" * 4096
        with pytest.raises(NbdError) as refused:
            client.write(second, b"\x22" * 4096)
        assert refused.value.errno == ENOSPC

    dog("vdi", "delete", "first", address=c.address)  # etcd still answers: space is freed
    with NbdClient(c.nbd_port, "second") as client:
        client.write(second, b"\x22" * 4096)
        assert client.read(second, 4096) == b"\x22" * 4096
    assert dog_json("node", "list", address=c.address)["nodes"][0]["space"] != "full"
