"""Rot and torn writes on real clusters, read over NBD: a block that fails its checksum on
every replica is an I/O error (EIO) and `dog vdi check` lists it; with a second copy it is
repaired; a block a kill -9 cut mid-write (new data, old sum) is an unacknowledged write,
kept, never reported as rot."""

from __future__ import annotations

import errno
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.etcd_server import EtcdServer
from sheep.store.checksum import SUM_BLOCK

from ..cluster import (
    Cluster,
    dog,
    dog_json,
    object_path,
    start_cluster,
    vdi_with_one_object,
)
from .test_nbd import NbdClient, NbdError

pytestmark = pytest.mark.slow

MiB = 1 << 20
VDI = "disk"


@pytest.fixture
def one_copy(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    c = start_cluster(tmp_path / "cluster", etcd.url, nodes=1, copies=1, nbd=True)
    yield c
    c.stop()


@pytest.fixture
def two_copies(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    c = start_cluster(tmp_path / "cluster", etcd.url, nodes=2, copies=2, nbd=True)
    yield c
    c.stop()


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def nbd_read(cluster: Cluster, offset: int, length: int) -> bytes:
    with NbdClient(cluster.nbd_port, VDI) as nbd:
        return nbd.read(offset, length)


def check(cluster: Cluster) -> tuple[int, dict]:
    proc = dog("vdi", "check", VDI, "--json", address=cluster.address, check=False)
    return proc.returncode, json.loads(proc.stdout)


def restart(cluster: Cluster, *, kill: bool) -> None:
    for node in cluster.nodes:
        if kill:
            node.kill()
        else:
            assert node.stop() == 0, node.log()
    for node in cluster.nodes:
        node.start()
    for node in cluster.nodes:
        node.wait_up()
    cluster.wait_members(len(cluster.nodes))


ROT = 3 * SUM_BLOCK + 1234


def test_rot_with_one_copy_is_eio_and_listed_by_check(one_copy: Cluster) -> None:
    data, oid = vdi_with_one_object(one_copy, VDI, 15)
    restart(one_copy, kill=False)  # a clean stop: nothing was being written
    flip(object_path(one_copy.nodes[0], oid), ROT)
    with pytest.raises(NbdError) as caught:
        nbd_read(one_copy, 3 * SUM_BLOCK, SUM_BLOCK)
    assert caught.value.errno == errno.EIO
    assert nbd_read(one_copy, 0, 3 * SUM_BLOCK) == data[: 3 * SUM_BLOCK]  # the rest reads
    with pytest.raises(NbdError):  # still bad: never re-stamped
        nbd_read(one_copy, 0, 8 * SUM_BLOCK)
    rc, report = check(one_copy)
    assert rc == 1
    assert report["unrepairable"] == [f"{oid:016x}"], report
    assert {(f["oid"], f["problem"]) for f in report["findings"]} == {(f"{oid:016x}",
                                                                      "corrupt")}
    assert "fail their checksums on every replica" in one_copy.nodes[0].log()


def test_lost_blocks_show_in_the_nodes_status(one_copy: Cluster) -> None:
    """A lost block is not only logged: dog node scrub and dog node info show it."""
    _data, oid = vdi_with_one_object(one_copy, VDI, 15)
    restart(one_copy, kill=False)
    flip(object_path(one_copy.nodes[0], oid), ROT)
    for _ in range(2):  # read twice, lost once
        with pytest.raises(NbdError):
            nbd_read(one_copy, 3 * SUM_BLOCK, SUM_BLOCK)
    [node] = dog_json("node", "scrub", address=one_copy.address)["nodes"]
    assert node["scrub"]["blocks_lost"] == 1
    info = dog("node", "info", address=one_copy.address).stdout
    assert "warning: node 0" in info and "1 block(s) bad on every replica" in info


def test_rot_in_one_of_two_copies_is_repaired(two_copies: Cluster) -> None:
    data, oid = vdi_with_one_object(two_copies, VDI, 15)
    flip(object_path(two_copies.nodes[0], oid), ROT)
    assert nbd_read(two_copies, 0, 4 * MiB) == data
    copies = {object_path(n, oid).read_bytes().ljust(4 * MiB, b"\0") for n in two_copies.nodes}
    assert copies == {data}


def test_rot_in_both_copies_is_eio(two_copies: Cluster) -> None:
    _data, oid = vdi_with_one_object(two_copies, VDI, 15)
    for node in two_copies.nodes:
        flip(object_path(node, oid), ROT)
    with pytest.raises(NbdError) as caught:
        nbd_read(two_copies, 0, 4 * MiB)
    assert caught.value.errno == errno.EIO
    rc, report = check(two_copies)
    assert rc == 1 and report["unrepairable"] == [f"{oid:016x}"], report


def test_torn_write_after_kill_9_is_kept_not_reported_as_rot(one_copy: Cluster) -> None:
    """kill -9 while a block was being written, and the data page reached the disk but
    not its sum: new data, old sum. An unacknowledged write, readable afterwards."""
    data, oid = vdi_with_one_object(one_copy, VDI, 15)
    node = one_copy.nodes[0]
    node.kill()
    new = random.Random(16).randbytes(SUM_BLOCK)
    with open(object_path(node, oid), "r+b") as f:
        f.seek(3 * SUM_BLOCK)
        f.write(new)
    restart(one_copy, kill=True)
    expected = data[: 3 * SUM_BLOCK] + new + data[4 * SUM_BLOCK :]
    assert nbd_read(one_copy, 0, 4 * MiB) == expected
    rc, report = check(one_copy)
    assert rc == 0 and report["clean"], report
    assert "torn" in node.log()
