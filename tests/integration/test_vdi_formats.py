"""`dog vdi import` / `dog vdi export` of disk images in the formats qemu-img knows, against
a real 3-node cluster (copies=3, 4 MiB objects). Images are made and compared with qemu-img
and qemu-io; what reached the VDI is read back raw with `dog vdi read`, and its thinness is
judged by the data objects on the nodes' disks."""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sheep.oid import ObjType, oid_index, oid_type, oid_vdi
from sheep.vdi.manager import VdiManager, open_manager

from ..cluster import (
    Cluster,
    all_objects_on_disk,
    dog,
    dog_bytes,
    dog_error,
    dog_json,
    objects_on_disk,
    vdi_read,
    vdi_write,
)

MiB = 1 << 20
GiB = 1 << 30
BS = 4 * MiB  # the cluster's object size: one VDI block

# (pattern, offset, length): data in blocks 0, 1 (straddling 0|1) and 9, and at the end
WRITES = [(0x11, 0, 64 << 10), (0x22, BS - 512, 8 << 10), (0x33, 37 * MiB, MiB),
          (0x44, 48 * MiB - 4096, 4096)]
SIZE = 48 * MiB


@pytest.fixture
async def m(cluster: Cluster) -> AsyncIterator[VdiManager]:
    async with open_manager(cluster.etcd_url, holder="test") as manager:
        yield manager


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _image(path: Path, fmt: str, size: int = SIZE,
           writes: list[tuple[int, int, int]] = WRITES) -> Path:
    _run("qemu-img", "create", "-q", "-f", fmt, str(path), str(size))
    io = [arg for p, off, n in writes for arg in ("-c", f"write -P {p:#x} {off} {n}")]
    _run("qemu-io", "-f", fmt, *io, str(path))
    return path


def _same(a: Path, a_fmt: str, b: Path, b_fmt: str) -> bool:
    proc = subprocess.run(["qemu-img", "compare", "-f", a_fmt, "-F", b_fmt, str(a), str(b)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def _vdi_raw(c: Cluster, spec: str, out: Path) -> Path:
    out.write_bytes(dog_bytes("vdi", "read", spec, address=c.address).stdout)
    return out


def _blocks(c: Cluster, vdi_id: int) -> list[int]:
    """The indexes of VDI `vdi_id`'s data objects that exist on some node's disk."""
    oids = set().union(*objects_on_disk(c).values())
    return sorted(oid_index(o) for o in oids
                  if oid_type(o) == ObjType.DATA and oid_vdi(o) == vdi_id)


# -- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [
    "qcow2",
    pytest.param("vmdk", marks=pytest.mark.slow),
    pytest.param("vhdx", marks=pytest.mark.slow),
    pytest.param("vdi", marks=pytest.mark.slow),
    pytest.param("vpc", marks=pytest.mark.slow),
])
async def test_an_image_imports_and_exports_back_identical(
    cluster: Cluster, tmp_path: Path, fmt: str
) -> None:
    a = cluster.address
    original = _image(tmp_path / f"in.{fmt}", fmt)
    size = json.loads(_run("qemu-img", "info", "--output=json", str(original)))["virtual-size"]

    reply = dog_json("vdi", "import", "disk", str(original), "--format", fmt, address=a)
    assert (reply["name"], reply["format"], reply["size"]) == ("disk", fmt, size)
    assert _same(_vdi_raw(cluster, "disk", tmp_path / "vdi.raw"), "raw", original, fmt)

    back = tmp_path / f"back.{fmt}"
    reply = dog_json("vdi", "export", "disk", str(back), "--format", fmt, address=a)
    assert (reply["format"], reply["size"]) == (fmt, size)
    assert json.loads(_run("qemu-img", "info", "--output=json", str(back)))["format"] == fmt
    assert _same(original, fmt, back, fmt)


