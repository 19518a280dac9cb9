"""The NBD gateway end to end, driven by the real clients (qemu-img, qemu-io, nbdinfo, nbdcopy,
fio) and by a small raw-socket client, against a real 3-node cluster with copies=3 whose
node 0 serves NBD.

One cluster serves the whole module; every test works on a VDI of its own. Objects are
4 MiB, so offsets near multiples of 4 MiB cross object boundaries on purpose. Every client
runs with a timeout and with the test's tmp_path as its working directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import itertools
import json
import os
import random
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.etcd_server import EtcdServer
from sheep.vdi.manager import open_manager

from ..cluster import (
    Cluster,
    dog,
    dog_bytes,
    dog_error,
    dog_json,
    recv_exact,
    start_cluster,
    wait_until,
)

KiB, MiB = 1 << 10, 1 << 20
OBJ = 4 * MiB  # the cluster's object (block) size
SIZE = 64 * MiB  # every VDI of this module
CLIENT_TIMEOUT = 120

# -- the NBD protocol, from its specification (independent of sheep.gateway.nbd.wire) ------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_ABORT, OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 2, 3, 7, 8, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
INFO_EXPORT = 0
TFLAG_READ_ONLY = 1 << 1
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = range(7)
CMD_BLOCK_STATUS = 7
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR_BIT, CHUNK_DONE = 1 << 15, 1
CMD_FLAG_FUA = 1
EPERM, EINVAL, ENOSPC, EOVERFLOW = 1, 22, 28, 75

GREETING = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">HHQI")  # after the magic: flags, type, cookie, payload length


class NbdOptionError(Exception):
    def __init__(self, rep: int, message: str) -> None:
        super().__init__(f"option refused: reply {rep:#x} {message!r}")
        self.rep = rep


class NbdError(Exception):
    def __init__(self, errno: int) -> None:
        super().__init__(f"NBD error {errno}")
        self.errno = errno


def greet(port: int, *, timeout: float = 10) -> socket.socket:
    """Connect and check the server's fixed newstyle greeting; nothing sent yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    magic, opt_magic, flags = GREETING.unpack(recv_exact(sock, GREETING.size))
    assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
    assert flags & FLAG_FIXED_NEWSTYLE
    return sock


def send_option(sock: socket.socket, option: int, data: bytes = b"") -> None:
    sock.sendall(OPTION.pack(IHAVEOPT, option, len(data)) + data)


def option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    """(option, reply type, payload) of the next option reply."""
    magic, option, rep, length = OPTION_REPLY.unpack(recv_exact(sock, OPTION_REPLY.size))
    assert magic == OPT_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
    return option, rep, recv_exact(sock, length)


def go_payload(export: str) -> bytes:
    raw = export.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)


