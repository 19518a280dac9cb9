"""Recovery's rules, with no processes and no sleeps: the node's own store is real (in
tmp_path), its peers, etcd and the clock are fakes (tests/unit/fakes.py)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sheep.cluster.state import EpochRecord, NodeInfo
from sheep.cluster.view import ClusterView
from sheep.dataplane.wire import Opcode
from sheep.errors import Corrupt, Result, StoreIOError
from sheep.node.recovery import UNVERIFIED_RETRY, Recovery
from sheep.oid import data_oid
from sheep.store import ObjectStore
from sheep.store.checksum import SUM_BLOCK

from ..fakes.clock import FakeClock, settle
from .fakes import NODES, FakeEtcd, FakePeer, FakePool, config

SIZE = 1 << 16
ME = NODES[0]
MEMBERS = NODES[:4]  # this node and three peers; copies=2


class Scene:
    """This node's Recovery over a real store, with fake peers, etcd and clock."""

    def __init__(self, root: Path, *, parallel: int = 4, copies: int = 2) -> None:
        self.clock = FakeClock()
        self.copies = copies
        self.store = ObjectStore(root, object_size=SIZE)
        self.peers = {n.node_id: FakePeer(n, self.clock, object_size=SIZE) for n in NODES[1:]}
        self.pool = FakePool(list(self.peers.values()))
        self.etcd = FakeEtcd()
        self.view = ClusterView()
        self.recovery = Recovery(ME.node_id, self.store, self.view, self.pool, self.etcd,
                                 parallel=parallel, clock=self.clock)
        self.view.add_listener(self.recovery.on_view)

    def peer(self, node: NodeInfo) -> FakePeer:
        return self.peers[node.node_id]

    async def epoch(self, epoch: int, members: tuple[NodeInfo, ...] = MEMBERS) -> None:
        await self.view.update(config(self.copies, SIZE), EpochRecord(epoch, 0.0, members))

    def oids(self, *, here: bool, count: int = 1, after: int = 0,
             members: tuple[NodeInfo, ...] = MEMBERS) -> list[int]:
        """Data objects the ring of `members` places (or does not place) on this node."""
        ring = EpochRecord(0, 0.0, members).ring()
        found = [oid for i in range(after, after + 2000)
                 if ring.places_on(oid := data_oid(7, i), self.copies, ME.node_id) == here]
        return found[:count]

    def holders(self, oid: int, members: tuple[NodeInfo, ...] = MEMBERS) -> list[FakePeer]:
        """The peers the ring of `members` places `oid` on."""
        ring = EpochRecord(0, 0.0, members).ring()
        return [p for p in self.peers.values() if p.node in members
                and ring.places_on(oid, self.copies, p.node.node_id)]

    async def all_finished(self, epoch: int, members: tuple[NodeInfo, ...] = MEMBERS) -> None:
        for node in members:
            await self.etcd.mark_recovered(epoch, node.node_id)

    async def until(self, state: str) -> None:
        await self.clock.run_until(lambda: self.recovery.status.state == state)

    async def reported(self, epoch: int) -> None:
        """Until this node reported `epoch` recovered (and then waits for the others)."""
        await self.clock.run_until(lambda: ME.node_id in self.etcd.recovered[epoch])

    def versions(self) -> dict[int, int]:
        return dict(self.store.list_versions())


@pytest.fixture
async def scene(tmp_path: Path) -> AsyncIterator[Scene]:
    s = Scene(tmp_path)
    yield s
    await s.recovery.close()
    s.store.close()


def blob(tag: bytes) -> bytes:
    return tag * 100


# -- what is fetched ------------------------------------------------------------------------


