"""Copy-on-write correctness on a real cluster (copies=3, 4 MiB objects): byte-exact content
of VDIs, snapshots and clones at any offset and length, 64 levels of snapshots of
snapshots, and snapshots taken by `dog` while many writes are in flight."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from sheep.vdi.manager import VdiManager, open_manager
from sheep.vdi.volume import Volume

from ..cluster import Cluster, all_objects_on_disk, dog_async, dog_json, vdi_read

MiB = 1 << 20
BS = 4 * MiB  # the cluster's object size: one VDI block


@pytest.fixture
async def m(cluster: Cluster) -> AsyncIterator[VdiManager]:
    async with open_manager(cluster.etcd_url, holder="test") as manager:
        yield manager


def _random_range(rnd: random.Random, size: int) -> tuple[int, int]:
    """An (offset, length) inside [0, size), biased to the cases that break COW: around
    block boundaries, whole blocks, several blocks, the very end."""
    kind = rnd.choice(["small", "straddle", "whole", "multi", "end", "aligned"])
    if kind == "small":
        n = rnd.randint(1, 9000)
        return rnd.randrange(0, size - n), n
    if kind == "straddle":
        boundary = rnd.randrange(1, size // BS + 1) * BS
        before, after = rnd.randint(1, 5000), rnd.randint(1, 5000)
        start = max(0, boundary - before)
        return start, min(size, boundary + after) - start
    if kind == "whole":
        return rnd.randrange(0, size // BS) * BS, BS
    if kind == "multi":
        n = rnd.randint(BS // 2, 2 * BS)
        return rnd.randrange(0, size - n), n
    if kind == "end":
        n = rnd.randint(1, 70_000)
        return size - n, n
    n = 4096 * rnd.randint(1, 16)
    return 4096 * rnd.randrange(0, (size - n) // 4096), n


async def _check_ranges(vol: Volume, model: bytes, rnd: random.Random, label: str) -> None:
    assert await vol.read(0, len(model)) == model, f"{label}: whole content differs"
    for _ in range(20):
        offset, n = _random_range(rnd, len(model))
        assert await vol.read(offset, n) == model[offset : offset + n], (label, offset, n)


async def test_cow_reads_match_a_model_at_any_offset_and_length(
    cluster: Cluster, m: VdiManager
) -> None:
    rnd = random.Random(20240501)
    size = 3 * BS + 12288  # the last block is short (whole sectors)
    await m.create("cow", size)
    model = bytearray(size)
    snapshots: dict[str, bytes] = {}
    clone_model: bytearray | None = None

    async with await m.open("cow", writable=True) as vol:
        for step in range(48):
            offset, n = _random_range(rnd, size)
            data = rnd.randbytes(n)
            await vol.write(offset, data)
            model[offset : offset + n] = data
            if step % 10 == 9:
                tag = f"t{step}"
                await vol.snapshot(tag)
                snapshots[tag] = bytes(model)
            if step == 25:  # a clone of the snapshot taken at step 19, written on its own
                await m.clone("cow", "t19", "kid")
                clone_model = bytearray(snapshots["t19"])
                async with await m.open("kid", writable=True) as kid:
                    for _ in range(6):
                        offset, n = _random_range(rnd, size)
                        data = rnd.randbytes(n)
                        await kid.write(offset, data)
                        clone_model[offset : offset + n] = data
        await _check_ranges(vol, bytes(model), rnd, "working, as written")

    assert clone_model is not None
    for tag, content in snapshots.items():
        async with await m.open("cow", tag) as snap:
            await _check_ranges(snap, content, rnd, f"cow@{tag}")
    async with await m.open("cow") as vol:
        await _check_ranges(vol, bytes(model), rnd, "working, reopened")
    async with await m.open("kid") as kid:
        await _check_ranges(kid, bytes(clone_model), rnd, "clone")


async def test_overwriting_a_block_shared_with_a_clone_of_a_deleted_root_keeps_its_data(
    cluster: Cluster, m: VdiManager
) -> None:
    """Deleting a root snapshot leaves its clone and the next working VDI in separate
    trees that still share the root's objects; neither may take them from the other."""
    await m.create("v", 2 * BS)
    async with await m.open("v", writable=True) as vol:
        await vol.write(0, b"shared by v and its clone")
        await vol.write(BS, b"block 1")
        await vol.snapshot("root")
    await m.clone("v", "root", "c")
    await m.delete("v", "root")
    async with await m.open("v", writable=True) as vol:
        await vol.write(0, b"v's own now")  # v stops sharing block 0
    await m.delete("v")  # and deleting v must leave block 1 to c
    assert await vdi_read(m, "c", 0, 25) == b"shared by v and its clone"
    assert await vdi_read(m, "c", BS, 7) == b"block 1"


