"""The storage node's side of the data plane: one handler per opcode over the object store.

This is the operations table (in the manner of Sheepdog's ops.c): each opcode maps to a
method; typed store errors become result codes; the epoch check happens once, here.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable

from sheep.dataplane.codec import Frame
from sheep.dataplane.server import ReplySink
from sheep.dataplane.wire import (
    DIGEST,
    EPOCH_CHECKED,
    HEADER,
    MUTATIONS,
    Flags,
    Opcode,
    pack_header,
)
from sheep.errors import (
    Corrupt,
    NewEpoch,
    NotFormatted,
    OldEpoch,
    OutOfRange,
    Result,
    SheepError,
    UnknownOp,
)
from sheep.oid import oid_vdi
from sheep.store import ObjectStore

from .fences import Fences

log = logging.getLogger(__name__)

_FUA = int(Flags.FUA)  # a plain int: IntFlag arithmetic costs µs per request
_FRESH = int(Flags.FRESH)
_RAW = int(Flags.RAW)
_MARKED = frozenset({Opcode.WRITE, Opcode.CREATE, Opcode.DISCARD})  # change data in place

# (oid, opcode, fresh) -> None to go ahead, or a future to wait for (recovery of the object)
Guard = Callable[[int, int, bool], "asyncio.Future[None] | None"]
# (oid, failed checksum blocks) -> a future done when the node tried to repair them
Repair = Callable[[int, list[int]], "asyncio.Future[None]"]


class ObjectService:
    """Serves data-plane frames from one node's ObjectStore.

    `epoch()` returns the node's current cluster epoch (0 while the cluster is not
    formatted); requests of another epoch are refused so the sender retries with the
    ring of the current one. `fences` holds the VDI lock tokens this node knows: a
    mutation is checked against them as it runs (after any wait for recovery or a
    write-intent mark), so a FENCE taken meanwhile stops it.
    """

    def __init__(self, store: ObjectStore, epoch: Callable[[], int],
                 guard: Guard | None = None, repair: Repair | None = None,
                 fences: Fences | None = None) -> None:
        self._store = store
        self._epoch = epoch
        self._guard = guard
        self._repair = repair
        self.fences = fences if fences is not None else Fences()
        self._ops: dict[int, Callable[[Frame, ReplySink], None]] = {
            Opcode.WRITE: self._write,
            Opcode.CREATE: self._create,
            Opcode.READ: self._read,
            Opcode.REMOVE: self._remove,
            Opcode.DISCARD: self._discard,
            Opcode.FLUSH: self._flush,
            Opcode.LIST: self._list,
            Opcode.GET_EPOCH: self._get_epoch,
            Opcode.EXISTS: self._exists,
            Opcode.LIST_EPOCHS: self._list_epochs,
            Opcode.DIGEST: self._digest,
            Opcode.FENCE: self._fence,
        }

    def handle(self, frame: Frame, conn: ReplySink) -> None:
        op = self._ops.get(frame.opcode)
        try:
            self._start(op, frame, conn)
        except Exception as exc:
            self._failed(op, frame, conn, exc)

    def _start(self, op: Callable[[Frame, ReplySink], None] | None, frame: Frame,
               conn: ReplySink) -> None:
        if op is None:
            raise UnknownOp(f"unknown opcode {frame.opcode}")
        if frame.opcode in EPOCH_CHECKED:
            self._check_epoch(frame.epoch, frame.opcode)
            if self._guard is not None and frame.epoch:  # epoch 0: peers' recovery reads
                fresh = frame.opcode == Opcode.CREATE and bool(frame.flags & _FRESH)
                wait = self._guard(frame.oid, frame.opcode, fresh)
                if wait is not None:
                    wait.add_done_callback(lambda _f: self._run(op, frame, conn))
                    return
        self._go(op, frame, conn)

    def _failed(self, op: Callable[[Frame, ReplySink], None] | None, frame: Frame,
                conn: ReplySink, exc: Exception) -> None:
        """What a request's failure answers: a bad block is repaired first and the request
        runs again; a typed error is its code; anything else an I/O error, logged."""
        if isinstance(exc, Corrupt) and op is not None:
            self._repair_then_run(op, frame, conn, exc)
        elif isinstance(exc, SheepError):
            self._reply(conn, frame, exc.code)
        else:
            log.error("data-plane request %s failed", frame.opcode, exc_info=exc)
            self._reply(conn, frame, Result.IO_ERROR)

    def read_now(self, oid: int, offset: int, length: int, epoch: int
                 ) -> bytes | bytearray | None:
        """A client read answered on the caller's stack, for this node's own gateway: the
        rules of `handle` (epoch, recovery guard, verified blocks) without a frame. None
        when it cannot be answered at once (another epoch, an object being recovered, a
        block to repair, any error): the caller then sends an ordinary request."""
        if epoch == 0 or epoch != self._epoch():
            return None
        try:
            if self._guard is not None and self._guard(oid, Opcode.READ, False) is not None:
                return None
            return self._store.read(oid, offset, length)
        except SheepError:
            return None

    def _repair_then_run(self, op: Callable[[Frame, ReplySink], None], frame: Frame,
                         conn: ReplySink, exc: Corrupt) -> None:
        """A client operation met a block that fails its checksum: the node repairs it
        from another replica, then runs the operation once more (a second failure is
        answered CORRUPT, and the client reads another replica). Peers' reads (epoch 0)
        are answered CORRUPT at once: they are other nodes' repairs and recoveries."""
        if self._repair is None or not frame.epoch:
            self._reply(conn, frame, exc.code)
            return
        self._repair(frame.oid, exc.blocks).add_done_callback(
            lambda _f: self._run(op, frame, conn))

    def _run(self, op: Callable[[Frame, ReplySink], None], frame: Frame, conn: ReplySink
             ) -> None:
        """Run an operation that had to wait for recovery of its object."""
        try:
            self._check_epoch(frame.epoch, frame.opcode)  # it may have moved meanwhile
            self._go(op, frame, conn)
        except SheepError as exc:
            self._reply(conn, frame, exc.code)
        except Exception:
            log.exception("data-plane request %s failed", frame.opcode)
            self._reply(conn, frame, Result.IO_ERROR)

    def _go(self, op: Callable[[Frame, ReplySink], None], frame: Frame, conn: ReplySink
            ) -> None:
        """Run `op`; one that changes an object's data first waits until the object's
        write-intent mark is durable (store/intent.py: batched with the other first writes
        of the moment, synced off the loop), so no page of it reaches the disk before."""
        if frame.opcode in _MARKED and self._changes_in_place(frame):
            wait = self._store.intend(frame.oid)
            if wait is not None:
                wait.add_done_callback(lambda f: self._after_mark(f, op, frame, conn))
                return
        op(frame, conn)

    def _changes_in_place(self, frame: Frame) -> bool:
        """Whether the operation changes blocks of an object (a whole-object discard
        removes it, and a WRITE to a missing object changes nothing: no mark for them)."""
        if frame.opcode == Opcode.CREATE:
            return True
        if frame.opcode == Opcode.DISCARD and frame.offset == 0 and (
                frame.length == self._store.object_size):
            return False
        return self._store.exists(frame.oid)

    def _after_mark(self, mark: asyncio.Future[None], op: Callable[[Frame, ReplySink], None],
                    frame: Frame, conn: ReplySink) -> None:
        """Run an operation that waited for its object's mark, by the rules of `handle`
        (a block to repair first included)."""
        exc = None if mark.cancelled() else mark.exception()
        if mark.cancelled() or exc is not None:
            log.error("write-intent mark of %s failed: %s", frame.oid, exc)
            self._reply(conn, frame, exc.code if isinstance(exc, SheepError) else Result.IO_ERROR)
            return
        try:
            self._check_epoch(frame.epoch, frame.opcode)  # it may have moved meanwhile
            op(frame, conn)
        except Exception as error:
            self._failed(op, frame, conn, error)

    def _check_epoch(self, epoch: int, opcode: int) -> None:
        """Epoch 0 is for reads that do not depend on the ring (peers' recovery and
        repair, checks of one replica); a change of data must name the epoch it was placed
        by, or a node cut off from the cluster could be made to take it."""
        mine = self._epoch()
        if mine == 0:
            raise NotFormatted()
        if epoch == mine or (epoch == 0 and opcode not in MUTATIONS):
            return
        if epoch < mine:
            raise OldEpoch(f"request epoch {epoch} < node epoch {mine}")
        raise NewEpoch(f"request epoch {epoch} > node epoch {mine}")

    def _reply(
        self,
        conn: ReplySink,
        frame: Frame,
        result: int = 0,
        *,
        length: int = 0,
        aux: int = 0,
        payload: bytes | bytearray | memoryview = b"",
    ) -> None:
        header = pack_header(
            frame.opcode,
            frame.req_id,
            epoch=self._epoch(),
            result=result,
            oid=frame.oid,
            offset=frame.offset,
            length=length,
            aux=aux,
        )
        conn.send(header, payload)

    def _after_durable(self, frame: Frame, conn: ReplySink, oids: list[int] | None) -> None:
        task = asyncio.ensure_future(self._store.flush(oids))

        def done(t: asyncio.Future) -> None:
            exc = t.exception()
            if exc is None:
                self._reply(conn, frame)
            else:
                code = exc.code if isinstance(exc, SheepError) else Result.IO_ERROR
                log.error("flush failed: %s", exc)
                self._reply(conn, frame, code)

        task.add_done_callback(done)

    def _write(self, frame: Frame, conn: ReplySink) -> None:
        self.fences.admit(frame.oid, frame.token)
        self._store.write(frame.oid, frame.offset, frame.payload, epoch=self._epoch(), create=False)
        self._ack_write(frame, conn)

    def _create(self, frame: Frame, conn: ReplySink) -> None:
        self.fences.admit(frame.oid, frame.token)
        self._store.write(frame.oid, frame.offset, frame.payload, epoch=self._epoch(), create=True,
                          fresh=bool(frame.flags & _FRESH))
        self._ack_write(frame, conn)

    def _ack_write(self, frame: Frame, conn: ReplySink) -> None:
        """The reply to a change: with FUA only once it is durable (a write, a discard's
        hole, a removal alike)."""
        if frame.flags & _FUA:
            self._after_durable(frame, conn, [frame.oid])
        else:
            self._reply(conn, frame)

    def _read(self, frame: Frame, conn: ReplySink) -> None:
        # check the range before allocating: a header may announce up to 4 GiB
        if frame.offset + frame.length > self._store.object_size:
            raise OutOfRange(
                f"read [{frame.offset}, {frame.offset + frame.length}) of a "
                f"{self._store.object_size}-byte object"
            )
        buf = bytearray(frame.length)
        self._store.readinto(frame.oid, frame.offset, memoryview(buf),
                             verify=not frame.flags & _RAW)
        self._reply(conn, frame, length=frame.length, payload=buf)

    def _remove(self, frame: Frame, conn: ReplySink) -> None:
        self.fences.admit(frame.oid, frame.token)
        self._store.remove(frame.oid)
        self._ack_write(frame, conn)

    def _discard(self, frame: Frame, conn: ReplySink) -> None:
        self.fences.admit(frame.oid, frame.token)
        self._store.discard(frame.oid, frame.offset, frame.length, epoch=self._epoch())
        self._ack_write(frame, conn)

    def _flush(self, frame: Frame, conn: ReplySink) -> None:
        self._after_durable(frame, conn, None)

    def _list(self, frame: Frame, conn: ReplySink) -> None:
        oids = self._store.list_oids()
        payload = struct.pack(f"<{len(oids)}Q", *oids)
        self._reply(conn, frame, length=len(payload), payload=payload)

    def _list_epochs(self, frame: Frame, conn: ReplySink) -> None:
        pairs = self._store.list_versions()
        payload = struct.pack(f"<{2 * len(pairs)}Q", *(x for pair in pairs for x in pair))
        self._reply(conn, frame, length=len(payload), payload=payload)

    def _digest(self, frame: Frame, conn: ReplySink) -> None:
        payload = DIGEST.pack(self._store.digest(frame.oid))
        self._reply(conn, frame, length=len(payload), payload=payload)

    def _fence(self, frame: Frame, conn: ReplySink) -> None:
        """A new lock holder of `oid`'s VDI announces its token before its first write;
        the reply says every later mutation with a lower token will be refused here.
        Not epoch-checked: raising a floor is safe on any node, in any epoch."""
        self.fences.raise_to(oid_vdi(frame.oid), frame.token)
        self._reply(conn, frame)

    def _get_epoch(self, frame: Frame, conn: ReplySink) -> None:
        self._reply(conn, frame)

    def _exists(self, frame: Frame, conn: ReplySink) -> None:
        self._reply(conn, frame, aux=int(self._store.exists(frame.oid)))


