"""The repairer's rules on a real store with fake peers: a block bad on this node is
rewritten from a replica that has it good; bad everywhere, it is accepted only when a
crash tore it mid-write, and otherwise stays an error (never re-stamped)."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from sheep.dataplane.client import PeerUnavailable
from sheep.errors import Corrupt, NoObject
from sheep.node.repair import Repairer
from sheep.oid import data_oid, oid_str
from sheep.store import ObjectStore
from sheep.store.checksum import SUM_BLOCK

OBJECT = 64 * 1024
OID = data_oid(9, 1)


@dataclass
class Node:
    node_id: str
    data_addr: tuple[str, int]


class View:
    def __init__(self, nodes: list[Node]) -> None:
        self.formatted = True
        self.record = object()
        self._nodes = nodes

    def placement(self, oid: int) -> list[Node]:
        return self._nodes


class Pool:
    """Peers' replicas: addr -> the object's bytes, or an exception to raise."""

    def __init__(self, replicas: dict[tuple[str, int], bytes | Exception]) -> None:
        self.replicas = replicas

    async def read_replica(self, addr, oid, offset, length, **_kw):
        held = self.replicas[addr]
        if isinstance(held, Exception):
            raise held
        return held[offset : offset + length]


ME = Node("me", ("127.0.0.1", 1))
PEER = Node("peer", ("127.0.0.1", 2))


def repairer(store: ObjectStore, peer: bytes | Exception | None) -> Repairer:
    if peer is None:  # copies=1
        return Repairer("me", store, View([ME]), Pool({}))  # type: ignore[arg-type]
    return Repairer("me", store, View([ME, PEER]),  # type: ignore[arg-type]
                    Pool({PEER.data_addr: peer}))  # type: ignore[arg-type]


def flip(root: Path, offset: int) -> None:
    with open(root / "obj" / oid_str(OID), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


async def repair(r: Repairer, blocks: list[int]) -> None:
    await r.repair(OID, blocks)


def test_rot_with_one_copy_is_lost_not_restamped(tmp_path: Path) -> None:
    with ObjectStore(tmp_path, object_size=OBJECT) as store:
        store.write(OID, 0, os.urandom(OBJECT))
        flip(tmp_path, 2 * SUM_BLOCK + 5)
        r = repairer(store, None)
        asyncio.run(repair(r, [2]))
        assert (r.stats.lost, r.stats.accepted, r.stats.repaired) == (1, 0, 0)
        with pytest.raises(Corrupt):
            store.read(OID, 2 * SUM_BLOCK, 10)
        assert store.check_object(OID) == [2]


def test_a_lost_block_read_again_is_counted_once(tmp_path: Path) -> None:
    """The node's count of lost blocks is of blocks, not of the reads that met them."""
    with ObjectStore(tmp_path, object_size=OBJECT) as store:
        store.write(OID, 0, os.urandom(OBJECT))
        flip(tmp_path, 2 * SUM_BLOCK + 5)
        r = repairer(store, None)
        for _ in range(3):
            asyncio.run(repair(r, [2]))
        assert r.stats.lost == 1


def test_rot_bad_on_every_replica_is_lost(tmp_path: Path) -> None:
    with ObjectStore(tmp_path, object_size=OBJECT) as store:
        store.write(OID, 0, os.urandom(OBJECT))
        flip(tmp_path, 5)
        r = repairer(store, Corrupt("bad there too", [0]))
        asyncio.run(repair(r, [0]))
        assert (r.stats.lost, r.stats.accepted) == (1, 0)
        with pytest.raises(Corrupt):
            store.read(OID, 0, 10)


def test_rot_is_repaired_from_a_good_replica(tmp_path: Path) -> None:
    data = os.urandom(OBJECT)
    with ObjectStore(tmp_path, object_size=OBJECT) as store:
        store.write(OID, 0, data)
        flip(tmp_path, 3 * SUM_BLOCK)
        r = repairer(store, data)
        asyncio.run(repair(r, [3]))
        assert (r.stats.repaired, r.stats.lost) == (1, 0)
        assert store.read(OID, 0, OBJECT) == data


def test_unreachable_replica_decides_nothing(tmp_path: Path) -> None:
    with ObjectStore(tmp_path, object_size=OBJECT) as store:
        store.write(OID, 0, os.urandom(OBJECT))
        flip(tmp_path, 0)
        r = repairer(store, PeerUnavailable("down"))
        asyncio.run(repair(r, [0]))
        assert (r.stats.failed, r.stats.lost, r.stats.accepted) == (1, 0, 0)


@pytest.mark.parametrize("peer", [None, NoObject("gone"), Corrupt("torn there too", [0])])
def test_torn_write_bad_everywhere_is_accepted(tmp_path: Path, peer) -> None:
    """kill -9 between the data and the sum write (new data, old sum) on every replica:
    an unacknowledged write, kept as it is, not reported as rot."""
    store = ObjectStore(tmp_path, object_size=OBJECT)
    store.write(OID, 0, b"old!" * 1024)
    with open(tmp_path / "obj" / oid_str(OID), "r+b") as f:
        f.write(b"new!" * 1024)
    crashed = tmp_path.parent / (tmp_path.name + "-crashed")
    shutil.copytree(tmp_path, crashed)
    store.close()
    with ObjectStore(crashed, object_size=OBJECT) as after:
        r = repairer(after, peer)
        asyncio.run(repair(r, [0]))
        assert (r.stats.accepted, r.stats.lost) == (1, 0)
        assert after.read(OID, 0, 4) == b"new!"


def test_torn_write_prefers_a_replica_that_verifies(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, object_size=OBJECT)
    store.write(OID, 0, b"old!" * 1024)
    with open(tmp_path / "obj" / oid_str(OID), "r+b") as f:
        f.write(b"new!" * 1024)
    crashed = tmp_path.parent / (tmp_path.name + "-crashed")
    shutil.copytree(tmp_path, crashed)
    store.close()
    with ObjectStore(crashed, object_size=OBJECT) as after:
        r = repairer(after, b"old!" * (OBJECT // 4))
        asyncio.run(repair(r, [0]))
        assert (r.stats.repaired, r.stats.accepted) == (1, 0)
        assert after.read(OID, 0, 4) == b"old!"
        assert after.torn_blocks(OID) == set()
