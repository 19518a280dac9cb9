"""ObjectClient's rules, with no processes and no sleeps: fake peers under the real
PeerPool, a fake etcd and clock (tests/unit/fakes.py); the local replica is the node's real
in-process service over a real store in tmp_path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sheep.cluster.state import EpochRecord, NodeInfo
from sheep.dataplane.wire import Flags, Opcode
from sheep.errors import ClusterError, Corrupt, NoObject, Result, StoreIOError
from sheep.node.service import InProcess, ObjectService
from sheep.objclient import ObjectClient
from sheep.oid import data_oid
from sheep.store import ObjectStore

from ..fakes.clock import FakeClock, settle
from .fakes import NODES, FakeEtcd, FakePeer, FakePool, config, view_of

SIZE = 1 << 16
OID = data_oid(7, 3)


class Scene:
    """A client of a 5-node cluster (copies=3) at epoch 1; every node a fake peer."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.peers = {n.node_id: FakePeer(n, self.clock, object_size=SIZE) for n in NODES}
        self.pool = FakePool(list(self.peers.values()))
        self.etcd = FakeEtcd(config(3, SIZE), EpochRecord(1, 0.0, NODES))

    async def start(self, **kwargs: object) -> ObjectClient:
        self.view = await view_of(NODES, copies=3, object_size=SIZE)
        self.client = ObjectClient(self.view, self.pool, etcd=self.etcd,  # type: ignore[arg-type]
                                   clock=self.clock, **kwargs)  # type: ignore[arg-type]
        return self.client

    def replicas(self, oid: int = OID) -> list[FakePeer]:
        return [self.peers[n.node_id] for n in self.view.placement(oid)]

    def others(self, oid: int = OID) -> list[FakePeer]:
        placed = self.replicas(oid)
        return [p for p in self.peers.values() if p not in placed]

    async def new_epoch(self, epoch: int, members: tuple[NodeInfo, ...]) -> None:
        """The cluster moves on: etcd, every peer and the client's view."""
        self.etcd.record = EpochRecord(epoch, 0.0, members)
        for peer in self.peers.values():
            peer.epoch = epoch
        await self.view.update(None, self.etcd.record)

    def run(self, coro) -> asyncio.Task:
        return asyncio.ensure_future(coro)


@pytest.fixture
async def scene() -> Scene:
    s = Scene()
    await s.start()
    return s


# -- writes ----------------------------------------------------------------------------------


async def test_a_write_reaches_every_replica_of_the_placement_and_no_other(
        scene: Scene) -> None:
    await scene.client.write(OID, 100, b"abc")
    for peer in scene.replicas():
        assert peer.data(OID)[100:103] == b"abc"
        assert [f.epoch for f in peer.seen(Opcode.CREATE)] == [1]
    for peer in scene.others():
        assert not peer.requests


async def test_a_write_is_acknowledged_only_once_every_replica_acknowledged(
        scene: Scene) -> None:
    slow = scene.replicas()[2]
    slow.hold()
    write = scene.run(scene.client.write(OID, 0, b"x"))
    await settle()
    assert not write.done()
    slow.release()
    await settle()
    assert write.done() and write.exception() is None


async def test_a_replica_that_fails_the_write_for_good_fails_it(scene: Scene) -> None:
    scene.replicas()[1].fail_next(Opcode.CREATE, Result.IO_ERROR)
    with pytest.raises(StoreIOError):
        await scene.client.write(OID, 0, b"x")
    assert scene.clock.slept == []  # not retried


async def test_a_write_without_create_fails_on_a_replica_that_lacks_the_object(
        scene: Scene) -> None:
    for peer in scene.replicas()[:2]:
        peer.put(OID, b"", written=1)
    with pytest.raises(NoObject):
        await scene.client.write(OID, 0, b"x", create=False)


async def test_a_write_with_an_unreachable_replica_waits_for_the_ring_without_it(
        scene: Scene) -> None:
    gone = scene.replicas()[1]
    gone.down = True
    write = scene.run(scene.client.write(OID, 0, b"w"))
    await scene.clock.advance(30.0)
    assert not write.done()  # an acknowledged write is on every replica of the epoch
    await scene.new_epoch(2, tuple(n for n in NODES if n != gone.node))
    await scene.clock.run_until(write.done)
    write.result()
    assert len(scene.replicas()) == 3
    for peer in scene.replicas():
        assert peer.data(OID)[:1] == b"w"
        assert peer.seen(Opcode.CREATE)[-1].epoch == 2