async def test_the_newest_copy_of_an_object_placed_here_is_fetched(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    scene.peer(NODES[1]).put(oid, blob(b"old"), written=2)
    scene.peer(NODES[2]).put(oid, blob(b"new"), written=3)
    scene.peer(NODES[3]).put(oid, blob(b"mid"), written=1)
    await scene.epoch(4)
    await scene.reported(4)
    assert scene.store.read(oid, 0, 300) == blob(b"new")
    assert scene.versions()[oid] == 3  # stamped with the epoch of the copy it came from
    assert not scene.peer(NODES[1]).seen(Opcode.READ, oid)
    assert not scene.peer(NODES[3]).seen(Opcode.READ, oid)


async def test_objects_the_ring_places_elsewhere_are_not_fetched(scene: Scene) -> None:
    oids = scene.oids(here=False, count=5)
    for oid in oids:
        scene.peer(NODES[1]).put(oid, blob(b"x"), written=1)
    await scene.epoch(2)
    await scene.reported(2)
    assert not scene.peer(NODES[1]).seen(Opcode.READ)
    assert scene.store.list_oids() == []
    assert scene.recovery.status.total == 0


async def test_an_object_held_here_as_new_as_any_copy_is_not_fetched(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    scene.store.write(oid, 0, blob(b"mine"), epoch=3)
    scene.peer(NODES[1]).put(oid, blob(b"theirs"), written=3)
    await scene.epoch(4)
    await scene.reported(4)
    assert not scene.peer(NODES[1]).seen(Opcode.READ)
    assert scene.store.read(oid, 0, 400) == blob(b"mine")


async def test_an_object_held_here_older_than_a_peers_copy_is_replaced(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    scene.store.write(oid, 0, blob(b"stale") + blob(b"tail"), epoch=2)
    scene.peer(NODES[1]).put(oid, blob(b"fresh"), written=3)
    await scene.epoch(4)
    await scene.reported(4)
    # the fetched copy replaces the old one whole: nothing of it survives past the new data
    assert scene.store.read(oid, 0, 1000) == blob(b"fresh").ljust(1000, b"\0")
    assert scene.versions()[oid] == 3


async def test_recovery_reports_the_epoch_finished_once_every_fetch_is_in(
        scene: Scene) -> None:
    oids = scene.oids(here=True, count=6)
    for oid in oids:
        scene.peer(NODES[1]).put(oid, blob(b"d"), written=1)
    await scene.epoch(2)
    await scene.reported(2)
    assert set(scene.store.list_oids()) == set(oids)
    assert scene.etcd.recovered[2] == {ME.node_id}
    assert (scene.recovery.status.done, scene.recovery.status.total) == (6, 6)


# -- the guard on client I/O ------------------------------------------------------------------


async def test_a_read_of_an_object_being_fetched_waits_for_the_fetch(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    source = scene.peer(NODES[1])
    source.put(oid, blob(b"r"), written=1)
    source.hold(Opcode.READ)  # the listing is answered, the fetch's read hangs
    await scene.epoch(2)
    await scene.clock.run_until(lambda: bool(source.seen(Opcode.READ)))
    wait = scene.recovery.guard(oid, Opcode.READ, False)
    assert wait is not None
    await settle()
    assert not wait.done()
    source.release()
    await scene.clock.run_until(wait.done)
    assert scene.store.read(oid, 0, 100) == blob(b"r")


async def test_a_client_op_on_a_pending_object_starts_its_fetch_at_once(tmp_path: Path) -> None:
    scene = Scene(tmp_path, parallel=1)
    try:
        first, *rest = scene.oids(here=True, count=4)
        source = scene.peer(NODES[1])
        for oid in (first, *rest):
            source.put(oid, blob(b"q"), written=1)
        source.hold(Opcode.READ)  # the one worker's first fetch hangs
        await scene.epoch(2)
        await scene.clock.run_until(lambda: bool(source.seen(Opcode.READ)))
        busy = source.seen(Opcode.READ)[0].oid
        last = next(oid for oid in (first, *rest) if oid != busy)
        wait = scene.recovery.guard(last, Opcode.WRITE, False)
        assert wait is not None
        await settle()
        assert source.seen(Opcode.READ, last)  # jumped the queue
        source.release()
        await scene.clock.run_until(wait.done)
        assert scene.store.exists(last)
    finally:
        await scene.recovery.close()
        scene.store.close()


async def test_an_op_during_listing_waits_for_the_plan(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    source = scene.peer(NODES[1])
    source.put(oid, blob(b"p"), written=1)
    source.hold()  # the listing hangs
    await scene.epoch(2)
    await settle()
    wait = scene.recovery.guard(oid, Opcode.READ, False)
    assert wait is not None
    source.release()  # the listing answers; the read then waits for the fetch
    await scene.clock.run_until(wait.done)
    assert scene.store.read(oid, 0, 100) == blob(b"p")


async def test_a_fresh_write_needs_no_fetch(tmp_path: Path) -> None:
    scene = Scene(tmp_path, parallel=1)
    try:
        oids = scene.oids(here=True, count=2)
        source = scene.peer(NODES[1])
        for oid in oids:
            source.put(oid, blob(b"f"), written=1)
        source.hold(Opcode.READ)  # the one worker fetches one object; the other waits
        await scene.epoch(2)
        await scene.clock.run_until(lambda: bool(source.seen(Opcode.READ)))
        [waiting] = [oid for oid in oids if not source.seen(Opcode.READ, oid)]
        assert scene.recovery.guard(waiting, Opcode.CREATE, True) is None
        source.release()
        await scene.reported(2)
        assert not source.seen(Opcode.READ, waiting)
    finally:
        await scene.recovery.close()
        scene.store.close()


async def test_a_fresh_write_during_listing_is_not_overwritten_by_an_older_copy(
        scene: Scene) -> None:
    """A write that replaces the object passes the guard even while the plan is being
    made; a copy some member listed meanwhile, older than it, must not be fetched over it
    (the retry, in a new epoch, of a first write that reached only some old replicas)."""
    [oid] = scene.oids(here=True)
    stale = scene.peer(NODES[1])
    stale.put(oid, blob(b"old"), written=1)
    stale.hold(Opcode.LIST_EPOCHS)
    await scene.epoch(2)
    await settle()
    assert scene.recovery.guard(oid, Opcode.CREATE, True) is None
    scene.store.write(oid, 0, blob(b"new"), epoch=2, fresh=True)  # the service's CREATE
    stale.release()
    await scene.reported(2)
    assert scene.store.read(oid, 0, 300) == blob(b"new")
    assert not stale.seen(Opcode.READ)


async def test_an_object_removed_during_listing_is_not_fetched_back(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    scene.store.write(oid, 0, blob(b"del"), epoch=1)
    other = scene.peer(NODES[1])
    other.put(oid, blob(b"del"), written=1)
    other.hold(Opcode.LIST_EPOCHS)
    await scene.epoch(2)
    await settle()
    scene.store.remove(oid)  # the service's REMOVE (which the guard lets through)
    other.release()
    await scene.reported(2)
    assert not scene.store.exists(oid)
    assert not other.seen(Opcode.READ)


async def test_ops_that_change_no_data_pass_the_guard(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    scene.peer(NODES[1]).put(oid, blob(b"e"), written=1)
    scene.peer(NODES[1]).hold()  # recovery is listing
    await scene.epoch(2)
    for opcode in (Opcode.EXISTS, Opcode.REMOVE, Opcode.LIST, Opcode.FLUSH):
        assert scene.recovery.guard(oid, opcode, False) is None


async def test_nothing_waits_once_the_epochs_recovery_is_over(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    await scene.epoch(2)
    await scene.reported(2)
    assert scene.recovery.guard(oid, Opcode.READ, False) is None


# -- dropping what is no longer placed here ----------------------------------------------------


async def test_unowned_copies_stay_until_every_member_finished(scene: Scene) -> None:
    [gone] = scene.oids(here=False)
    scene.store.write(gone, 0, blob(b"u"), epoch=1)
    await scene.epoch(2)
    await scene.reported(2)
    for node in MEMBERS[:-1]:  # all but one member finished
        await scene.etcd.mark_recovered(2, node.node_id)
    await scene.clock.advance(600.0)  # many polls later
    assert scene.store.exists(gone)
    assert scene.recovery.status.state == "waiting"
    await scene.etcd.mark_recovered(2, MEMBERS[-1].node_id)
    await scene.until("done")
    assert not scene.store.exists(gone)


async def test_owned_copies_are_kept_when_unowned_ones_are_dropped(scene: Scene) -> None:
    [kept] = scene.oids(here=True)
    [gone] = scene.oids(here=False)
    for oid in (kept, gone):
        scene.store.write(oid, 0, blob(b"k"), epoch=1)
    await scene.epoch(2)
    await scene.all_finished(2)
    await scene.until("done")
    assert scene.store.list_oids() == [kept]


async def test_an_epoch_that_moves_on_before_all_finished_drops_nothing(scene: Scene) -> None:
    later = (*MEMBERS, NODES[4])  # a node joins
    [gone] = scene.oids(here=False, members=later)
    scene.store.write(gone, 0, blob(b"m"), epoch=1)
    await scene.epoch(2)
    await scene.reported(2)
    await scene.view.update(None, EpochRecord(3, 0.0, later))
    await scene.all_finished(2)  # the old epoch completes only now: too late to count
    await scene.clock.run_until(lambda: scene.etcd.recovered[3] == {ME.node_id})
    await scene.clock.advance(60.0)
    assert scene.store.exists(gone)
    assert scene.recovery.status.epoch == 3


async def test_a_node_outside_the_epoch_neither_recovers_nor_drops(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    scene.store.write(oid, 0, blob(b"o"), epoch=1)
    scene.peer(NODES[1]).put(scene.oids(here=True, after=2000)[0], blob(b"x"), written=1)
    await scene.epoch(2, MEMBERS[1:])
    await scene.all_finished(2, MEMBERS[1:])
    await scene.clock.advance(60.0)
    assert scene.recovery.status.state == "idle"
    assert scene.store.list_oids() == [oid]
    assert not scene.peer(NODES[1]).requests
    assert ME.node_id not in scene.etcd.recovered[2]


# -- epoch changes and failures ----------------------------------------------------------------


async def test_an_epoch_change_during_recovery_restarts_against_the_new_ring(
        scene: Scene) -> None:
    smaller = MEMBERS[:3]  # NODES[3] leaves
    source = scene.peer(NODES[1])
    newly = next(oid for oid in scene.oids(here=True, count=500, members=smaller)
                 if oid not in scene.oids(here=True, count=2000))
    source.put(newly, blob(b"n"), written=1)
    source.hold()  # epoch 2's listing hangs
    await scene.epoch(2)
    await settle()
    await scene.view.update(None, EpochRecord(3, 0.0, smaller))
    source.release()
    await scene.reported(3)
    assert scene.recovery.status.epoch == 3
    assert scene.store.read(newly, 0, 100) == blob(b"n")
    assert not scene.etcd.recovered[2]  # never reported


async def test_a_member_that_cannot_list_is_asked_again_a_second_later(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    source = scene.peer(NODES[1])
    source.put(oid, blob(b"l"), written=1)
    source.fail_next(Opcode.LIST_EPOCHS, Result.IO_ERROR, times=3)
    await scene.epoch(2)
    await scene.reported(2)
    assert len(source.seen(Opcode.LIST_EPOCHS)) == 4
    assert scene.clock.slept.count(1.0) == 3
    assert scene.store.exists(oid)


async def test_a_source_that_fails_gives_way_to_another_with_the_same_copy(
        scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    bad, good = scene.peer(NODES[1]), scene.peer(NODES[2])
    bad.put(oid, blob(b"s"), written=2)
    good.put(oid, blob(b"s"), written=2)
    bad.fail_next(Opcode.READ, Result.IO_ERROR)  # the sources are tried in member order
    await scene.epoch(3)
    await scene.reported(3)
    assert scene.store.read(oid, 0, 100) == blob(b"s")
    assert (len(bad.seen(Opcode.READ)), len(good.seen(Opcode.READ))) == (1, 1)


def full(seed: int) -> bytes:
    """A whole object of distinct blocks."""
    return bytes((seed + i) % 251 for i in range(SIZE))


async def test_a_block_bad_on_one_source_is_taken_from_another_where_it_verifies(
        scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    one, two = scene.peer(NODES[1]), scene.peer(NODES[2])
    for peer in (one, two):
        peer.put(oid, full(5), written=1)
    one.rotten[oid] = {1}
    two.rotten[oid] = {2}
    await scene.epoch(2)
    await scene.reported(2)
    assert scene.store.read(oid, 0, SIZE) == full(5)
    assert scene.recovery.status.lost == 0


async def _recover_with_block_3_rotten(scene: Scene, oid: int) -> FakePeer:
    """Epoch 2 makes this node recover `oid` from its one source, whose block 3 is rot;
    back once recovery is left verifying it. The source, to heal or leave."""
    source = scene.peer(NODES[1])
    source.put(oid, full(7), written=1)
    source.rotten[oid] = {3}
    await scene.epoch(2)
    await scene.clock.run_until(lambda: scene.recovery.status.state.startswith("verifying"))
    return source


async def test_a_block_that_verifies_on_no_source_is_installed_unreadable(
        scene: Scene) -> None:
    """Never wrong bytes: what verifies nowhere is an error to read, not data, and the
    blocks around it that verify are kept."""
    [oid] = scene.oids(here=True)
    await _recover_with_block_3_rotten(scene, oid)
    with pytest.raises(Corrupt):
        scene.store.read(oid, 3 * SUM_BLOCK, 1)
    assert scene.store.read(oid, 0, 3 * SUM_BLOCK) == full(7)[: 3 * SUM_BLOCK]
    assert scene.store.read(oid, 4 * SUM_BLOCK, SIZE - 4 * SUM_BLOCK) == full(7)[4 * SUM_BLOCK :]
    assert scene.recovery.status.lost == 1


async def test_the_epoch_is_not_reported_while_a_block_verifies_nowhere(scene: Scene) -> None:
    """Once reported, the sources would drop their copies: the block's only chance to
    come back good (a torn write its node accepts) would go with them."""
    [oid] = scene.oids(here=True)
    await _recover_with_block_3_rotten(scene, oid)
    await scene.clock.advance(10 * UNVERIFIED_RETRY)
    assert ME.node_id not in scene.etcd.recovered[2]


async def test_the_epoch_is_reported_once_a_source_has_the_block_good_again(
        scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    source = await _recover_with_block_3_rotten(scene, oid)
    source.rotten[oid] = set()  # its node accepted a torn write, or repaired it
    await scene.reported(2)
    assert scene.store.read(oid, 0, SIZE) == full(7)


async def test_an_object_no_longer_placed_here_holds_back_no_later_epoch(
        scene: Scene) -> None:
    wider = (*MEMBERS, NODES[4])
    elsewhere = set(scene.oids(here=False, count=2000, members=wider))
    oid = next(o for o in scene.oids(here=True, count=50) if o in elsewhere)
    await _recover_with_block_3_rotten(scene, oid)
    await scene.epoch(3, wider)
    await scene.reported(3)


async def test_a_block_a_client_rewrote_is_not_fetched_over(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    await _recover_with_block_3_rotten(scene, oid)
    scene.store.write(oid, 3 * SUM_BLOCK, b"\x99" * SUM_BLOCK, epoch=2)  # heals it
    await scene.reported(2)
    assert scene.store.read(oid, 3 * SUM_BLOCK, SUM_BLOCK) == b"\x99" * SUM_BLOCK


async def test_a_fetch_client_io_started_that_fails_is_done_again_before_the_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scene = Scene(tmp_path, parallel=1)
    try:
        oids = scene.oids(here=True, count=2)
        source = scene.peer(NODES[1])
        for oid in oids:
            source.put(oid, blob(b"k"), written=1)
        source.hold(Opcode.READ)
        await scene.epoch(2)
        await scene.clock.run_until(lambda: bool(source.seen(Opcode.READ)))
        [urgent] = [oid for oid in oids if not source.seen(Opcode.READ, oid)]
        real_write, failed = scene.store.write, []

        def write_failing_once(oid: int, *args, **kwargs) -> None:
            if oid == urgent and not failed:
                failed.append(oid)
                raise StoreIOError("injected")
            real_write(oid, *args, **kwargs)

        monkeypatch.setattr(scene.store, "write", write_failing_once)
        assert scene.recovery.guard(urgent, Opcode.READ, False) is not None
        source.release()
        await scene.reported(2)
        assert failed == [urgent]
        assert scene.store.read(urgent, 0, 100) == blob(b"k")
    finally:
        await scene.recovery.close()
        scene.store.close()


async def test_a_fetch_that_fails_on_every_source_is_retried_not_skipped(
        scene: Scene) -> None:
    """The epoch is not reported finished while an object placed here is missing: once it
    is, the other members drop their copies, which may be the only ones."""
    [oid] = scene.oids(here=True)
    source = scene.peer(NODES[1])
    source.put(oid, blob(b"t"), written=1)
    source.fail_next(Opcode.READ, Result.IO_ERROR, times=2)
    await scene.epoch(2)
    await scene.clock.run_until(lambda: ME.node_id in scene.etcd.recovered[2])
    assert scene.store.read(oid, 0, 100) == blob(b"t")
    assert len(source.seen(Opcode.READ)) == 3


async def test_an_object_no_source_has_any_more_is_given_up(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    source = scene.peer(NODES[1])
    source.put(oid, blob(b"v"), written=1)
    source.fail_next(Opcode.READ, Result.NO_OBJECT)  # removed since it was listed
    await scene.epoch(2)
    await scene.reported(2)
    assert not scene.store.exists(oid)
    assert scene.etcd.recovered[2] == {ME.node_id}


# -- pacing ----------------------------------------------------------------------------------


async def test_the_throttle_spaces_fetches_by_their_size_over_the_rate(tmp_path: Path) -> None:
    scene = Scene(tmp_path, parallel=1)
    try:
        oids = scene.oids(here=True, count=5)
        source = scene.peer(NODES[1])
        for oid in oids:
            source.put(oid, blob(b"z"), written=1)
        scene.recovery.throttle = SIZE // 2  # one object per two seconds
        await scene.epoch(2)
        await scene.reported(2)
        times = source.times(Opcode.READ)
        assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [2.0] * 4
    finally:
        await scene.recovery.close()
        scene.store.close()


async def test_a_fetch_a_client_waits_for_is_not_held_back_by_the_throttle(
        tmp_path: Path) -> None:
    scene = Scene(tmp_path, parallel=1)
    try:
        oids = scene.oids(here=True, count=3)
        source = scene.peer(NODES[1])
        for oid in oids:
            source.put(oid, blob(b"h"), written=1)
        scene.recovery.throttle = SIZE // 100  # 100 s per object
        await scene.epoch(2)
        await scene.clock.run_until(lambda: scene.recovery.status.done == 1)
        await scene.clock.advance(1.0)  # the worker waits out its budget
        [urgent, _] = [oid for oid in oids if not source.seen(Opcode.READ, oid)]
        asked = scene.clock.now
        wait = scene.recovery.guard(urgent, Opcode.READ, False)
        assert wait is not None
        await settle()
        assert source.times(Opcode.READ, urgent) == [asked]  # read at once
        await scene.clock.run_until(wait.done)  # and installed (its mark syncs in a thread)
    finally:
        await scene.recovery.close()
        scene.store.close()


async def test_without_a_throttle_fetches_take_no_time(scene: Scene) -> None:
    for oid in scene.oids(here=True, count=5):
        scene.peer(NODES[1]).put(oid, blob(b"w"), written=1)
    start = scene.clock.now
    await scene.epoch(2)
    await scene.reported(2)
    assert scene.clock.now == start
    assert scene.recovery.status.done == 5


async def test_recovery_pauses_below_the_free_space_floor_and_resumes(scene: Scene) -> None:
    [oid] = scene.oids(here=True)
    scene.peer(NODES[1]).put(oid, blob(b"y"), written=1)
    scene.recovery.min_free = 1 << 62
    await scene.epoch(2)
    await scene.clock.run_until(lambda: scene.recovery.status.state.startswith("paused"))
    assert not scene.store.exists(oid)
    scene.recovery.min_free = 0
    await scene.reported(2)
    assert scene.store.exists(oid)
