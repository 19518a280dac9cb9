"""Fencing on a real cluster: a node paused (SIGSTOP) past its lease is dropped from the
epoch while writes go on through NBD, refuses the writes of its old epoch when it wakes,
then rejoins and catches up."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.dataplane.client import PeerPool
from sheep.dataplane.wire import Opcode
from sheep.errors import Fenced, OldEpoch
from sheep.etcd_server import EtcdServer
from sheep.oid import data_oid

from ..cluster import (
    Cluster,
    PatternImage,
    SheepProcess,
    TcpProxy,
    dog,
    dog_json,
    free_port,
    objects_on_disk,
    qemu_io,
    start_cluster,
    wait_healthy,
    wait_until,
)

pytestmark = pytest.mark.slow

MiB = 1 << 20
LEASE_TTL = 3
PAUSE = 2 * LEASE_TTL  # well past the lease


@pytest.fixture
def nbd3(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    c = start_cluster(tmp_path / "cluster", etcd.url, nodes=3, copies=3,
                      lease_ttl=LEASE_TTL, nbd=True)
    yield c
    for node in c.nodes:  # never leave a stopped process behind
        if node.alive and node.proc is not None:
            node.proc.send_signal(signal.SIGCONT)
    c.stop()


def _assert_clean(cluster: Cluster, name: str) -> None:
    proc = dog("vdi", "check", name, address=cluster.address, check=False)
    assert proc.returncode == 0 and "all replicas present and identical" in proc.stdout, (
        proc.stdout[-2000:], proc.stderr[-2000:])


def _data_addr(cluster: Cluster, node: SheepProcess) -> tuple[str, int]:
    for n in cluster.node_list():
        if int(n["node"]["control_port"]) == node.port:
            return n["node"]["host"], int(n["node"]["data_port"])
    raise AssertionError(f"node on port {node.port} is not listed")


class _Writer(threading.Thread):
    """Pattern writes through NBD, one qemu-io connection each, until stopped; every one
    must succeed. The model is the writer's until it is joined."""

    def __init__(self, image: PatternImage, url: str, cwd: Path, region: int) -> None:
        super().__init__(daemon=True)
        self.image, self.url, self.cwd, self.region = image, url, cwd, region
        self.stop = threading.Event()
        self.done: list[float] = []  # monotonic time each write was acknowledged
        self.error: BaseException | None = None

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                chunk = (i * 5) % (self.region // MiB)  # 1 MiB chunks in a scattered order
                length = MiB - (i % 7) * 4096
                qemu_io(self.url, self.image.write(1 + i % 250, chunk * MiB, length),
                        cwd=self.cwd, timeout=90)
                self.done.append(time.monotonic())
                i += 1
        except BaseException as exc:
            self.error = exc

    def acknowledged_since(self, t: float) -> int:
        return sum(1 for d in self.done if d > t)


def test_a_paused_node_is_dropped_while_writes_go_on_and_catches_up_after_sigcont(
        nbd3: Cluster, tmp_path: Path) -> None:
    cluster = nbd3
    dog("vdi", "create", "disk", "32M", address=cluster.address)
    url = cluster.nbd_url("disk")
    image = PatternImage(32 * MiB)
    qemu_io(url, image.write(0x11, 0, 32 * MiB), cwd=tmp_path)
    paused = cluster.nodes[2]
    assert paused.proc is not None
    rec = dog_json("vdi", "list", "disk", address=cluster.address)["vdis"][0]
    untouched = [paused.dir / "obj" / f"{data_oid(int(rec['id']), i, 3):016x}"
                 for i in range(4, 8)]  # the writer keeps to the first 16 MiB
    mtimes = [p.stat().st_mtime_ns for p in untouched]

    writer = _Writer(image, url, tmp_path, region=16 * MiB)
    writer.start()
    try:
        wait_until(lambda: len(writer.done) >= 2 or writer.error, 30, "writes to start")
        paused.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            cluster.wait_members(2, timeout=30)
            dropped = time.monotonic()
            # writes go on without it, with no error, for the rest of the pause
            wait_until(lambda: (time.monotonic() - stopped >= PAUSE
                                and writer.acknowledged_since(dropped) >= 3) or writer.error,
                       60, "writes acknowledged without the paused node")
            assert writer.error is None, writer.error
        finally:
            paused.proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        cluster.wait_members(3, timeout=30)
        wait_healthy(cluster, 60)
        wait_until(lambda: writer.acknowledged_since(resumed) >= 2 or writer.error, 60,
                   "writes after it rejoined")
    finally:
        writer.stop.set()
        writer.join(120)
    assert not writer.is_alive()
    assert writer.error is None, f"a write failed: {writer.error}"
    assert "lease lost" in paused.log()[paused.log_start :]
    wait_healthy(cluster, 60)
    _assert_clean(cluster, "disk")
    image.verify(url, tmp_path)
    # what it did not miss it kept: neither dropped nor copied again
    assert [p.stat().st_mtime_ns for p in untouched] == mtimes


async def test_a_node_woken_past_its_lease_refuses_writes_of_its_old_epoch(
        nbd3: Cluster, tmp_path: Path) -> None:
    cluster = nbd3
    dog("vdi", "create", "disk", "16M", address=cluster.address)
    url = cluster.nbd_url("disk")
    image = PatternImage(16 * MiB)
    await asyncio.to_thread(qemu_io, url, image.write(0x11, 0, 16 * MiB), cwd=tmp_path)
    rec = dog_json("vdi", "list", "disk", address=cluster.address)["vdis"][0]
    oid = data_oid(int(rec["id"]), 1, int(rec["copies"]))
    paused = cluster.nodes[2]
    assert paused.proc is not None
    addr = _data_addr(cluster, paused)
    epoch = int(cluster.info()["epoch"])

    pool = PeerPool()
    try:
        conn = await pool.get(addr)
        # while the node holds its lease, a write of this epoch is acknowledged (the same
        # bytes it holds: nothing changes)
        same = await conn.request(Opcode.WRITE, oid=oid, offset=0, payload=b"\x11" * 4096,
                                  epoch=epoch, timeout=10)
        assert same.result == 0, same

        paused.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            # a client that still believes in the old epoch writes to it: the request
            # waits in the socket while the node sleeps
            late = conn.request(Opcode.WRITE, oid=oid, offset=0, payload=b"\xee" * 4096,
                                epoch=epoch, timeout=90)
            await asyncio.to_thread(cluster.wait_members, 2, 30)
            await asyncio.sleep(max(0.0, PAUSE - (time.monotonic() - stopped)))
            assert not late.done()
        finally:
            paused.proc.send_signal(signal.SIGCONT)
        reply = await asyncio.wait_for(late, 60)
    finally:
        await pool.close()
    assert reply.result in (Fenced.code, OldEpoch.code), f"old-epoch write answered {reply}"

    await asyncio.to_thread(cluster.wait_members, 3, 30)
    await asyncio.to_thread(wait_healthy, cluster, 60)
    await asyncio.to_thread(_assert_clean, cluster, "disk")
    await asyncio.to_thread(image.verify, url, tmp_path)


async def test_a_node_cut_off_from_etcd_acknowledges_no_write_and_catches_up_after(
        tmp_path: Path, etcd: EtcdServer) -> None:
    """The node keeps running and serving its data port; only etcd is out of its reach."""
    cluster = Cluster(tmp_path / "cluster", etcd.url, lease_ttl=LEASE_TTL)
    host, port = etcd.url.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port)))
    try:
        cluster.add_node("--nbd-port", str(cluster.nbd_port))
        cluster.add_node()
        cut = SheepProcess(tmp_path / "cluster" / "node2", free_port(),
                           f"http://127.0.0.1:{proxy.port}{cluster.prefix}",
                           ["--lease-ttl", str(LEASE_TTL)])
        cluster.nodes.append(cut.start())
        cut.wait_up()
        await asyncio.to_thread(cluster.wait_members, 3)
        cluster.format(3)
        dog("vdi", "create", "disk", "16M", address=cluster.address)
        url = cluster.nbd_url("disk")
        image = PatternImage(16 * MiB)
        await asyncio.to_thread(qemu_io, url, image.write(0x11, 0, 16 * MiB), cwd=tmp_path)
        rec = dog_json("vdi", "list", "disk", address=cluster.address)["vdis"][0]
        oid = data_oid(int(rec["id"]), 2, int(rec["copies"]))
        addr = _data_addr(cluster, cut)
        epoch = int(cluster.info()["epoch"])

        proxy.cut()
        await asyncio.to_thread(cluster.wait_members, 2, 30)
        new_epoch = int(cluster.info()["epoch"])
        # writes go on through the gateway without it
        await asyncio.to_thread(qemu_io, url, image.write(0x22, 0, 8 * MiB), cwd=tmp_path)
        pool = PeerPool()
        try:
            conn = await pool.get(addr)
            for attempt in (epoch, new_epoch, 0):
                reply = await conn.request(Opcode.WRITE, oid=oid, offset=0,
                                           payload=b"\xee" * 4096, epoch=attempt, timeout=10)
                assert reply.result != 0, f"cut-off node acknowledged a write of epoch {attempt}"
        finally:
            await pool.close()
        assert "lease" in cut.log()[cut.log_start :]

        proxy.restore()
        await asyncio.to_thread(cluster.wait_members, 3, 60)
        await asyncio.to_thread(wait_healthy, cluster, 60)
        await asyncio.to_thread(_assert_clean, cluster, "disk")
        await asyncio.to_thread(image.verify, url, tmp_path)
    finally:
        cluster.stop()
        proxy.close()