async def test_import_detects_the_image_format(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    image = _image(tmp_path / "disk.img", "vmdk")  # the name says nothing
    reply = dog_json("vdi", "import", "d", str(image), address=cluster.address)
    assert reply["format"] == "vmdk"
    assert (await m.state()).lookup("d").size == SIZE
    assert _same(_vdi_raw(cluster, "d", tmp_path / "vdi.raw"), "raw", image, "vmdk")


async def test_export_takes_the_format_from_the_file_extension(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    await m.create("e", 8 * MiB)
    await vdi_write(m, "e", MiB, b"some data")
    a = cluster.address
    assert dog_json("vdi", "export", "e", str(tmp_path / "e.vhdx"), address=a)["format"] == "vhdx"
    assert dog_json("vdi", "export", "e", str(tmp_path / "e.vhd"), address=a)["format"] == "vpc"
    assert dog_json("vdi", "export", "e", str(tmp_path / "e.img"), address=a)["format"] == "raw"
    raw = (tmp_path / "e.img").read_bytes()  # other names: raw, as always
    assert len(raw) == 8 * MiB and raw[MiB : MiB + 9] == b"some data"
    assert _same(tmp_path / "e.vhdx", "vhdx", tmp_path / "e.img", "raw")


# -- thin ---------------------------------------------------------------------------------


async def test_a_mostly_empty_image_imports_thin_and_exports_small(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    a = cluster.address
    writes = [(0x55, 0, 4096), (0x66, 300 * MiB + 7 * 512, 64 << 10), (0x77, GiB - MiB, MiB)]
    image = _image(tmp_path / "big.qcow2", "qcow2", GiB, writes)

    reply = dog_json("vdi", "import", "thin", str(image), address=a)
    assert reply["allocated"] == 3 * BS
    rec = (await m.state()).lookup("thin")
    assert rec.size == GiB
    [row] = dog_json("vdi", "list", "thin", address=a)["vdis"]
    assert row["allocated"] == 3 * BS
    assert _blocks(cluster, rec.id) == [0, 75, 255]  # only the blocks holding data

    back = tmp_path / "back.qcow2"
    reply = dog_json("vdi", "export", "thin", str(back), address=a)
    assert reply["file_size"] == back.stat().st_blocks * 512 < 4 * MiB
    assert _same(image, "qcow2", back, "qcow2")


async def test_forced_import_into_an_existing_vdi_replaces_all_its_content(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    await m.create("dst", 60 * MiB)
    await vdi_write(m, "dst", 2 * BS, b"old data, where the image has none")
    await vdi_write(m, "dst", 50 * MiB, b"past the image")
    image = _image(tmp_path / "in.qcow2", "qcow2")
    dog("vdi", "import", "dst", str(image), "--force", address=cluster.address)
    assert await vdi_read(m, "dst", 2 * BS, 34) == bytes(34)
    assert await vdi_read(m, "dst", 37 * MiB, 4) == b"\x33" * 4
    assert await vdi_read(m, "dst", 50 * MiB, 14) == bytes(14)  # no old tail
    rec = (await m.state()).lookup("dst")
    assert rec.size == 60 * MiB and not rec.incomplete
    assert _blocks(cluster, rec.id) == [0, 1, 9, 11]  # blocks 2 and 12 dropped, not zeroed


# -- snapshots ----------------------------------------------------------------------------


async def test_export_of_a_snapshot_writes_the_snapshot(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    image = _image(tmp_path / "in.qcow2", "qcow2")
    a = cluster.address
    dog("vdi", "import", "s", str(image), address=a)
    dog("vdi", "snapshot", "s", "-s", "before", address=a)
    await vdi_write(m, "s", 0, b"changed after the snapshot")

    reply = dog_json("vdi", "export", "s@before", str(tmp_path / "snap.qcow2"), address=a)
    assert reply["name"] == "s@before"
    assert _same(image, "qcow2", tmp_path / "snap.qcow2", "qcow2")
    dog("vdi", "export", "s", str(tmp_path / "live.qcow2"), address=a)
    assert not _same(image, "qcow2", tmp_path / "live.qcow2", "qcow2")


# -- progress -----------------------------------------------------------------------------


async def test_progress_is_shown_when_asked(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.address
    image = _image(tmp_path / "in.vmdk", "vmdk")
    out = dog("vdi", "import", "p", str(image), "--progress", address=a)
    assert "import [" in out.stderr and "100%" in out.stderr
    out = dog("vdi", "export", "p", str(tmp_path / "out.qcow2"), "--progress", address=a)
    assert "export [" in out.stderr and "100%" in out.stderr
    # and without it (stderr is not a terminal here) not a word
    assert dog("vdi", "export", "p", str(tmp_path / "out.qcow2"), address=a).stderr == ""


# -- bad input ----------------------------------------------------------------------------


def _corrupt_qcow2(path: Path) -> Path:
    """A qcow2 whose header reads fine but whose first L2 table offset is nonsense: it
    probes well and fails half-way through the conversion."""
    _image(path, "qcow2")
    with open(path, "r+b") as f:
        (l1_offset,) = struct.unpack(">Q", f.read(48)[40:48])
        f.seek(l1_offset)
        f.write(struct.pack(">Q", (1 << 63) | 0x200))
    return path


@pytest.mark.slow
async def test_bad_input_gets_a_one_line_error_and_changes_nothing(
    cluster: Cluster, m: VdiManager, tmp_path: Path
) -> None:
    a = cluster.address
    await m.create("small", 8 * MiB)
    await vdi_write(m, "small", 0, b"keep me")
    image = _image(tmp_path / "in.qcow2", "qcow2")
    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(b"not an image at all" * 100)
    corrupt = _corrupt_qcow2(tmp_path / "corrupt.qcow2")
    out_file = tmp_path / "never.qcow2"
    before = (dog_json("vdi", "list", address=a), all_objects_on_disk(cluster))

    bad: list[tuple[list[str], str]] = [
        (["import", "new", str(image), "--format", "qcow3"], "unknown image format 'qcow3'"),
        (["export", "small", str(out_file), "--format", "iso"], "unknown image format 'iso'"),
        (["import", "new", str(tmp_path / "missing.qcow2")], "no such file"),
        (["import", "new", str(garbage), "--format", "qcow2"], "not in qcow2 format"),
        (["import", "new", str(image), "--format", "vmdk"], "VMDK"),
        (["import", "new", str(corrupt)], "corrupt"),  # fails after the VDI was made
        (["import", "small", str(image)], "VDI 'small' exists; 'dog vdi import --force'"),
        (["import", "small", str(image), "--force"], "more than VDI 'small'"),
        (["export", "nope", str(out_file)], "no VDI named 'nope'"),
        (["export", "small@nosuch", str(out_file)], "no snapshot tagged 'nosuch'"),
    ]
    for args, expect in bad:
        err = dog_error("vdi", *args, address=a)
        assert expect in err, (args, err)

    after = (dog_json("vdi", "list", address=a), all_objects_on_disk(cluster))
    assert after == before
    assert (await m.state()).locks == {}
    assert not out_file.exists()
