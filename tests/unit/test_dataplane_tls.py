"""Mutual TLS in front of the data plane (sheep/dataplane/tls.py), in one process: a real
listener with a recording handler, real TLS clients (PeerPool, python ssl), certificates of
a real CA; on both event loops a node may run (asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop

from sheep.dataplane.client import PeerPool, PeerUnavailable
from sheep.dataplane.codec import Frame
from sheep.dataplane.link import ASK_CLEAR, ASK_ENCRYPTED
from sheep.dataplane.server import Listening, serve
from sheep.dataplane.tls import CLIENT_ROLES, SERVER_ROLES, refusal
from sheep.dataplane.wire import HEADER_SIZE, Opcode, pack_header
from sheep.security.identity import Identity, Peer
from sheep.security.pki import ClusterCA

EPOCH = 7
WAIT = 5.0


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return uvloop.EventLoopPolicy() if request.param == "uvloop" \
        else asyncio.DefaultEventLoopPolicy()


class Recorder:
    """A frame handler that answers GET_EPOCH and remembers every frame it was given."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def handle(self, frame: Frame, conn) -> None:
        self.frames.append(frame)
        conn.send(pack_header(frame.opcode, frame.req_id, epoch=EPOCH))


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = ClusterCA.create(root / "ca", "test")
        self.other_ca = ClusterCA.create(root / "other-ca", "other")
        self.root = root

    def identity(self, name: str, role: str, *, other: bool = False) -> Identity:
        ca = self.other_ca if other else self.ca
        where = self.root / f"{name}-{role}-{'other' if other else 'ours'}"
        return Identity.from_files(ca.issue(where, name, role))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


class Listener:
    def __init__(self, server: Listening, sock: socket.socket, recorder: Recorder) -> None:
        self.server = server
        self.recorder = recorder
        self.addr: tuple[str, int] = sock.getsockname()[:2]
        self._sock = sock

    def close(self) -> None:
        self.server.close()
        self._sock.close()


async def listen(identity: Identity, *, max_connections: int = 16,
                 handshake_timeout: float = WAIT, encrypt_loopback: bool = False) -> Listener:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    recorder = Recorder()
    server = await serve(recorder, sock, max_connections, identity=identity,
                         encrypt_loopback=encrypt_loopback,
                         handshake_timeout=handshake_timeout)
    return Listener(server, sock, recorder)


@pytest.fixture
async def node(pki: Pki) -> AsyncIterator[Listener]:
    listener = await listen(pki.identity("node0", "node"))
    yield listener
    listener.close()


async def epoch_through(pool: PeerPool, addr: tuple[str, int]) -> int:
    conn = await pool.get(addr)
    frame = await conn.request(Opcode.GET_EPOCH, timeout=WAIT)
    return frame.epoch


async def closed_without_reply(reader: asyncio.StreamReader) -> bool:
    """The peer closed (EOF or reset) having sent no application byte."""
    try:
        data = await asyncio.wait_for(reader.read(HEADER_SIZE), WAIT)
    except (ConnectionError, ssl.SSLError):
        return True
    return data == b""


# -- who may connect ------------------------------------------------------------------------


def test_nodes_and_admins_may_use_the_data_plane() -> None:
    assert refusal(Peer("node", "n1"), CLIENT_ROLES) is None
    assert refusal(Peer("admin", "admin"), CLIENT_ROLES) is None


def test_clients_and_etcd_and_the_anonymous_may_not() -> None:
    assert "'client'" in (refusal(Peer("client", "qemu"), CLIENT_ROLES) or "")
    assert "'etcd'" in (refusal(Peer("etcd", "etcd"), CLIENT_ROLES) or "")
    assert refusal(None, CLIENT_ROLES) == "no client certificate"


def test_a_dialer_accepts_only_a_node_at_the_other_end() -> None:
    assert refusal(Peer("node", "n2"), SERVER_ROLES) is None
    assert refusal(Peer("admin", "admin"), SERVER_ROLES) is not None


# -- the listener ---------------------------------------------------------------------------


async def test_a_node_certificate_gets_replies(pki: Pki, node: Listener) -> None:
    pool = PeerPool(identity=pki.identity("node1", "node"))
    try:
        assert await epoch_through(pool, node.addr) == EPOCH
    finally:
        await pool.close()


async def test_an_admin_certificate_gets_replies(pki: Pki, node: Listener) -> None:
    pool = PeerPool(identity=pki.identity("admin", "admin"))
    try:
        assert await epoch_through(pool, node.addr) == EPOCH
    finally:
        await pool.close()


async def test_a_plaintext_frame_is_never_handled(node: Listener) -> None:
    reader, writer = await asyncio.open_connection(*node.addr)
    writer.write(pack_header(Opcode.REMOVE, 1, epoch=EPOCH, oid=42))
    assert await closed_without_reply(reader)
    writer.close()
    assert node.recorder.frames == []


@pytest.mark.parametrize("encrypt", [False, True], ids=["clear-link", "encrypted-link"])
async def test_a_client_certificate_is_refused_before_any_frame(
        pki: Pki, node: Listener, encrypt: bool) -> None:
    pool = PeerPool(identity=pki.identity("qemu", "client"), encrypt_loopback=encrypt)
    try:
        with pytest.raises((PeerUnavailable, TimeoutError)):
            await epoch_through(pool, node.addr)
    finally:
        await pool.close()
    assert node.recorder.frames == []


@pytest.mark.parametrize("encrypt", [False, True], ids=["clear-link", "encrypted-link"])
async def test_a_certificate_of_another_ca_is_refused(pki: Pki, node: Listener,
                                                      encrypt: bool) -> None:
    pool = PeerPool(identity=pki.identity("node1", "node", other=True), encrypt_loopback=encrypt)
    try:
        with pytest.raises((PeerUnavailable, TimeoutError)):
            await epoch_through(pool, node.addr)
    finally:
        await pool.close()
    assert node.recorder.frames == []


