"""The data plane of a cluster whose nodes have identities: only mutual-TLS peers holding
a node or admin certificate of the cluster's CA get a frame handled.

One secure 3-node cluster (copies=3, node 0 an NBD gateway) serves the module. Its VDI
`v` holds one object of known data, written through dog's Python API as the admin; every
refused attempt must leave that object, on every replica, exactly as it was.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sheep.cluster.state import NodeInfo
from sheep.dataplane.client import PeerPool
from sheep.dataplane.link import ASK_ENCRYPTED
from sheep.dataplane.tls import HANDSHAKE_TIMEOUT
from sheep.dataplane.wire import MAGIC, Opcode, pack_header
from sheep.localcluster import LocalCluster
from sheep.oid import ObjType, oid_type
from sheep.security.identity import Identity
from sheep.security.pki import ClusterCA
from sheep.vdi.manager import open_manager

from ..cluster import SecureCluster, qemu_io, recv_exact, vdi_read, vdi_write

TIMEOUT = 10.0
SIZE = 4 << 20  # one object of the cluster's default size
NO_REPLY_PREFIX = struct.pack("<I", MAGIC)  # how every data-plane reply begins


@dataclass
class Secured:
    cluster: SecureCluster
    admin: Identity
    data: bytes  # what VDI `v` holds
    oid: int  # its one data object
    nodes: list[NodeInfo]  # every member, with its data port


async def members(cluster: SecureCluster, admin: Identity) -> list[NodeInfo]:
    async with open_manager(cluster.etcd_url, identity=admin) as manager:
        record = manager.client.view.record
        assert record is not None
        return list(record.nodes)


def data_objects(cluster: SecureCluster) -> set[int]:
    return {int(p.name, 16) for node in cluster.nodes for p in (node.dir / "obj").iterdir()
            if len(p.name) == 16 and oid_type(int(p.name, 16)) == ObjType.DATA}


async def write_one_object(cluster: SecureCluster, admin: Identity, data: bytes) -> None:
    async with open_manager(cluster.etcd_url, identity=admin) as manager:
        await manager.create("v", 4 * SIZE)
        await vdi_write(manager, "v", 0, data)


@pytest.fixture(scope="module")
def secured(secure_cluster: SecureCluster) -> Secured:
    admin = Identity.from_files(secure_cluster.pki.admin)
    data = random.Random(16).randbytes(SIZE)
    asyncio.run(write_one_object(secure_cluster, admin, data))
    (oid,) = data_objects(secure_cluster)
    return Secured(secure_cluster, admin, data, oid,
                   asyncio.run(members(secure_cluster, admin)))


async def replicas(secured: Secured, oid: int, length: int = SIZE) -> list[bytes]:
    """The object as each member holds it, read as the admin."""
    pool = PeerPool(identity=secured.admin)
    try:
        return [bytes(await pool.read_replica(n.data_addr, oid, 0, length, timeout=TIMEOUT))
                for n in secured.nodes]
    finally:
        await pool.close()


async def assert_untouched(secured: Secured) -> None:
    assert await replicas(secured, secured.oid) == [secured.data] * len(secured.nodes)


def tampering_write(oid: int, epoch: int = 0) -> bytes:
    payload = b"TAMPERED" * 512
    return pack_header(Opcode.WRITE, 1, epoch=epoch, oid=oid, length=len(payload)) + payload


def answer_until_closed(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """Everything the node sends until it closes the connection (bounded)."""
    sock.settimeout(TIMEOUT)
    got = b""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError("the node kept the connection open")


def tls_client(identity: Identity, addr: tuple[str, int]) -> ssl.SSLSocket | None:
    """A python ssl connection as `identity`, the link asked encrypted (link.py); None if
    the node ended the handshake."""
    raw = socket.create_connection(addr, timeout=TIMEOUT)
    try:
        raw.sendall(ASK_ENCRYPTED)
        assert recv_exact(raw, 1) == ASK_ENCRYPTED
        return identity.client_ssl().wrap_socket(raw, server_hostname="sheep")
    except (ssl.SSLError, ConnectionResetError):
        raw.close()
        return None


def node_logs(cluster: SecureCluster) -> str:
    return "".join(n.log() for n in cluster.nodes)


# -- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", ["write", "remove"])
async def test_a_plaintext_frame_is_refused_and_the_object_is_unchanged(
        secured: Secured, frame: str) -> None:
    for node in secured.nodes:
        with socket.create_connection(node.data_addr, timeout=TIMEOUT) as sock:
            sock.sendall(tampering_write(secured.oid) if frame == "write" else
                         pack_header(Opcode.REMOVE, 1, oid=secured.oid))
            assert not answer_until_closed(sock).startswith(NO_REPLY_PREFIX)
    await assert_untouched(secured)


async def test_a_certificate_of_another_ca_is_refused(secured: Secured, tmp_path) -> None:
    other = ClusterCA.create(tmp_path / "ca", "other")
    impostor = Identity.from_files(other.issue(tmp_path / "node0", "node0", "node"))
    sock = tls_client(impostor, secured.nodes[0].data_addr)
    if sock is not None:  # TLS 1.3: the client may finish before the node checks it
        with sock:
            sock.sendall(tampering_write(secured.oid))
            assert answer_until_closed(sock) == b""
    await assert_untouched(secured)


async def test_a_client_role_certificate_is_refused(secured: Secured) -> None:
    qemu = Identity.from_files(secured.cluster.pki.client)
    sock = tls_client(qemu, secured.nodes[1].data_addr)
    assert sock is not None, "the handshake itself succeeds: the chain is good"
    with sock:
        sock.sendall(tampering_write(secured.oid))
        assert answer_until_closed(sock) == b""
    await assert_untouched(secured)
    assert "holds a 'client' certificate" in node_logs(secured.cluster)


async def test_an_unfinished_handshake_is_closed_after_the_timeout(secured: Secured) -> None:
    with socket.create_connection(secured.nodes[2].data_addr, timeout=TIMEOUT) as sock:
        started = time.monotonic()
        assert answer_until_closed(sock) == b""
        assert HANDSHAKE_TIMEOUT - 1 < time.monotonic() - started < HANDSHAKE_TIMEOUT + 5


# -- let in -----------------------------------------------------------------------------------


async def test_the_admin_reads_back_what_it_wrote(secured: Secured) -> None:
    async with open_manager(secured.cluster.etcd_url, identity=secured.admin) as manager:
        assert await vdi_read(manager, "v", 0, SIZE) == secured.data


async def test_a_gateway_write_reaches_every_replica_over_mutual_tls(
        secured: Secured, tmp_path) -> None:
    """Node 0's NBD gateway writes its own replica and sends the others to its peers
    as a node: each replica holds the new bytes."""
    qemu_io(f"{secured.cluster.nbd_url}/v", f"write -P 0x5a {SIZE} 65536", cwd=tmp_path)
    (oid,) = data_objects(secured.cluster) - {secured.oid}
    assert await replicas(secured, oid, 65536) == [b"\x5a" * 65536] * len(secured.nodes)


# -- what crosses the wire -----------------------------------------------------------------


class LoopbackSniffer:
    """Every byte of every packet on `lo` while it runs (a raw AF_PACKET socket: root)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._chunks: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._chunks.append(self._sock.recv(1 << 16))
            except TimeoutError:
                continue

    def __enter__(self) -> LoopbackSniffer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def saw_any_of(self, pieces: list[bytes]) -> bool:
        wire = b"".join(self._chunks)
        return any(piece in wire for piece in pieces)


