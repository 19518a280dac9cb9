"""A storage node's data port against broken and hostile peers.

Raw TCP to one node of a real 3-node cluster: garbage, bad headers, truncated frames,
oversized announcements, unknown opcodes, out-of-range reads and a seeded fuzz of mutated
headers. After each, the daemon must still run, and one long-lived well-behaved connection,
opened before any of it, must still get correct replies.

One cluster serves the whole module (built like the `cluster` fixture, with the same
helpers): every test leaves it healthy, which is exactly what each test checks.
"""

from __future__ import annotations

import itertools
import random
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sheep.dataplane.wire import (
    EPOCH_CHECKED,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_LENGTH,
    REPLY_HAS_PAYLOAD,
    REQUEST_HAS_PAYLOAD,
    Flags,
    Opcode,
    pack_header,
)
from sheep.errors import Result
from sheep.etcd_server import EtcdServer
from sheep.oid import data_oid

from ..cluster import Cluster, SheepProcess, start_cluster
from ..hostile import rss

TIMEOUT = 5.0
OBJECT_SIZE = 4 << 20  # the cluster's default
HEALTH_VDI = 0xABCDEF  # objects of the health checks
FUZZ_VDI = 0x00F022  # objects the fuzzer may touch


@dataclass
class Reply:
    opcode: int
    flags: int
    epoch: int
    result: int
    req_id: int
    oid: int
    offset: int
    length: int
    aux: int
    payload: bytes


class PeerClosed(Exception):
    pass


class RawConn:
    """A blocking socket speaking the data plane by hand; every operation is bounded."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(TIMEOUT)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n:
            try:
                chunk = self.sock.recv(min(n, 1 << 20))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise PeerClosed(f"closed with {n} bytes still expected")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def recv_reply(self) -> Reply:
        fields = HEADER.unpack(self.recv_exact(HEADER_SIZE))
        (magic, opcode, flags, _pad, epoch, result, req_id, oid, offset, length, aux,
         _token) = fields
        assert magic == MAGIC
        payload = b""
        if opcode in REPLY_HAS_PAYLOAD and result == Result.OK:
            payload = self.recv_exact(length)
        return Reply(opcode, flags, epoch, result, req_id, oid, offset, length, aux, payload)

    def call(self, opcode: int, req_id: int, payload: bytes = b"", **fields: int) -> Reply:
        if payload:
            fields["length"] = len(payload)
        self.send(pack_header(opcode, req_id, **fields) + payload)
        reply = self.recv_reply()
        assert reply.req_id == req_id
        return reply

    def expect_closed(self) -> None:
        """The peer closes the connection without sending a byte."""
        try:
            data = self.sock.recv(4096)
        except ConnectionResetError:
            data = b""
        assert data == b"", f"expected the node to close the connection, got {data[:64]!r}"

    def abort(self) -> None:
        """Close with a RST (SO_LINGER 0), the way a crashed peer goes."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Target:
    cluster: Cluster
    node: SheepProcess
    data_port: int
    epoch: int
    good: RawConn
    ids: Iterator[int]
    oids: Iterator[int]

    def connect(self) -> RawConn:
        return RawConn(self.data_port)

    def assert_healthy(self) -> None:
        """The daemon runs and the long-lived connection still gets correct replies."""
        assert self.node.alive, f"sheep died:\n{self.node.log()[-4000:]}"
        assert all(n.alive for n in self.cluster.nodes)
        req = next(self.ids)
        reply = self.good.call(Opcode.GET_EPOCH, req)
        assert (reply.opcode, reply.result, reply.epoch) == (
            Opcode.GET_EPOCH,
            Result.OK,
            self.epoch,
        )
        oid, data = next(self.oids), random.randbytes(4096)
        created = self.good.call(
            Opcode.CREATE, req + 1, data, epoch=self.epoch, oid=oid, offset=8192
        )
        assert (created.result, created.req_id, created.oid) == (Result.OK, req + 1, oid)
        read = self.good.call(
            Opcode.READ, req + 2, epoch=self.epoch, oid=oid, offset=8192, length=4096
        )
        assert (read.result, read.length, read.payload) == (Result.OK, 4096, data)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Target]:
    cluster = start_cluster(tmp_path_factory.mktemp("dataplane"), etcd.url, nodes=3, copies=3)
    try:
        node = cluster.nodes[0]
        (entry,) = [e for e in cluster.node_list() if e["node"]["control_port"] == node.port]
        port = entry["node"]["data_port"]
        epoch = int(cluster.info()["epoch"])
        assert epoch > 0
        good = RawConn(port)
        t = Target(
            cluster,
            node,
            port,
            epoch,
            good,
            itertools.count(1000, 3),
            (data_oid(HEALTH_VDI, i) for i in itertools.count()),
        )
        t.assert_healthy()
        yield t
        good.close()
    finally:
        cluster.stop()