async def test_a_replica_that_does_not_answer_times_out_like_an_unreachable_one(
        scene: Scene) -> None:
    mute = scene.replicas()[0]
    mute.hold()
    write = scene.run(scene.client.write(OID, 0, b"t"))
    await scene.clock.advance(4.9)
    assert len(mute.seen(Opcode.CREATE)) == 1
    await scene.clock.advance(0.2)  # the request's 5 s timeout: then wait for a new ring
    await scene.new_epoch(2, tuple(n for n in NODES if n != mute.node))
    await scene.clock.run_until(write.done)
    write.result()
    assert mute not in scene.replicas()


async def test_a_request_gives_up_at_its_deadline(scene: Scene) -> None:
    scene.replicas()[0].down = True
    start = scene.clock.now
    write = scene.run(scene.client.write(OID, 0, b"d"))
    await scene.clock.run_until(write.done)
    with pytest.raises(ClusterError, match="after 60s"):
        write.result()
    assert 60.0 <= scene.clock.now - start <= 61.0


async def test_remove_counts_a_replica_without_the_object_as_done(scene: Scene) -> None:
    scene.replicas()[0].put(OID, b"r", written=1)
    await scene.client.remove(OID)
    assert all(OID not in p.objects for p in scene.peers.values())
    assert all(len(p.seen(Opcode.REMOVE)) == 1 for p in scene.replicas())


# -- epochs ----------------------------------------------------------------------------------


async def test_old_epoch_refreshes_the_view_from_etcd_and_retries_at_once(
        scene: Scene) -> None:
    scene.etcd.record = EpochRecord(2, 0.0, NODES)  # the cluster moved; the view missed it
    for peer in scene.peers.values():
        peer.epoch = 2
    await scene.client.write(OID, 0, b"o")
    assert scene.view.epoch == 2
    for peer in scene.replicas():
        assert [f.epoch for f in peer.seen(Opcode.CREATE)] == [1, 2]
    assert scene.clock.slept == []


async def test_new_epoch_waits_a_moment_for_the_node_to_catch_up_and_retries(
        scene: Scene) -> None:
    behind = scene.replicas()[2]
    await scene.new_epoch(2, NODES)
    behind.epoch = 1  # has not seen epoch 2 yet
    write = scene.run(scene.client.write(OID, 0, b"n"))
    await scene.clock.advance(0.2)
    assert not write.done()
    assert set(scene.clock.slept) == {0.05}
    behind.epoch = 2
    await scene.clock.advance(0.05)
    assert write.done() and write.exception() is None
    assert behind.data(OID)[:1] == b"n"


async def test_requests_carry_the_views_epoch(scene: Scene) -> None:
    await scene.new_epoch(5, NODES)
    await scene.client.write(OID, 0, b"e")
    await scene.client.read(OID, 0, 1)
    assert {f.epoch for p in scene.peers.values() for f in p.requests} == {5}


# -- reads -----------------------------------------------------------------------------------


async def test_a_read_asks_one_replica(scene: Scene) -> None:
    await scene.client.write(OID, 0, b"one")
    assert await scene.client.read(OID, 0, 3) == b"one"
    assert sum(len(p.seen(Opcode.READ)) for p in scene.peers.values()) == 1


@pytest.mark.parametrize("failure", ["down", "corrupt", "missing", "io-error"])
async def test_a_read_falls_back_to_the_next_replica(scene: Scene, failure: str) -> None:
    await scene.client.write(OID, 0, b"fb")
    first = scene.replicas()[0]
    if failure == "down":
        first.down = True
    elif failure == "corrupt":
        first.corrupt.add(OID)
    elif failure == "missing":
        del first.objects[OID]
    else:
        first.fail_next(Opcode.READ, Result.NOT_FORMATTED)  # a retryable refusal
    assert await scene.client.read(OID, 0, 2) == b"fb"
    assert scene.replicas()[1].seen(Opcode.READ)


async def test_a_read_no_replica_has_is_no_object_at_once(scene: Scene) -> None:
    with pytest.raises(NoObject):
        await scene.client.read(OID, 0, 10)
    assert scene.clock.slept == []