def pieces_of(data: bytes) -> list[bytes]:
    """64-byte pieces from all over `data`: one of them lies inside some TCP segment."""
    return [data[i:i + 64] for i in range(0, len(data) - 64, 4096)]


async def write_and_read_sniffed(cluster: LocalCluster, name: str, data: bytes) -> bool:
    """Write `data` to a new VDI and read it back as the admin, sniffing loopback: whether
    any of its bytes crossed it in the clear."""
    admin = Identity.from_files(cluster.pki.admin)
    async with open_manager(cluster.etcd_url, identity=admin) as manager:
        await manager.create(name, 4 * SIZE)
        with LoopbackSniffer() as sniffer:
            await vdi_write(manager, name, 0, data)
            assert await vdi_read(manager, name, 0, len(data)) == data
    return sniffer.saw_any_of(pieces_of(data))


@pytest.fixture(scope="module")
def encrypting_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Two secure nodes started with --encrypt-loopback, copies=2."""
    cluster = LocalCluster(tmp_path_factory.mktemp("encrypting"), 2, secure=True,
                           node_extra=lambda _i: ["--encrypt-loopback"])
    try:
        cluster.up(copies=2)
        yield cluster
    finally:
        cluster.stop()


async def test_with_encrypt_loopback_no_byte_of_a_disk_crosses_loopback_in_the_clear(
        encrypting_cluster: LocalCluster) -> None:
    data = random.Random(161).randbytes(1 << 20)
    assert not await write_and_read_sniffed(encrypting_cluster, "sealed", data)


async def test_by_default_loopback_links_carry_frames_in_the_clear_after_authenticating(
        secure_cluster: SecureCluster) -> None:
    """What --encrypt-loopback changes (and proof that the sniffer above sees frames)."""
    data = random.Random(162).randbytes(1 << 20)
    assert await write_and_read_sniffed(secure_cluster, "clear", data)
