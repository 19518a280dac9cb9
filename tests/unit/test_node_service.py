"""The node's ops table, through its in-process door (the very path network requests
take): FUA means durable before the reply for every change, not for writes only. NBD's
TRIM and hole-punching WRITE_ZEROES with FUA once replied before their holes were."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.dataplane.wire import Flags, Opcode
from sheep.errors import Result
from sheep.node.service import InProcess, ObjectService
from sheep.oid import data_oid, oid_str
from sheep.store import ObjectStore

from ..fakes.clock import settle
from ..fakes.faults import fail_fdatasync_once

SIZE = 1 << 16
OID = data_oid(7, 3)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[InProcess, ObjectStore]]:
    store = ObjectStore(tmp_path, object_size=SIZE)
    yield InProcess(ObjectService(store, lambda: 1)), store
    store.close()


async def written(node: InProcess, store: ObjectStore) -> int:
    reply = await node.request(Opcode.CREATE, oid=OID, payload=b"x" * SIZE, epoch=1,
                               flags=Flags.FUA)
    assert reply.result == Result.OK
    return store.commits


@pytest.mark.parametrize("opcode", [Opcode.DISCARD, Opcode.REMOVE])
async def test_a_change_with_fua_is_committed_before_its_reply(
        node: tuple[InProcess, ObjectStore], opcode: Opcode) -> None:
    door, store = node
    before = await written(door, store)
    reply = await door.request(opcode, oid=OID, offset=0, length=4096, epoch=1,
                               flags=Flags.FUA)
    assert reply.result == Result.OK
    assert store.commits > before


@pytest.mark.parametrize("opcode", [Opcode.DISCARD, Opcode.REMOVE])
async def test_a_change_without_fua_replies_at_once(
        node: tuple[InProcess, ObjectStore], opcode: Opcode) -> None:
    door, store = node
    before = await written(door, store)
    reply = await door.request(opcode, oid=OID, offset=0, length=4096, epoch=1)
    assert reply.result == Result.OK
    assert store.commits == before


async def test_failed_fdatasync_fails_the_flush_and_the_data_is_never_read_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed fdatasync the page cache's copy is not trusted: the FLUSH fails
    (NBD EIO), and with no other replica to repair from, reads fail too (CORRUPT: NBD
    EIO), also after a later flush that succeeds."""

    from sheep.node.repair import Repairer

    from .test_repair import ME, Pool, View

    store = ObjectStore(tmp_path / "store", object_size=SIZE)
    repairer = Repairer("me", store, View([ME]), Pool({}))  # type: ignore[arg-type]
    door = InProcess(ObjectService(store, lambda: 1, repair=repairer.repair))
    try:
        reply = await door.request(Opcode.CREATE, oid=OID, payload=b"x" * SIZE, epoch=1)
        assert reply.result == Result.OK
        fail_fdatasync_once(monkeypatch)
        assert (await door.request(Opcode.FLUSH, epoch=1)).result == Result.IO_ERROR
        assert (await door.request(Opcode.FLUSH, epoch=1)).result == Result.OK
        reply = await door.request(Opcode.READ, oid=OID, offset=0, length=4096, epoch=1)
        assert reply.result == Result.CORRUPT
        assert repairer.stats.lost == 1 and repairer.stats.accepted == 0
    finally:
        store.close()


async def test_a_first_write_is_applied_only_once_its_objects_mark_is_durable(
        node: tuple[InProcess, ObjectStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """The mark's directory sync runs in a thread, batched; the write waits for it, so
    none of its pages can reach the disk before the mark does."""
    door, store = node
    gate, real_fsync = threading.Event(), os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (gate.wait(10), real_fsync(fd))[1])
    reply = door.request(Opcode.CREATE, oid=OID, payload=b"x" * SIZE, epoch=1)
    await settle()
    assert not reply.done()
    assert not store.exists(OID)
    gate.set()
    assert (await asyncio.wait_for(reply, 10)).result == Result.OK
    assert store.read(OID, 0, 1) == b"x"
    assert store.mark_syncs == 1


async def test_first_writes_to_many_objects_share_one_mark_sync(
        node: tuple[InProcess, ObjectStore]) -> None:
    door, store = node
    replies = [door.request(Opcode.CREATE, oid=data_oid(7, i), payload=b"y" * 4096, epoch=1)
               for i in range(32)]
    assert {r.result for r in await asyncio.gather(*replies)} == {Result.OK}
    assert store.mark_syncs == 1


async def test_a_first_write_into_a_rotten_block_repairs_it_then_applies(
        tmp_path: Path) -> None:
    """A partial write that waited for its object's mark and then met rot in its block
    takes the same path as one that did not wait: repair from a replica, then apply."""
    from sheep.node.repair import Repairer

    from .test_repair import ME, PEER, Pool, View

    good = bytes(range(256)) * (SIZE // 256)
    store = ObjectStore(tmp_path / "store", object_size=SIZE, intent_idle=0)
    repairer = Repairer("me", store, View([ME, PEER]),  # type: ignore[arg-type]
                        Pool({PEER.data_addr: good}))  # type: ignore[arg-type]
    door = InProcess(ObjectService(store, lambda: 1, repair=repairer.repair))
    try:
        store.write(OID, 0, good)
        await store.flush()
        assert await store.tidy_intents() == 1  # unmarked: the next write waits for a mark
        with open(tmp_path / "store" / "obj" / oid_str(OID), "r+b") as f:
            f.write(b"\xff")
        reply = await door.request(Opcode.WRITE, oid=OID, offset=100, payload=b"new", epoch=1)
        assert reply.result == Result.OK
        assert store.read(OID, 0, 103) == good[:100] + b"new"
        assert repairer.stats.repaired == 1
    finally:
        store.close()