# -- framing errors close only the offending connection ---------------------------------------


def test_garbage_bytes_close_the_connection(target: Target) -> None:
    conn = target.connect()
    conn.send(random.Random(1).randbytes(4096))
    conn.expect_closed()
    conn.close()
    target.assert_healthy()


def test_http_request_closes_the_connection(target: Target) -> None:
    conn = target.connect()
    conn.send(b"GET / HTTP/1.1\r\nHost: sheep\r\n\r\n" + b"\r\n" * 16)
    conn.expect_closed()
    conn.close()
    target.assert_healthy()


def test_header_with_bad_magic_closes_the_connection(target: Target) -> None:
    conn = target.connect()
    header = bytearray(pack_header(Opcode.GET_EPOCH, 1))
    header[0:4] = b"PEHS"
    conn.send(bytes(header))
    conn.expect_closed()
    conn.close()
    target.assert_healthy()


def test_bad_magic_after_good_requests_still_answers_nothing_after_it(target: Target) -> None:
    conn = target.connect()
    assert conn.call(Opcode.GET_EPOCH, 1).result == Result.OK
    conn.send(b"\0" * HEADER_SIZE + pack_header(Opcode.GET_EPOCH, 2))
    conn.expect_closed()
    conn.close()
    target.assert_healthy()


@pytest.mark.parametrize("length", [MAX_LENGTH + 1, 0xFFFFFFFF], ids=["64MiB+1", "4GiB-1"])
@pytest.mark.parametrize("opcode", [Opcode.WRITE, Opcode.CREATE])
def test_payload_over_the_64_mib_limit_closes_the_connection(
    target: Target, opcode: Opcode, length: int
) -> None:
    conn = target.connect()
    conn.send(pack_header(opcode, 1, epoch=target.epoch, oid=next(target.oids), length=length))
    conn.expect_closed()
    conn.close()
    target.assert_healthy()


def test_payload_of_exactly_64_mib_is_received_and_refused_out_of_range(target: Target) -> None:
    conn = target.connect()
    oid = next(target.oids)
    reply = conn.call(Opcode.CREATE, 7, bytes(MAX_LENGTH), epoch=target.epoch, oid=oid)
    assert (reply.result, reply.req_id, reply.oid) == (Result.OUT_OF_RANGE, 7, oid)
    assert conn.call(Opcode.EXISTS, 8, oid=oid).aux == 0
    conn.close()
    target.assert_healthy()


@pytest.mark.parametrize(
    "cut",
    ["half-header", "header-of-small-write", "part-of-small-payload", "part-of-large-payload"],
)
@pytest.mark.parametrize("how", ["close", "reset"])
def test_truncated_frame_then_close(target: Target, cut: str, how: str) -> None:
    oid = next(target.oids)
    small = pack_header(Opcode.CREATE, 1, epoch=target.epoch, oid=oid, length=4096)
    large = pack_header(Opcode.CREATE, 1, epoch=target.epoch, oid=oid, length=1 << 20)
    data = {
        "half-header": small[:20],
        "header-of-small-write": small,
        "part-of-small-payload": small + bytes(1000),
        "part-of-large-payload": large + bytes(300_000),
    }[cut]
    conn = target.connect()
    conn.send(pack_header(Opcode.GET_EPOCH, 9) + data)
    assert conn.recv_reply().req_id == 9  # the node got what came before the cut
    if how == "close":
        conn.close()
    else:
        conn.abort()
    target.assert_healthy()
    assert target.good.call(Opcode.EXISTS, next(target.ids), oid=oid).aux == 0


def test_peer_gone_before_its_durable_write_is_acknowledged(target: Target) -> None:
    conn = target.connect()
    oid = next(target.oids)
    conn.send(
        pack_header(Opcode.CREATE, 1, flags=Flags.FUA, epoch=target.epoch, oid=oid, length=4096)
        + bytes(4096)
        + pack_header(Opcode.FLUSH, 2)
    )
    conn.abort()  # the replies come after the commit, to nobody
    target.assert_healthy()
    assert target.good.call(Opcode.EXISTS, next(target.ids), oid=oid).aux == 1


# -- request errors are replies, and the connection stays usable ------------------------------


@pytest.mark.parametrize("opcode", [0, max(Opcode) + 1, 99, 255])
def test_unknown_opcode_replies_unknown_op_and_the_connection_stays_usable(
    target: Target, opcode: int
) -> None:
    conn = target.connect()
    reply = conn.call(opcode, 42, epoch=target.epoch, oid=7, offset=11, length=4096)
    assert (reply.opcode, reply.req_id, reply.result, reply.oid, reply.offset) == (
        opcode,
        42,
        Result.UNKNOWN_OP,
        7,
        11,
    )
    assert reply.payload == b""
    after = conn.call(Opcode.GET_EPOCH, 43)
    assert (after.result, after.epoch) == (Result.OK, target.epoch)
    conn.close()
    target.assert_healthy()