class NbdClient:
    """A minimal NBD client over a raw socket: fixed newstyle, NBD_OPT_GO, simple replies
    or (with `structured`) structured ones and the base:allocation context; one request at
    a time unless `send` and `reply` are used directly."""

    def __init__(self, port: int, export: str, *, timeout: float = 10,
                 structured: bool = False) -> None:
        self.sock = greet(port, timeout=timeout)
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        self.structured = structured
        self.context: int | None = None
        if structured:
            send_option(self.sock, OPT_STRUCTURED_REPLY)
            assert option_reply(self.sock)[:2] == (OPT_STRUCTURED_REPLY, REP_ACK)
            name, query = export.encode(), b"base:allocation"
            send_option(self.sock, OPT_SET_META_CONTEXT,
                        struct.pack(">I", len(name)) + name
                        + struct.pack(">II", 1, len(query)) + query)
            while (reply := option_reply(self.sock))[1] == REP_META_CONTEXT:
                self.context = struct.unpack_from(">I", reply[2])[0]
            assert reply[1] == REP_ACK and self.context is not None, reply
        send_option(self.sock, OPT_GO, go_payload(export))
        self.size = -1
        self.flags = 0
        while True:
            option, rep, data = option_reply(self.sock)
            assert option == OPT_GO
            if rep == REP_ACK:
                break
            if rep & (1 << 31):
                self.sock.close()
                raise NbdOptionError(rep, data.decode(errors="replace"))
            if rep == REP_INFO and struct.unpack_from(">H", data)[0] == INFO_EXPORT:
                _, self.size, self.flags = struct.unpack(">HQH", data)
        assert self.size >= 0, "no NBD_INFO_EXPORT before the ACK"
        self._cookies = itertools.count(1)
        self._pending: dict[int, tuple[int, int]] = {}  # cookie -> (command, length)
        self._offsets: dict[int, int] = {}

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)

    def send(self, command: int, offset: int, length: int, *, flags: int = 0,
             payload: bytes = b"") -> int:
        cookie = next(self._cookies)
        self._pending[cookie] = (command, length)
        self._offsets[cookie] = offset
        self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)
                          + payload)
        return cookie

    def reply(self) -> tuple[int, int, bytes]:
        """(cookie, error, data) of the next whole reply: data is what a good READ read,
        or the extents (length, flags u32 pairs) of a good BLOCK_STATUS."""
        (magic,) = struct.unpack(">I", recv_exact(self.sock, 4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", recv_exact(self.sock, 12))
            assert cookie in self._pending, f"reply to unknown cookie {cookie}"
            command, length = self._pending.pop(cookie)
            self._offsets.pop(cookie)
            data = recv_exact(self.sock, length) if command == CMD_READ and not error else b""
            return cookie, error, data
        assert magic == STRUCTURED_REPLY_MAGIC and self.structured, f"bad magic {magic:#x}"
        return self._structured_reply()

    def _structured_reply(self) -> tuple[int, int, bytes]:
        """Chunks of one cookie until DONE (this client never has two replies interleave:
        the server sends each reply whole)."""
        first: int | None = None
        error, covered = 0, 0
        pieces: list[tuple[int, bytes]] = []  # READ data chunks: (offset, bytes)
        extents = b""
        while True:
            if first is not None:  # the first chunk's magic was read by reply()
                (magic,) = struct.unpack(">I", recv_exact(self.sock, 4))
                assert magic == STRUCTURED_REPLY_MAGIC, f"bad chunk magic {magic:#x}"
            flags, kind, cookie, length = CHUNK.unpack(recv_exact(self.sock, CHUNK.size))
            payload = recv_exact(self.sock, length)
            if first is None:
                assert cookie in self._pending, f"reply to unknown cookie {cookie}"
                first = cookie
            assert cookie == first, "chunks of two replies interleaved"
            if kind & CHUNK_ERROR_BIT:
                error, msg_len = struct.unpack_from(">IH", payload)
                assert error and msg_len <= len(payload) - 6, payload
            elif kind == CHUNK_OFFSET_DATA:
                (offset,) = struct.unpack_from(">Q", payload)
                pieces.append((offset, payload[8:]))
                covered += length - 8
            elif kind == CHUNK_OFFSET_HOLE:
                covered += struct.unpack(">QI", payload)[1]
            elif kind == CHUNK_BLOCK_STATUS:
                assert struct.unpack_from(">I", payload)[0] == self.context
                extents = payload[4:]
            else:
                assert kind == CHUNK_NONE and not length, (kind, length)
            if flags & CHUNK_DONE:
                break
        command, req_length = self._pending.pop(first)
        start = self._offsets.pop(first)
        if command == CMD_READ and not error:
            assert covered == req_length, f"READ chunks cover {covered} of {req_length} bytes"
            data = bytearray(req_length)  # holes stay zeros
            for offset, piece in pieces:
                assert start <= offset and offset + len(piece) <= start + req_length
                data[offset - start : offset - start + len(piece)] = piece
            return first, 0, bytes(data)
        return first, error, extents

    def call(self, command: int, offset: int, length: int, *, flags: int = 0,
             payload: bytes = b"") -> bytes:
        cookie = self.send(command, offset, length, flags=flags, payload=payload)
        got, error, data = self.reply()
        assert got == cookie
        if error:
            raise NbdError(error)
        return data

    def read(self, offset: int, length: int) -> bytes:
        return self.call(CMD_READ, offset, length)

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self.call(CMD_WRITE, offset, len(data), flags=CMD_FLAG_FUA if fua else 0,
                  payload=data)

    def flush(self) -> None:
        self.call(CMD_FLUSH, 0, 0)

    def close(self) -> None:
        """A clean NBD_CMD_DISC, then the socket."""
        with contextlib.suppress(OSError):
            self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Cluster]:
    """One formatted 3-node cluster (copies=3) for the module; node 0 serves NBD."""
    c = start_cluster(tmp_path_factory.mktemp("nbd") / "cluster", etcd.url, nodes=3,
                      copies=3, nbd=True)
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def gateway_stays_healthy(gw: Cluster) -> Iterator[None]:
    """After every test: the gateway is alive and logged no traceback meanwhile."""
    start = len(gw.nodes[0].log())
    yield
    assert gw.nodes[0].alive, "the NBD gateway died"
    new = gw.nodes[0].log()[start:]
    assert "Traceback" not in new, f"the gateway logged a traceback:\n{new[-5000:]}"


_names = itertools.count()


@pytest.fixture
def vdi(gw: Cluster) -> str:
    """A fresh, empty 64 MiB VDI."""
    name = f"v{next(_names)}"
    dog("vdi", "create", name, "64M", address=gw.address)
    return name


def run(cmd: list[str], cwd: Path, *, ok: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, timeout=CLIENT_TIMEOUT, cwd=cwd,
                          input=input)
    if ok:
        assert proc.returncode == 0, (f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                                      f"{proc.stdout.decode(errors='replace')[-3000:]}\n"
                                      f"{proc.stderr.decode(errors='replace')[-3000:]}")
    return proc


def out(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr).decode(errors="replace")


def qemu_io(url: str, *commands: str, cwd: Path, read_only: bool = False,
            fmt: str = "raw") -> str:
    """qemu-io commands in one connection; any failed command or pattern mismatch fails."""
    cmd = ["qemu-io", "-f", fmt, *(["-r"] if read_only else [])]
    for command in commands:
        cmd += ["-c", command]
    proc = run([*cmd, url], cwd, ok=False)
    text = out(proc)
    if proc.returncode != 0 or "failed" in text.lower() or "error" in text.lower():
        raise AssertionError(f"qemu-io {commands} on {url} ({proc.returncode}):\n{text[-3000:]}")
    return text


def nbdinfo_json(*args: str, cwd: Path) -> object:
    return json.loads(run(["nbdinfo", "--json", *args], cwd).stdout)


def nbd_map(url: str, cwd: Path) -> list[tuple[int, int, bool]]:
    """nbdinfo --map as (offset, length, is data) runs, with adjacent equal runs merged."""
    runs: list[tuple[int, int, bool]] = []
    for e in nbdinfo_json("--map", url, cwd=cwd):  # type: ignore[union-attr]
        data = e["type"] == 0
        if e["type"] not in (0, 3):
            raise AssertionError(f"unexpected extent type {e}")
        if runs and runs[-1][2] == data and runs[-1][0] + runs[-1][1] == e["offset"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], data)
        else:
            runs.append((e["offset"], e["length"], data))
    return runs


