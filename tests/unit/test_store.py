"""ObjectStore and NodeMeta on real files in tmp_path (no mocks)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.errors import InvalidParams, NoObject, OutOfRange
from sheep.oid import data_oid, oid_str
from sheep.store import NodeMeta, ObjectStore

MiB = 1 << 20
OID = data_oid(7, 3)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    s = ObjectStore(tmp_path)
    yield s
    s.close()


def obj_path(root: Path, oid: int) -> Path:
    return root / "obj" / oid_str(oid)


# -- data path ------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 4096, 12345, (4 << 20) - 10])
def test_write_then_read_round_trips_at_offset(store: ObjectStore, offset: int) -> None:
    data = bytes(range(10)) * 1
    store.write(OID, offset, data)
    assert store.read(OID, offset, len(data)) == data


def test_write_accepts_memoryview(store: ObjectStore) -> None:
    buf = bytearray(b"abcdefgh" * 512)
    store.write(OID, 100, memoryview(buf)[8:])
    assert store.read(OID, 100, len(buf) - 8) == bytes(buf[8:])


def test_read_of_unwritten_ranges_of_existing_object_returns_zeros(store: ObjectStore) -> None:
    store.write(OID, 8192, b"x" * 10)
    assert store.read(OID, 0, 8192) == bytes(8192)  # hole before the data
    assert store.read(OID, 8190, 14) == b"\0\0" + b"x" * 10 + b"\0\0"  # past EOF
    assert store.read(OID, MiB, 4096) == bytes(4096)  # far past EOF


def test_readinto_fills_buffer_and_zero_fills_past_eof(store: ObjectStore) -> None:
    store.write(OID, 0, b"hello")
    buf = bytearray(b"\xff" * 16)
    store.readinto(OID, 0, memoryview(buf))
    assert bytes(buf) == b"hello" + bytes(11)


def test_read_of_missing_object_raises_no_object(store: ObjectStore) -> None:
    with pytest.raises(NoObject):
        store.read(OID, 0, 4096)
    with pytest.raises(NoObject):
        store.readinto(OID, 0, memoryview(bytearray(16)))
    assert not store.exists(OID)


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (4 << 20, 1), ((4 << 20) - 1, 2)])
def test_write_outside_object_raises_out_of_range(
    store: ObjectStore, offset: int, length: int
) -> None:
    with pytest.raises(OutOfRange):
        store.write(OID, offset, b"x" * length)
    assert not store.exists(OID)


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (4 << 20, 1), ((4 << 20) - 1, 2)])
def test_read_outside_object_raises_out_of_range(
    store: ObjectStore, offset: int, length: int
) -> None:
    store.write(OID, 0, b"x")
    with pytest.raises(OutOfRange):
        store.read(OID, offset, length)


def test_read_with_negative_length_raises_invalid_params(store: ObjectStore) -> None:
    store.write(OID, 0, b"x")
    with pytest.raises(InvalidParams):
        store.read(OID, 0, -1)


def test_discard_punches_hole_that_reads_back_as_zeros(store: ObjectStore, tmp_path: Path) -> None:
    store.write(OID, 0, b"\xab" * (2 * MiB))
    before = obj_path(tmp_path, OID).stat().st_blocks
    store.discard(OID, MiB // 2, MiB)
    after = obj_path(tmp_path, OID).stat()
    assert after.st_blocks <= before - MiB // 512
    assert after.st_size == 2 * MiB  # the hole keeps the size
    assert store.read(OID, MiB // 2, MiB) == bytes(MiB)
    assert store.read(OID, 0, MiB // 2) == b"\xab" * (MiB // 2)
    assert store.read(OID, 3 * MiB // 2, MiB // 2) == b"\xab" * (MiB // 2)


def test_discard_of_whole_object_removes_it(store: ObjectStore, tmp_path: Path) -> None:
    store.write(OID, 0, b"x" * 4096)
    store.discard(OID, 0, store.object_size)
    assert not store.exists(OID)
    assert not obj_path(tmp_path, OID).exists()
    assert OID not in store.list_oids()


def test_discard_of_missing_object_is_a_no_op(store: ObjectStore) -> None:
    store.discard(OID, 0, 4096)
    store.discard(OID, 0, store.object_size)
    assert not store.exists(OID)


def test_remove_deletes_object_and_its_index_entry(store: ObjectStore) -> None:
    store.write(OID, 0, b"x")
    store.remove(OID)
    assert not store.exists(OID)
    with pytest.raises(NoObject):
        store.read(OID, 0, 1)
    assert store.list_oids() == []


async def test_remove_of_committed_object_drops_index_entry_at_next_flush(
    store: ObjectStore,
) -> None:
    store.write(OID, 0, b"x")
    await store.flush()
    store.remove(OID)
    await store.flush()
    assert store.meta.object_info(OID) is None


def test_remove_of_missing_object_raises_no_object(store: ObjectStore) -> None:
    with pytest.raises(NoObject):
        store.remove(OID)


def test_rewrite_after_remove_recreates_object_with_zeros(store: ObjectStore) -> None:
    store.write(OID, 0, b"old data")
    store.remove(OID)
    store.write(OID, 4, b"new")
    assert store.read(OID, 0, 8) == b"\0\0\0\0new\0"


async def test_list_oids_is_sorted_and_counts_pending_and_committed(store: ObjectStore) -> None:
    oids = [data_oid(9, 1), data_oid(2, 5), data_oid(2, 4)]
    store.write(oids[0], 0, b"a")
    await store.flush()
    store.write(oids[1], 0, b"b")
    store.write(oids[2], 0, b"c")
    store.remove(oids[0])
    assert store.list_oids() == sorted(oids[1:])
    await store.flush()
    assert store.list_oids() == sorted(oids[1:])
    assert store.meta.list_objects() == sorted(oids[1:])


async def test_flush_records_new_object_with_epoch_and_version_1(store: ObjectStore) -> None:
    store.write(OID, 0, b"x", epoch=42)
    assert store.meta.object_info(OID) is None  # not before the commit
    await store.flush()
    assert store.meta.object_info(OID) == (42, 1)


def test_eviction_from_fd_cache_keeps_objects_readable(tmp_path: Path) -> None:
    with ObjectStore(tmp_path, max_open_files=2) as s:
        oids = [data_oid(1, i) for i in range(6)]
        for i, oid in enumerate(oids):
            s.write(oid, 0, bytes([i + 1]) * 100)
        for i, oid in enumerate(oids):
            assert s.read(oid, 0, 100) == bytes([i + 1]) * 100
        assert len(s._fds) <= 2


async def test_flush_syncs_objects_evicted_from_fd_cache(tmp_path: Path) -> None:
    with ObjectStore(tmp_path, max_open_files=1) as s:
        s.write(data_oid(1, 0), 0, b"a")
        s.write(data_oid(1, 1), 0, b"b")  # evicts the first, still dirty
        await s.flush()
        assert not s._dirty
        assert s.meta.list_objects() == [data_oid(1, 0), data_oid(1, 1)]


# -- persistence and reconcile --------------------------------------------------------------


def test_reopen_after_close_keeps_objects_and_index(tmp_path: Path) -> None:
    s = ObjectStore(tmp_path)
    s.write(OID, 100, b"persistent", epoch=3)
    s.write(data_oid(1, 1), 0, b"other")
    s.close()
    s = ObjectStore(tmp_path)
    try:
        assert s.read(OID, 100, 10) == b"persistent"
        assert s.list_oids() == sorted([OID, data_oid(1, 1)])
        assert s.meta.object_info(OID) == (3, 1)
    finally:
        s.close()


def test_reopen_indexes_object_file_missing_from_index(tmp_path: Path) -> None:
    ObjectStore(tmp_path).close()
    obj_path(tmp_path, OID).write_bytes(b"crashed before commit")
    with ObjectStore(tmp_path) as s:
        assert s.meta.object_info(OID) is not None
        assert s.list_oids() == [OID]
        assert s.read(OID, 0, 7) == b"crashed"


def test_reopen_drops_index_entry_without_file(tmp_path: Path) -> None:
    ObjectStore(tmp_path).close()
    meta = NodeMeta(tmp_path)
    meta.record_objects({OID: (1, 1)})
    meta.close()
    with ObjectStore(tmp_path) as s:
        assert s.list_oids() == []
        assert s.meta.object_info(OID) is None


def test_reopen_ignores_foreign_files_in_obj_dir(tmp_path: Path) -> None:
    ObjectStore(tmp_path).close()
    (tmp_path / "obj" / "not-an-object").write_bytes(b"x")
    with ObjectStore(tmp_path) as s:
        assert s.list_oids() == []


# -- group commit ---------------------------------------------------------------------------


async def test_concurrent_flushes_are_group_committed(store: ObjectStore) -> None:
    async def write_and_flush(i: int) -> None:
        store.write(data_oid(5, i), 0, b"x" * 4096)
        await store.flush()

    before = store.commits
    await asyncio.gather(*(write_and_flush(i) for i in range(50)))
    assert store.commits - before < 10
    assert not store._dirty
    assert store.meta.count_objects() == 50


async def test_flush_with_nothing_dirty_does_not_commit(store: ObjectStore) -> None:
    store.write(OID, 0, b"x")
    await store.flush()
    before = store.commits
    await store.flush()
    await store.flush([OID])
    assert store.commits == before


async def test_flush_of_fua_oids_leaves_other_objects_dirty(store: ObjectStore) -> None:
    other = data_oid(1, 1)
    store.write(OID, 0, b"x")
    store.write(other, 0, b"y")
    await store.flush(fua_oids=[OID])
    assert store._dirty == {other}
    assert store.meta.list_objects() == sorted([OID, other])  # the index batch went too


async def test_flush_runs_off_the_event_loop(store: ObjectStore) -> None:
    for i in range(8):
        store.write(data_oid(3, i), 0, b"\x5a" * MiB)
    task = asyncio.create_task(store.flush())
    ticks = 0
    while not task.done():
        await asyncio.sleep(0)
        ticks += 1
    await task
    assert ticks >= 2  # the loop kept running while the commit was in the worker


async def test_close_completes_flushes_in_progress(tmp_path: Path) -> None:
    s = ObjectStore(tmp_path)
    s.write(data_oid(1, 0), 0, b"a")
    running = asyncio.create_task(s.flush())
    await asyncio.sleep(0)  # its commit is now in the worker
    s.write(data_oid(1, 1), 0, b"b")
    queued = asyncio.create_task(s.flush())
    await asyncio.sleep(0)  # waits for the next commit
    s.close()
    await asyncio.wait_for(asyncio.gather(running, queued), 5)
    with NodeMeta(tmp_path) as meta:
        assert meta.list_objects() == [data_oid(1, 0), data_oid(1, 1)]


async def test_flush_after_close_raises(tmp_path: Path) -> None:
    s = ObjectStore(tmp_path)
    s.close()
    with pytest.raises(Exception, match="closed"):
        await s.flush()


# -- usage and object size ------------------------------------------------------------------


def test_usage_rises_on_write_and_falls_on_discard_and_remove(store: ObjectStore) -> None:
    base, free = store.usage()
    assert free > 0
    store.write(OID, 0, b"\x11" * (2 * MiB))
    after_write, _ = store.usage()
    assert after_write >= base + 2 * MiB
    store.discard(OID, 0, MiB)
    after_discard, _ = store.usage()
    assert after_discard <= after_write - MiB
    store.remove(OID)
    assert store.usage()[0] == base


def test_usage_at_open_counts_existing_objects(tmp_path: Path) -> None:
    with ObjectStore(tmp_path) as s:
        s.write(OID, 0, b"\x22" * MiB)
        used = s.usage()[0]
    with ObjectStore(tmp_path) as s:
        assert s.usage()[0] == used >= MiB


def test_usage_follows_evicted_objects(tmp_path: Path) -> None:
    with ObjectStore(tmp_path, max_open_files=1) as s:
        s.write(data_oid(1, 0), 0, b"a" * MiB)
        s.write(data_oid(1, 1), 0, b"b" * MiB)  # evicts the first
        assert s.usage()[0] >= 2 * MiB


def test_object_size_change_applies_to_later_requests(store: ObjectStore) -> None:
    store.set_object_size(MiB)
    with pytest.raises(OutOfRange):
        store.write(OID, MiB, b"x")
    store.write(OID, MiB - 1, b"x")
    store.set_object_size(8 * MiB)
    store.write(OID, 6 * MiB, b"y")
    assert store.read(OID, 6 * MiB, 1) == b"y"
    with pytest.raises(InvalidParams):
        store.set_object_size(0)


def test_whole_object_discard_uses_current_object_size(store: ObjectStore) -> None:
    store.set_object_size(MiB)
    store.write(OID, 0, b"x")
    store.discard(OID, 0, MiB)
    assert not store.exists(OID)


def test_new_object_file_is_private_to_its_owner(store: ObjectStore, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store.write(OID, 0, b"x")
    finally:
        os.umask(old)
    assert obj_path(tmp_path, OID).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "obj").stat().st_mode & 0o777 == 0o700


# -- NodeMeta -------------------------------------------------------------------------------


def test_node_meta_settings_survive_reopen(tmp_path: Path) -> None:
    meta = NodeMeta(tmp_path)
    assert meta.get("node_id") is None
    meta.set("node_id", "n1")
    meta.set("cluster_id", "c-42")
    meta.close()
    meta = NodeMeta(tmp_path)
    try:
        assert meta.get("node_id") == "n1"
        assert meta.get("cluster_id") == "c-42"
    finally:
        meta.close()


def test_node_meta_epoch_log_is_ordered_by_epoch(tmp_path: Path) -> None:
    meta = NodeMeta(tmp_path)
    try:
        meta.put_epoch(10, b"ten")
        meta.put_epoch(2, b"two")
        meta.put_epoch(300, b"three hundred")
        assert meta.get_epoch(2) == b"two"
        assert meta.get_epoch(3) is None
        assert meta.epochs() == [(2, b"two"), (10, b"ten"), (300, b"three hundred")]
    finally:
        meta.close()


def test_node_meta_object_index_records_lists_and_drops(tmp_path: Path) -> None:
    meta = NodeMeta(tmp_path)
    try:
        meta.record_objects({5: (1, 1), 1 << 63: (2, 7), 3: (0, 1)})
        assert meta.list_objects() == [3, 5, 1 << 63]
        assert meta.object_info(1 << 63) == (2, 7)
        assert meta.count_objects() == 3
        meta.drop_objects([5, 99])
        assert meta.list_objects() == [3, 1 << 63]
        assert meta.count_objects() == 2
    finally:
        meta.close()
