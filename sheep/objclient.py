"""The replicated object client: one logical object -> `copies` replicas on the ring.

Writes go to every replica of the current epoch and succeed only when all of them
acknowledged; reads go to one replica (this node's own store first) and fail over to the
next. A refusal for another epoch, or a replica that cannot be reached, makes the request
wait for the ring to change and retry; the deadline bounds how long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from typing import Protocol

from sheep.clock import SYSTEM, Clock
from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.state import NodeInfo
from sheep.cluster.view import ClusterView
from sheep.dataplane.client import PeerPool, PeerUnavailable, check
from sheep.dataplane.codec import Frame
from sheep.dataplane.wire import Flags, Opcode
from sheep.errors import (
    ClusterError,
    Corrupt,
    Fenced,
    NewEpoch,
    NoObject,
    NotFormatted,
    OldEpoch,
    error_for,
)
from sheep.futures import settle_when
from sheep.netaddr import host_port
from sheep.security.identity import Identity

log = logging.getLogger(__name__)

_FUA = int(Flags.FUA)  # plain ints: IntFlag arithmetic costs microseconds per request
_FRESH = int(Flags.FRESH)
_RETRYABLE = (OldEpoch, NewEpoch, PeerUnavailable, TimeoutError, NotFormatted, Fenced)


class LocalReplica(Protocol):
    """This node's own service in process (sheep.node.service.InProcess): requests
    take the path the network's take, with a peer connection's `request`, and a read may
    be answered at once."""

    def request(self, opcode: int, *, oid: int = ..., offset: int = ..., length: int = ...,
                payload: bytes | bytearray | memoryview = ..., flags: int = ...,
                epoch: int = ..., aux: int = ..., timeout: float | None = ...,
                token: int = ...) -> asyncio.Future[Frame]: ...

    def read_now(self, oid: int, offset: int, length: int, epoch: int
                 ) -> bytes | bytearray | None: ...


class ObjectClient:
    def __init__(
        self,
        view: ClusterView,
        pool: PeerPool,
        *,
        etcd: EtcdCluster | None = None,
        local: tuple[str, LocalReplica] | None = None,
        timeout: float = 5.0,
        deadline: float = 60.0,
        clock: Clock = SYSTEM,
    ) -> None:
        """`clock` times the deadline and the waits between tries (tests give a fake)."""
        self._view = view
        self._clock = clock
        self._pool = pool
        self._etcd = etcd
        # this node's id and its own service: its replica costs no socket
        self._local_id, self._local = local if local else ("", None)
        self._timeout = timeout
        self._deadline = deadline
        self._placed: dict[int, list[NodeInfo]] = {}  # oid -> replicas, for one epoch
        self._placed_epoch = -1

    @property
    def view(self) -> ClusterView:
        return self._view

    @property
    def etcd(self) -> EtcdCluster:
        if self._etcd is None:
            raise ClusterError("this client was built without etcd")
        return self._etcd

    def replicas(self, oid: int) -> list[NodeInfo]:
        """The nodes holding `oid` in the current epoch (cached until the epoch moves: the
        ring walk costs more than the rest of a local read)."""
        record = self._view.record
        if record is None or record.epoch != self._placed_epoch or len(self._placed) > 65536:
            self._placed.clear()
            self._placed_epoch = record.epoch if record is not None else -1
        nodes = self._placed.get(oid)
        if nodes is None:
            nodes = self._placed[oid] = self._view.placement(oid)
        return list(nodes)

    def read_local(self, oid: int, offset: int, length: int) -> bytes | bytearray | None:
        """This node's own replica of `oid`, read synchronously, or None when this node
        holds no replica, or its service cannot answer at once (the object is being
        recovered or repaired, or is missing): the caller then takes the async path."""
        if self._local is None:
            return None
        try:
            nodes = self.replicas(oid)
        except NotFormatted:
            return None
        if not any(n.node_id == self._local_id for n in nodes):
            return None
        return self._local.read_now(oid, offset, length, self._view.epoch)

    # -- public operations ------------------------------------------------------------

    async def write(
        self,
        oid: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        fua: bool = False,
        create: bool = True,
        fresh: bool = False,
        token: int = 0,
    ) -> None:
        """`create=False` fails on a replica that lacks the object; `fresh` (with create)
        empties an existing object before writing. `token`: the writer's fencing token
        (its VDI lock's; 0: no lock, sheep/node/fences.py); a node that knows a newer
        holder refuses the write with StaleLock."""
        opcode = Opcode.CREATE if create else Opcode.WRITE
        flags = (_FUA if fua else 0) | (_FRESH if fresh and create else 0)
        await self._to_all(opcode, oid, offset=offset, payload=data, flags=flags, token=token)

    async def remove(self, oid: int, *, fua: bool = False, token: int = 0) -> None:
        await self._to_all(Opcode.REMOVE, oid, missing_ok=True,
                           flags=_FUA if fua else 0, token=token)

    async def discard(self, oid: int, offset: int, length: int, *, fua: bool = False,
                      token: int = 0) -> None:
        """Make the range read as zeros; with `fua`, durably so before it returns."""
        await self._to_all(Opcode.DISCARD, oid, offset=offset, length=length,
                           flags=_FUA if fua else 0, token=token)

    async def fence(self, oid: int, token: int) -> None:
        """Tell every node of the cluster that `oid`'s VDI has a lock holder with `token`,
        and return once all of them said they refuse older tokens. Sent to the members of
        one epoch; a member that cannot be reached makes it wait for the next ring (a
        node that joins later reads the fence records from etcd before it serves, see
        sheep/node/fences.py), and a ring that moved meanwhile is fenced again."""
        start = self._clock.monotonic()
        while True:
            record = self._view.record
            if record is None:
                raise NotFormatted()
            results = await asyncio.gather(*(self._fence_node(n, oid, token)
                                             for n in record.nodes),
                                           return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is None:
                if self._etcd is not None:
                    await self._view.refresh(self._etcd)
                if self._view.epoch == record.epoch:
                    return
                continue
            if not isinstance(failure, (*_RETRYABLE, OSError)):
                raise failure
            await self._await_new_ring(record.epoch, failure, start)

    async def read(self, oid: int, offset: int, length: int) -> bytes | bytearray:
        local = self.read_local(oid, offset, length)
        if local is not None:
            return local
        frame = await self._from_one(Opcode.READ, oid, offset=offset, length=length)
        return frame.payload

    async def exists(self, oid: int) -> bool:
        frame = await self._from_one(Opcode.EXISTS, oid)
        return bool(frame.aux)

    async def flush(self) -> None:
        """Make every acknowledged write on every node durable. A member that cannot be
        reached (killed a moment ago, still in the epoch until its lease runs out) makes
        the flush wait for the next ring and flush its members: the acknowledged writes
        that count are on them."""
        start = self._clock.monotonic()
        while True:
            record = self._view.record
            if record is None:
                return
            results = await asyncio.gather(*(self._flush_node(n) for n in record.nodes),
                                           return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is None:
                return
            if not isinstance(failure, (*_RETRYABLE, OSError)):
                raise failure
            await self._await_new_ring(record.epoch, failure, start)

    async def list_node(self, node: NodeInfo) -> list[int]:
        frame = await self._pool.call(node.data_addr, Opcode.LIST, timeout=self._timeout)
        payload = frame.payload
        return list(struct.unpack(f"<{len(payload) // 8}Q", payload))

    async def stored_objects(self) -> set[int]:
        """Every object some node of the current epoch holds."""
        record = self._view.record
        found: set[int] = set()
        for node in record.nodes if record is not None else ():
            found.update(await self.list_node(node))
        return found

    async def read_replica(self, node: NodeInfo, oid: int, offset: int, length: int, *,
                           raw: bool = False) -> bytes:
        """Read one specific replica (for checks that compare copies); `raw` skips its
        checksum verification."""
        return bytes(await self._pool.read_replica(node.data_addr, oid, offset, length,
                                                   raw=raw, timeout=self._timeout))

    async def write_replica(self, node: NodeInfo, oid: int, data: bytes) -> None:
        """Replace one specific replica with `data` (repair copies a good replica over a
        bad one)."""
        await self._pool.call(
            node.data_addr,
            Opcode.CREATE,
            flags=Flags.FRESH,
            oid=oid,
            offset=0,
            length=len(data),
            payload=data,
            epoch=self._view.epoch,
            timeout=self._timeout,
        )

    # -- internals --------------------------------------------------------------------

    async def _fence_node(self, node: NodeInfo, oid: int, token: int) -> None:
        if node.node_id == self._local_id and self._local is not None:
            check(await self._local.request(Opcode.FENCE, oid=oid, token=token))
            return
        await self._pool.call(node.data_addr, Opcode.FENCE, oid=oid, token=token,
                              timeout=self._timeout)

    async def _flush_node(self, node: NodeInfo) -> None:
        if node.node_id == self._local_id and self._local is not None:
            check(await self._local.request(Opcode.FLUSH, epoch=self._view.epoch))
            return
        await self._pool.call(node.data_addr, Opcode.FLUSH, timeout=self._timeout * 6)

    def _local_later(self, *args) -> asyncio.Future[Frame]:
        """This node's replica, run after the requests to the other replicas have gone out
        (their sends are queued for the same loop pass, before this): the local write then
        overlaps the remote ones instead of delaying them."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Frame] = loop.create_future()

        def run() -> None:
            try:
                local = self._send_local(*args)
            except Exception as exc:  # handed to the awaiting request
                fut.set_exception(exc)
                return
            settle_when(local, fut)

        loop.call_soon(run)
        return fut

    def _send(
        self,
        node: NodeInfo,
        opcode: Opcode,
        oid: int,
        offset: int,
        length: int,
        payload,
        flags: int,
        token: int = 0,
    ) -> asyncio.Future[Frame] | None:
        if node.node_id == self._local_id and self._local is not None:
            return self._send_local(opcode, oid, offset, length, payload, flags, token)
        conn = self._pool.cached(node.data_addr)
        if conn is None:
            return None
        return conn.request(
            opcode,
            oid=oid,
            offset=offset,
            length=length,
            payload=payload,
            flags=flags,
            epoch=self._view.epoch,
            timeout=self._timeout,
            token=token,
        )

    def _send_local(self, opcode: Opcode, oid: int, offset: int, length: int, payload,
                    flags: int, token: int = 0) -> asyncio.Future[Frame]:
        assert self._local is not None
        return self._local.request(opcode, oid=oid, offset=offset, length=length,
                                   payload=payload, flags=flags, epoch=self._view.epoch,
                                   token=token)

    async def _connected_send(self, node: NodeInfo, *args) -> asyncio.Future[Frame]:
        fut = self._send(node, *args)
        if fut is None:
            await self._pool.get(node.data_addr)
            fut = self._send(node, *args)
            if fut is None:
                raise PeerUnavailable(f"connection to {host_port(*node.data_addr)} broke")
        return fut

    async def _to_all(
        self,
        opcode: Opcode,
        oid: int,
        *,
        offset: int = 0,
        length: int = 0,
        payload=b"",
        flags: int = 0,
        missing_ok: bool = False,
        token: int = 0,
    ) -> None:
        start = self._clock.monotonic()
        while True:
            epoch = self._view.epoch
            nodes = self.replicas(oid)
            if not nodes:
                raise ClusterError("no storage nodes in the cluster")
            futs = []
            here = False
            try:
                for node in nodes:
                    if node.node_id == self._local_id and self._local is not None:
                        here = True
                        continue
                    fut = self._send(node, opcode, oid, offset, length, payload, flags, token)
                    if fut is None:
                        fut = await self._connected_send(
                            node, opcode, oid, offset, length, payload, flags, token
                        )
                    futs.append(fut)
                if here:
                    futs.append(self._local_later(opcode, oid, offset, length, payload, flags,
                                                  token))
                # the replicas work in parallel already; awaiting each in turn costs less
                # than gather's bookkeeping, and a finished one (the local replica) is free
                results: list = []
                for fut in futs:
                    try:
                        results.append(await fut)
                    except Exception as exc:
                        results.append(exc)
            except PeerUnavailable as exc:
                results = [exc]
            failure: BaseException | None = None
            for res in results:
                if isinstance(res, BaseException):
                    failure = res
                elif res.result and not (missing_ok and res.result == NoObject.code):
                    failure = error_for(res.result)
                else:
                    continue
                if not isinstance(failure, _RETRYABLE):
                    raise failure
            if failure is None:
                return
            await self._await_new_ring(epoch, failure, start)

    async def _from_one(self, opcode: Opcode, oid: int, *, offset: int = 0, length: int = 0):
        start = self._clock.monotonic()
        while True:
            epoch = self._view.epoch
            nodes = self.replicas(oid)
            if not nodes:
                raise ClusterError("no storage nodes in the cluster")
            nodes.sort(key=lambda n: n.node_id != self._local_id)
            failure: BaseException | None = None
            missing = corrupt = 0
            for node in nodes:
                try:
                    fut = await self._connected_send(node, opcode, oid, offset, length, b"", 0)
                    return check(await fut)
                except NoObject as exc:
                    missing += 1
                    failure = exc
                except Corrupt as exc:  # unrepaired on that replica: another may do
                    corrupt += 1
                    failure = exc
                except _RETRYABLE as exc:
                    failure = exc
            if missing == len(nodes):
                raise NoObject(f"object {oid:016x} does not exist")
            if corrupt and corrupt + missing == len(nodes):
                # every replica that holds it tried to repair it and found no good copy:
                # the data is lost, and that is an I/O error, never bytes
                raise failure
            assert failure is not None
            await self._await_new_ring(epoch, failure, start)

    async def _await_new_ring(self, epoch: int, failure: BaseException, start: float) -> None:
        remaining = self._deadline - (self._clock.monotonic() - start)
        if remaining <= 0:
            raise ClusterError(f"request failed after {self._deadline:.0f}s: {failure}")
        log.debug("retrying after %s (epoch %d)", failure, epoch)
        if isinstance(failure, OldEpoch) and self._etcd is not None:
            await self._view.refresh(self._etcd)
            if self._view.epoch != epoch:
                return
        if isinstance(failure, (NewEpoch, NotFormatted)):
            await self._clock.sleep(0.05)  # the node has not caught up with the ring yet
            return
        changed = await self._view.wait_for_change(epoch, min(1.0, remaining),
                                                   clock=self._clock)
        if not changed and self._etcd is not None:
            await self._view.refresh(self._etcd)


@contextlib.asynccontextmanager
async def open_client(etcd_url: str, *, identity: Identity | None = None,
                      encrypt_loopback: bool = False,
                      **kwargs: object) -> AsyncIterator[ObjectClient]:
    """An ObjectClient that follows the cluster at `etcd_url` for as long as it is open:
    what a gateway, a benchmark or a test holds. `identity`: its certificate of the
    cluster, which an https etcd asks for; a cluster whose nodes have identities lets in
    only a node or admin identity of its CA on the data plane (dog holds the admin's).
    `encrypt_loopback`: encrypt links to nodes of this host too (sheep/dataplane/link.py)."""
    from sheep.cluster.state import EtcdTarget
    from sheep.cluster.view import follow

    etcd = EtcdCluster(EtcdTarget.parse(etcd_url), identity=identity)
    await etcd.connect()
    view = ClusterView()
    await view.refresh(etcd)
    follower = asyncio.ensure_future(follow(view, etcd))
    pool = PeerPool(identity=identity, encrypt_loopback=encrypt_loopback)
    try:
        yield ObjectClient(view, pool, etcd=etcd, **kwargs)  # type: ignore[arg-type]
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await pool.close()
        await etcd.close()