@pytest.mark.parametrize(
    ("offset", "length"),
    [(OBJECT_SIZE - 1, 2), (OBJECT_SIZE, 1), (0, OBJECT_SIZE + 1), (0, 0xFFFFFFFF), (2**64 - 1, 1)],
    ids=["straddles-end", "at-end", "too-long", "4GiB", "max-offset"],
)
def test_read_past_the_object_end_replies_out_of_range(
    target: Target, offset: int, length: int
) -> None:
    conn = target.connect()
    oid = next(target.oids)
    assert conn.call(Opcode.CREATE, 1, b"x", epoch=target.epoch, oid=oid).result == Result.OK
    started = time.monotonic()
    reply = conn.call(Opcode.READ, 2, epoch=target.epoch, oid=oid, offset=offset, length=length)
    assert time.monotonic() - started < 1.0  # refused up front, nothing allocated
    assert (reply.result, reply.req_id, reply.offset, reply.payload) == (
        Result.OUT_OF_RANGE,
        2,
        offset,
        b"",
    )
    last = conn.call(Opcode.READ, 3, epoch=target.epoch, oid=oid, offset=OBJECT_SIZE - 1, length=1)
    assert (last.result, last.payload) == (Result.OK, b"\0")
    conn.close()
    target.assert_healthy()


def test_requests_of_another_epoch_are_refused_on_a_usable_connection(target: Target) -> None:
    conn = target.connect()
    oid = next(target.oids)
    old = conn.call(Opcode.CREATE, 1, b"y", epoch=target.epoch - 1, oid=oid)
    new = conn.call(Opcode.READ, 2, epoch=target.epoch + 1, oid=oid, length=1)
    assert (old.result, old.epoch) == (Result.OLD_EPOCH, target.epoch)
    assert (new.result, new.epoch) == (Result.NEW_EPOCH, target.epoch)
    assert conn.call(Opcode.EXISTS, 3, oid=oid).aux == 0
    conn.close()
    target.assert_healthy()


# -- fuzz --------------------------------------------------------------------------------------

FUZZ_CASES = 300
FUZZ_SEED = 0x5EED
FUZZ_BUDGET = 20.0  # seconds


def _base_frames(epoch: int) -> list[tuple[bytes, bytes]]:
    oid = data_oid(FUZZ_VDI, 1)
    return [
        (pack_header(Opcode.GET_EPOCH, 1), b""),
        (pack_header(Opcode.READ, 2, epoch=epoch, oid=oid, offset=4096, length=4096), b""),
        (pack_header(Opcode.WRITE, 3, epoch=epoch, oid=oid, offset=512, length=512), bytes(512)),
        (pack_header(Opcode.CREATE, 4, epoch=epoch, oid=oid + 1, length=100), b"c" * 100),
        (pack_header(Opcode.EXISTS, 5, epoch=epoch, oid=oid), b""),
        (pack_header(Opcode.DISCARD, 6, epoch=epoch, oid=oid + 1, length=4096), b""),
        (pack_header(Opcode.FLUSH, 7), b""),
        (pack_header(Opcode.LIST, 8), b""),
    ]


def _expected_reply_checks(reply: Reply, sent: tuple, node_epoch: int) -> None:
    _magic, opcode, _flags, _pad, epoch, _result, req_id, oid, offset, length, _aux, _token = sent
    assert (reply.opcode, reply.req_id, reply.epoch) == (opcode, req_id, node_epoch)
    if opcode not in Opcode._value2member_map_:
        assert reply.result == Result.UNKNOWN_OP
        return
    assert (reply.oid, reply.offset) == (oid, offset)
    assert reply.result in Result._value2member_map_
    if opcode in EPOCH_CHECKED and epoch not in (0, node_epoch):
        assert reply.result == (Result.OLD_EPOCH if epoch < node_epoch else Result.NEW_EPOCH)
    if opcode == Opcode.READ and reply.result == Result.OK:
        assert len(reply.payload) == reply.length == length
        assert offset + length <= OBJECT_SIZE


