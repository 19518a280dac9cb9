"""The scrub's pass over one node's objects, on a real store with fake peers: what it
reads and what it compares."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.dataplane.wire import Opcode
from sheep.node.repair import Repairer
from sheep.node.scrub import Replicas, Scrubber
from sheep.oid import data_oid
from sheep.store import ObjectStore
from sheep.store.checksum import SUM_BLOCK

from ..fakes.clock import FakeClock
from .fakes import NODES, FakePeer, FakePool, view_of

SIZE = 1 << 18
ME = NODES[0]


class NoRescan:
    """The part of Recovery a scrub uses, with nothing missing to look for."""

    def rescan(self) -> None:
        return None


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    s = ObjectStore(tmp_path, object_size=SIZE)
    yield s
    s.close()


def count_data_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the reads of whole checksum blocks or more (object data; the sum
    files' reads are smaller) from now on."""
    sizes: list[int] = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, n: int, offset: int) -> bytes:
        if n >= SUM_BLOCK:
            sizes.append(n)
        return real_pread(fd, n, offset)

    def preadv(fd: int, buffers: list, offset: int) -> int:
        n = real_preadv(fd, buffers, offset)
        if sum(len(b) for b in buffers) >= SUM_BLOCK:
            sizes.append(n)
        return n

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    return sizes


async def test_the_primary_reads_each_object_once_to_check_and_compare_it(
        store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    view = await view_of(NODES[:2], copies=2, object_size=SIZE)
    oid = next(o for i in range(1000)
               if view.placement(o := data_oid(7, i))[0].node_id == ME.node_id)
    data = os.urandom(SIZE)
    store.write(oid, 0, data)
    peer = FakePeer(NODES[1], FakeClock(), object_size=SIZE)
    peer.put(oid, data, written=1)
    pool = FakePool([peer])
    scrubber = Scrubber(store, NoRescan(), Repairer(ME.node_id, store, view, pool),  # type: ignore[arg-type]
                        Replicas(ME.node_id, view, pool, None),  # type: ignore[arg-type]
                        interval=0)
    reads = count_data_reads(monkeypatch)
    await asyncio.wait_for(scrubber.scrub(), 10)
    assert sum(reads) == SIZE
    assert len(peer.seen(Opcode.DIGEST, oid)) == 1
    assert scrubber.status.diverged == 0
