"""Fakes for the distributed logic's unit tests: a clock that moves only when the test says,
storage peers over a PeerPool with no sockets, and the part of etcd that recovery and the
object client use. LevelDB's `Env` is the model: the code under test is the real one; only
time, the network and the coordination store are stand-ins.
"""

from __future__ import annotations

import asyncio
import struct
from collections import defaultdict, deque

import xxhash

from sheep.cluster.state import ClusterConfig, EpochRecord, NodeInfo
from sheep.cluster.view import ClusterView
from sheep.dataplane.client import PeerPool, PeerUnavailable
from sheep.dataplane.codec import Frame
from sheep.dataplane.wire import DIGEST, EPOCH_CHECKED, MUTATIONS, Flags, Opcode
from sheep.errors import Result
from sheep.store.checksum import SUM_BLOCK

from ..fakes.clock import FakeClock

NODES = tuple(NodeInfo(f"{i:032x}", "127.0.0.1", 7000 + i, 8000 + i, vnodes=64)
              for i in range(1, 6))


# -- peers --------------------------------------------------------------------------------


class FakePeer:
    """One storage node as the data plane shows it to others, with no socket: the
    `request` of a PeerConnection over objects in memory, by the rules of the node's
    ObjectService (epoch check, NO_OBJECT, CREATE's FRESH, epoch 0 for peers' reads).

    Adversity, set by the test: `down` (no connection, requests fail PeerUnavailable);
    `answers[opcode]`, result codes to answer the next requests of that opcode with;
    `corrupt`, oids whose verified reads answer CORRUPT; `rotten[oid]`, the checksum
    blocks of an object whose verified reads answer CORRUPT; `hold()`, replies (to all
    requests, or to those of some opcodes) wait for `release()`, or time out on the clock
    as a real connection's requests do."""

    def __init__(self, node: NodeInfo, clock: FakeClock, *, epoch: int = 1,
                 object_size: int = 1 << 16) -> None:
        self.node = node
        self.epoch = epoch  # 0: not formatted
        self.object_size = object_size
        self.objects: dict[int, tuple[bytearray, int]] = {}  # oid -> (data, epoch written)
        self.down = False
        self.answers: dict[int, deque[int]] = defaultdict(deque)
        self.corrupt: set[int] = set()
        self.rotten: dict[int, set[int]] = defaultdict(set)  # oid -> blocks that fail
        self.requests: list[Frame] = []  # what reached this node, in order
        self.request_times: list[float] = []  # and when, on the clock
        self._clock = clock
        self._held: list[tuple[asyncio.Future[Frame], Frame]] | None = None
        self._holding: frozenset[int] | None = None  # the opcodes held; None: all

    # -- the test's side

    def put(self, oid: int, data: bytes, written: int) -> None:
        self.objects[oid] = (bytearray(data.ljust(self.object_size, b"\0")), written)

    def data(self, oid: int) -> bytes:
        return bytes(self.objects[oid][0])

    def fail_next(self, opcode: Opcode, result: Result, times: int = 1) -> None:
        self.answers[opcode].extend([result] * times)

    def hold(self, *opcodes: Opcode) -> None:
        if self._held is None:
            self._held = []
        self._holding = frozenset(opcodes) if opcodes else None

    def release(self) -> None:
        held, self._held = self._held or [], None
        self._holding = None
        for fut, reply in held:
            if not fut.done():
                fut.set_result(reply)

    def seen(self, opcode: Opcode, oid: int | None = None) -> list[Frame]:
        return [f for f in self.requests
                if f.opcode == opcode and (oid is None or f.oid == oid)]

    def times(self, opcode: Opcode, oid: int | None = None) -> list[float]:
        """When (on the clock) the requests `seen` returns came."""
        return [t for t, f in zip(self.request_times, self.requests, strict=True)
                if f.opcode == opcode and (oid is None or f.oid == oid)]

    # -- a PeerConnection's side

    @property
    def usable(self) -> bool:
        return not self.down

    def close(self) -> None:
        pass

    def request(self, opcode: int, *, oid: int = 0, offset: int = 0, length: int = 0,
                payload: bytes | bytearray | memoryview = b"", flags: int = 0,
                epoch: int = 0, aux: int = 0, timeout: float | None = 10.0,
                token: int = 0) -> asyncio.Future[Frame]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Frame] = loop.create_future()
        if self.down:
            fut.set_exception(PeerUnavailable("not connected"))
            return fut
        if payload:
            length = len(payload)
        frame = Frame(opcode, flags, epoch, 0, 0, oid, offset, length, aux, bytes(payload),
                      token)
        self.requests.append(frame)
        self.request_times.append(self._clock.now)
        reply = self._serve(frame)
        if self._held is not None and (self._holding is None or opcode in self._holding):
            self._held.append((fut, reply))
            if timeout:
                def expire() -> None:
                    if not fut.done():
                        fut.set_exception(TimeoutError("data-plane request timed out"))
                self._clock.call_at(self._clock.now + timeout, expire)
        else:
            loop.call_soon(lambda: fut.done() or fut.set_result(reply))
        return fut

    def _serve(self, f: Frame) -> Frame:
        def reply(result: int = 0, payload: bytes = b"", aux: int = 0) -> Frame:
            return Frame(f.opcode, 0, self.epoch, int(result), 0, f.oid, f.offset,
                         len(payload), aux, payload)

        queued = self.answers.get(f.opcode)
        if queued:
            return reply(queued.popleft())
        if f.opcode in EPOCH_CHECKED:
            if self.epoch == 0:
                return reply(Result.NOT_FORMATTED)
            if not (f.epoch == self.epoch or (f.epoch == 0 and f.opcode not in MUTATIONS)):
                return reply(Result.OLD_EPOCH if f.epoch < self.epoch else Result.NEW_EPOCH)
        held = self.objects.get(f.oid)
        if f.opcode in (Opcode.WRITE, Opcode.CREATE):
            if held is None:
                if f.opcode == Opcode.WRITE:
                    return reply(Result.NO_OBJECT)
                held = (bytearray(self.object_size), self.epoch)
            data = held[0]
            if f.flags & Flags.FRESH:
                data[:] = bytes(self.object_size)
            data[f.offset:f.offset + len(f.payload)] = f.payload
            self.objects[f.oid] = (data, max(held[1], self.epoch))
            return reply()
        if f.opcode == Opcode.READ:
            if held is None:
                return reply(Result.NO_OBJECT)
            if not f.flags & Flags.RAW and (f.oid in self.corrupt or any(
                    f.offset // SUM_BLOCK <= b <= (f.offset + f.length - 1) // SUM_BLOCK
                    for b in self.rotten.get(f.oid, ()))):
                return reply(Result.CORRUPT)
            return reply(payload=bytes(held[0][f.offset:f.offset + f.length]))
        if f.opcode == Opcode.REMOVE:
            if self.objects.pop(f.oid, None) is None:
                return reply(Result.NO_OBJECT)
            return reply()
        if f.opcode == Opcode.DISCARD:
            if held is not None:
                held[0][f.offset:f.offset + f.length] = bytes(f.length)
            return reply()
        if f.opcode == Opcode.EXISTS:
            return reply(aux=int(held is not None))
        if f.opcode == Opcode.DIGEST:
            if held is None:
                return reply(Result.NO_OBJECT)
            return reply(payload=DIGEST.pack(xxhash.xxh3_64_intdigest(bytes(held[0]))))
        if f.opcode == Opcode.LIST:
            oids = sorted(self.objects)
            return reply(payload=struct.pack(f"<{len(oids)}Q", *oids))
        if f.opcode == Opcode.LIST_EPOCHS:
            pairs = [x for oid in sorted(self.objects) for x in (oid, self.objects[oid][1])]
            return reply(payload=struct.pack(f"<{len(pairs)}Q", *pairs))
        if f.opcode in (Opcode.FLUSH, Opcode.GET_EPOCH):
            return reply()
        return reply(Result.UNKNOWN_OP)


