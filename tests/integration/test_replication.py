"""Replicated objects on a real 3-node cluster (copies=3): placement, failover, epochs."""

from __future__ import annotations

import os
import random
import signal

import pytest

from sheep.oid import data_oid, oid_str

from ..cluster import Cluster, object_client, wait_until

pytestmark = pytest.mark.slow

OBJECT_SIZE = 4 << 20


async def _write_some(client, count: int = 12, seed: int = 1) -> dict[int, tuple[int, bytes]]:
    rnd = random.Random(seed)
    written = {}
    for i in range(count):
        oid = data_oid(7, i)
        size = rnd.choice([512, 4096, 65536, 300_000])
        offset = rnd.randrange(0, OBJECT_SIZE - size)
        data = os.urandom(size)
        await client.write(oid, offset, data)
        written[oid] = (offset, data)
    return written


async def test_written_objects_have_the_same_bytes_in_every_replica(cluster: Cluster) -> None:
    async with object_client(cluster.etcd_url) as client:
        written = await _write_some(client)
        record = client.view.record
        assert record is not None and len(record.nodes) == 3
        for oid, (offset, data) in written.items():
            replicas = client.replicas(oid)
            assert len(replicas) == 3
            for node in replicas:
                got = await client.read_replica(node, oid, offset, len(data))
                assert got == data, f"replica on {node.node_id[:8]} differs for {oid_str(oid)}"
    for node in cluster.nodes:
        files = {p.name for p in (node.dir / "obj").iterdir()}
        assert {oid_str(oid) for oid in written} <= files


async def test_reads_succeed_after_kill_9_of_any_one_node(cluster: Cluster) -> None:
    async with object_client(cluster.etcd_url, timeout=2.0) as client:
        written = await _write_some(client, count=8)
        for victim in cluster.nodes:
            victim.kill(signal.SIGKILL)
            for oid, (offset, data) in written.items():
                assert await client.read(oid, offset, len(data)) == data
            victim.start().wait_up()
            cluster.wait_members(3)


async def test_writes_go_on_once_a_dead_node_has_left(cluster: Cluster) -> None:
    async with object_client(cluster.etcd_url, timeout=2.0) as client:
        epoch = client.view.epoch
        cluster.nodes[2].kill(signal.SIGKILL)
        data = os.urandom(8192)
        await client.write(data_oid(9, 1), 4096, data)  # waits for the epoch without node 2
        assert client.view.epoch > epoch
        assert await client.read(data_oid(9, 1), 4096, 8192) == data
        assert len(client.replicas(data_oid(9, 1))) == 2


def test_a_node_whose_lease_expires_leaves_and_the_epoch_goes_up(cluster: Cluster) -> None:
    before = cluster.info()
    cluster.nodes[1].kill(signal.SIGKILL)
    after = cluster.wait_members(2, timeout=cluster.lease_ttl + 15)
    assert after["epoch"] > before["epoch"]
    ids = {n["id"] for n in after["history"][-1]["nodes"]}
    assert len(ids) == 2
    assert {n["node"]["id"] for n in cluster.node_list()} == ids


def test_sigterm_stops_a_node_cleanly_and_it_leaves_at_once(cluster: Cluster) -> None:
    before = cluster.info()["epoch"]
    assert cluster.nodes[0].stop() == 0
    after = cluster.wait_members(2, timeout=5)
    assert after["epoch"] == before + 1
    assert "stopped" in cluster.nodes[0].log()


def test_a_restarted_node_rejoins_with_the_same_id(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    old_ids = {n["node"]["id"] for n in cluster.node_list()}
    node.stop()
    cluster.wait_members(2)
    node.start().wait_up()
    cluster.wait_members(3)
    assert {n["node"]["id"] for n in cluster.node_list()} == old_ids


def test_objects_survive_a_restart_of_every_node(cluster: Cluster) -> None:
    import asyncio

    async def write() -> dict:
        async with object_client(cluster.etcd_url) as client:
            written = await _write_some(client, count=4, seed=5)
            await client.flush()
            return written

    async def read(written: dict) -> None:
        async with object_client(cluster.etcd_url) as client:
            for oid, (offset, data) in written.items():
                assert await client.read(oid, offset, len(data)) == data

    written = asyncio.run(write())
    for node in cluster.nodes:
        node.kill(signal.SIGKILL)
    for node in cluster.nodes:
        node.start()
    for node in cluster.nodes:
        node.wait_up()
    wait_until(lambda: len(cluster.node_list()) == 3, 30, "3 nodes back")
    asyncio.run(read(written))