async def test_a_request_sent_right_after_the_handshake_is_answered(
        pki: Pki, node: Listener) -> None:
    """TLS 1.3: the client may write its first frame with its Finished, before the server
    has checked its role."""
    ctx = pki.identity("node1", "node").client_ssl()
    reader, writer = await asyncio.open_connection(*node.addr)
    writer.write(ASK_ENCRYPTED)
    assert await asyncio.wait_for(reader.readexactly(1), WAIT) == ASK_ENCRYPTED
    await writer.start_tls(ctx, server_hostname="sheep")
    writer.write(pack_header(Opcode.GET_EPOCH, 5))
    reply = await asyncio.wait_for(reader.readexactly(HEADER_SIZE), WAIT)
    writer.close()
    assert reply == pack_header(Opcode.GET_EPOCH, 5, epoch=EPOCH)


@pytest.mark.parametrize("encrypt", [False, True], ids=["clear-link", "encrypted-link"])
async def test_the_dialer_refuses_a_peer_that_is_not_a_node(pki: Pki, encrypt: bool) -> None:
    impostor = await listen(pki.identity("etcd", "etcd"))
    pool = PeerPool(identity=pki.identity("node1", "node"), encrypt_loopback=encrypt)
    try:
        with pytest.raises(PeerUnavailable, match="'etcd' certificate"):
            await pool.get(impostor.addr)
    finally:
        await pool.close()
        impostor.close()


async def test_an_unfinished_handshake_is_closed_after_the_timeout(pki: Pki) -> None:
    listener = await listen(pki.identity("node0", "node"), handshake_timeout=0.5)
    try:
        reader, writer = await asyncio.open_connection(*listener.addr)
        started = asyncio.get_running_loop().time()
        assert await closed_without_reply(reader)
        assert asyncio.get_running_loop().time() - started < WAIT
        writer.close()
    finally:
        listener.close()


async def test_unfinished_handshakes_count_against_the_connection_cap(pki: Pki) -> None:
    listener = await listen(pki.identity("node0", "node"), max_connections=2,
                            handshake_timeout=1.0)
    pool = PeerPool(identity=pki.identity("node1", "node"))
    try:
        idle = [await asyncio.open_connection(*listener.addr) for _ in range(2)]
        await asyncio.sleep(0.1)  # both accepted and counted
        with pytest.raises(PeerUnavailable):  # the third is closed at once
            await pool.get(listener.addr)
        for reader, _ in idle:  # the timeout frees their places
            assert await closed_without_reply(reader)
        assert await epoch_through(pool, listener.addr) == EPOCH
        for _, writer in idle:
            writer.close()
    finally:
        await pool.close()
        listener.close()


# -- encrypted, or in the clear after authentication (link.py) ------------------------------


async def link_encrypted(pool: PeerPool, addr: tuple[str, int]) -> bool:
    """Whether the link `pool` makes to `addr` (which must serve it) carries frames inside
    TLS; the pool is closed after."""
    try:
        assert await epoch_through(pool, addr) == EPOCH
        conn = pool.cached(addr)
        assert conn is not None
        return conn.encrypted
    finally:
        await pool.close()


async def test_a_loopback_link_is_authenticated_then_carries_frames_in_the_clear(
        pki: Pki, node: Listener) -> None:
    assert not await link_encrypted(PeerPool(identity=pki.identity("node1", "node")), node.addr)


async def test_a_dialer_that_encrypts_loopback_gets_an_encrypted_link(
        pki: Pki, node: Listener) -> None:
    pool = PeerPool(identity=pki.identity("node1", "node"), encrypt_loopback=True)
    assert await link_encrypted(pool, node.addr)


async def test_a_node_that_encrypts_loopback_encrypts_a_link_asked_in_the_clear(
        pki: Pki) -> None:
    listener = await listen(pki.identity("node0", "node"), encrypt_loopback=True)
    try:
        assert await link_encrypted(PeerPool(identity=pki.identity("node1", "node")),
                                    listener.addr)
    finally:
        listener.close()


async def test_frames_in_the_clear_without_the_tls_handshake_are_never_handled(
        node: Listener) -> None:
    """Asking for a clear link skips no authentication: the handshake still comes first."""
    reader, writer = await asyncio.open_connection(*node.addr)
    writer.write(ASK_CLEAR)
    assert await asyncio.wait_for(reader.readexactly(1), WAIT) == ASK_CLEAR
    writer.write(pack_header(Opcode.REMOVE, 1, epoch=EPOCH, oid=42))
    assert await closed_without_reply(reader)
    writer.close()
    assert node.recorder.frames == []


async def test_a_byte_that_is_no_link_mode_is_closed_unanswered(node: Listener) -> None:
    reader, writer = await asyncio.open_connection(*node.addr)
    writer.write(b"\x16")  # a TLS record's first byte, sent by a dialer that skips the ask
    assert await closed_without_reply(reader)
    writer.close()


async def test_a_tls_record_announced_past_the_limit_is_closed_unread(node: Listener) -> None:
    """Asking for a clear link, then announcing a 64 KiB record: nothing is allocated for it
    (TLS records are at most 16 KiB + 256), the connection is closed."""
    reader, writer = await asyncio.open_connection(*node.addr)
    writer.write(ASK_CLEAR)
    assert await asyncio.wait_for(reader.readexactly(1), WAIT) == ASK_CLEAR
    writer.write(bytes([22, 3, 1, 0xFF, 0xFF]))  # a handshake record of 65535 bytes
    assert await closed_without_reply(reader)
    writer.close()
    assert node.recorder.frames == []
