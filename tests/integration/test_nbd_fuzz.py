"""Hostile NBD clients against a live gateway: garbage at every stage of the handshake and of
transmission, over raw loopback sockets.

What must hold after every case: the gateway process is alive, a healthy connection opened
before any fuzzing still reads the right bytes, and a new client can still connect and
read. Framing the server cannot trust (bad magics, oversize payloads, huge option lengths)
ends that one connection; a well-framed but wrong request gets an error reply and the
connection goes on.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sheep.etcd_server import EtcdServer

from ..cluster import Cluster, dog, dog_json, start_cluster, wait_until
from ..hostile import rss
from .test_nbd import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    EOVERFLOW,
    EPERM,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    OPT_GO,
    OPT_LIST,
    OPT_REPLY_MAGIC,
    OPTION,
    OPTION_REPLY,
    REP_ACK,
    REP_ERR_UNSUP,
    REP_SERVER,
    REQUEST,
    REQUEST_MAGIC,
    NbdClient,
    NbdError,
    go_payload,
    greet,
    option_reply,
    recv_exact,
    send_option,
)

KiB, MiB = 1 << 10, 1 << 20
OBJ = 4 * MiB
SIZE = 16 * MiB
DATA_AT = OBJ - 300 * KiB  # the known data straddles objects 0 and 1
DATA = random.Random(1).randbytes(600 * KiB)
MAX_PAYLOAD = 32 * MiB  # what the gateway advertises as its maximum payload
CLOSE_TIMEOUT = 5.0

FUZZ = settings(max_examples=50, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Cluster]:
    """A formatted 3-node cluster (copies=3) whose node 0 serves NBD, with two VDIs: "fz"
    holds DATA (and its snapshot "fz@frozen" too), "scratch" takes the fuzzed writes."""
    c = start_cluster(tmp_path_factory.mktemp("nbdfuzz") / "cluster", etcd.url, nodes=3,
                      copies=3, nbd=True)
    try:
        for name in ("fz", "scratch"):
            dog("vdi", "create", name, str(SIZE), address=c.address)
        with NbdClient(c.nbd_port, "fz") as client:
            client.write(DATA_AT, DATA)
            client.flush()
        wait_until(lambda: not dog_json("vdi", "lock", "list", address=c.address)["locks"],
                   5, "the writer's lock to go")
        dog("vdi", "snapshot", "fz", "-s", "frozen", address=c.address)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def healthy(gw: Cluster) -> Iterator[NbdClient]:
    """A well-behaved connection, opened before any fuzzing and kept through all of it."""
    with NbdClient(gw.nbd_port, "fz") as client:
        yield client


def assert_gateway_serves(gw: Cluster, healthy: NbdClient) -> None:
    assert gw.nodes[0].alive, "the NBD gateway died"
    assert healthy.read(DATA_AT, len(DATA)) == DATA


@pytest.fixture(autouse=True)
def survives(gw: Cluster, healthy: NbdClient) -> Iterator[None]:
    """After every test: the old connection still reads DATA, a new one (with structured
    replies) can connect and read it from the snapshot, and the gateway logged no traceback
    meanwhile."""
    start = len(gw.nodes[0].log())
    yield
    assert_gateway_serves(gw, healthy)
    with NbdClient(gw.nbd_port, "fz@frozen", structured=True) as fresh:
        assert fresh.read(DATA_AT, len(DATA)) == DATA
    new = gw.nodes[0].log()[start:]
    assert "Traceback" not in new, f"the gateway logged a traceback:\n{new[-5000:]}"


# -- helpers ----------------------------------------------------------------------------------


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the server will take: it may hang up half way, which is allowed."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def drain_until_closed(sock: socket.socket, timeout: float = CLOSE_TIMEOUT) -> bytes:
    """Everything the server still sends, until it closes the connection; fails if it
    keeps the connection open past `timeout`."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open {timeout}s") from None
        except ConnectionResetError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def hang_up(sock: socket.socket) -> bytes:
    """Half-close: the server must then end the connection too. Returns what it sent."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    try:
        return drain_until_closed(sock)
    finally:
        sock.close()


def parse_option_replies(data: bytes) -> list[tuple[int, int]]:
    """(option, reply type) of each reply in `data`, which must be whole, well-formed
    fixed newstyle option replies and nothing else."""
    out = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= OPTION_REPLY.size, f"truncated reply header at {pos}"
        magic, option, rep, length = OPTION_REPLY.unpack_from(data, pos)
        assert magic == OPT_REPLY_MAGIC, f"bad option reply magic at {pos}: {data[pos:pos+8]!r}"
        pos += OPTION_REPLY.size + length
        assert pos <= len(data), "truncated reply payload"
        out.append((option, rep))
    return out


def negotiated(gw: Cluster, export: str) -> socket.socket:
    """A socket in the transmission phase on `export` (NBD_OPT_GO done, simple replies)."""
    client = NbdClient(gw.nbd_port, export)
    return client.sock


def request(command: int, offset: int, length: int, *, flags: int = 0, cookie: int = 7,
            magic: int = REQUEST_MAGIC) -> bytes:
    return REQUEST.pack(magic, flags, command, cookie, offset, length)


def wait_unlocked(gw: Cluster, name: str) -> None:
    def free() -> bool:
        locks = dog_json("vdi", "lock", "list", address=gw.address)["locks"]
        return not any(lock["name"] == name for lock in locks)

    wait_until(free, 3, f"the gateway to release {name}")


# -- handshake ----------------------------------------------------------------------------


@FUZZ
@given(garbage=st.binary(max_size=64))
def test_garbage_instead_of_client_flags_ends_only_that_connection(
        gw: Cluster, healthy: NbdClient, garbage: bytes) -> None:
    sock = greet(gw.nbd_port)
    send_quietly(sock, garbage)
    parse_option_replies(hang_up(sock))  # whatever came back was well-formed
    assert_gateway_serves(gw, healthy)


@FUZZ
@given(garbage=st.binary(min_size=4, max_size=64).filter(
    lambda b: struct.unpack_from(">I", b)[0] & ~3 != 0))
def test_unknown_client_flags_close_the_connection_at_once(
        gw: Cluster, healthy: NbdClient, garbage: bytes) -> None:
    sock = greet(gw.nbd_port)
    send_quietly(sock, garbage)
    try:
        assert drain_until_closed(sock) == b""  # no reply: the server just hangs up
    finally:
        sock.close()
    assert_gateway_serves(gw, healthy)


options = st.tuples(
    st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)),  # option code
    st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),  # announced length
    st.binary(max_size=300),  # data actually sent (at most the announced length)
)


@FUZZ
@given(opts=st.lists(options, max_size=6))
def test_random_options_with_random_lengths_get_well_formed_replies(
        gw: Cluster, healthy: NbdClient, opts: list[tuple[int, int, bytes]]) -> None:
    sock = greet(gw.nbd_port)
    send_quietly(sock, struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    for option, length, data in opts:
        send_quietly(sock, OPTION.pack(IHAVEOPT, option, length) + data[:length])
    for option, _rep in parse_option_replies(hang_up(sock)):
        assert option in {o for o, _, _ in opts}, f"reply to option {option} never sent"
    assert_gateway_serves(gw, healthy)


@pytest.mark.parametrize("option", [1, 3, 6, OPT_GO, 9, 10, 0x12345678])
def test_a_huge_option_length_closes_the_connection(
        gw: Cluster, healthy: NbdClient, option: int) -> None:
    sock = greet(gw.nbd_port)
    sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE) + OPTION.pack(IHAVEOPT, option,
                                                                      2**32 - 1))
    try:
        assert drain_until_closed(sock) == b""  # closed without reading 4 GiB first
    finally:
        sock.close()


def test_an_unknown_option_is_refused_and_negotiation_goes_on(
        gw: Cluster, healthy: NbdClient) -> None:
    sock = greet(gw.nbd_port)
    try:
        sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        send_option(sock, 0xDEAD, b"0123456789")
        assert option_reply(sock)[:2] == (0xDEAD, REP_ERR_UNSUP)
        send_option(sock, OPT_LIST)
        names = []
        while (reply := option_reply(sock))[1] == REP_SERVER:
            names.append(reply[2][4 : 4 + struct.unpack_from(">I", reply[2])[0]].decode())
        assert reply[:2] == (OPT_LIST, REP_ACK)
        assert {"fz", "fz@frozen", "scratch"} <= set(names)
        send_option(sock, OPT_GO, go_payload("fz@frozen"))
        while (reply := option_reply(sock))[1] != REP_ACK:
            assert not reply[1] & (1 << 31), reply
        sock.sendall(request(CMD_READ, DATA_AT, 4096, cookie=99))
        head = recv_exact(sock, 16)
        assert struct.unpack(">IIQ", head)[1:] == (0, 99)
        assert recv_exact(sock, 4096) == DATA[:4096]
    finally:
        sock.close()


@FUZZ
@given(cut=st.integers(0, 200), rst=st.booleans(), export=st.sampled_from(["fz@frozen",
                                                                           "scratch"]))
def test_a_client_that_hangs_up_in_the_middle_of_the_handshake(
        gw: Cluster, healthy: NbdClient, cut: int, rst: bool, export: str) -> None:
    whole = (struct.pack(">I", FLAG_FIXED_NEWSTYLE)
             + OPTION.pack(IHAVEOPT, OPT_LIST, 0)
             + OPTION.pack(IHAVEOPT, OPT_GO, len(go_payload(export))) + go_payload(export))
    sock = greet(gw.nbd_port)
    send_quietly(sock, whole[: cut % (len(whole) + 1)])
    if rst:  # an abortive close: the server sees a reset, not an EOF
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert_gateway_serves(gw, healthy)


# -- transmission -----------------------------------------------------------------------------


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=200).filter(
    lambda b: len(b) < 4 or struct.unpack_from(">I", b)[0] != REQUEST_MAGIC),
    export=st.sampled_from(["fz@frozen", "scratch"]))
def test_garbage_instead_of_requests_closes_the_connection_without_a_reply(
        gw: Cluster, healthy: NbdClient, garbage: bytes, export: str) -> None:
    sock = negotiated(gw, export)
    send_quietly(sock, garbage)
    assert hang_up(sock) == b""
    assert_gateway_serves(gw, healthy)


def test_a_bad_request_magic_closes_only_that_connection(
        gw: Cluster, healthy: NbdClient) -> None:
    sock = negotiated(gw, "fz@frozen")
    try:
        sock.sendall(request(CMD_READ, DATA_AT, 512, cookie=1))
        assert recv_exact(sock, 16 + 512)[16:] == DATA[:512]
        sock.sendall(request(CMD_READ, DATA_AT, 512, cookie=2, magic=0x25609514))
        assert drain_until_closed(sock) == b""
    finally:
        sock.close()


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 2**32 - 1])
def test_a_write_over_the_maximum_payload_closes_the_connection(
        gw: Cluster, healthy: NbdClient, length: int) -> None:
    sock = negotiated(gw, "scratch")
    try:
        sock.sendall(request(CMD_WRITE, 0, length))
        send_quietly(sock, b"\xee" * 65536)
        assert drain_until_closed(sock) == b""  # no payload was waited for
    finally:
        sock.close()


def test_reads_past_the_end_get_einval_and_the_connection_goes_on(
        gw: Cluster, healthy: NbdClient) -> None:
    with NbdClient(gw.nbd_port, "fz@frozen") as client:
        for offset, length in ((SIZE - 100, 200), (SIZE, 1), (SIZE + OBJ, 4096),
                               (2**64 - 1, 1), (2**64 - 4096, 8192), (0, 2**32 - 1)):
            with pytest.raises(NbdError) as err:
                client.read(offset, length)
            assert err.value.errno == EINVAL, (offset, length)
        with pytest.raises(NbdError) as err:
            client.read(0, 0)
        assert err.value.errno == EINVAL
        assert client.read(SIZE - 100, 100) == bytes(100)
        assert client.read(DATA_AT, len(DATA)) == DATA


def test_writes_past_the_end_get_enospc(gw: Cluster, healthy: NbdClient) -> None:
    with NbdClient(gw.nbd_port, "scratch") as client:
        with pytest.raises(NbdError) as err:
            client.write(SIZE - 10, b"x" * 20)
        assert err.value.errno == ENOSPC
        with pytest.raises(NbdError) as err:
            client.call(CMD_WRITE_ZEROES, SIZE - 10, 20)
        assert err.value.errno == ENOSPC
        with pytest.raises(NbdError) as err:
            client.call(CMD_TRIM, SIZE - 10, 20)
        assert err.value.errno == EINVAL
        client.write(SIZE - 10, b"y" * 10)
        assert client.read(SIZE - 10, 10) == b"y" * 10


def test_writes_to_a_snapshot_export_get_eperm(gw: Cluster, healthy: NbdClient) -> None:
    with NbdClient(gw.nbd_port, "fz@frozen") as client:
        assert client.read_only
        for command, payload in ((CMD_WRITE, b"\xff" * 512), (CMD_TRIM, b""),
                                 (CMD_WRITE_ZEROES, b"")):
            with pytest.raises(NbdError) as err:
                client.call(command, DATA_AT, 512, payload=payload)
            assert err.value.errno == EPERM, command
        client.flush()  # allowed on a read-only export, and harmless
        assert client.read(DATA_AT, len(DATA)) == DATA


@pytest.mark.parametrize("command", [CMD_CACHE, 8, 9, 0x7FFF, 0xFFFF])
def test_an_unknown_command_gets_einval_and_the_connection_goes_on(
        gw: Cluster, healthy: NbdClient, command: int) -> None:
    with NbdClient(gw.nbd_port, "scratch") as client:
        with pytest.raises(NbdError) as err:
            client.call(command, 0, 4096)
        assert err.value.errno == EINVAL
        client.write(OBJ, b"ok")
        assert client.read(OBJ, 2) == b"ok"


requests = st.tuples(
    st.one_of(st.sampled_from([CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE,
                               CMD_WRITE_ZEROES, CMD_BLOCK_STATUS]), st.integers(3, 0xFFFF)),
    st.one_of(st.just(0), st.integers(0, 0x1F), st.integers(0, 0xFFFF)),  # flags
    st.one_of(st.integers(0, SIZE + OBJ), st.integers(0, 2**64 - 1),
              st.sampled_from([SIZE - 1, SIZE, 2**64 - 512])),  # offset
    st.one_of(st.integers(0, 64 * KiB), st.sampled_from([2**32 - 1, MAX_PAYLOAD + 1])),
).filter(lambda r: r[0] != CMD_DISC and not (r[0] == CMD_WRITE and r[3] > 64 * KiB))


@FUZZ
@given(reqs=st.lists(requests, min_size=1, max_size=20), structured=st.booleans())
def test_well_framed_random_requests_each_get_exactly_one_reply(
        gw: Cluster, healthy: NbdClient, reqs: list[tuple[int, int, int, int]],
        structured: bool) -> None:
    """Pipelined, never waiting, with simple or structured replies: one whole reply per
    cookie, an error for anything invalid, never EIO, and the connection still works."""
    with NbdClient(gw.nbd_port, "scratch", structured=structured) as client:
        cookies = {}
        for command, flags, offset, length in reqs:
            payload = bytes(length) if command == CMD_WRITE else b""
            cookie = client.send(command, offset, length, flags=flags, payload=payload)
            cookies[cookie] = (command, flags, offset, length)
        for _ in reqs:
            cookie, error, data = client.reply()
            command, flags, offset, length = cookies.pop(cookie)
            what = (command, flags, offset, length, error)
            assert error in (0, EPERM, EINVAL, ENOSPC, EOVERFLOW), what
            known = (CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES)
            if structured:
                known += (CMD_BLOCK_STATUS,)
            if command not in known:
                assert error == EINVAL, what
            elif command != CMD_FLUSH and (length == 0 or offset + length > SIZE):
                assert error, what
            elif command == CMD_READ and not error:
                assert len(data) == length, what
            elif command == CMD_BLOCK_STATUS and not error:
                extents = list(struct.iter_unpack(">II", data))
                assert extents and all(n > 0 and not f & ~3 for n, f in extents), what
                assert len(extents) == 1 or not flags & 8, what  # REQ_ONE
        assert not cookies
        client.write(0, b"still here")
        assert client.read(0, 10) == b"still here"


@pytest.mark.parametrize("length,sent", [(MiB, 300 * KiB), (4096, 100), (64 * KiB, 0)],
                         ids=["large", "small", "header-only"])
def test_a_client_that_hangs_up_in_the_middle_of_a_write_payload(
        gw: Cluster, healthy: NbdClient, length: int, sent: int) -> None:
    name = f"mid{length}"
    dog("vdi", "create", name, str(SIZE), address=gw.address)
    sock = negotiated(gw, name)
    sock.sendall(request(CMD_WRITE, OBJ - 1000, length) + b"\xaa" * sent)
    sock.close()
    wait_unlocked(gw, name)  # the gateway let go of the VDI
    with NbdClient(gw.nbd_port, name) as client:
        assert not client.read_only
        assert client.read(OBJ - 1000, length) == bytes(length)  # nothing half-written
        client.write(OBJ - 1000, b"\xbb" * length)
        assert client.read(OBJ - 1000, length) == b"\xbb" * length


def gateway_rss(gw: Cluster) -> int:
    assert gw.nodes[0].proc is not None
    return rss(gw.nodes[0].proc.pid)


def test_a_client_that_does_not_read_its_replies_cannot_make_the_gateway_hoard_them(
        gw: Cluster, healthy: NbdClient) -> None:
    """400 pipelined 1 MiB READs, then nothing read for a while: the gateway must stop
    taking requests once replies back up (not buffer 400 MiB), and then deliver every
    reply in full once the client reads."""
    count = 400
    image = bytearray(SIZE)
    image[DATA_AT : DATA_AT + len(DATA)] = DATA
    offsets = [(i * 777 * KiB) % (SIZE - MiB) for i in range(count)]
    before = gateway_rss(gw)
    sock = negotiated(gw, "fz@frozen")
    try:
        sock.sendall(b"".join(request(CMD_READ, off, MiB, cookie=i)
                              for i, off in enumerate(offsets)))
        time.sleep(1.5)
        grown = gateway_rss(gw) - before
        assert grown < 100 * MiB, f"the gateway grew by {grown >> 20} MiB of unread replies"
        assert_gateway_serves(gw, healthy)  # others are served meanwhile
        sock.settimeout(30)
        for _ in range(count):
            head = recv_exact(sock, 16)
            magic, error, cookie = struct.unpack(">IIQ", head)
            assert (magic, error) == (0x67446698, 0), head
            data = recv_exact(sock, MiB)
            assert data == image[offsets[cookie] : offsets[cookie] + MiB], cookie
    finally:
        sock.close()
