"""Checksums on a real 3-node cluster (copies=3, node 0 serving NBD): rot in one replica
never reaches a reader and gets repaired, by the read that meets it or by the scrub; a block
whose data and sum disagree on every replica while the nodes run (no crash tore it) is an
error, never data (a crash's torn write: test_integrity.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from sheep.dataplane.client import PeerPool
from sheep.dataplane.wire import Opcode
from sheep.store.checksum import SUM_BLOCK

from ..cluster import (
    Cluster,
    dog,
    dog_bytes,
    dog_json,
    object_path,
    vdi_with_one_object,
    wait_until,
)
from .test_nbd import NbdClient

pytestmark = pytest.mark.slow

MiB = 1 << 20
VDI = "disk"


@pytest.fixture
def written(nbd_cluster: Cluster) -> tuple[bytes, int]:
    """A VDI whose first block holds random data: (the data, that block's oid)."""
    return vdi_with_one_object(nbd_cluster, VDI, 5)


def _rot(path: Path, offset: int, length: int = 16) -> None:
    """Flip bytes of an object file behind the daemon's back (through the page cache,
    where the daemon reads them)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in old))


def _nbd_read(cluster: Cluster, tmp_path: Path, length: int) -> bytes:
    out = tmp_path / "read.raw"
    proc = subprocess.run(["nbdcopy", cluster.nbd_url(VDI), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()[:length]


def _replicas_identical(cluster: Cluster, oid: int) -> bool:
    contents = {object_path(node, oid).read_bytes().ljust(4 * MiB, b"\0")
                for node in cluster.nodes}
    return len(contents) == 1


def _scrub(cluster: Cluster) -> dict:
    return dog_json("node", "scrub", "start", "--wait", "--no-progress",
                    address=cluster.address)


def test_read_through_a_rotten_local_replica_returns_the_right_bytes(
        nbd_cluster: Cluster, written: tuple[bytes, int], tmp_path: Path) -> None:
    data, oid = written
    _rot(object_path(nbd_cluster.nodes[0], oid), 3 * SUM_BLOCK + 5)
    assert _nbd_read(nbd_cluster, tmp_path, len(data)) == data


def test_read_that_meets_rot_repairs_the_replica(
        nbd_cluster: Cluster, written: tuple[bytes, int], tmp_path: Path) -> None:
    data, oid = written
    _rot(object_path(nbd_cluster.nodes[0], oid), 100 * SUM_BLOCK)
    _nbd_read(nbd_cluster, tmp_path, len(data))
    assert _replicas_identical(nbd_cluster, oid)
    (stats,) = [n["scrub"] for n in dog_json("node", "scrub", address=nbd_cluster.address)["nodes"]
                if int(n["node"]["control_port"]) == nbd_cluster.nodes[0].port]
    assert int(stats["blocks_repaired"]) >= 1, stats


def test_scrub_finds_and_repairs_rot_in_a_replica_no_read_touches(
        nbd_cluster: Cluster, written: tuple[bytes, int]) -> None:
    _data, oid = written
    _rot(object_path(nbd_cluster.nodes[2], oid), 7 * SUM_BLOCK + 1)
    _rot(object_path(nbd_cluster.nodes[2], oid), 900 * SUM_BLOCK + 1)
    assert not _replicas_identical(nbd_cluster, oid)
    report = _scrub(nbd_cluster)
    assert report["bad_blocks"] == 2 and report["repaired"] == 2, report
    assert _replicas_identical(nbd_cluster, oid)
    assert _scrub(nbd_cluster)["bad_blocks"] == 0


def test_scrub_of_a_clean_cluster_reports_nothing_and_counts_its_pass(
        nbd_cluster: Cluster, written: tuple[bytes, int]) -> None:
    report = _scrub(nbd_cluster)
    assert report == {"objects": report["objects"], "bad_blocks": 0, "repaired": 0,
                      "diverged": 0, "reconciled": 0, "lost": 0}
    assert report["objects"] >= 3 * 2  # a data object and an inode, on each of 3 nodes
    for node in dog_json("node", "scrub", address=nbd_cluster.address)["nodes"]:
        assert node["scrub"]["passes"] == 1 and node["scrub"]["state"] == "idle"


def test_scrub_start_shows_progress_on_stderr(nbd_cluster: Cluster,
                                              written: tuple[bytes, int]) -> None:
    proc = dog("node", "scrub", "start", "--wait", "--progress", address=nbd_cluster.address)
    assert "scrub [" in proc.stderr and "100%" in proc.stderr
    assert "0 bad block(s)" in proc.stdout


def test_vdi_check_names_a_rotten_replica_and_repair_fixes_it(
        nbd_cluster: Cluster, written: tuple[bytes, int]) -> None:
    _data, oid = written
    _rot(object_path(nbd_cluster.nodes[1], oid), 0)
    proc = dog("vdi", "check", VDI, "--json", address=nbd_cluster.address, check=False)
    assert proc.returncode == 1, proc.stderr  # findings: the check says so in its status
    report = json.loads(proc.stdout)
    problems = {(f["oid"], f["problem"]) for f in report["findings"]}
    assert problems == {(f"{oid:016x}", "corrupt")}, report
    dog("vdi", "check", VDI, "--repair", address=nbd_cluster.address)
    assert dog_json("vdi", "check", VDI, address=nbd_cluster.address)["clean"]
    assert _replicas_identical(nbd_cluster, oid)


def test_block_whose_sum_disagrees_on_every_replica_is_an_error_not_restamped(
        nbd_cluster: Cluster, written: tuple[bytes, int], tmp_path: Path) -> None:
    """The same new bytes under every replica's old sum while the nodes run: no crash cut
    a write, so it is rot everywhere. Reads fail, the scrub finds it on every replica and
    repairs nothing, and it is still bad afterwards (it was not re-stamped)."""
    _data, oid = written
    new = os.urandom(SUM_BLOCK)
    for node in nbd_cluster.nodes:
        with open(object_path(node, oid), "r+b") as f:
            f.seek(SUM_BLOCK)
            f.write(new)
    proc = subprocess.run(["nbdcopy", nbd_cluster.nbd_url(VDI), str(tmp_path / "r.raw")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for _ in range(2):
        report = _scrub(nbd_cluster)
        assert (report["bad_blocks"], report["repaired"]) == (3, 0), report


def test_write_into_a_rotten_block_lands_and_the_rest_of_the_block_is_repaired(
        nbd_cluster: Cluster, written: tuple[bytes, int], tmp_path: Path) -> None:
    data, oid = written
    _rot(object_path(nbd_cluster.nodes[0], oid), 2 * SUM_BLOCK + 2000, 100)
    dog_bytes("vdi", "write", VDI, str(2 * SUM_BLOCK + 10), "5", address=nbd_cluster.address,
              input=b"HELLO")
    at = 2 * SUM_BLOCK + 10
    expected = data[:at] + b"HELLO" + data[at + 5 :]
    assert _nbd_read(nbd_cluster, tmp_path, len(data)) == expected
    assert _replicas_identical(nbd_cluster, oid)


# -- replicas alike --------------------------------------------------------------------------


def _write_one_replica(cluster: Cluster, node_index: int, oid: int, data: bytes) -> None:
    """A write that reached one replica only (its client was told it failed): whole by its
    checksums there, unlike the others."""
    port = cluster.nodes[node_index].port
    (entry,) = [n for n in cluster.node_list() if int(n["node"]["control_port"]) == port]
    addr = (entry["node"]["host"], int(entry["node"]["data_port"]))
    epoch = int(cluster.info()["epoch"])

    async def write() -> None:
        pool = PeerPool()
        try:
            await pool.call(addr, Opcode.WRITE, oid=oid, offset=0, length=len(data),
                            payload=data, epoch=epoch)
        finally:
            await pool.close()

    asyncio.run(write())


def test_scrub_makes_replicas_that_diverged_alike_again(
        nbd_cluster: Cluster, written: tuple[bytes, int]) -> None:
    _data, oid = written
    _write_one_replica(nbd_cluster, 1, oid, b"only here" * 100)
    assert not _replicas_identical(nbd_cluster, oid)
    report = _scrub(nbd_cluster)
    # the primary's copy wins: one replica fixed, or two if the write reached the primary
    assert report["bad_blocks"] == 0 and report["diverged"] == 1, report
    assert report["reconciled"] in (1, 2), report
    assert _replicas_identical(nbd_cluster, oid)
    again = _scrub(nbd_cluster)
    assert (again["diverged"], again["reconciled"]) == (0, 0), again


def test_scrub_leaves_replicas_of_a_vdi_being_written_for_a_later_pass(
        nbd_cluster: Cluster, written: tuple[bytes, int]) -> None:
    _data, oid = written
    _write_one_replica(nbd_cluster, 1, oid, b"only here" * 100)
    with NbdClient(nbd_cluster.nbd_port, VDI):  # a writer holds the VDI
        report = _scrub(nbd_cluster)
        assert (report["diverged"], report["reconciled"]) == (1, 0), report
        assert not _replicas_identical(nbd_cluster, oid)
    wait_until(lambda: not dog_json("vdi", "lock", "list", address=nbd_cluster.address)["locks"],
               10, "the writer's lock to go")
    assert _scrub(nbd_cluster)["reconciled"] >= 1
    assert _replicas_identical(nbd_cluster, oid)