def test_nodes_woken_past_their_lease_keep_copies_that_exist_nowhere_else(
        tmp_path: Path, etcd: EtcdServer) -> None:
    """Two of four nodes (copies=2) paused together: the objects whose copies are all on
    those two are nowhere else while they sleep. Woken, each first sees the epoch without
    it; it must not drop its copies by that epoch's ring before it rejoins."""
    cluster = start_cluster(tmp_path / "cluster", etcd.url, nodes=4, copies=0,
                            lease_ttl=LEASE_TTL, nbd=True)
    try:
        cluster.format(2, "--object-size", "1M")
        dog("vdi", "create", "disk", "32M", address=cluster.address)
        url = cluster.nbd_url("disk")
        image = PatternImage(32 * MiB)
        qemu_io(url, *(image.write(0x21 + i, i * MiB, MiB) for i in range(32)), cwd=tmp_path)
        wait_healthy(cluster, 30)
        disk = objects_on_disk(cluster)
        # the pair of non-gateway nodes that alone hold the most objects
        pair = max(((1, 2), (1, 3), (2, 3)), key=lambda p: len(disk[p[0]] & disk[p[1]]))
        only_there = disk[pair[0]] & disk[pair[1]]
        assert only_there, disk

        sleepers = [cluster.nodes[i] for i in pair]
        for node in sleepers:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGSTOP)
        try:
            cluster.wait_members(2, timeout=30)
            wait_healthy(cluster, 30)  # the two awake ones finished the epoch without them
        finally:
            for node in sleepers:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGCONT)
        cluster.wait_members(4, timeout=30)
        wait_healthy(cluster, 60)
        assert only_there <= set().union(*objects_on_disk(cluster).values())
        _assert_clean(cluster, "disk")
        image.verify(url, tmp_path)
    finally:
        for node in cluster.nodes:
            if node.alive and node.proc is not None:
                node.proc.send_signal(signal.SIGCONT)
        cluster.stop()