class FakePool(PeerPool):
    """The real PeerPool (`call`, `read_replica`, `cached`, `get`) over FakePeers instead
    of TCP connections: connecting to a peer that is down fails as a refused connect."""

    def __init__(self, peers: list[FakePeer]) -> None:
        super().__init__()
        self.peers = {p.node.data_addr: p for p in peers}

    async def _connect(self, addr: tuple[str, int]) -> FakePeer:  # type: ignore[override]
        peer = self.peers.get(addr)
        if peer is None or peer.down:
            raise PeerUnavailable(f"cannot connect to {addr[0]}:{addr[1]}")
        self._conns[addr] = peer  # type: ignore[assignment]
        return peer


# -- etcd ---------------------------------------------------------------------------------


class FakeEtcd:
    """What recovery (RecoveryLog) and the object client's view refresh read of etcd: the
    config, the current epoch, and who finished recovering which epoch."""

    def __init__(self, config: ClusterConfig | None = None,
                 record: EpochRecord | None = None) -> None:
        self.cluster_config = config
        self.record = record
        self.recovered: dict[int, set[str]] = defaultdict(set)
        self.refreshes = 0

    async def config(self) -> ClusterConfig | None:
        return self.cluster_config

    async def epoch(self) -> tuple[EpochRecord | None, int]:
        self.refreshes += 1
        return self.record, self.record.epoch if self.record is not None else 0

    async def mark_recovered(self, epoch: int, node_id: str) -> None:
        self.recovered[epoch].add(node_id)

    async def recovered_members(self, epoch: int) -> set[str]:
        return set(self.recovered[epoch])


def config(copies: int = 3, object_size: int = 1 << 16) -> ClusterConfig:
    return ClusterConfig("test", copies, object_size, 0.0)


async def view_of(nodes: tuple[NodeInfo, ...], *, epoch: int = 1, copies: int = 3,
                  object_size: int = 1 << 16) -> ClusterView:
    view = ClusterView()
    await view.update(config(copies, object_size), EpochRecord(epoch, 0.0, nodes))
    return view
