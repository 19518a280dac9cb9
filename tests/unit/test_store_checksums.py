"""Per-block checksums of the ObjectStore, on real files: rot is caught, crashes are not
mistaken for data loss, every write and discard keeps the sums true."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from sheep.errors import Corrupt, StoreIOError
from sheep.oid import data_oid, oid_str
from sheep.store import ObjectStore
from sheep.store.checksum import SUM_BLOCK

from ..fakes.clock import FakeClock
from ..fakes.faults import fail_fdatasync_once

OBJECT = 256 * 1024
OID = data_oid(7, 3)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    s = ObjectStore(tmp_path, object_size=OBJECT)
    yield s
    s.close()


def flip(root: Path, oid: int, offset: int) -> None:
    """Rot one byte of the object's file behind the store's back."""
    with open(root / "obj" / oid_str(oid), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_flipped_byte_makes_a_read_of_its_block_raise_corrupt(store: ObjectStore,
                                                               tmp_path: Path) -> None:
    store.write(OID, 0, os.urandom(OBJECT))
    flip(tmp_path, OID, 5 * SUM_BLOCK + 100)
    with pytest.raises(Corrupt) as caught:
        store.read(OID, 5 * SUM_BLOCK + 7, 10)
    assert caught.value.blocks == [5]


def test_flipped_byte_leaves_other_blocks_readable(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(OBJECT)
    store.write(OID, 0, data)
    flip(tmp_path, OID, 5 * SUM_BLOCK)
    assert store.read(OID, 0, 5 * SUM_BLOCK) == data[: 5 * SUM_BLOCK]
    assert store.read(OID, 6 * SUM_BLOCK, SUM_BLOCK) == data[6 * SUM_BLOCK : 7 * SUM_BLOCK]


def test_unverified_read_returns_the_rotten_bytes(store: ObjectStore, tmp_path: Path) -> None:
    store.write(OID, 0, b"\x11" * SUM_BLOCK)
    flip(tmp_path, OID, 0)
    assert store.read(OID, 0, 1, verify=False) == b"\xee"


def test_check_object_lists_every_bad_block(store: ObjectStore, tmp_path: Path) -> None:
    store.write(OID, 0, os.urandom(OBJECT))
    for block in (0, 9, 63):
        flip(tmp_path, OID, block * SUM_BLOCK + 1)
    assert store.check_object(OID) == [0, 9, 63]


def test_rot_is_never_accepted(store: ObjectStore, tmp_path: Path) -> None:
    """A block that rots while the store runs was not torn by any crash: its data is
    never re-stamped, and it stays unreadable until rewritten from a good copy."""
    store.write(OID, 0, b"\x22" * 2 * SUM_BLOCK)
    flip(tmp_path, OID, SUM_BLOCK)
    assert store.accept_torn(OID, [1]) == []
    with pytest.raises(Corrupt):
        store.read(OID, SUM_BLOCK, 1)
    assert store.check_object(OID) == [1]
    store.write(OID, SUM_BLOCK, b"\x33" * SUM_BLOCK)  # a repair's whole-block write
    assert store.read(OID, SUM_BLOCK, 1) == b"\x33"


def test_unaligned_writes_and_discards_keep_every_sum_true(store: ObjectStore) -> None:
    rnd = random.Random(3)
    model = bytearray(OBJECT)
    for _ in range(300):
        offset = rnd.randrange(OBJECT)
        length = rnd.randint(1, min(3 * SUM_BLOCK, OBJECT - offset))
        if rnd.random() < 0.75:
            data = rnd.randbytes(length)
            store.write(OID, offset, data)
            model[offset : offset + length] = data
        else:
            store.discard(OID, offset, length)
            model[offset : offset + length] = bytes(length)
    assert store.check_object(OID) == []
    assert store.read(OID, 0, OBJECT) == model


def test_write_reaching_the_end_of_the_object_sums_its_last_block(store: ObjectStore) -> None:
    store.write(OID, OBJECT - 10, b"x" * 10)
    store.write(OID, OBJECT - 3 * SUM_BLOCK, b"y" * 3 * SUM_BLOCK)
    assert store.check_object(OID) == []


def test_never_written_blocks_verify_as_zeros(store: ObjectStore) -> None:
    store.write(OID, 10 * SUM_BLOCK, b"z")
    assert store.read(OID, 0, OBJECT)[: 10 * SUM_BLOCK] == bytes(10 * SUM_BLOCK)


def crash(root: Path, store: ObjectStore) -> Path:
    """What a kill -9 of the store leaves on disk: its directory as it is now, with no
    close (so no final commit, and its write-intent marks left in place)."""
    copy = root.parent / (root.name + "-crashed")
    shutil.copytree(root, copy)
    return copy


def test_data_written_without_its_sum_is_caught_then_accepted(store: ObjectStore,
                                                              tmp_path: Path) -> None:
    """A crash between the data and the sum write (new data, old sum): the block is a
    torn write, suspect but not lost, and no replica having it good, it is accepted."""
    store.write(OID, 0, b"old!" * 1024)
    with open(tmp_path / "obj" / oid_str(OID), "r+b") as f:
        f.write(b"new!" * 1024)
    with ObjectStore(crash(tmp_path, store), object_size=OBJECT) as after:
        assert after.torn_blocks(OID) == {0}
        with pytest.raises(Corrupt):
            after.read(OID, 0, 4)
        assert after.accept_torn(OID, [0]) == [0]
        assert after.read(OID, 0, 4) == b"new!"
        assert after.torn_blocks(OID) == set()


def test_a_crash_tears_only_what_it_cut(store: ObjectStore, tmp_path: Path) -> None:
    """After a crash, only the blocks that failed on open count as torn: rot found
    later in the same object is still rot."""
    store.write(OID, 0, b"old!" * 2048)
    with open(tmp_path / "obj" / oid_str(OID), "r+b") as f:
        f.write(b"new!" * 1024)
    with ObjectStore(crash(tmp_path, store), object_size=OBJECT) as after:
        flip(after.root, OID, SUM_BLOCK)
        assert after.check_object(OID) == [0, 1]
        assert after.accept_torn(OID, [0, 1]) == [0]
        with pytest.raises(Corrupt):
            after.read(OID, SUM_BLOCK, 4)


def test_rot_in_an_object_synced_before_the_crash_is_rot(tmp_path: Path) -> None:
    """An object synced and idle is unmarked: after a crash its mismatches are rot."""
    s = ObjectStore(tmp_path, object_size=OBJECT, intent_idle=0)
    try:
        s.write(OID, 0, b"old!" * 1024)
        asyncio.run(s.flush())
        assert asyncio.run(s.tidy_intents()) == 1
        assert not (tmp_path / "intent" / oid_str(OID)).exists()
        flip(tmp_path, OID, 0)
        with ObjectStore(crash(tmp_path, s), object_size=OBJECT) as after:
            assert after.torn_blocks(OID) == set()
            assert after.accept_torn(OID, [0]) == []
            with pytest.raises(Corrupt):
                after.read(OID, 0, 4)
    finally:
        s.close()


def test_first_write_marks_the_object_durably_before_its_data(store: ObjectStore,
                                                              tmp_path: Path,
                                                              monkeypatch) -> None:
    order: list[str] = []
    real_fsync, real_pwrite = os.fsync, os.pwrite
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "pwrite",
                        lambda fd, b, off: (order.append("pwrite"), real_pwrite(fd, b, off))[1])
    store.write(OID, 0, b"x" * SUM_BLOCK)
    assert (tmp_path / "intent" / oid_str(OID)).exists()
    assert order[0] == "fsync" and "pwrite" in order
    order.clear()
    store.write(OID, SUM_BLOCK, b"y" * SUM_BLOCK)  # marked already: no sync on the way
    assert "fsync" not in order


def test_clean_close_leaves_no_marks(tmp_path: Path) -> None:
    with ObjectStore(tmp_path, object_size=OBJECT) as s:
        s.write(OID, 0, b"q" * 10)
        assert list((tmp_path / "intent").iterdir()) != []
    assert list((tmp_path / "intent").iterdir()) == []


def test_failed_fdatasync_makes_the_object_untrusted(store: ObjectStore,
                                                     monkeypatch) -> None:
    """After a failed fdatasync the page cache no longer holds what was written: the
    flush fails, and no block of the object verifies (reads raise Corrupt, so the node
    repairs them from other replicas), even after a later sync succeeds."""
    store.write(OID, 0, b"a" * 3 * SUM_BLOCK)
    fail_fdatasync_once(monkeypatch)
    with pytest.raises(StoreIOError):
        asyncio.run(store.flush())
    asyncio.run(store.flush())  # the retry "succeeds": the data is still not trusted
    with pytest.raises(Corrupt) as caught:
        store.read(OID, 0, 3 * SUM_BLOCK)
    assert caught.value.blocks == [0, 1, 2]
    assert store.accept_torn(OID, [0, 1, 2]) == []  # never accepted either
    assert store.read(OID, 3 * SUM_BLOCK, 10) == bytes(10)  # never written: still zeros
    store.write(OID, 0, b"b" * SUM_BLOCK)  # a repair rewrites a block whole: it verifies
    assert store.read(OID, 0, 4) == b"bbbb"
    with pytest.raises(Corrupt):
        store.read(OID, SUM_BLOCK, 4)


def test_untrusted_object_stays_untrusted_after_a_crash(store: ObjectStore, tmp_path: Path,
                                                        monkeypatch) -> None:
    store.write(OID, 0, b"a" * SUM_BLOCK)
    fail_fdatasync_once(monkeypatch)
    with pytest.raises(StoreIOError):
        asyncio.run(store.flush())
    with ObjectStore(crash(tmp_path, store), object_size=OBJECT) as after:
        assert after.torn_blocks(OID) == set()  # invalidated is not torn
        with pytest.raises(Corrupt):
            after.read(OID, 0, 4)


def test_fresh_write_forgets_the_old_sums(store: ObjectStore) -> None:
    store.write(OID, 0, os.urandom(OBJECT))
    store.write(OID, 100, b"abc", fresh=True)
    assert store.read(OID, 0, OBJECT) == bytes(100) + b"abc" + bytes(OBJECT - 103)


def test_object_without_a_sum_file_gets_sums_of_its_data(tmp_path: Path) -> None:
    with ObjectStore(tmp_path, object_size=OBJECT) as s:
        s.write(OID, 0, b"q" * 10000)
    os.unlink(tmp_path / "sum" / oid_str(OID))
    with ObjectStore(tmp_path, object_size=OBJECT) as s:
        assert s.read(OID, 0, 10000) == b"q" * 10000
        assert s.check_object(OID) == []
    assert (tmp_path / "sum" / oid_str(OID)).exists()


def test_sum_file_without_its_object_is_removed_on_open(tmp_path: Path) -> None:
    with ObjectStore(tmp_path, object_size=OBJECT) as s:
        s.write(OID, 0, b"q")
    os.unlink(tmp_path / "obj" / oid_str(OID))
    (tmp_path / "sum" / (oid_str(OID) + ".new")).write_bytes(b"half")
    ObjectStore(tmp_path, object_size=OBJECT).close()
    assert list((tmp_path / "sum").iterdir()) == []


def test_remove_deletes_the_sum_file(store: ObjectStore, tmp_path: Path) -> None:
    store.write(OID, 0, b"q")
    store.remove(OID)
    assert not (tmp_path / "sum" / oid_str(OID)).exists()


async def test_flush_makes_sums_durable_with_the_data(tmp_path: Path) -> None:
    s = ObjectStore(tmp_path, object_size=OBJECT)
    s.write(OID, 0, b"d" * OBJECT)
    await s.flush()
    s.close()
    with ObjectStore(tmp_path, object_size=OBJECT) as again:
        assert again.check_object(OID) == []


def test_partial_write_into_a_rotten_block_is_refused_and_changes_nothing(
        store: ObjectStore, tmp_path: Path) -> None:
    store.write(OID, 0, b"\x33" * SUM_BLOCK)
    flip(tmp_path, OID, 0)
    with pytest.raises(Corrupt):
        store.write(OID, 100, b"new")
    assert store.read(OID, 100, 3, verify=False) == b"\x33" * 3


def test_whole_block_write_over_a_rotten_block_heals_it(store: ObjectStore,
                                                        tmp_path: Path) -> None:
    store.write(OID, 0, b"\x33" * SUM_BLOCK)
    flip(tmp_path, OID, 0)
    store.write(OID, 0, b"\x44" * SUM_BLOCK)
    assert store.check_object(OID) == []


def test_scanning_an_object_gives_its_bad_blocks_and_its_digest(store: ObjectStore,
                                                                tmp_path: Path) -> None:
    store.write(OID, 0, os.urandom(OBJECT))
    flip(tmp_path, OID, 3 * SUM_BLOCK)
    bad, digest = store.scan_object(OID)
    assert bad == [3]
    assert digest == xxhash.xxh3_64_intdigest(store.read(OID, 0, OBJECT, verify=False))


# -- write-intent marks: batched, and cleared by the store itself ------------------------------


async def test_marks_asked_for_together_cost_one_directory_sync_off_the_loop(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced_in: list[threading.Thread] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced_in.append(threading.current_thread()),
                                                 real_fsync(fd))[1])
    oids = [data_oid(7, i) for i in range(20)]
    await asyncio.gather(*{store.intend(oid) for oid in oids})
    assert store.mark_syncs == 1
    assert len(synced_in) == 1 and synced_in[0] is not threading.current_thread()
    assert sorted(p.name for p in (tmp_path / "intent").iterdir()) == sorted(map(oid_str, oids))
    assert all(store.intend(oid) is None for oid in oids)


async def test_marks_are_made_when_no_descriptor_is_left(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the descriptor limit the store closes cached objects to go on, but only on the
    loop's thread: the marking thread must not need a descriptor of its own."""
    real_open = os.open

    def out_of_descriptors(path, *args, **kwargs):
        if "intent" in str(path) and not str(path).endswith("intent"):
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", out_of_descriptors)
    await store.intend(data_oid(7, 1))
    assert [p.name for p in (tmp_path / "intent").iterdir()] == [oid_str(data_oid(7, 1))]