class InProcess:
    """This node's service, called in process: the volume client of a gateway on this node
    runs its own replica's operations through the very path the network's requests take
    (epoch check, recovery guard, repair then retry), with no socket and no payload copy.
    It has the `request` of a peer connection, so the client treats it as one."""

    def __init__(self, service: ObjectService) -> None:
        self._service = service

    def request(self, opcode: int, *, oid: int = 0, offset: int = 0, length: int = 0,
                payload: bytes | bytearray | memoryview = b"", flags: int = 0, epoch: int = 0,
                aux: int = 0, timeout: float | None = None, token: int = 0
                ) -> asyncio.Future[Frame]:
        """The reply frame, as a peer would send it (any result code); `timeout` is a
        peer's concern: nothing here waits on a network."""
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        if payload:
            length = len(payload)
        frame = Frame(opcode, flags, epoch, 0, 0, oid, offset, length, aux, payload, token)
        self._service.handle(frame, _FutureSink(fut))
        return fut


    def read_now(self, oid: int, offset: int, length: int, epoch: int
                 ) -> bytes | bytearray | None:
        return self._service.read_now(oid, offset, length, epoch)


class _FutureSink:
    """A ReplySink that settles a future with the reply instead of sending it."""

    __slots__ = ("_fut",)

    def __init__(self, fut: asyncio.Future[Frame]) -> None:
        self._fut = fut

    def send(self, header: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
        if self._fut.done():  # its caller gave up waiting (a synchronous read's try)
            return
        (_magic, opcode, flags, _pad, epoch, result, req_id, oid, offset, length, aux,
         _token) = HEADER.unpack(header)
        self._fut.set_result(Frame(opcode, flags, epoch, result, req_id, oid, offset, length,
                                   aux, payload))