def data_runs(objects: set[int]) -> list[tuple[int, int, bool]]:
    """The merged map of an export whose allocated objects are `objects`."""
    runs: list[tuple[int, int, bool]] = []
    for i in range(SIZE // OBJ):
        data = i in objects
        if runs and runs[-1][2] == data:
            runs[-1] = (runs[-1][0], runs[-1][1] + OBJ, data)
        else:
            runs.append((i * OBJ, OBJ, data))
    return runs


def locked(cluster: Cluster, name: str) -> bool:
    locks = dog_json("vdi", "lock", "list", address=cluster.address)["locks"]
    return any(lock["name"] == name for lock in locks)


# -- qemu-img -----------------------------------------------------------------------------


def test_qemu_img_info_reports_the_vdi_size(gw: Cluster, vdi: str, tmp_path: Path) -> None:
    info = json.loads(run(["qemu-img", "info", "--output=json", gw.nbd_url(vdi)],
                          tmp_path).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"


QCOW2_WRITES = [  # (pattern, offset, length): unaligned, across object boundaries, at the end
    (0x11, 0, 64 * KiB),
    (0x22, OBJ - 3000, 6000),
    (0x33, 2 * OBJ - MiB, 2 * MiB + 4 * KiB),
    (0x44, 7 * OBJ + 512, 12345),
    (0x55, SIZE - OBJ - 8 * KiB, OBJ + 8 * KiB),
]


def test_qcow2_converted_into_the_export_and_back_compares_equal(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    src, back, url = tmp_path / "src.qcow2", tmp_path / "back.qcow2", gw.nbd_url(vdi)
    run(["qemu-img", "create", "-f", "qcow2", str(src), str(SIZE)], tmp_path)
    qemu_io(str(src), *(f"write -P {p:#x} {o} {n}" for p, o, n in QCOW2_WRITES), cwd=tmp_path,
            fmt="qcow2")

    run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), url], tmp_path)
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), url], tmp_path)
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", url, str(src)], tmp_path)

    run(["qemu-img", "convert", "-f", "raw", url, "-O", "qcow2", str(back)], tmp_path)
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(src), str(back)], tmp_path)
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(back), url], tmp_path)

    # the comparison is not vacuous: one byte changed in the export is found
    qemu_io(url, f"write -P 0x99 {7 * OBJ + 600} 1", cwd=tmp_path)
    proc = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), url], tmp_path,
               ok=False)
    assert proc.returncode == 1 and "Content mismatch" in out(proc), out(proc)