def _depth(node: dict) -> int:
    return 1 + max((_depth(c) for c in node["children"]), default=0)


@pytest.mark.slow
async def test_64_levels_of_snapshots_of_snapshots_read_back_exactly(
    cluster: Cluster, m: VdiManager
) -> None:
    levels = 64
    rnd = random.Random(64)
    lo, hi = BS - (128 << 10), BS + (128 << 10)  # every write lands here, many straddle BS
    await m.create("deep", 2 * BS)
    window = bytearray(hi - lo)
    frozen: dict[str, bytes] = {}
    async with await m.open("deep", writable=True) as vol:
        for level in range(levels):
            n = rnd.randint(1, 8192)
            offset = rnd.randrange(lo, hi - n)
            data = (f"[level {level:02d}]".encode() * (n // 10 + 1))[:n]
            await vol.write(offset, data)
            window[offset - lo : offset - lo + n] = data
            tag = f"l{level:02d}"
            await vol.snapshot(tag)
            frozen[tag] = bytes(window)
        await vol.write(lo, b"working")
        window[:7] = b"working"

    async def check(tag: str | None, content: bytes) -> None:
        async with await m.open("deep", tag) as v:
            assert await v.read(lo, hi - lo) == content, tag
            assert await v.read(0, 4096) == bytes(4096), tag
            assert await v.read(2 * BS - 4096, 4096) == bytes(4096), tag

    for tag, content in frozen.items():
        await check(tag, content)
    await check(None, bytes(window))

    [root] = dog_json("vdi", "tree", address=cluster.address)["tree"]
    assert _depth(root) == levels + 1
    chain, node = [], root
    while node["children"]:
        chain.append(node["tag"])
        [node] = node["children"]
    assert chain == list(frozen) and node["snapshot"] is False

    # every other snapshot goes; the later ones and the working VDI keep all of their data
    for tag in list(frozen)[::2]:
        await m.delete("deep", tag)
        del frozen[tag]
    for tag, content in frozen.items():
        await check(tag, content)
    await check(None, bytes(window))
    for tag in frozen:
        await m.delete("deep", tag)
    await check(None, bytes(window))
    await m.delete("deep")
    assert all_objects_on_disk(cluster) == set()


# -- snapshots with writes in flight ------------------------------------------------------


@dataclass
class Record:
    offset: int
    data: bytes
    issued: float = 0.0
    acked: float = 0.0


def _records(rnd: random.Random, size: int) -> list[Record]:
    """Non-overlapping records with gaps, 4 KiB-aligned or not, several straddling blocks."""
    records = []
    pos = 0
    while True:
        boundary = (pos // BS + 1) * BS
        if boundary < size and boundary - pos < 40_000:  # straddle every block boundary
            start = max(pos, boundary - rnd.randint(1, 6000))
            records.append(Record(start, rnd.randbytes(boundary - start + rnd.randint(1, 6000))))
            pos = start + len(records[-1].data) + rnd.randint(0, 100)
            continue
        if rnd.random() < 0.5:
            pos = -(-pos // 4096) * 4096
            n = 4096 * rnd.randint(1, 3)
        else:
            n = rnd.randint(1, 12_000)
        if pos + n > size:
            return records
        records.append(Record(pos, rnd.randbytes(n)))
        pos += n + rnd.choice([0, 0, 1, 17, 4096])


async def test_snapshot_by_dog_during_concurrent_writes_keeps_acked_writes_and_tears_none(
    cluster: Cluster, m: VdiManager
) -> None:
    rnd = random.Random(7)
    size = 4 * BS
    baseline = rnd.randbytes(size)
    records = _records(rnd, size)
    assert sum(1 for r in records if r.offset // BS != (r.offset + len(r.data) - 1) // BS) == 3
    await m.create("live", size)
    vol = await m.open("live", writable=True)
    try:
        await vol.write(0, baseline)
        await vol.snapshot("base")  # the first writes to each block copy it from here

        queue = list(records)
        rnd.shuffle(queue)
        in_flight = iter(queue)
        stop = asyncio.Event()
        pace = random.Random(8)
        acks = 0

        async def acked_more(n: int) -> None:
            """Pace the snapshots by progress, not by the clock: a loaded machine is slow."""
            target = acks + n
            async with asyncio.timeout(60):
                while acks < target:
                    await asyncio.sleep(0.01)

        async def writer() -> None:
            nonlocal acks
            for rec in in_flight:
                if stop.is_set():
                    return
                rec.issued = time.monotonic()
                await vol.write(rec.offset, rec.data)
                rec.acked = time.monotonic()
                acks += 1
                await asyncio.sleep(pace.uniform(0, 0.06))

        writers = asyncio.gather(*(writer() for _ in range(16)))
        snaps: dict[str, tuple[float, float]] = {}
        for tag in ("s1", "s2", "s3"):
            await acked_more(8)
            started = time.monotonic()
            rc, _, err = await dog_async("vdi", "snapshot", "live", "-s", tag,
                                         address=cluster.address)
            snaps[tag] = (started, time.monotonic())
            assert rc == 0, err.decode()
        async with asyncio.timeout(60):  # writes issued before dog returned may still ack now
            while sum(1 for r in records if r.acked and r.issued > snaps["s3"][1]) < 4:
                await asyncio.sleep(0.01)
        stop.set()
        await writers
    finally:
        await vol.close()
    written = [r for r in records if r.acked]
    assert len(written) < len(records), "ran out of records: make more"
    assert min(r.acked for r in written) < snaps["s1"][0], "the writers started too late"
    assert max(r.issued for r in written) > snaps["s3"][1], "the writers stopped too soon"
    for rec in records:  # never written: expect the baseline everywhere
        if not rec.acked:
            rec.issued = rec.acked = float("inf")

    for tag, (started, finished) in snaps.items():
        content = await vdi_read(m, "live", 0, size, tag)
        acked_before = 0
        for rec in records:
            end = rec.offset + len(rec.data)
            got, old = content[rec.offset : end], baseline[rec.offset : end]
            if rec.acked < started:  # acknowledged before dog began: must be in it
                acked_before += 1
                assert got == rec.data, (tag, rec.offset, "acknowledged write lost")
            elif rec.issued > finished:  # issued after dog was done: must not be
                assert got == old, (tag, rec.offset, "later write leaked in")
            else:
                assert got in (rec.data, old), (tag, rec.offset, "torn write")
        assert 0 < acked_before < len(written), (tag, acked_before)
        assert any(r.issued < finished and r.acked > started for r in written), (
            tag, "no write was in flight while dog took the snapshot")
        _check_gaps(content, baseline, records, tag)

    working = await vdi_read(m, "live", 0, size)
    for rec in records:
        end = rec.offset + len(rec.data)
        expected = rec.data if rec.acked < float("inf") else baseline[rec.offset : end]
        assert working[rec.offset : end] == expected, rec.offset
    _check_gaps(working, baseline, records, "working")
    assert await vdi_read(m, "live", 0, size, "base") == baseline


def _check_gaps(content: bytes, baseline: bytes, records: list[Record], label: str) -> None:
    """Between the records, nothing but the baseline."""
    pos = 0
    for rec in sorted(records, key=lambda r: r.offset):
        assert content[pos : rec.offset] == baseline[pos : rec.offset], (label, pos)
        pos = rec.offset + len(rec.data)
    assert content[pos:] == baseline[pos:], (label, pos)