async def test_marks_asked_for_while_a_batch_syncs_share_the_next_sync(
        store: ObjectStore) -> None:
    first = store.intend(data_oid(7, 1))
    await asyncio.sleep(0)  # the first batch is under way
    later = {store.intend(data_oid(7, i)) for i in range(2, 12)}
    assert first not in later
    await asyncio.gather(first, *later)
    assert store.mark_syncs == 2


def idle_store(root: Path, clock: FakeClock) -> ObjectStore:
    return ObjectStore(root, object_size=OBJECT, intent_idle=10.0, clock=clock)


async def test_an_object_nobody_flushes_is_synced_and_unmarked_once_idle(
        tmp_path: Path) -> None:
    clock = FakeClock()
    s = idle_store(tmp_path, clock)
    upkeep = asyncio.ensure_future(s.run_upkeep())
    try:
        s.write(OID, 0, b"w" * SUM_BLOCK)
        await clock.run_until(lambda: not (tmp_path / "intent" / oid_str(OID)).exists(),
                              limit=30.0)
        assert s.commits == 1  # synced before it was unmarked
        assert clock.now - 1000.0 >= 10.0
    finally:
        upkeep.cancel()
        s.close()


async def test_an_object_written_within_the_idle_time_keeps_its_mark(tmp_path: Path) -> None:
    clock = FakeClock()
    s = idle_store(tmp_path, clock)
    upkeep = asyncio.ensure_future(s.run_upkeep())
    try:
        for _ in range(6):
            s.write(OID, 0, b"w" * SUM_BLOCK)
            await clock.advance(6.0)
        assert (tmp_path / "intent" / oid_str(OID)).exists()
    finally:
        upkeep.cancel()
        s.close()


async def test_rot_in_an_object_left_unflushed_and_idle_is_rot_after_a_crash(
        tmp_path: Path) -> None:
    """No client flushed it, yet it was idle: what fails in it after a crash is rot, not
    a torn write to be accepted."""
    clock = FakeClock()
    s = idle_store(tmp_path, clock)
    try:
        s.write(OID, 0, b"old!" * 1024)
        await s.tidy_intents()
        await clock.advance(10.0)
        assert await s.tidy_intents() == 1
        flip(tmp_path, OID, 0)
        with ObjectStore(crash(tmp_path, s), object_size=OBJECT) as after:
            assert after.torn_blocks(OID) == set()
            assert after.accept_torn(OID, [0]) == []
    finally:
        s.close()