def test_qemu_img_map_shows_unwritten_ranges_as_holes(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    url = gw.nbd_url(vdi)
    qemu_io(url, f"write -P 0xab {OBJ + 100} 4096", f"write -P 0xcd {5 * OBJ - 10} 20",
            cwd=tmp_path)
    extents = json.loads(run(["qemu-img", "map", "-f", "raw", "--output=json", url],
                             tmp_path).stdout)
    data: list[tuple[int, int]] = []
    pos = 0
    for e in extents:
        assert e["start"] == pos, extents  # the map covers the export without gaps
        pos += e["length"]
        if e["data"]:
            assert not e["zero"], e
            if data and data[-1][1] == e["start"]:
                data[-1] = (data[-1][0], e["start"] + e["length"])
            else:
                data.append((e["start"], e["start"] + e["length"]))
        else:
            assert e["zero"], e  # a hole reads as zeros
    assert pos == SIZE
    assert data == [(OBJ, 2 * OBJ), (4 * OBJ, 6 * OBJ)]


# -- qemu-io ------------------------------------------------------------------------------


@pytest.mark.parametrize("fua", [False, True], ids=["plain", "fua"])
def test_write_then_read_across_object_boundaries(
        gw: Cluster, vdi: str, tmp_path: Path, fua: bool) -> None:
    url, f = gw.nbd_url(vdi), "-f " if fua else ""
    small = (OBJ - 5000, 10000)  # straddles objects 0 and 1
    large = (3 * OBJ - 512, 2 * OBJ + 1024)  # objects 2, 3 and 4
    qemu_io(url,
            f"write {f}-P 0xab {small[0]} {small[1]}",
            f"write {f}-P 0x5c {large[0]} {large[1]}",
            f"read -P 0xab {small[0]} {small[1]}",
            f"read -P 0x5c {large[0]} {large[1]}",
            cwd=tmp_path)
    # a new connection sees the same bytes, and the neighbours are still zeros
    qemu_io(url,
            f"read -P 0xab {small[0]} {small[1]}",
            f"read -P 0x5c {large[0]} {large[1]}",
            f"read -P 0 {small[0] - 4096} 4096",
            f"read -P 0 {sum(small)} 4096",
            f"read -P 0 {large[0] - 4096} 4096",
            f"read -P 0 {sum(large)} 4096",
            cwd=tmp_path, read_only=True)


def test_discard_of_a_whole_object_reads_zeros_and_frees_it(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    url = gw.nbd_url(vdi)
    qemu_io(url, f"write -P 0xab {OBJ} {2 * OBJ}", cwd=tmp_path)
    qemu_io(url, f"discard {OBJ} {OBJ}", f"read -P 0 {OBJ} {OBJ}",
            f"read -P 0xab {2 * OBJ} {OBJ}", cwd=tmp_path)
    assert nbd_map(url, tmp_path) == data_runs({2})


def test_discard_inside_an_object_reads_zeros_and_keeps_the_rest(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    url = gw.nbd_url(vdi)
    start, n = MiB + 512, 64 * KiB
    qemu_io(url, f"write -P 0xcd 0 {OBJ}", cwd=tmp_path)
    qemu_io(url, f"discard {start} {n}", f"read -P 0 {start} {n}",
            f"read -P 0xcd 0 {start}", f"read -P 0xcd {start + n} {OBJ - start - n}",
            cwd=tmp_path)
    qemu_io(url, f"read -P 0 {start} {n}", f"read -P 0xcd 0 {start}", cwd=tmp_path,
            read_only=True)


def test_discard_spanning_objects_reads_zeros_and_frees_the_whole_ones(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    url = gw.nbd_url(vdi)
    lo, hi = 3 * MiB + 4 * KiB, 13 * MiB - 4 * KiB  # part of 0, all of 1 and 2, part of 3
    qemu_io(url, f"write -P 0xef {2 * MiB} {12 * MiB}", cwd=tmp_path)
    qemu_io(url, f"discard {lo} {hi - lo}", f"read -P 0 {lo} {hi - lo}",
            f"read -P 0xef {2 * MiB} {lo - 2 * MiB}", f"read -P 0xef {hi} {14 * MiB - hi}",
            cwd=tmp_path)
    assert nbd_map(url, tmp_path) == data_runs({0, 3})


@pytest.mark.parametrize(("flags", "lo", "allocated"), [
    pytest.param("-z", 3 * MiB + 100, {0, 1, 2}, id="no-hole"),
    pytest.param("-z", OBJ, {0, 1, 2}, id="no-hole-aligned"),
    pytest.param("-z -u", 3 * MiB + 100, {0, 2}, id="may-unmap"),
])
def test_write_zeroes_reads_zeros(gw: Cluster, vdi: str, tmp_path: Path, flags: str, lo: int,
                                  allocated: set[int]) -> None:
    """From inside (or the start of) object 0 or 1 to inside object 2; with NO_HOLE the
    zeros stay allocated, with may-unmap the whole object in the range is freed."""
    url, n, end = gw.nbd_url(vdi), 6 * MiB, 10 * MiB
    qemu_io(url, f"write -P 0x5a {3 * MiB} {end - 3 * MiB}", cwd=tmp_path)
    qemu_io(url, f"write {flags} {lo} {n}", f"read -P 0 {lo} {n}",
            f"read -P 0x5a {3 * MiB} {lo - 3 * MiB}", f"read -P 0x5a {lo + n} {end - lo - n}",
            cwd=tmp_path)
    qemu_io(url, f"read -P 0 {lo} {n}", cwd=tmp_path, read_only=True)
    assert nbd_map(url, tmp_path) == data_runs(allocated)


# -- nbdinfo ------------------------------------------------------------------------------


def test_nbdinfo_list_shows_vdis_and_their_snapshots(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    dog("vdi", "snapshot", vdi, "-s", "s1", address=gw.address)
    listing = nbdinfo_json("--list", gw.nbd_url(), cwd=tmp_path)
    exports = {e["export-name"]: e for e in listing["exports"]}  # type: ignore[index]
    assert {vdi, f"{vdi}@s1"} <= set(exports)
    assert exports[vdi]["export-size"] == SIZE
    assert exports[vdi]["is_read_only"] is False
    assert exports[f"{vdi}@s1"]["is_read_only"] is True
    assert "snapshot" in exports[f"{vdi}@s1"].get("description", "")


def test_nbdinfo_map_shows_data_where_written_and_holes_elsewhere(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    url = gw.nbd_url(vdi)
    assert nbd_map(url, tmp_path) == [(0, SIZE, False)]
    qemu_io(url, "write -P 1 0 512", f"write -P 2 {3 * OBJ + 7} 9", f"write -P 3 {SIZE - 1} 1",
            cwd=tmp_path)
    assert nbd_map(url, tmp_path) == data_runs({0, 3, SIZE // OBJ - 1})


def test_nbdinfo_of_a_snapshot_export_says_read_only(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    dog("vdi", "snapshot", vdi, "-s", "frozen", address=gw.address)
    snap = nbdinfo_json(gw.nbd_url(f"{vdi}@frozen"), cwd=tmp_path)["exports"][0]  # type: ignore
    assert snap["is_read_only"] is True and snap["export-size"] == SIZE
    working = nbdinfo_json(gw.nbd_url(vdi), cwd=tmp_path)["exports"][0]  # type: ignore
    assert working["is_read_only"] is False


def test_writes_to_a_snapshot_export_are_refused(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    url = gw.nbd_url(vdi)
    qemu_io(url, "write -P 0x17 0 4096", cwd=tmp_path)
    dog("vdi", "snapshot", vdi, "-s", "ro", address=gw.address)
    for cmd in ("write -P 0x18 0 4096", "discard 0 4096", "write -z 0 4096"):
        proc = run(["qemu-io", "-f", "raw", "-c", cmd, gw.nbd_url(f"{vdi}@ro")], tmp_path,
                   ok=False)
        text = out(proc).lower()
        assert proc.returncode != 0 or "failed" in text, text
        assert "read-only" in text or "read only" in text or "permission denied" in text, text
    qemu_io(gw.nbd_url(f"{vdi}@ro"), "read -P 0x17 0 4096", cwd=tmp_path, read_only=True)


# -- nbdcopy ------------------------------------------------------------------------------


def test_nbdcopy_file_to_export_and_back_is_identical_and_sparse(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    url, src, back = gw.nbd_url(vdi), tmp_path / "src.raw", tmp_path / "back.raw"
    rng = random.Random(4)
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for offset, n in ((MiB, 100 * KiB), (OBJ - 48 * KiB, 96 * KiB), (8 * OBJ + MiB, MiB)):
            f.seek(offset)
            f.write(rng.randbytes(n))
    run(["nbdcopy", str(src), url], tmp_path)
    assert nbd_map(url, tmp_path) == data_runs({0, 1, 8})

    run(["nbdcopy", url, str(back)], tmp_path)
    assert filecmp.cmp(src, back, shallow=False)
    assert back.stat().st_size == SIZE
    assert back.stat().st_blocks * 512 <= 3 * OBJ, "unwritten objects were copied as data"
    with open(back, "rb") as f:  # objects 2..7 and 9.. were never written: holes in the file
        assert os.lseek(f.fileno(), 2 * OBJ, os.SEEK_DATA) >= 8 * OBJ
        with pytest.raises(OSError):
            os.lseek(f.fileno(), 9 * OBJ, os.SEEK_DATA)


# -- fio ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", [["--bs=4k", "--size=16M"],
                                   ["--bsrange=4k-256k", "--size=32M"]],
                         ids=["4k", "4k-256k"])
def test_fio_random_writes_verify_clean(
        gw: Cluster, vdi: str, tmp_path: Path, shape: list[str]) -> None:
    proc = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={gw.nbd_url(vdi)}",
                "--rw=randwrite", *shape, "--iodepth=16", "--verify=crc32c",
                "--do_verify=1", "--verify_fatal=1", "--output-format=json"], tmp_path,
               ok=False)
    assert proc.returncode == 0, out(proc)[-5000:]
    report = json.loads(proc.stdout[proc.stdout.index(b"{"):])
    (job,) = report["jobs"]
    assert job["error"] == 0, job
    written = int(shape[1].removeprefix("--size=").removesuffix("M")) * MiB
    assert job["write"]["io_bytes"] == written
    assert job["read"]["io_bytes"] == written  # the verify pass read everything back
    assert "verify" not in proc.stderr.decode(errors="replace"), out(proc)[-5000:]


# -- snapshots while the working VDI is written ---------------------------------------------


@pytest.mark.slow
def test_two_snapshot_exports_stay_frozen_while_the_working_vdi_is_written(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    url = gw.nbd_url(vdi)
    span = 3 * OBJ
    with NbdClient(gw.nbd_port, vdi) as writer:  # holds the VDI's lock all along
        for off in range(0, span, MiB):
            writer.write(off, b"\x11" * MiB)
        writer.flush()
        assert locked(gw, vdi)
        dog("vdi", "snapshot", vdi, "-s", "s1", address=gw.address)  # answered by the gateway
        for off in range(2 * MiB, 10 * MiB, MiB):
            writer.write(off, b"\x22" * MiB, fua=True)
        dog("vdi", "snapshot", vdi, "-s", "s2", address=gw.address)
        writer.write(4 * MiB, b"\x33" * (2 * MiB))  # after s2: in neither snapshot

        s1 = bytearray(SIZE)
        s1[:span] = b"\x11" * span
        s2 = bytearray(s1)
        s2[2 * MiB : 10 * MiB] = b"\x22" * (8 * MiB)
        errors: list[BaseException] = []

        def guarded(fn):  # type: ignore[no-untyped-def]
            def go() -> None:
                try:
                    fn()
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)
            return go

        def write_working() -> None:
            for i, pattern in enumerate((0x44, 0x55, 0x66)):
                fua = "-f " if i % 2 else ""
                qemu_io(url, *(f"write {fua}-P {pattern:#x} {off} {MiB}"
                               for off in range(0, span, MiB)),
                        f"read -P {pattern:#x} 0 {span}", cwd=tmp_path)

        def read_s1() -> None:
            for _ in range(3):
                qemu_io(gw.nbd_url(f"{vdi}@s1"), f"read -P 0x11 0 {span}",
                        f"read -P 0 {span} {SIZE - span}", cwd=tmp_path, read_only=True)

        def read_s2() -> None:
            for i in range(3):
                copy = tmp_path / f"s2-{i}.raw"
                run(["nbdcopy", gw.nbd_url(f"{vdi}@s2"), str(copy)], tmp_path)
                assert copy.read_bytes() == s2, "snapshot s2 changed"
                copy.unlink()

        threads = [threading.Thread(target=guarded(f)) for f in (write_working, read_s1,
                                                                 read_s2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * CLIENT_TIMEOUT)
        assert not any(t.is_alive() for t in threads), "a client hung"
        if errors:
            raise errors[0]
        # the raw writer shares the volume the qemu-io writes went through
        assert writer.read(0, span) == b"\x66" * span
    assert run(["nbdcopy", gw.nbd_url(f"{vdi}@s1"), "-"], tmp_path).stdout == s1
    assert dog_bytes("vdi", "read", vdi, "-s", "s2", address=gw.address).stdout == s2


# -- locks and the dog CLI --------------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_export_is_open(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    with NbdClient(gw.nbd_port, vdi) as client:
        assert not client.read_only
        client.write(0, b"\x42" * 4096)
        error = dog_error("vdi", "write", vdi, "0", "512", address=gw.address,
                          input=b"\x01" * 512)
        assert "open for writing" in error, error
        assert client.read(0, 4096) == b"\x42" * 4096  # the refused writer wrote nothing
    wait_until(lambda: not locked(gw, vdi), 3, f"the gateway to release {vdi}")
    dog_bytes("vdi", "write", vdi, "0", "512", address=gw.address, input=b"\x01" * 512)
    assert dog_bytes("vdi", "read", vdi, "0", "4096", address=gw.address).stdout == (
        b"\x01" * 512 + b"\x42" * 3584)


def test_a_vdi_held_by_another_writer_is_exported_read_only(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    url = gw.nbd_url(vdi)

    async def holding() -> None:
        async with open_manager(gw.etcd_url, holder="test writer") as m:
            vol = await m.open(vdi, writable=True)
            try:
                await vol.write(0, b"\x24" * 4096)
                await vol.flush()
                proc = await asyncio.create_subprocess_exec(
                    "nbdinfo", "--json", url, stdout=asyncio.subprocess.PIPE, cwd=tmp_path)
                info, _ = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT)
                export = json.loads(info)["exports"][0]
                assert export["is_read_only"] is True, export
                proc = await asyncio.create_subprocess_exec(
                    "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x24 0 4096", url,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                    cwd=tmp_path)
                text, _ = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT)
                assert proc.returncode == 0 and b"failed" not in text, text
            finally:
                await vol.close()

    asyncio.run(holding())
    with NbdClient(gw.nbd_port, vdi) as client:  # the holder is gone: writable again
        assert not client.read_only
        client.write(4096, b"\x25" * 512)


def test_data_written_through_nbd_is_what_dog_vdi_read_returns(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    rng = random.Random(7)
    image = bytearray(SIZE)
    with NbdClient(gw.nbd_port, vdi) as client:
        for offset, n in ((0, 1000), (OBJ - 777, 5000), (5 * OBJ - MiB, 3 * MiB + 3),
                          (SIZE - 4096, 4096)):
            data = rng.randbytes(n)
            client.write(offset, data)
            image[offset : offset + n] = data
        client.flush()
    got = dog_bytes("vdi", "read", vdi, address=gw.address).stdout
    assert len(got) == SIZE
    assert got == image
    part = dog_bytes("vdi", "read", vdi, str(OBJ - 777), "5000", address=gw.address).stdout
    assert part == image[OBJ - 777 : OBJ - 777 + 5000]


def test_data_written_by_dog_vdi_write_reads_back_through_nbd(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    data = random.Random(8).randbytes(3 * MiB)
    offset = 2 * OBJ - MiB - 5
    dog_bytes("vdi", "write", vdi, str(offset), str(len(data)), address=gw.address,
              input=data)
    with NbdClient(gw.nbd_port, vdi) as client:
        assert client.read(offset, len(data)) == data
        assert client.read(offset - 4096, 4096) == bytes(4096)


def test_a_client_arriving_after_the_other_writer_left_gets_a_writable_volume(
        gw: Cluster, vdi: str, tmp_path: Path) -> None:
    """A reader connected while another process held the VDI keeps its read-only volume;
    a client that connects after that writer left is offered the export writable, and
    must get a writable volume too, not share the reader's."""

    async def reader_while_held() -> NbdClient:
        async with open_manager(gw.etcd_url, holder="test writer") as m:
            vol = await m.open(vdi, writable=True)
            try:
                return await asyncio.to_thread(NbdClient, gw.nbd_port, vdi)
            finally:
                await vol.close()

    with asyncio.run(reader_while_held()) as reader:
        assert reader.read_only
        with NbdClient(gw.nbd_port, vdi) as writer:
            assert not writer.read_only
            writer.write(0, b"\x31" * 4096)  # NbdError(EPERM) if handed the reader's volume
            writer.flush()
            assert writer.read(0, 4096) == b"\x31" * 4096
        with pytest.raises(NbdError) as err:
            reader.write(0, b"\x32" * 512)
        assert err.value.errno == EPERM