def test_fuzzed_headers_get_replies_or_a_close_and_never_hurt_the_node(target: Target) -> None:
    rng = random.Random(FUZZ_SEED)
    # objects for the base frames to find
    setup = target.connect()
    for oid in (data_oid(FUZZ_VDI, 1), data_oid(FUZZ_VDI, 2)):
        assert setup.call(Opcode.CREATE, 1, b"f" * 8192, epoch=target.epoch,
                          oid=oid).result == Result.OK
    setup.close()

    bases = _base_frames(target.epoch)
    conn: RawConn | None = None
    closed = replied = 0
    deadline = time.monotonic() + FUZZ_BUDGET
    for case in range(FUZZ_CASES):
        assert time.monotonic() < deadline, f"fuzz over its time budget at case {case}"
        header, payload = rng.choice(bases)
        mutated = bytearray(header)
        for pos in rng.sample(range(HEADER_SIZE), rng.randint(1, 3)):
            mutated[pos] ^= rng.randint(1, 255)
        sent = HEADER.unpack(mutated)
        magic, opcode, req_id, length = sent[0], sent[1], sent[6], sent[9]
        carries = opcode in REQUEST_HAS_PAYLOAD
        must_close = magic != MAGIC or (carries and length > MAX_LENGTH)
        sentinel = 1 if req_id != 1 else 2
        if conn is None:
            conn = target.connect()
        data = bytes(mutated)
        if not must_close:
            if carries:  # exactly the payload the (mutated) header announces
                data += (payload + bytes(max(0, length - len(payload))))[:length]
            data += pack_header(Opcode.GET_EPOCH, sentinel)
        conn.send(data)
        if must_close:
            conn.expect_closed()
            conn.close()
            conn = None
            closed += 1
        else:
            # replies may come out of order (a FUA write or FLUSH waits for a commit)
            got = {}
            while len(got) < 2:
                reply = conn.recv_reply()
                assert reply.req_id in (req_id, sentinel) and reply.req_id not in got
                got[reply.req_id] = reply
            _expected_reply_checks(got[req_id], sent, target.epoch)
            assert (got[sentinel].result, got[sentinel].epoch) == (Result.OK, target.epoch)
            replied += 1
        if case % 50 == 49:
            target.assert_healthy()
    if conn is not None:
        conn.close()
    target.assert_healthy()
    assert closed > 20 and replied > 100  # both outcomes were exercised


# -- memory: a peer that does not take its replies ----------------------------------------------


def test_reads_whose_replies_are_never_taken_cost_a_bounded_backlog(target: Target) -> None:
    """150 READs of a whole object (7.2 KB of headers) once cost the node 600 MiB: every
    request of one recv was answered into memory. Now it stops handling a connection's
    requests while REPLY_BACKLOG of its replies are unsent, and serves others meanwhile."""
    oid = next(target.oids)
    writer = target.connect()
    created = writer.call(Opcode.CREATE, next(target.ids), b"x" * 4096, epoch=target.epoch,
                          oid=oid)
    assert created.result == Result.OK
    writer.close()
    before = rss(target.node.proc.pid)  # type: ignore[union-attr]
    hostile = target.connect()
    # a small receive buffer keeps the replies on the node, yet not under a loopback MSS:
    # at 4 KiB, taking the first 4 MiB reply at the end crawled for 100 s
    hostile.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
    try:
        hostile.send(b"".join(
            pack_header(Opcode.READ, 1 << 20 | i, epoch=target.epoch, oid=oid,
                        length=OBJECT_SIZE) for i in range(150)))
        target.assert_healthy()  # handled after the hostile recv: it came first
        grown = rss(target.node.proc.pid) - before  # type: ignore[union-attr]
        assert grown < 64 << 20, f"the node grew by {grown >> 20} MiB"
        first = hostile.recv_reply()  # and the hostile peer still gets its replies
        assert (first.result, first.payload[:4096]) == (Result.OK, b"x" * 4096)
    finally:
        hostile.abort()
    target.assert_healthy()


def test_digest_requests_never_read_cost_a_bounded_amount(target: Target) -> None:
    """DIGEST reads a whole object for an 8-byte answer: a flood of them, none read back,
    holds no more than one object's read at a time, and others are served meanwhile."""
    oid = next(target.oids)
    writer = target.connect()
    assert writer.call(Opcode.CREATE, next(target.ids), b"d" * 4096, epoch=target.epoch,
                       oid=oid).result == Result.OK
    writer.close()
    before = rss(target.node.proc.pid)  # type: ignore[union-attr]
    hostile = target.connect()
    try:
        hostile.send(b"".join(pack_header(Opcode.DIGEST, 1 << 21 | i, oid=oid)
                              for i in range(500)))
        target.assert_healthy()
        grown = rss(target.node.proc.pid) - before  # type: ignore[union-attr]
        assert grown < 64 << 20, f"the node grew by {grown >> 20} MiB"
        first = hostile.recv_reply()
        assert first.result == Result.OK and len(first.payload) == 8
    finally:
        hostile.abort()
    target.assert_healthy()