async def test_a_read_every_replica_finds_corrupt_is_an_error_at_once(scene: Scene) -> None:
    """Each replica tried to repair the block and found no good copy: lost data is an
    I/O error to the reader (NBD EIO), not a wait for a ring that will not help."""
    await scene.client.write(OID, 0, b"rot")
    for peer in scene.replicas():
        peer.corrupt.add(OID)
    with pytest.raises(Corrupt):
        await scene.client.read(OID, 0, 3)
    assert scene.clock.slept == []


async def test_a_read_no_replica_can_answer_waits_for_a_new_ring(scene: Scene) -> None:
    await scene.client.write(OID, 0, b"wr")
    for peer in scene.replicas():
        peer.down = True
    read = scene.run(scene.client.read(OID, 0, 2))
    await scene.clock.advance(10.0)
    assert not read.done()
    for peer in scene.peers.values():
        peer.down = False
    await scene.clock.run_until(read.done)
    assert read.result() == b"wr"


# -- the local replica -----------------------------------------------------------------------


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[tuple[Scene, ObjectStore]]:
    """The client of a gateway on NODES[0], whose own replica is its in-process service
    (no fake peer answers for NODES[0]: a request over the network to it fails)."""
    s = Scene()
    me = NODES[0]
    del s.pool.peers[me.data_addr]
    store = ObjectStore(tmp_path, object_size=SIZE)
    s.view = await view_of(NODES, copies=3, object_size=SIZE)
    service = ObjectService(store, lambda: s.view.epoch)
    s.client = ObjectClient(s.view, s.pool, etcd=s.etcd,  # type: ignore[arg-type]
                            local=(me.node_id, InProcess(service)), clock=s.clock)
    yield s, store
    store.close()


def placed_on(scene: Scene, node: NodeInfo) -> int:
    return next(oid for i in range(1000)
                if node in scene.view.placement(oid := data_oid(9, i)))


async def test_the_local_replica_is_written_in_process(
        local: tuple[Scene, ObjectStore]) -> None:
    scene, store = local
    oid = placed_on(scene, NODES[0])
    await scene.client.write(oid, 10, b"here")
    assert store.read(oid, 10, 4) == b"here"
    for node in scene.view.placement(oid):
        if node != NODES[0]:
            assert scene.peers[node.node_id].data(oid)[10:14] == b"here"


async def test_a_read_of_an_object_this_node_holds_asks_no_peer(
        local: tuple[Scene, ObjectStore]) -> None:
    scene, _store = local
    oid = placed_on(scene, NODES[0])
    await scene.client.write(oid, 0, b"mine")
    assert await scene.client.read(oid, 0, 4) == b"mine"
    assert not any(p.seen(Opcode.READ) for p in scene.peers.values())


async def test_a_read_of_an_object_placed_elsewhere_goes_to_a_peer(
        local: tuple[Scene, ObjectStore]) -> None:
    scene, store = local
    oid = next(oid for i in range(1000)
               if NODES[0] not in scene.view.placement(oid := data_oid(9, i)))
    await scene.client.write(oid, 0, b"away")
    assert not store.exists(oid)
    assert await scene.client.read(oid, 0, 4) == b"away"


# -- flush -----------------------------------------------------------------------------------


async def test_flush_reaches_every_member(scene: Scene) -> None:
    await scene.client.flush()
    assert all(len(p.seen(Opcode.FLUSH)) == 1 for p in scene.peers.values())


async def test_flush_with_an_unreachable_member_flushes_the_next_ring(scene: Scene) -> None:
    dead = scene.peers[NODES[4].node_id]
    dead.down = True
    flush = scene.run(scene.client.flush())
    await scene.clock.advance(5.0)
    assert not flush.done()
    await scene.new_epoch(2, NODES[:4])
    await scene.clock.run_until(flush.done)
    flush.result()
    assert all(p.seen(Opcode.FLUSH) for p in scene.peers.values() if p is not dead)


# -- FUA on every change -----------------------------------------------------------------------


@pytest.mark.parametrize("call", ["discard", "remove"])
async def test_fua_reaches_every_replica_of_a_discard_or_remove(scene: Scene, call: str) -> None:
    for peer in scene.replicas():
        peer.put(OID, b"x" * 4096, 1)
    if call == "discard":
        await scene.client.discard(OID, 0, 4096, fua=True)
    else:
        await scene.client.remove(OID, fua=True)
    opcode = Opcode.DISCARD if call == "discard" else Opcode.REMOVE
    sent = [f for peer in scene.replicas() for f in peer.seen(opcode, OID)]
    assert len(sent) == 3 and all(f.flags & Flags.FUA for f in sent)
