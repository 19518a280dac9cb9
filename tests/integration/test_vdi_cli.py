"""`dog vdi` against a real 3-node cluster (copies=3, 4 MiB objects): every command as a user
runs it, --json where it has one. Each test runs the command under test through `dog` and
sets up or checks the rest through the Python API (a dog process costs ~0.4 s), against the
bytes read back and the object files on the nodes' disks."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sheep.errors import InvalidParams
from sheep.oid import ObjType, oid_index, oid_str, oid_type, oid_vdi
from sheep.vdi.inode import block_oid
from sheep.vdi.manager import VdiManager, open_manager

from ..cluster import (
    BIN,
    Cluster,
    all_objects_on_disk,
    dog,
    dog_bytes,
    dog_error,
    dog_json,
    object_path,
    objects_on_disk,
    vdi_read,
    vdi_write,
    wait_until,
)

MiB = 1 << 20
BS = 4 * MiB  # the cluster's object size: one VDI block


@pytest.fixture
async def m(cluster: Cluster) -> AsyncIterator[VdiManager]:
    async with open_manager(cluster.etcd_url, holder="test") as manager:
        yield manager


def _data_objects(c: Cluster, vdi_id: int | None = None) -> dict[int, int]:
    """Data oid -> on how many nodes a replica of it exists (only VDI `vdi_id`'s if given)."""
    counts: dict[int, int] = {}
    for oids in objects_on_disk(c).values():
        for oid in oids:
            if oid_type(oid) == ObjType.DATA and (vdi_id is None or oid_vdi(oid) == vdi_id):
                counts[oid] = counts.get(oid, 0) + 1
    return counts


def _blocks(c: Cluster, vdi_id: int) -> list[int]:
    return sorted(oid_index(oid) for oid in _data_objects(c, vdi_id))


def _pattern(seed: int, n: int) -> bytes:
    unit = f"<{seed:06d}>".encode()
    return (unit * (n // len(unit) + 1))[:n]


async def _id(m: VdiManager, name: str, tag: str | None = None) -> int:
    return (await m.state()).lookup(name, tag).id


async def _usage(m: VdiManager, name: str, tag: str | None = None) -> tuple[int, int]:
    usage = await m.usage((await m.state()).lookup(name, tag))
    return usage.used, usage.shared


async def _snapshot(m: VdiManager, name: str, tag: str) -> None:
    async with await m.open(name, writable=True) as vol:
        await vol.snapshot(tag)


# -- create, read, write ------------------------------------------------------------------


async def test_create_is_thin_until_a_block_is_written(cluster: Cluster, m: VdiManager) -> None:
    a = cluster.address
    out = dog_json("vdi", "create", "thin", "1G", address=a)
    assert (out["name"], out["size"], out["allocated"], out["copies"]) == ("thin", 1 << 30, 0, 3)
    info = dog_json("vdi", "info", "thin", address=a)
    assert (info["size"], info["allocated"], info["shared"], info["objects"]) == (
        1 << 30, 0, 0, 256)
    assert _data_objects(cluster) == {}
    read = dog_bytes("vdi", "read", "thin", str(700 * MiB), "64k", address=a).stdout
    assert read == bytes(64 << 10)

    dog_bytes("vdi", "write", "thin", str(5 * BS + 10), address=a, input=b"hello")
    assert dog_json("vdi", "info", "thin", address=a)["allocated"] == BS
    objects = _data_objects(cluster, info["id"])
    assert [oid_index(oid) for oid in objects] == [5]
    assert list(objects.values()) == [3]  # one object, a replica on each of the 3 nodes
    assert await vdi_read(m, "thin", 5 * BS, 20) == bytes(10) + b"hello" + bytes(5)
    assert await vdi_read(m, "thin", 4 * BS, BS) == bytes(BS)  # neighbours stay holes


async def test_create_with_prealloc_allocates_every_block(cluster: Cluster, m: VdiManager
                                                          ) -> None:
    out = dog_json("vdi", "create", "full", "10M", "--prealloc", address=cluster.address)
    assert out["allocated"] == 3 * BS  # 10 MiB rounds up to three 4 MiB blocks
    assert _blocks(cluster, out["id"]) == [0, 1, 2]
    assert await _usage(m, "full") == (3 * BS, 0)
    assert await vdi_read(m, "full", 0, 10 * MiB) == bytes(10 * MiB)


async def test_create_with_copies_places_that_many_replicas(cluster: Cluster, m: VdiManager
                                                            ) -> None:
    out = dog_json("vdi", "create", "two", "8M", "--copies", "2", address=cluster.address)
    assert out["copies"] == 2
    await vdi_write(m, "two", BS - 2, b"abcd")  # straddles blocks 0 and 1
    objects = _data_objects(cluster, out["id"])
    assert sorted(oid_index(o) for o in objects) == [0, 1]
    assert set(objects.values()) == {2}
    assert await vdi_read(m, "two", BS - 4, 8) == b"\0\0abcd\0\0"


async def test_write_and_read_stream_stdin_and_stdout_at_any_offset(
    cluster: Cluster, m: VdiManager
) -> None:
    a = cluster.address
    size = 2 * BS + 3072  # the last block is short (whole sectors)
    await m.create("io", size)
    model = bytearray(size)
    for offset, data in [(0, _pattern(1, 100)), (BS + 4096, _pattern(3, 9000)),
                         (123, _pattern(5, BS + 10))]:
        await vdi_write(m, "io", offset, data)
        model[offset : offset + len(data)] = data

    # OFFSET LENGTH, across the block boundary
    dog_bytes("vdi", "write", "io", str(BS - 7), "20", address=a, input=_pattern(2, 20))
    model[BS - 7 : BS + 13] = _pattern(2, 20)
    # OFFSET only: the whole of stdin, up to the very last byte of the VDI
    dog_bytes("vdi", "write", "io", str(size - 11), address=a, input=_pattern(4, 11))
    model[size - 11 :] = _pattern(4, 11)
    # LENGTH shorter than stdin: only LENGTH bytes
    dog_bytes("vdi", "write", "io", "50", "4", address=a, input=b"0123456789")
    model[50:54] = b"0123"
    assert await vdi_read(m, "io", 0, size) == model

    assert dog_bytes("vdi", "read", "io", address=a).stdout == model

    # more piped stdin than fits: refused before anything is written
    err = dog_error("vdi", "write", "io", str(size - 5), address=a, input=b"0123456789")
    assert "nothing written" in err
    assert await vdi_read(m, "io", size - 8, 8) == model[-8:]
    tail = dog_bytes("vdi", "read", "io", str(BS - 100), address=a).stdout
    assert tail == model[BS - 100 :]  # OFFSET without LENGTH: to the end
    assert dog_bytes("vdi", "read", "io", str(size), "0", address=a).stdout == b""


# -- list, tree, info ---------------------------------------------------------------------


async def test_list_tree_and_info_describe_vdis_snapshots_and_clones(
    cluster: Cluster, m: VdiManager
) -> None:
    a = cluster.address
    await m.create("base", 12 * MiB)
    await vdi_write(m, "base", 0, b"one")
    await _snapshot(m, "base", "s1")
    await vdi_write(m, "base", BS, b"two")
    await _snapshot(m, "base", "s2")
    await m.clone("base", "s1", "copy")
    await m.create("other", MiB, copies=1)

    rows = dog_json("vdi", "list", address=a)["vdis"]
    by_label = {(r["name"], r["tag"]): r for r in rows}
    assert list(by_label) == [("base", "s1"), ("base", "s2"), ("base", ""), ("copy", ""),
                              ("other", "")]
    s1, s2, base, copy, other = by_label.values()
    assert [r["snapshot"] for r in rows] == [True, True, False, False, False]
    assert s2["parent"] == s1["id"] and base["parent"] == s2["id"]
    assert copy["parent"] == s1["id"] and s1["parent"] == 0 and other["parent"] == 0
    assert (s1["allocated"], s1["shared"]) == (BS, 0)
    assert (s2["allocated"], s2["shared"]) == (BS, BS)  # wrote block 1, shares block 0 with s1
    assert (base["allocated"], base["shared"]) == (0, 2 * BS)
    assert (copy["allocated"], copy["shared"]) == (0, BS)
    assert other["copies"] == 1 and {r["copies"] for r in rows[:4]} == {3}
    assert all(r["size"] == 12 * MiB and r["block_size"] == BS for r in rows[:4])
    assert s1["created"] <= s1["snap_time"] <= s2["snap_time"] <= base["created"]
    assert base["snap_time"] == 0
    assert dog_json("vdi", "list", "copy", address=a)["vdis"] == [copy]

    info = dog_json("vdi", "info", "base", "--snapshot", "s1", address=a)
    assert info["tag"] == "s1" and info["snapshot"] and info["id"] == s1["id"]
    assert info["snapshots"] == ["s1", "s2"] and info["objects"] == 3
    assert info["allocated"] == BS and info["snap_time"] == s1["snap_time"]
    assert info["created"] == s1["created"] and info["locked_by"] == ""

    tree = dog_json("vdi", "tree", address=a)["tree"]
    assert [(t["name"], t["tag"]) for t in tree] == [("base", "s1"), ("other", "")]
    kids = tree[0]["children"]
    assert [(k["name"], k["tag"]) for k in kids] == [("base", "s2"), ("copy", "")]
    assert [(k["name"], k["snapshot"]) for k in kids[0]["children"]] == [("base", False)]

    text = dog("vdi", "tree", address=a).stdout
    assert text.splitlines()[0] == "base@s1"
    assert "base@s2" in text and "copy (working)" in text and "other (working)" in text
    listing = dog("vdi", "list", address=a).stdout.splitlines()
    assert listing[0].split()[:3] == ["Name", "Tag", "Id"] and len(listing) == 6
    text = dog("vdi", "info", "base", address=a).stdout
    assert "Snapshots: s1, s2" in text and "Size: 12 MiB" in text


# -- snapshot, clone, rollback, flatten ---------------------------------------------------


async def test_snapshot_keeps_its_content_while_the_vdi_moves_on(
    cluster: Cluster, m: VdiManager
) -> None:
    a = cluster.address
    await m.create("d", 8 * MiB)
    await vdi_write(m, "d", BS - 3, b"before")
    snap = dog_json("vdi", "snapshot", "d", "-s", "t1", address=a)
    assert (snap["name"], snap["tag"], snap["snapshot"]) == ("d", "t1", True)
    await vdi_write(m, "d", BS - 1, b"AFTER")
    assert await vdi_read(m, "d", BS - 3, 7) == b"beAFTER"
    assert dog_bytes("vdi", "read", "d", str(BS - 3), "7", "-s", "t1", address=a).stdout == (
        b"before\0")
    # the working VDI copied both blocks it wrote to; the snapshot keeps the originals
    assert await _usage(m, "d") == (2 * BS, 0)
    assert await _usage(m, "d", "t1") == (2 * BS, 0)


async def test_clone_is_a_writable_copy_independent_of_its_origin(
    cluster: Cluster, m: VdiManager
) -> None:
    a = cluster.address
    await m.create("src", 8 * MiB)
    await vdi_write(m, "src", 100, b"origin")
    await _snapshot(m, "src", "gold")
    out = dog_json("vdi", "clone", "src@gold", "vm1", address=a)
    assert (out["name"], out["snapshot"], out["parent"]) == ("vm1", False, await _id(m, "src",
                                                                                     "gold"))
    dog("vdi", "clone", "src", "vm2", "-s", "gold", address=a)  # -s TAG works too
    assert await vdi_read(m, "vm1", 100, 6) == b"origin"
    await vdi_write(m, "vm1", 100, b"clone1")
    await vdi_write(m, "src", 102, b"XX")
    assert await vdi_read(m, "vm1", 100, 6) == b"clone1"
    assert await vdi_read(m, "vm2", 100, 6) == b"origin"
    assert await vdi_read(m, "src", 100, 6) == b"orXXin"
    assert await vdi_read(m, "src", 100, 6, "gold") == b"origin"


async def test_rollback_restores_a_snapshot_and_reclaims_what_only_the_old_vdi_held(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("r", 12 * MiB)
    await vdi_write(m, "r", 0, b"good")
    await _snapshot(m, "r", "safe")
    await vdi_write(m, "r", 0, b"BAD!")
    await vdi_write(m, "r", 2 * BS, b"junk")
    old_id = await _id(m, "r")
    assert _blocks(cluster, old_id) == [0, 2]

    out = dog_json("vdi", "rollback", "r", "-s", "safe", address=cluster.address)
    assert out["id"] != old_id and out["parent"] == await _id(m, "r", "safe")
    assert await vdi_read(m, "r", 0, 4) == b"good"
    assert await vdi_read(m, "r", 2 * BS, 4) == bytes(4)
    assert _data_objects(cluster, old_id) == {}  # the old working VDI's blocks are gone
    await vdi_write(m, "r", 1, b"XX")  # the rolled-back VDI is writable, COW from the snapshot
    assert await vdi_read(m, "r", 0, 4) == b"gXXd"
    assert await vdi_read(m, "r", 0, 4, "safe") == b"good"


async def test_flatten_lets_a_clone_outlive_its_origin(cluster: Cluster, m: VdiManager) -> None:
    a = cluster.address
    await m.create("orig", 12 * MiB)
    await vdi_write(m, "orig", 0, _pattern(1, 5000))
    await vdi_write(m, "orig", 2 * BS - 10, _pattern(2, 20))
    await _snapshot(m, "orig", "base")
    await m.clone("orig", "base", "flat")
    await vdi_write(m, "flat", 3, b"mine")
    expected = await vdi_read(m, "flat", 0, 12 * MiB)
    assert await _usage(m, "flat") == (BS, 2 * BS)

    dog("vdi", "flatten", "flat", address=a)
    rec = (await m.state()).lookup("flat")
    assert rec.parent == 0 and await _usage(m, "flat") == (3 * BS, 0)
    dog("vdi", "delete", "orig", "-s", "base", address=a)
    dog("vdi", "delete", "orig", address=a)
    assert sorted((await m.state()).working) == ["flat"]
    assert set(_data_objects(cluster)) == set(_data_objects(cluster, rec.id))
    assert await vdi_read(m, "flat", 0, 12 * MiB) == expected


# -- delete -------------------------------------------------------------------------------


async def test_delete_reclaims_the_objects_of_a_vdi(cluster: Cluster, m: VdiManager) -> None:
    for name in ("keep", "gone"):
        await m.create(name, 12 * MiB)
        await vdi_write(m, name, BS - 1, b"xy")
    gone_id, keep_id = await _id(m, "gone"), await _id(m, "keep")
    assert {oid_vdi(o) for o in all_objects_on_disk(cluster)} == {gone_id, keep_id}

    out = dog_json("vdi", "delete", "gone", address=cluster.address)
    assert out == {"deleted": ["gone"], "reclaimed_objects": 2, "remaining_snapshots": []}
    assert {oid_vdi(o) for o in all_objects_on_disk(cluster)} == {keep_id}  # data and inode
    assert list((await m.state()).working) == ["keep"]
    assert await vdi_read(m, "keep", BS - 1, 2) == b"xy"
    await m.create("gone", 4 * MiB)  # the name is free again, and the new VDI is empty
    assert await vdi_read(m, "gone", BS - 1, 1) == b"\0"


async def _vdi_with_two_snapshots(m: VdiManager, name: str) -> None:
    await m.create(name, 12 * MiB)
    await vdi_write(m, name, 0, b"first")
    await _snapshot(m, name, "s1")
    await vdi_write(m, name, BS, b"second")
    await _snapshot(m, name, "s2")
    await vdi_write(m, name, 2 * BS, b"third")


async def test_a_plain_delete_says_which_snapshots_remain_and_how_to_remove_them(
    cluster: Cluster, m: VdiManager
) -> None:
    await _vdi_with_two_snapshots(m, "v")
    out = dog("vdi", "delete", "v", address=cluster.address).stdout.splitlines()
    assert out[1] == "its snapshots remain: s1, s2 ('dog vdi delete -r v' removes them too)"
    assert [r.label for r in (await m.state()).family("v")] == ["v@s1", "v@s2"]


async def test_create_after_a_plain_delete_says_that_snapshots_remain(
    cluster: Cluster, m: VdiManager
) -> None:
    await _vdi_with_two_snapshots(m, "v")
    dog("vdi", "delete", "v", address=cluster.address)
    err = dog_error("vdi", "create", "v", "1G", address=cluster.address)
    assert err == ("VDI 'v' was deleted but its snapshots remain (s1, s2): 'dog vdi delete "
                   "-r v' removes them, 'dog vdi rollback v -s TAG' revives one")


async def test_recursive_delete_removes_the_vdi_and_its_snapshots_and_keeps_clones(
    cluster: Cluster, m: VdiManager
) -> None:
    await _vdi_with_two_snapshots(m, "v")
    await m.clone("v", "s1", "c")
    c_id = await _id(m, "c")
    out = dog_json("vdi", "delete", "v", "-r", address=cluster.address)
    assert out["deleted"] == ["v", "v@s2", "v@s1"] and out["remaining_snapshots"] == []
    state = await m.state()
    assert list(state.working) == ["c"] and list(state.records) == [c_id]
    assert await vdi_read(m, "c", 0, 5) == b"first"  # the clone keeps the blocks it uses
    # every data object left is one c uses: v's own were reclaimed
    table = await m.table(state.records[c_id])
    assert set(_data_objects(cluster)) == {block_oid(ref, i) for i, ref in enumerate(table)
                                           if ref}
    dog("vdi", "create", "v", "1G", address=cluster.address)  # the name is free again


async def test_deleting_snapshots_keeps_the_data_of_clones_and_later_snapshots(
    cluster: Cluster, m: VdiManager
) -> None:
    a = cluster.address
    await m.create("v", 12 * MiB)
    for i in range(3):
        await vdi_write(m, "v", i * BS, f"v1-block{i}".encode())
    await _snapshot(m, "v", "s1")
    await vdi_write(m, "v", BS, b"v2")
    await _snapshot(m, "v", "s2")
    await m.clone("v", "s1", "c")
    await vdi_write(m, "v", 2 * BS, b"v3")
    await vdi_write(m, "c", BS, b"c!")

    async def contents() -> dict[str, list[bytes]]:
        state = await m.state()
        found = {}
        for rec in sorted(state.records.values(), key=lambda r: r.label):
            if rec.label != "v@s1":
                tag = rec.tag if rec.snapshot else None
                found[rec.label] = [await vdi_read(m, rec.name, i * BS, 9, tag)
                                    for i in range(3)]
        return found

    before = await contents()
    assert before == {
        "c": [b"v1-block0", b"c!-block1", b"v1-block2"],
        "v": [b"v1-block0", b"v2-block1", b"v3-block2"],
        "v@s2": [b"v1-block0", b"v2-block1", b"v1-block2"],
    }
    # s1's blocks 0 and 2 are still used by s2, v and c; its block 1, which s2 and c both
    # wrote over, is used by nobody any more: that one object is reclaimed
    out = dog_json("vdi", "delete", "v", "-s", "s1", address=a)
    assert out == {"deleted": ["v@s1"], "reclaimed_objects": 1,
                   "remaining_snapshots": ["s2"]}
    assert await contents() == before
    assert (await m.state()).lookup("c").parent == 0  # c and v are now separate trees...
    dog("vdi", "delete", "v", "-s", "s2", address=a)
    del before["v@s2"]
    assert await contents() == before  # ...that still share s1's objects
    dog("vdi", "delete", "v", address=a)
    del before["v"]
    assert await contents() == before
    left = sorted(_data_objects(cluster), key=oid_index)
    assert [oid_index(o) for o in left] == [0, 1, 2]  # exactly the three blocks c uses
    dog("vdi", "delete", "c", address=a)
    assert all_objects_on_disk(cluster) == set()
    assert (await m.state()).records == {}


# -- resize -------------------------------------------------------------------------------


async def test_resize_grows_and_refuses_to_shrink(cluster: Cluster, m: VdiManager) -> None:
    a = cluster.address
    await m.create("g", 5 * MiB)
    await vdi_write(m, "g", 5 * MiB - 4, b"edge")
    assert dog_json("vdi", "resize", "g", "1G", address=a)["size"] == 1 << 30
    assert await vdi_read(m, "g", 5 * MiB - 4, 8) == b"edge" + bytes(4)
    await vdi_write(m, "g", (1 << 30) - 3, b"end")
    assert await vdi_read(m, "g", (1 << 30) - 3, 3) == b"end"

    err = dog_error("vdi", "resize", "g", "8M", address=a)
    assert "shrinking is not supported" in err and str(8 * MiB) in err
    assert "maximum" in dog_error("vdi", "resize", "g", "5T", address=a)
    state = await m.state()
    assert state.lookup("g").size == 1 << 30 and state.locks == {}


# -- import, export -----------------------------------------------------------------------


def _sparse_image(path: Path, size: int, islands: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in islands:
            f.seek(offset)
            f.write(data)


async def test_import_and_export_of_a_sparse_image_round_trip_thin(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    a = cluster.address
    size = 40 * MiB
    image, back = tmp_path / "in.raw", tmp_path / "out.raw"
    islands = [
        (0, _pattern(1, 512)),                      # block 0
        (BS - 1000, _pattern(2, 3000)),             # straddles blocks 0 and 1
        (17 * MiB + 12345, _pattern(3, 70_000)),    # block 4
        (29 * MiB, bytes(2 * MiB)),                 # zeros written out in block 7
        (size - 7, b"the end"),                     # the very end, block 9
    ]
    _sparse_image(image, size, islands)

    out = dog("vdi", "import", "img", str(image), "--progress", "--json", address=a)
    assert "import" in out.stderr and "100%" in out.stderr
    reply = json.loads(out.stdout)
    assert (reply["name"], reply["size"]) == ("img", size)
    assert 512 + 3000 + 70_000 + 7 <= reply["written"] <= 512 << 10  # not the zeros
    rec = (await m.state()).lookup("img")
    assert rec.size == size and await _usage(m, "img") == (4 * BS, 0)
    assert _blocks(cluster, rec.id) == [0, 1, 4, 9]  # block 7 held only zeros: still a hole

    out = dog("vdi", "export", "img", str(back), "--progress", address=a)
    assert "export" in out.stderr and "100%" in out.stderr
    assert back.stat().st_size == size
    assert back.read_bytes() == image.read_bytes()
    assert back.stat().st_blocks * 512 <= MiB  # holes where the VDI has no data
    # without --progress (and stderr not a terminal) it is quiet
    assert dog("vdi", "export", "img", str(back), address=a).stderr == ""


async def test_import_into_an_existing_vdi_is_refused_without_force(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    await m.create("dst", 12 * MiB)
    await vdi_write(m, "dst", 0, b"keep me")
    image = tmp_path / "img.raw"
    image.write_bytes(b"new")
    err = dog_error("vdi", "import", "dst", str(image), address=cluster.address)
    assert err == "VDI 'dst' exists; 'dog vdi import --force' replaces its content"
    assert await vdi_read(m, "dst", 0, 7) == b"keep me"
    assert not (await m.state()).lookup("dst").incomplete


async def test_forced_import_of_a_smaller_image_leaves_zeros_past_its_end(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    """The VDI keeps its size (VDIs do not shrink); nothing of its old content survives,
    not even past the image's end."""
    await m.create("dst", 12 * MiB)
    await vdi_write(m, "dst", 0, b"old data everywhere")
    await vdi_write(m, "dst", BS + 5, b"old")
    await vdi_write(m, "dst", 8 * MiB - 3, b"old tail across the image's end")
    await vdi_write(m, "dst", 2 * BS + 100, b"past the image")
    image = tmp_path / "img.raw"
    _sparse_image(image, 8 * MiB, [(10, b"new"), (BS, bytes(BS))])
    dog("vdi", "import", "dst", str(image), "--force", address=cluster.address)
    assert await vdi_read(m, "dst", 0, 19) == bytes(10) + b"new" + bytes(6)
    assert await vdi_read(m, "dst", BS, 8) == bytes(8)  # zeros in the image: zeros now
    assert await vdi_read(m, "dst", 8 * MiB - 3, 31) == bytes(31)
    assert await vdi_read(m, "dst", 2 * BS + 100, 14) == bytes(14)
    rec = (await m.state()).lookup("dst")
    assert rec.size == 12 * MiB and not rec.incomplete
    assert await _usage(m, "dst") == (BS, 0)  # blocks 1 and 2 dropped, not filled


# -- sizes in whole sectors ----------------------------------------------------------------


def _create_1(c: Cluster, tmp_path: Path) -> str:
    return dog("vdi", "create", "odd", "1", address=c.address).stderr


def _create_513(c: Cluster, tmp_path: Path) -> str:
    return dog("vdi", "create", "odd", "513", address=c.address).stderr


def _resize_1025(c: Cluster, tmp_path: Path) -> str:
    dog("vdi", "create", "odd", "512", address=c.address)
    return dog("vdi", "resize", "odd", "1025", address=c.address).stderr


def _import_3_bytes(c: Cluster, tmp_path: Path) -> str:
    (tmp_path / "three").write_bytes(b"abc")
    return dog("vdi", "import", "odd", str(tmp_path / "three"), "-f", "raw",
               address=c.address).stderr


@pytest.mark.parametrize(("make", "asked", "size"), [
    (_create_1, 1, 512), (_create_513, 513, 1024), (_resize_1025, 1025, 1536),
    (_import_3_bytes, 3, 512)], ids=["create-1", "create-513", "resize-1025", "import-3"])
def test_vdi_sizes_round_up_to_whole_sectors_that_nbd_and_iscsi_agree_on(
    iscsi_cluster: Cluster, tmp_path: Path, make, asked: int, size: int
) -> None:
    c = iscsi_cluster
    note = make(c, tmp_path)
    assert note == (f"dog: note: VDI 'odd' size {asked} bytes rounded up to {size} bytes "
                    f"(whole 512-byte sectors)\n")
    assert dog_json("vdi", "info", "odd", address=c.address)["size"] == size
    nbd = subprocess.run(["nbdinfo", "--size", c.nbd_url("odd")], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert nbd.stdout.strip() == str(size), nbd.stderr
    iscsi = subprocess.run(["iscsi-readcapacity16", c.iscsi_url("odd")], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path)
    assert f"Total size:{size}\n" in iscsi.stdout, iscsi.stdout + iscsi.stderr
    data = dog_bytes("vdi", "read", "odd", address=c.address).stdout
    assert data == (b"abc" if asked == 3 else b"") + bytes(size - (3 if asked == 3 else 0))


async def test_the_api_refuses_sizes_that_are_not_whole_sectors(
    cluster: Cluster, m: VdiManager
) -> None:
    """Only dog rounds (with its notice): a program on the API must not make a disk that
    NBD and iSCSI would size differently."""
    with pytest.raises(InvalidParams, match="not a whole number of 512-byte sectors"):
        await m.create("odd", 513)
    assert "odd" not in (await m.state()).working
    await m.create("odd", 512)
    with pytest.raises(InvalidParams, match="not a whole number of 512-byte sectors"):
        await m.resize("odd", 1025)
    assert (await m.state()).lookup("odd").size == 512


@pytest.mark.parametrize(("args", "why"), [
    (("vdi", "create", "bad\udcff", "1M"), "VDI name 'bad\\udcff' is not valid UTF-8"),
    (("vdi", "info", "bad\udcff"), "no VDI named 'bad\\udcff'"),
    (("vdi", "create", "evil\u202etxt", "1M"), "contains U+202E"),
    (("vdi", "create", "cafe\u0301", "1M"), "not in Unicode normal form C"),
    (("vdi", "create", "X" * 101, "1M"), "too long for iSCSI"),
])
def test_bad_names_get_a_one_line_error_and_create_nothing(
        cluster: Cluster, args: tuple[str, ...], why: str) -> None:
    assert why in dog_error(*args, address=cluster.address)
    assert dog_json("vdi", "list", address=cluster.address)["vdis"] == []


# -- capacity -----------------------------------------------------------------------------


async def test_preallocating_more_than_the_cluster_has_free_is_refused(
    cluster: Cluster, m: VdiManager
) -> None:
    before = all_objects_on_disk(cluster)
    err = dog_error("vdi", "create", "huge", "3T", "-P", address=cluster.address)
    assert err.startswith("cannot preallocate 3 TiB for VDI 'huge': with 3 copies the "
                          "cluster has room for "), err
    assert "huge" not in (await m.state()).working
    assert all_objects_on_disk(cluster) == before


async def test_a_thin_vdi_larger_than_the_cluster_is_created_with_a_warning(
    cluster: Cluster, m: VdiManager
) -> None:
    proc = dog("vdi", "create", "huge", "3T", address=cluster.address)
    assert proc.stdout.startswith("VDI huge created: 3 TiB")
    assert proc.stderr.startswith("dog: warning: VDI 'huge' (3 TiB) is larger than the "
                                  "cluster can hold with 3 copies (")
    assert proc.stderr.endswith("); writes will fail when space runs out\n")
    assert (await m.state()).lookup("huge").size == 3 << 40


async def test_resize_with_preallocation_beyond_free_space_is_refused(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("r", 8 * MiB)
    err = dog_error("vdi", "resize", "r", "3T", "-P", address=cluster.address)
    assert err.startswith("cannot preallocate 3.0 TiB for VDI 'r': with 3 copies"), err
    assert (await m.state()).lookup("r").size == 8 * MiB


async def test_resize_with_preallocation_allocates_the_new_part(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("r", BS)
    dog("vdi", "resize", "r", str(3 * BS), "-P", address=cluster.address)
    rec = (await m.state()).lookup("r")
    assert rec.size == 3 * BS and _blocks(cluster, rec.id) == [1, 2]
    assert await vdi_read(m, "r", BS, 8) == bytes(8)
    assert (await m.state()).locks == {}


async def _start_import(c: Cluster, m: VdiManager, tmp_path: Path, name: str
                        ) -> asyncio.subprocess.Process:
    """`dog vdi import` of a 64 MiB image of data, caught in the middle: it has created
    the VDI and written some of its objects."""
    image = tmp_path / "big.raw"
    image.write_bytes(_pattern(7, 64 * MiB))
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "dog"), "vdi", "import", name, str(image), "-a", c.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        state = await m.state()
        if name in state.working and _data_objects(c, state.working[name]):
            return proc
        assert proc.returncode is None and time.monotonic() < deadline, "no import seen"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_an_interrupted_import_deletes_the_vdi_it_created(
    cluster: Cluster, m: VdiManager, tmp_path: Path, sig: int
) -> None:
    proc = await _start_import(cluster, m, tmp_path, "big")
    proc.send_signal(sig)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert (proc.returncode, out, err) == (
        130, b"", b"dog: import interrupted: VDI 'big' deleted\n")
    assert "big" not in (await m.state()).working
    assert dog_json("vdi", "list", address=cluster.address) == {"vdis": []}


async def test_a_killed_import_leaves_its_vdi_marked_incomplete(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    """kill -9 leaves no chance to clean up: the flag set before the first byte stays."""
    proc = await _start_import(cluster, m, tmp_path, "big")
    proc.kill()
    await proc.wait()
    a = cluster.address
    [row] = dog_json("vdi", "list", address=a)["vdis"]
    assert (row["name"], row["incomplete"]) == ("big", True)
    assert dog("vdi", "list", address=a).stdout.splitlines()[1].split()[:2] == [
        "big", "(incomplete)"]
    assert dog_json("vdi", "info", "big", address=a)["incomplete"] is True
    assert ("Status: incomplete: an import into it did not finish (import again with "
            "--force, or delete it)") in dog("vdi", "info", "big", address=a).stdout


async def test_export_of_a_snapshot_writes_the_snapshot(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    await m.create("e", 6 * MiB)
    await vdi_write(m, "e", 5 * MiB, b"snap")
    await _snapshot(m, "e", "t")
    await vdi_write(m, "e", 5 * MiB, b"live")
    dog("vdi", "export", "e", str(tmp_path / "t.raw"), "-s", "t", address=cluster.address)
    data = (tmp_path / "t.raw").read_bytes()
    assert len(data) == 6 * MiB and data[5 * MiB : 5 * MiB + 4] == b"snap"
    assert data.count(0) == len(data) - 4


# -- check --------------------------------------------------------------------------------


async def test_check_finds_and_repairs_corrupt_and_missing_replicas(
    cluster: Cluster, m: VdiManager
) -> None:
    a = cluster.address
    await m.create("chk", 12 * MiB)
    await vdi_write(m, "chk", 0, _pattern(1, 100_000))
    await vdi_write(m, "chk", BS + 5, _pattern(2, 4096))
    clean = dog_json("vdi", "check", "chk", address=a)
    assert clean == {"objects": 3, "findings": [], "unrepairable": [], "clean": True}
    block0, block1 = sorted(_data_objects(cluster, await _id(m, "chk")), key=oid_index)
    good0 = object_path(cluster.nodes[0], block0).read_bytes()

    # flip bytes in place in node 0's replica: its checksums no longer match
    with open(object_path(cluster.nodes[0], block0), "r+b") as f:
        f.seek(50_000)
        f.write(b"\xff\xfe\xfd")
    # node 1 loses its replica of block 1. A running node serves an object it has open
    # even after its file is unlinked, so restart the node first (recovery has nothing to
    # do then), and delete the file once the cluster is healthy again
    victim = cluster.nodes[1]
    victim.stop()
    victim.start()
    victim.wait_up()
    cluster.wait_members(3)
    wait_until(lambda: cluster.info().get("health") == "healthy", 30, "a healthy cluster")
    object_path(victim, block1).unlink()

    proc = dog("vdi", "check", "chk", "--json", address=a, check=False)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    found = {(f["oid"], f["problem"], f["repaired"]) for f in report["findings"]}
    assert found == {(oid_str(block0), "corrupt", False), (oid_str(block1), "missing", False)}
    assert not report["clean"] and report["unrepairable"] == []
    text = dog("vdi", "check", "chk", address=a, check=False)
    assert text.returncode == 1 and "corrupt" in text.stdout and "missing" in text.stdout

    proc = dog("vdi", "check", "chk", "--repair", "--json", address=a)
    found = {(f["oid"], f["problem"], f["repaired"]) for f in json.loads(proc.stdout)["findings"]}
    assert found == {(oid_str(block0), "corrupt", True), (oid_str(block1), "missing", True)}
    assert dog_json("vdi", "check", "chk", address=a)["clean"] is True
    repaired = object_path(cluster.nodes[0], block0).read_bytes()
    assert repaired[: len(good0)] == good0 and not any(repaired[len(good0) :])
    assert object_path(victim, block1).exists()
    assert await vdi_read(m, "chk", BS + 5, 4096) == _pattern(2, 4096)


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_bad_input_gets_a_one_line_error_and_changes_nothing(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    a = cluster.address
    await m.create("disk", 8 * MiB)
    await vdi_write(m, "disk", 0, b"keep me")
    await _snapshot(m, "disk", "snap")
    big = tmp_path / "big.raw"
    _sparse_image(big, 9 * MiB, [(0, b"x")])
    out_file = tmp_path / "never.raw"
    before = (dog_json("vdi", "list", address=a), all_objects_on_disk(cluster))

    bad: list[tuple[list[str], str]] = [
        # unknown VDI or snapshot
        (["info", "nope"], "no VDI named 'nope'"),
        (["read", "nope"], "no VDI named 'nope'"),
        (["write", "nope", "0"], "no VDI named 'nope'"),
        (["delete", "nope"], "no VDI named 'nope'"),
        (["snapshot", "nope", "-s", "t"], "no VDI named 'nope'"),
        (["clone", "nope@snap", "new"], "no VDI named 'nope'"),
        (["resize", "nope", "1G"], "no VDI named 'nope'"),
        (["flatten", "nope"], "no VDI named 'nope'"),
        (["export", "nope", str(out_file)], "no VDI named 'nope'"),
        (["read", "disk", "-s", "nosuch"], "no snapshot tagged 'nosuch'"),
        (["clone", "disk@nosuch", "new"], "no snapshot tagged 'nosuch'"),
        (["delete", "disk", "-s", "nosuch"], "no snapshot tagged 'nosuch'"),
        # sizes
        (["create", "new", "0"], "more than 0"),
        (["create", "new", "5T"], "maximum"),
        (["create", "new", "lots"], "VDI size"),
        (["create", "new", "1G", "--copies", "4"], "4 copies need at least 4 nodes"),
        # ranges
        (["read", "disk", str(8 * MiB + 1)], "past the end"),
        (["read", "disk", str(8 * MiB - 4), "5"], "past the end"),
        (["write", "disk", str(9 * MiB)], "past the end"),
        (["write", "disk", str(8 * MiB - 4), "5"], "past the end"),
        (["write", "disk", str(8 * MiB - 4)], "nothing written"),  # a file of 10 bytes
        (["import", "disk", str(big)], "VDI 'disk' exists; 'dog vdi import --force'"),
        (["import", "disk", str(big), "--force"], "more than VDI"),
        # tags
        (["snapshot", "disk", "-s", "snap"], "already has a snapshot tagged 'snap'"),
        (["snapshot", "disk", "-s", "a@b"], "snapshot tag 'a@b' contains '@'"),
        (["snapshot", "disk", "-s", ""], "snapshot tag is empty"),
        (["clone", "disk", "new"], "needs a snapshot"),
        # names
        (["create", "bad@name", "1M"], "contains '@'"),
        (["create", "a b", "1M"], "contains U+0020 (SPACE)"),
        (["create", "", "1M"], "VDI name is empty"),
        (["create", "n" * 256, "1M"], "256 bytes long, over the 255 allowed"),
        (["create", "disk", "1M"], "already exists"),
        (["clone", "disk@snap", "disk"], "already exists"),
    ]

    ten = tmp_path / "ten.bytes"
    ten.write_bytes(b"x" * 10)
    for args, expect in bad:  # one at a time: some take the VDI's lock
        err = dog_error("vdi", *args, address=a, input=ten if args[0] == "write" else b"")
        assert expect in err, (args, err)

    after = (dog_json("vdi", "list", address=a), all_objects_on_disk(cluster))
    assert after == before
    assert (await m.state()).locks == {}
    assert not out_file.exists()
    assert await vdi_read(m, "disk", 0, 7) == b"keep me"


async def test_export_into_a_missing_directory_is_one_line_naming_the_path(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("disk", MiB)
    for target in ("/nonexistent/dir/x", "/nonexistent/dir/x.qcow2"):
        err = dog_error("vdi", "export", "disk", target, address=cluster.address)
        assert target in err, err


async def test_write_under_json_reports_what_it_wrote(cluster: Cluster, m: VdiManager) -> None:
    await m.create("w", MiB)
    proc = dog_bytes("vdi", "write", "w", "100", "--json", address=cluster.address,
                     input=b"0123456789")
    assert json.loads(proc.stdout) == {"name": "w", "offset": 100, "written": 10}
    assert await vdi_read(m, "w", 100, 10) == b"0123456789"


async def test_vdi_list_and_info_json_give_sizes_and_times_as_numbers(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("t", 8 * MiB)
    await vdi_write(m, "t", 0, b"x")
    await _snapshot(m, "t", "s")
    rows = dog_json("vdi", "list", address=cluster.address)["vdis"]
    info = dog_json("vdi", "info", "t", address=cluster.address)
    for r in [*rows, info]:
        for key in ("id", "parent", "size", "allocated", "shared", "copies", "block_size"):
            assert type(r[key]) is int, (key, r[key])
        for key in ("created", "snap_time"):
            assert isinstance(r[key], int | float), (key, r[key])
    assert info["size"] == 8 * MiB and info["objects"] == 2


async def test_info_names_a_clones_parent_as_name_at_tag(cluster: Cluster, m: VdiManager) -> None:
    await m.create("src", MiB)
    await _snapshot(m, "src", "gold")
    dog("vdi", "clone", "src@gold", "vm1", address=cluster.address)
    gold = await _id(m, "src", "gold")
    assert f"Parent: src@gold (id {gold})\n" in dog("vdi", "info", "vm1",
                                                      address=cluster.address).stdout
    info = dog_json("vdi", "info", "vm1", address=cluster.address)
    assert (info["parent"], info["parent_name"]) == (gold, "src@gold")
