"""Recovery on real clusters: kill -9 during verified writes through NBD, a restarted node
catching up (stale copies refreshed), a joining node taking its share, copies left behind
by a join never served as current, I/O waiting for recovery across epoch changes, flushed
writes surviving kill -9 of every daemon, `dog node recovery` and its throttle.

Data is checked byte for byte: fio's crc32c verification, qemu-io pattern reads, nbdcopy
of the whole export against a model, and object files compared across nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.dataplane.client import PeerPool
from sheep.dataplane.codec import Frame
from sheep.dataplane.wire import Opcode
from sheep.errors import NewEpoch, OldEpoch
from sheep.etcd_server import EtcdServer
from sheep.oid import data_oid

from ..cluster import (
    Cluster,
    PatternImage,
    SheepProcess,
    dog,
    dog_bytes,
    dog_json,
    object_client,
    objects_on_disk,
    qemu_io,
    start_cluster,
    wait_healthy,
    wait_until,
)

pytestmark = pytest.mark.slow

MiB = 1 << 20
OBJECT_SIZE = 4 * MiB


@pytest.fixture
def make_cluster(tmp_path: Path, etcd: EtcdServer) -> Iterator:
    """start_cluster(nodes=3, nbd=True) with the given copies; stopped at the end."""
    made: list[Cluster] = []

    def make(copies: int = 3, *format_args: str) -> Cluster:
        c = start_cluster(tmp_path / "cluster", etcd.url, nodes=3, copies=0, nbd=True)
        made.append(c)
        c.format(copies, *format_args)
        return c

    yield make
    for c in made:
        c.stop()


def _vdi_check(cluster: Cluster, name: str) -> dict:
    proc = dog("vdi", "check", name, "--json", address=cluster.address, check=False)
    report = json.loads(proc.stdout)
    assert report["clean"] == (proc.returncode == 0), (proc.returncode, report)
    return report


def _assert_clean(cluster: Cluster, name: str) -> None:
    report = _vdi_check(cluster, name)
    assert report["clean"], f"dog vdi check {name}: {report}"
    assert dog("vdi", "check", name, address=cluster.address).stdout.rstrip().endswith(
        "all replicas present and identical")


def _data_oids(cluster: Cluster, name: str, *indexes: int) -> list[int]:
    """The oids of blocks of a VDI (the VDI's copies are part of them)."""
    rec = dog_json("vdi", "list", name, address=cluster.address)["vdis"][0]
    return [data_oid(int(rec["id"]), i, int(rec["copies"])) for i in indexes]


def _object_bytes(node: SheepProcess, oid: int, size: int = OBJECT_SIZE) -> bytes | None:
    """A replica as its file holds it (holes and a short file read as zeros)."""
    path = node.dir / "obj" / f"{oid:016x}"
    if not path.exists():
        return None
    return path.read_bytes().ljust(size, b"\0")


def _bytes_on_disk(node: SheepProcess) -> int:
    total = 0
    for path in (node.dir / "obj").iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_blocks * 512
    return total


# -- 1. kill -9 of a replica in the middle of a verified write workload ----------------------


def _fio(url: str, cwd: Path, *extra: str) -> list[str]:
    return ["fio", "--name=verified", "--ioengine=nbd", f"--uri={url}", "--rw=randwrite",
            "--bs=64k", "--size=48M", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1",
            "--randrepeat=1", "--output-format=json", *extra]


def _fio_result(proc_out: str, proc_err: str, rc: int) -> dict:
    assert rc == 0, f"fio exited {rc}:\n{proc_err[-3000:]}\n{proc_out[-3000:]}"
    job = json.loads(proc_out[proc_out.index("{"):])["jobs"][0]
    assert job["error"] == 0, job["error"]
    return job


@pytest.mark.parametrize(("copies", "victim"), [(3, 2), (2, 1)], ids=["copies3", "copies2"])
def test_verified_writes_survive_kill_9_of_a_replica_mid_workload(
        make_cluster, tmp_path: Path, copies: int, victim: int) -> None:
    cluster = make_cluster(copies)
    dog("vdi", "create", "disk", "64M", address=cluster.address)
    url = cluster.nbd_url("disk")
    # rate-bounded so the write phase lasts seconds: the kill lands in its middle
    fio = subprocess.Popen(_fio(url, tmp_path, "--do_verify=1", "--rate=12m"), cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        node = cluster.nodes[victim]
        # a third of the data is on the victim's disk: the kill falls mid-write
        wait_until(lambda: _bytes_on_disk(node) >= 16 * MiB or fio.poll() is not None,
                   30, "fio to write a third of its data")
        assert fio.poll() is None, "fio finished before the kill"
        node.kill(signal.SIGKILL)
        out, err = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    job = _fio_result(out, err, fio.returncode)
    # I/O resumes within 5 s: the stall is the victim's lease (3 s here) running out, plus
    # the next epoch reaching the gateway
    stall = job["write"]["clat_ns"]["max"] / 1e9
    assert stall < 5, f"writes stalled {stall:.2f} s across the kill"
    assert job["write"]["io_kbytes"] == 48 * 1024
    assert job["read"]["io_kbytes"] == 48 * 1024  # every block read back and verified
    assert _bytes_on_disk(node) < 40 * MiB  # the victim missed part of the writes
    cluster.wait_members(2, timeout=30)

    # everything reads back once more, in a new connection
    proc = subprocess.run(_fio(url, tmp_path, "--verify_only"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    job = _fio_result(proc.stdout, proc.stderr, proc.returncode)
    assert job["read"]["io_kbytes"] == 48 * 1024
    if copies == 2:  # two survivors hold two copies of everything again
        wait_healthy(cluster, 60)
        _assert_clean(cluster, "disk")


# -- 2. a restarted node catches up ----------------------------------------------------------


def test_a_restarted_node_recovers_what_was_written_and_overwritten_while_it_was_down(
        make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster(3)
    dog("vdi", "create", "disk", "64M", address=cluster.address)
    url = cluster.nbd_url("disk")
    image = PatternImage(64 * MiB)
    qemu_io(url, image.write(0x11, 0, 24 * MiB), cwd=tmp_path)  # objects 0-5
    down = cluster.nodes[2]
    down.kill(signal.SIGKILL)
    cluster.wait_members(2, timeout=30)

    # overwrite whole objects 2 and 3, part of object 5, and create objects 6 and 7
    qemu_io(url, image.write(0x22, 8 * MiB, 8 * MiB), image.write(0x33, 22 * MiB, 10 * MiB),
            image.write(0x44, 20 * MiB + 4096, 4096), cwd=tmp_path)
    changed = _data_oids(cluster, "disk", 2, 3, 5, 6, 7)
    for oid in changed[:3]:  # the stale copies the node comes back with
        assert _object_bytes(down, oid) != _object_bytes(cluster.nodes[1], oid)
    for oid in changed[3:]:
        assert _object_bytes(down, oid) is None

    down.start().wait_up()
    cluster.wait_members(3)
    wait_healthy(cluster, 60)
    _assert_clean(cluster, "disk")
    # the node's own files hold the newest bytes, not just what reads through it would see
    source = cluster.nodes[1]
    for oid in sorted(objects_on_disk(cluster)[1]):
        assert _object_bytes(down, oid) == _object_bytes(source, oid), f"{oid:016x} differs"
    assert set(changed) <= objects_on_disk(cluster)[2]
    image.verify(url, tmp_path)


# -- 3. a fourth node joins ------------------------------------------------------------------


class _Reader(threading.Thread):
    """Reads the whole export over and over, comparing with the model, until stopped."""

    def __init__(self, image: PatternImage, url: str, cwd: Path) -> None:
        super().__init__(daemon=True)
        self.image, self.url, self.cwd = image, url, cwd
        self.stop = threading.Event()
        self.passes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.image.verify(self.url, self.cwd)
                self.passes += 1
        except BaseException as exc:
            self.error = exc


def test_a_joining_node_takes_a_share_while_reads_go_on_and_old_copies_are_removed(
        make_cluster, tmp_path: Path) -> None:
    # 1 MiB objects and copies=2: enough objects for the share to mean something
    cluster = make_cluster(2, "--object-size", "1M")
    dog("vdi", "create", "disk", "48M", address=cluster.address)
    url = cluster.nbd_url("disk")
    image = PatternImage(48 * MiB)
    qemu_io(url, *(image.write(0x40 + i, i * MiB, MiB) for i in range(48)), cwd=tmp_path)
    wait_healthy(cluster, 30)
    before = objects_on_disk(cluster)
    objects = set().union(*before.values())
    assert len(objects) == 49  # 48 data objects and the inode
    assert sum(map(len, before.values())) == 2 * len(objects)

    reader = _Reader(image, url, tmp_path)
    reader.start()
    try:
        wait_until(lambda: reader.passes >= 1 or reader.error, 60, "a first full read")
        cluster.add_node()
        cluster.wait_members(4)
        wait_healthy(cluster, 60)
        # the old copies go once every member reported in
        wait_until(lambda: sum(map(len, objects_on_disk(cluster).values())) == 2 * len(objects),
                   30, "copies the ring no longer places to be removed")
        passes = reader.passes
        wait_until(lambda: reader.passes > passes or reader.error, 60, "a full read after")
    finally:
        reader.stop.set()
        reader.join(120)
    assert reader.error is None, f"a read during the join failed: {reader.error}"
    assert reader.passes >= 2

    after = objects_on_disk(cluster)
    assert set().union(*after.values()) == objects
    share = len(after[3]) / (2 * len(objects))
    assert 0.1 <= share <= 0.45, f"the new node holds {len(after[3])} of {2 * len(objects)}"
    for i in range(3):  # copies only moved to the new node, never between the old ones
        assert after[i] <= before[i], (i, after[i] - before[i])
    assert sum(len(before[i] - after[i]) for i in range(3)) == len(after[3])
    _assert_clean(cluster, "disk")
    image.verify(url, tmp_path)


# -- while recovery is in progress -----------------------------------------------------------


def _node_ids(cluster: Cluster) -> dict[int, str]:
    """Control port -> node id."""
    return {int(n["node"]["control_port"]): n["node"]["id"] for n in cluster.node_list()}


def _placement(cluster: Cluster, oids: list[int]) -> dict[int, set[str]]:
    """The node ids the current epoch's ring places each object on."""
    async def ask() -> dict[int, set[str]]:
        async with object_client(cluster.etcd_url) as client:
            return {oid: {n.node_id for n in client.replicas(oid)} for oid in oids}

    return asyncio.run(ask())


def test_a_copy_left_behind_by_a_join_is_not_served_when_its_object_comes_back(
        make_cluster, tmp_path: Path) -> None:
    """A join moves object X off node A; A keeps its copy until every member finished the
    epoch. X is written (A no longer gets the write), then the joiner leaves and X comes
    back to A: A's copy is stale and must not be served as current while A's recovery is
    still listing its peers (held up here by a paused member)."""
    block_size = 64 << 10  # many small objects: the joiner's recovery takes seconds
    cluster = make_cluster(2, "--object-size", str(block_size))
    dog("vdi", "create", "disk", "8M", address=cluster.address)
    url = cluster.nbd_url("disk")
    image = PatternImage(8 * MiB)
    qemu_io(url, image.write(0x11, 0, 8 * MiB), cwd=tmp_path)
    wait_healthy(cluster, 30)
    gateway = cluster.nodes[0]
    oids = _data_oids(cluster, "disk", *range(8 * MiB // block_size))
    on_gateway = [i for i, oid in enumerate(oids) if oid in objects_on_disk(cluster)[0]]

    # the joiner's recovery is throttled: the epoch stays unfinished, A keeps its copies
    joiner = cluster.add_node("--recovery-throttle", "128K")
    cluster.wait_members(4)
    ids = _node_ids(cluster)
    placed = _placement(cluster, oids)
    moved = [i for i in on_gateway if ids[gateway.port] not in placed[oids[i]]]
    assert moved, "the join moved nothing off the gateway"
    block = moved[0]
    payload = b"\x22" * block_size
    dog_bytes("vdi", "write", "disk", str(block * block_size), str(block_size),
              address=cluster.address, input=payload)
    image.data[block * block_size : (block + 1) * block_size] = payload
    leftover = gateway.dir / "obj" / f"{oids[block]:016x}"
    assert leftover.read_bytes()[:4096] == b"\x11" * 4096, "the test came too late"

    # a member that does not answer holds up the gateway's listing in the next epoch,
    # until its lease runs out and the epoch after that leaves it out
    paused = next(n for n in cluster.nodes[1:3] if ids[n.port] not in placed[oids[block]])
    addr = _data_addr(cluster, gateway)
    assert paused.proc is not None
    paused.proc.send_signal(signal.SIGSTOP)
    try:
        joiner.stop()  # leaves at once: the block is the gateway's again
        info = cluster.info()
        assert len(info["history"][-1]["nodes"]) == 3, "the paused node is out already"
        # a client of this epoch reads the block from the gateway: not the stale copy;
        # once the epoch moves on without the paused node, a refusal for the old epoch
        reply = asyncio.run(_read_at(addr, oids[block], block_size, int(info["epoch"])))
    finally:
        paused.proc.send_signal(signal.SIGCONT)
    if reply.result == 0:
        assert bytes(reply.payload) == payload, "the stale copy was served"
    else:
        assert reply.result == OldEpoch.code, reply
    cluster.wait_members(3)
    wait_healthy(cluster, 60)
    image.verify(url, tmp_path)
    _assert_clean(cluster, "disk")


async def _read_at(addr: tuple[str, int], oid: int, length: int, epoch: int) -> Frame:
    """READ a whole object at `epoch` from one node, as a client of that epoch would."""
    pool = PeerPool()
    try:
        conn = await pool.get(addr)
        deadline = time.monotonic() + 10
        while True:
            reply = await conn.request(Opcode.READ, oid=oid, offset=0, length=length,
                                       epoch=epoch, timeout=20)
            if reply.result != NewEpoch.code or time.monotonic() > deadline:
                return reply
            await asyncio.sleep(0.05)  # the node has not seen the epoch yet
    finally:
        await pool.close()


def _data_addr(cluster: Cluster, node: SheepProcess) -> tuple[str, int]:
    for n in cluster.node_list():
        if int(n["node"]["control_port"]) == node.port:
            return n["node"]["host"], int(n["node"]["data_port"])
    raise AssertionError(f"node on port {node.port} is not listed")


def test_a_read_waiting_for_the_recovery_of_its_object_survives_epoch_changes(
        make_cluster, tmp_path: Path) -> None:
    """The gateway reads objects it has yet to fetch while their only source is paused;
    the epoch changes twice meanwhile (a node comes back, the paused one's lease runs
    out), cancelling those fetches and then the listing of the epoch after them: the read
    is answered, with the right bytes, once a source is back."""
    block_size = 64 << 10
    cluster = make_cluster(2, "--object-size", str(block_size))
    dog("vdi", "create", "disk", "4M", address=cluster.address)
    url = cluster.nbd_url("disk")
    image = PatternImage(4 * MiB)
    qemu_io(url, *(image.write(0x30 + i, i * block_size, block_size) for i in range(64)),
            cwd=tmp_path)
    wait_healthy(cluster, 30)
    gateway, source, away = cluster.nodes
    gateway_id = _node_ids(cluster)[gateway.port]
    # recovery drains at one object a second: most are still to come when the source stops
    dog("node", "recovery", "set-throttle", "64K", address=cluster.address)
    away.stop()
    cluster.wait_members(2)

    def gateway_recovery() -> dict:
        nodes = dog_json("node", "recovery", address=cluster.address)["nodes"]
        return next(n["recovery"] for n in nodes if n["node"]["id"] == gateway_id)

    wait_until(lambda: gateway_recovery()["state"] == "recovering", 30, "the gateway to plan")
    left = gateway_recovery()
    assert int(left["total"]) - int(left["done"]) >= 4, left
    assert source.proc is not None
    source.proc.send_signal(signal.SIGSTOP)
    reader = _Reader(image, url, tmp_path)
    try:
        reader.start()
        away.start().wait_up()  # a new epoch while the read waits for fetches
        wait_until(lambda: reader.passes >= 1 or reader.error, 60, "the read to be answered")
    finally:
        source.proc.send_signal(signal.SIGCONT)
        reader.stop.set()
        reader.join(120)
    assert reader.error is None, reader.error
    assert not reader.is_alive()
    dog("node", "recovery", "set-throttle", "0", address=cluster.address)
    cluster.wait_members(3)
    wait_healthy(cluster, 60)
    image.verify(url, tmp_path)
    _assert_clean(cluster, "disk")


# -- 4. flushes and kill -9 ------------------------------------------------------------------


def test_a_flush_right_after_kill_9_of_a_replica_waits_for_the_new_epoch(
        make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster(3)
    dog("vdi", "create", "disk", "16M", address=cluster.address)
    url = cluster.nbd_url("disk")
    qemu_io(url, "write -P 0x11 0 16M", cwd=tmp_path)
    cluster.nodes[2].kill(signal.SIGKILL)
    # what was acknowledged before the kill is on the two others: a flush can succeed
    qemu_io(url, "read -P 0x11 0 64k", "flush", cwd=tmp_path, timeout=60)


def test_flushed_writes_survive_kill_9_of_every_daemon(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster(3)
    dog("vdi", "create", "disk", "32M", address=cluster.address)
    url = cluster.nbd_url("disk")
    image = PatternImage(32 * MiB)
    # qemu-io flushes on close; dog vdi write flushes before it exits
    qemu_io(url, image.write(0x5A, 0, 12 * MiB), image.write(0xA5, 20 * MiB, 3 * MiB + 512),
            image.write(0x77, 6 * MiB - 512, 1024), cwd=tmp_path)
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    dog_bytes("vdi", "write", "disk", str(28 * MiB), str(len(payload)),
              address=cluster.address, input=payload)
    image.data[28 * MiB : 29 * MiB] = payload

    for node in cluster.nodes:
        node.kill(signal.SIGKILL)
    for node in cluster.nodes:
        node.start()
    for node in cluster.nodes:
        node.wait_up()
    cluster.wait_members(3)
    wait_healthy(cluster, 60)
    image.verify(url, tmp_path)
    _assert_clean(cluster, "disk")


# -- 6. dog node recovery and its throttle ----------------------------------------------------


def test_node_recovery_shows_progress_after_a_restart_and_set_throttle_reaches_every_node(
        make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster(3)
    dog("vdi", "create", "disk", "32M", address=cluster.address)
    url = cluster.nbd_url("disk")
    away = cluster.nodes[2]
    away.stop()  # SIGTERM: it leaves at once
    cluster.wait_members(2, timeout=30)
    image = PatternImage(32 * MiB)
    qemu_io(url, image.write(0x61, 0, 20 * MiB), cwd=tmp_path)  # 5 objects and the inode
    away.start().wait_up()
    cluster.wait_members(3)
    wait_healthy(cluster, 60)

    def states() -> list[dict]:
        return dog_json("node", "recovery", address=cluster.address)["nodes"]

    away_id = next(n["node"]["id"] for n in cluster.node_list()
                   if int(n["node"]["control_port"]) == away.port)
    epoch = int(cluster.info()["epoch"])
    wait_until(lambda: all(s["recovery"]["state"] == "done" for s in states()), 30,
               "every node to finish")
    nodes = states()
    assert len(nodes) == 3
    for s in nodes:
        r = s["recovery"]
        assert s["reachable"]
        assert int(r["epoch"]) == epoch
        assert int(r["done"]) == int(r["total"])
        if s["node"]["id"] == away_id:
            assert int(r["total"]) == 6, r  # what was written while it was away
        else:
            assert int(r["total"]) == 0, r
    text = dog("node", "recovery", address=cluster.address).stdout
    assert "6/6" in text and "100%" in text

    out = json.loads(dog("node", "recovery", "set-throttle", "10M", "--json",
                         address=cluster.address).stdout)
    assert out == {"throttle": 10 * MiB, "nodes": 3}
    assert all(int(s["recovery"]["throttle"]) == 10 * MiB for s in states())
    assert dog("node", "recovery", address=cluster.address).stdout.count("10 MiB/s") == 3
    dog("node", "recovery", "set-throttle", "0", address=cluster.address)
    assert all(int(s["recovery"]["throttle"]) == 0 for s in states())
    image.verify(url, tmp_path)


def test_set_throttle_bounds_the_recovery_rate_of_each_node(
        make_cluster, tmp_path: Path) -> None:
    block_size = 64 << 10
    cluster = make_cluster(2, "--object-size", str(block_size))
    dog("vdi", "create", "disk", "4M", address=cluster.address)
    url = cluster.nbd_url("disk")
    image = PatternImage(4 * MiB)
    qemu_io(url, image.write(0x5C, 0, 4 * MiB), cwd=tmp_path)
    wait_healthy(cluster, 30)
    dog("node", "recovery", "set-throttle", "256K", address=cluster.address)  # 4 objects/s
    cluster.nodes[2].stop()  # the two others each copy what they shared with it
    cluster.wait_members(2)
    wait_healthy(cluster, 60)
    for s in dog_json("node", "recovery", address=cluster.address)["nodes"]:
        r = s["recovery"]
        assert int(r["done"]) == int(r["total"]) >= 8, r
        # the bound is the node's, however many fetches run at once (a first burst of
        # parallel fetches aside): not 4 objects/s per worker
        assert float(r["rate"]) <= 8, r
    image.verify(url, tmp_path)
