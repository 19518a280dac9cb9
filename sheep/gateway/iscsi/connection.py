"""One iSCSI connection, sans-I/O: bytes in, events and bytes out (RFC 7143).

The owner feeds received bytes to `receive_data`, acts on `events()` and writes
`data_to_send()`:

- `LoginReady`: the initiator asked to enter the full feature phase. Open what the session
  needs, then call `accept_login(...)` (or `refuse_login(status)`).
- `Execute`: run this SCSI command (all its Data-Out already collected) and give the
  outcome back with `complete(itt, status, data, sense)`. Commands may complete in any
  order.
- `Closed`: send what is left, then close the connection; nothing more will come.
- `Notice`: something worth a log line (a Reject sent, a PDU dropped).

What the core does itself: login (login.py), the CmdSN window and ordering
(session.py), Data-Out collection with R2T solicitation and DataSN/offset checks, Data-In
split by the initiator's MaxRecvDataSegmentLength with the status folded into the last
one when there is no sense, residual counts from iSCSI's Expected Data Transfer Length
against what the CDB transfers, NOP-Out/NOP-In, Text (SendTargets) with continuation,
task management, logout, and the few SCSI conditions the transport owns (sense.py).

Memory is bounded whatever the initiator announces: a command's Data-Out buffer is
allocated only when the connection's write budget has room for it (its R2Ts wait until
then), immediate and unsolicited data are bounded by FirstBurstLength, and a command
announcing more Data-Out than the whole budget is refused (CHECK CONDITION, INVALID FIELD
IN CDB) without soliciting any.

Bad input never raises out of here. A framing error or a bad header digest closes the
connection silently (its byte stream cannot be trusted); a PDU the RFC says to reject is
answered with a Reject; anything that would leave a task stuck at ErrorRecoveryLevel 0
(a bad data digest, Data-Out out of sequence) is rejected or dropped and then the
connection is closed, which at ERL 0 is how an initiator learns to retry.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sheep.gateway.scsi import Op, ScsiResult, Status

from .login import Login, LoginInfo, Portal
from .sense import DATA_PHASE_ERROR, LUN_NOT_SUPPORTED, RESET_OCCURRED, TOO_MUCH_DATA_OUT
from .session import MASK, QUEUE_DEPTH, Session, SessionTable
from .text import Limits, TextError, encode, parse
from .wire import (
    LOGIN_MAX_DATA,
    MAX_TEXT,
    NO_TAG,
    CommandFlag,
    DataDigestError,
    Digests,
    IscsiFramingError,
    LoginStatus,
    LogoutReason,
    LogoutResponse,
    Opcode,
    Pdu,
    PduReader,
    RejectReason,
    ResponseFlag,
    SeqNumbers,
    TextFlag,
    TmfFunction,
    TmfResponse,
    data_in,
    logout_response,
    nop_in,
    r2t,
    reject,
    scsi_response,
    text_response,
    tmf_response,
)

# -- events --------------------------------------------------------------------------------


@dataclass(slots=True)
class LoginReady:
    info: LoginInfo


@dataclass(slots=True)
class Execute:
    """Run a command. `data_out` is all the initiator sent; `expected_length` its Expected
    Data Transfer Length for writes (None for commands without the W bit). Where they and
    the CDB disagree, the LUN decides what to write; the transport reports the residual."""

    itt: int
    lun: int
    cdb: bytes
    data_out: bytes | bytearray | memoryview
    expected_length: int | None = None


@dataclass(slots=True)
class Closed:
    reason: str


@dataclass(slots=True)
class Notice:
    text: str


Event = LoginReady | Execute | Closed | Notice


class TargetPortal(Portal):
    """What a connection needs beyond login: the targets to list in SendTargets."""

    def targets(self) -> list[str]: ...


class LogicalUnit(Protocol):
    """What the transport needs of the LUN behind a target (sheep.gateway.scsi.Lun is
    one): how much Data-Out a CDB moves, to solicit it and report residuals, and the
    command run for each Execute. A protocol, so this core never imports volumes."""

    def data_out_length(self, cdb: bytes) -> int: ...

    def data_in_length(self, cdb: bytes) -> int: ...

    async def execute(self, cdb: bytes, data_out: bytes | bytearray | memoryview = b"", *,
                      expected_length: int | None = None) -> ScsiResult: ...


# -- tasks ---------------------------------------------------------------------------------


# Data-Out buffered per connection at most (plus what comes unasked: FirstBurstLength a
# command). As large as the largest WRITE a LUN takes (65536 blocks of 512 bytes, VPD B0).
WRITE_BUDGET = 32 << 20


@dataclass(slots=True)
class _R2T:
    offset: int
    length: int
    r2tsn: int
    received: int = 0
    datasn: int = 0


@dataclass(slots=True, eq=False)
class _Task:
    itt: int
    lun: int
    cdb: bytes
    cmdsn: int
    immediate: bool
    edtl_in: int  # what the initiator will take as Data-In (EDTL if R)
    edtl_out: int  # what it will send as Data-Out (EDTL if W)
    spdtl_out: int  # what the CDB would write
    write: bool = False
    buf: bytearray | None = None
    received: int = 0
    unsol_next: int = 0  # next byte of the unsolicited burst
    unsol_end: int = 0  # where it ends (may shrink when the initiator ends it early)
    unsol_open: bool = False  # unsolicited Data-Out may still come
    unsol_datasn: int = 0
    solicit_next: int = 0  # first byte not yet asked for by an R2T
    r2tsn: int = 0
    r2ts: dict[int, _R2T] = field(default_factory=dict)
    granted: bool = False  # holds its whole Data-Out buffer: R2Ts may go out
    too_big: bool = False  # announced more Data-Out than a connection buffers: refused
    admitted: bool = False
    counted: bool = False  # holds a place in the session's window
    executing: bool = False
    aborted: bool = False

    @property
    def data_complete(self) -> bool:
        return self.too_big or self.received >= self.edtl_out


@dataclass(slots=True)
class _Tmf:
    itt: int
    waiting: set[int]
    response: int


# -- the connection ------------------------------------------------------------------------


class Connection:
    """One TCP connection's worth of iSCSI: login, then the full feature phase."""

    def __init__(self, portal: TargetPortal, sessions: SessionTable, *,
                 limits: Limits | None = None, address: str = "127.0.0.1:3260",
                 portal_group: int = 1, depth: int = QUEUE_DEPTH,
                 write_budget: int = WRITE_BUDGET) -> None:
        self.portal = portal
        self.sessions = sessions
        self.limits = limits or Limits()
        self.address = address
        self.portal_group = portal_group
        self.depth = depth
        self.write_budget = write_budget
        self._buffered = 0  # bytes of Data-Out buffers held by this connection's tasks
        self._ungranted: deque[_Task] = deque()  # writes waiting for budget, oldest first
        self.login = Login(portal, self.limits, window=depth)
        self.session: Session | None = None
        self.closed = False
        self.wake: Callable[[], None] | None = None  # called when another connection acts
        # login PDUs carry at most 8 KiB (RFC 7143 §6.1); the negotiated limit applies only
        # once the login is accepted
        self._reader = PduReader(LOGIN_MAX_DATA)
        self._digests = Digests()
        self._out: list = []
        self._events: list[Event] = []
        self._statsn = 0
        self._tasks: dict[int, _Task] = {}
        self._by_ttt: dict[int, tuple[_Task, _R2T]] = {}
        self._next_ttt = 1
        self._tmfs: list[_Tmf] = []
        self._logout: Pdu | None = None
        self._text_more: dict[int, bytes] = {}  # TTT -> the rest of a long Text Response
        self._text_in = bytearray()  # a Text Request continued by the initiator (C bit)
        self._data_out_length: Callable[[bytes], int] = lambda cdb: 0

    # -- the owner's side ----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        self._reader.feed(data)
        while not self.closed and not (self.session is None and self.login.ready):
            try:
                pdu = self._reader.next_pdu()
            except DataDigestError as exc:
                self._reject(RejectReason.DATA_DIGEST_ERROR, exc.bhs)
                self._close("data digest error")
                return
            except IscsiFramingError as exc:
                self._close(f"framing error: {exc}")
                return
            if pdu is None:
                return
            if self.session is None:
                self._login_pdu(pdu)
            else:
                self._pdu(pdu)

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def data_to_send(self) -> list:
        out, self._out = self._out, []
        return out

    def accept_login(self, data_out_length: Callable[[bytes], int] | None = None) -> bool:
        """Finish the login the last LoginReady announced. False (and a refusal sent) when
        the session it names cannot be joined. `data_out_length` is the session's
        `LogicalUnit.data_out_length` (none for discovery)."""
        info = self.login.info
        assert self.login.ready and info is not None
        if info.tsih:
            session = self.sessions.get(info.tsih)
            if session is None or (session.initiator_name, session.isid,
                                   session.target_name) != (info.initiator_name, info.isid,
                                                            info.target_name):
                self.refuse_login(LoginStatus.SESSION_DOES_NOT_EXIST)
                return False
            old = session.connection
            if old is not None and old is not self:
                if old.login.info is not None and old.login.info.cid != info.cid:
                    self.refuse_login(LoginStatus.TOO_MANY_CONNECTIONS)
                    return False
                old.terminate("connection reinstated")
            session.in_flight = 0
            session.params = info.params
        else:
            old_session = self.sessions.find(info.initiator_name, info.isid, info.target_name)
            if old_session is not None:  # session reinstatement (RFC 7143 §6.3.5)
                self.sessions.remove(old_session)
                if old_session.connection is not None:
                    old_session.connection.terminate("session reinstated")
            session = self.sessions.create(info.isid, info.initiator_name, info.target_name,
                                           info.params, info.cmdsn, self.depth)
        session.connection = self
        self.session = session
        if data_out_length is not None:
            self._data_out_length = data_out_length
        self._out += self.login.accept(session.tsih)
        self._statsn = self.login.statsn
        params = info.params
        self._digests = Digests(params.header_digest, params.data_digest)
        self._reader.max_data = max(self.limits.max_recv_data_segment_length, LOGIN_MAX_DATA)
        self._reader.header_digest = params.header_digest
        self._reader.data_digest = params.data_digest
        self.receive_data(b"")  # PDUs that arrived behind the last login request
        return True

    def refuse_login(self, status: LoginStatus) -> None:
        self._out += self.login.refuse(status)
        self._close(f"login refused ({status.name})")

    def complete(self, itt: int, status: int, data: bytes | bytearray | memoryview = b"",
                 sense: bytes = b"") -> None:
        """The outcome of an Execute. Unknown or aborted tasks are dropped silently: their
        initiator was told (or will be) through task management."""
        task = self._tasks.get(itt)
        if task is None or not task.executing:
            return
        del self._tasks[itt]
        self._release(task)
        if task.aborted or self.closed:
            self._task_gone(task)
            return
        self._respond(task, status, data, sense)

    def terminate(self, reason: str) -> None:
        """End this connection from outside (its session was reinstated elsewhere)."""
        if self.session is not None and self.session.connection is self:
            self.session.connection = None
        self.session = None
        self._close(reason)
        if self.wake is not None:
            self.wake()

    def connection_lost(self) -> None:
        """The transport is gone: the session ends with it (ErrorRecoveryLevel 0)."""
        session = self.session
        if session is not None and session.connection is self:
            session.connection = None
            self.sessions.remove(session)
        self.closed = True

    @property
    def executing(self) -> int:
        return sum(1 for t in self._tasks.values() if t.executing)

    def ping(self) -> None:
        """A target NOP-In asking the initiator for a NOP-Out: a liveness check."""
        if self.session is None or self.closed:
            return
        ttt = self._ttt()
        self._out += nop_in(NO_TAG, ttt, 0, self._sn(advance=False), digests=self._digests)

    # -- login -----------------------------------------------------------------------------

    def _login_pdu(self, pdu: Pdu) -> None:
        if pdu.opcode != Opcode.LOGIN_REQUEST:
            self._close(f"{_name(pdu.opcode)} before login")
            return
        self._out += self.login.receive(pdu)
        if self.login.failed:
            why = self.login.refused
            self._close(f"login refused ({why.name if why is not None else '?'})")
        elif self.login.ready:
            assert self.login.info is not None
            self._events.append(LoginReady(self.login.info))

    # -- full feature phase: dispatch ----------------------------------------------------

    def _pdu(self, pdu: Pdu) -> None:
        op = pdu.opcode
        if self._logout is not None and op != Opcode.DATA_OUT:
            return  # after a Logout request the initiator sends nothing new
        if op == Opcode.DATA_OUT:
            self._data_out(pdu)
            return
        if op == Opcode.SCSI_COMMAND:
            self._scsi_command(pdu)
            return
        if op in (Opcode.NOP_OUT, Opcode.TASK_MGMT_REQUEST, Opcode.TEXT_REQUEST,
                  Opcode.LOGOUT_REQUEST):
            if op == Opcode.NOP_OUT and pdu.itt == NO_TAG and pdu.ttt != NO_TAG:
                return  # the answer to our ping: nothing to do
            self._ordered(pdu.cmdsn, pdu, pdu.immediate)
            return
        if op == Opcode.LOGIN_REQUEST:
            self._reject(RejectReason.PROTOCOL_ERROR, pdu.bhs)
            self._close("login request in the full feature phase")
            return
        if op == Opcode.SNACK:
            self._reject(RejectReason.SNACK_REJECT, pdu.bhs)
            return
        self._reject(RejectReason.COMMAND_NOT_SUPPORTED, pdu.bhs)

    def _ordered(self, cmdsn: int, item: Pdu | _Task, immediate: bool) -> None:
        """Act on a PDU or task in CmdSN order (immediate ones at once)."""
        session = self.session
        assert session is not None
        ready = [item] if immediate else session.admit(cmdsn, item)
        if not ready and not immediate:
            self._events.append(Notice(f"CmdSN {cmdsn} outside the window "
                                       f"[{session.exp_cmdsn}, {session.max_cmdsn}] dropped"
                                       if not session.in_window(cmdsn) else
                                       f"CmdSN {cmdsn} waits for {session.exp_cmdsn}"))
        for one in ready:
            if isinstance(one, _Task):
                self._admit(one)
            else:
                self._ordered_pdu(one)

    def _ordered_pdu(self, pdu: Pdu) -> None:
        op = pdu.opcode
        if op == Opcode.NOP_OUT:
            self._nop_out(pdu)
        elif op == Opcode.TASK_MGMT_REQUEST:
            self._task_management(pdu)
        elif op == Opcode.TEXT_REQUEST:
            self._text(pdu)
        elif op == Opcode.LOGOUT_REQUEST:
            self._logout_request(pdu)

    # -- SCSI commands and their data ----------------------------------------------------

    def _scsi_command(self, pdu: Pdu) -> None:
        session = self.session
        assert session is not None
        if session.discovery:
            self._reject(RejectReason.PROTOCOL_ERROR, pdu.bhs)
            self._close("SCSI command in a discovery session")
            return
        if not pdu.immediate and not session.in_window(pdu.cmdsn):
            self._events.append(Notice(f"SCSI command CmdSN {pdu.cmdsn} outside the window "
                                       f"[{session.exp_cmdsn}, {session.max_cmdsn}] dropped"))
            return
        if pdu.itt in self._tasks:
            self._reject(RejectReason.TASK_IN_PROGRESS, pdu.bhs)
            return
        flags = pdu.flags
        edtl = pdu.edtl
        try:
            cdb = pdu.cdb
        except IscsiFramingError:
            self._reject(RejectReason.INVALID_PDU_FIELD, pdu.bhs)
            self._close("malformed AHS")
            return
        try:
            spdtl_out = max(int(self._data_out_length(cdb)), 0)
        except Exception:
            spdtl_out = 0
        write = bool(flags & CommandFlag.WRITE)
        task = _Task(pdu.itt, pdu.lun, cdb, pdu.cmdsn, pdu.immediate,
                     edtl_in=edtl if flags & CommandFlag.READ else 0,
                     edtl_out=edtl if write else 0, spdtl_out=spdtl_out, write=write)
        params = session.params
        immediate = pdu.data
        if immediate:
            limit = min(params.first_burst_length, task.edtl_out)
            if not write or not params.immediate_data or len(immediate) > limit:
                self._reject(RejectReason.PROTOCOL_ERROR, pdu.bhs)
                self._close("immediate data not allowed here")
                return
        if task.edtl_out > self.write_budget:
            task.too_big = True  # refused when its turn comes; its Data-Out is dropped
        elif task.edtl_out:
            task.received = task.unsol_next = task.unsol_end = len(immediate)
            if not params.initial_r2t and not pdu.final:
                task.unsol_open = True
                task.unsol_end = min(params.first_burst_length, task.edtl_out)
            task.solicit_next = task.unsol_end
            if not self._grant(task):
                # what comes unasked (at most FirstBurstLength) is taken meanwhile
                self._take(task, task.unsol_end)
                self._ungranted.append(task)
            task.buf[: len(immediate)] = immediate
        self._tasks[task.itt] = task
        if not task.unsol_open:
            self._solicit(task)
        self._ordered(task.cmdsn, task, task.immediate)

    def _admit(self, task: _Task) -> None:
        task.admitted = True
        if not task.immediate:
            task.counted = True
            assert self.session is not None
            self.session.in_flight += 1
        if task.aborted:
            self._drop(task)
            return
        self._maybe_execute(task)

    def _data_out(self, pdu: Pdu) -> None:
        if pdu.ttt == NO_TAG:
            hit = None
            task = self._tasks.get(pdu.itt)
        else:
            hit = self._by_ttt.get(pdu.ttt)
            task = hit[0] if hit is not None else None
            if task is not None and task.itt != pdu.itt:
                self._sequence_error(pdu, task)
                return
        if task is None or task.aborted:
            # data of a command dropped (out of its window) or aborted: nothing waits
            self._events.append(Notice(f"Data-Out for no live task ({pdu.itt:#x}) dropped"))
            return
        data = pdu.data
        offset = pdu.buffer_offset
        if hit is None:  # unsolicited
            ok = (task.unsol_open and offset == task.unsol_next
                  and pdu.datasn == task.unsol_datasn
                  and offset + len(data) <= task.unsol_end)
            if not ok:
                self._sequence_error(pdu, task)
                return
            task.unsol_next += len(data)
            task.unsol_datasn += 1
            if pdu.final or task.unsol_next == task.unsol_end:
                task.unsol_open = False
                task.unsol_end = task.solicit_next = task.unsol_next
        else:
            burst = hit[1]
            ok = (offset == burst.offset + burst.received and pdu.datasn == burst.datasn
                  and burst.received + len(data) <= burst.length)
            if not ok:
                self._sequence_error(pdu, task)
                return
            burst.received += len(data)
            burst.datasn += 1
            if burst.received == burst.length:
                del task.r2ts[pdu.ttt]
                del self._by_ttt[pdu.ttt]
            elif pdu.final:
                self._sequence_error(pdu, task)
                return
        if data:
            assert task.buf is not None
            task.buf[offset : offset + len(data)] = data
            task.received += len(data)
        if task.aborted:
            return
        self._solicit(task)
        self._maybe_execute(task)

    def _sequence_error(self, pdu: Pdu, task: _Task) -> None:
        """Data-Out out of order, out of its burst, or with a wrong DataSN: at ERL 0 the
        task's data cannot be recovered. The PDU is rejected and the task ends at once with
        CHECK CONDITION (DATA PHASE ERROR); its later Data-Out finds no task and is dropped.
        The connection stays: the initiator learns of the failure without a reconnect."""
        self._reject(RejectReason.PROTOCOL_ERROR, pdu.bhs)
        self._events.append(Notice(f"Data-Out out of sequence for task {task.itt:#x} "
                                   f"(DataSN {pdu.datasn}, offset {pdu.buffer_offset})"))
        if task.admitted:
            self._finish(task, Status.CHECK_CONDITION, sense=DATA_PHASE_ERROR)
        else:
            task.aborted = True
            self._release(task)

    def _take(self, task: _Task, size: int) -> None:
        """Give `task` a Data-Out buffer of `size` bytes (keeping what it holds)."""
        old = task.buf
        task.buf = bytearray(size)
        if old is not None:
            task.buf[: len(old)] = old
            self._buffered -= len(old)
        self._buffered += size

    def _grant(self, task: _Task) -> bool:
        """Give `task` its whole buffer if the write budget has room (always when no other
        task holds one, so a lone command never waits for ever)."""
        others = self._buffered - (len(task.buf) if task.buf is not None else 0)
        if others and others + task.edtl_out > self.write_budget:
            return False
        self._take(task, task.edtl_out)
        task.granted = True
        return True

    def _grant_waiting(self) -> None:
        while self._ungranted:
            task = self._ungranted[0]
            if task.aborted or self._tasks.get(task.itt) is not task:
                self._ungranted.popleft()
                continue
            if not self._grant(task):
                return
            self._ungranted.popleft()
            self._solicit(task)

    def _solicit(self, task: _Task) -> None:
        """Send R2Ts for data still missing, at most MaxOutstandingR2T at a time."""
        session = self.session
        if task.unsol_open or not task.granted or session is None or task.aborted:
            return
        params = session.params
        while (task.solicit_next < task.edtl_out
               and len(task.r2ts) < params.max_outstanding_r2t):
            length = min(params.max_burst_length, task.edtl_out - task.solicit_next)
            ttt = self._ttt()
            burst = _R2T(task.solicit_next, length, task.r2tsn)
            task.r2ts[ttt] = burst
            self._by_ttt[ttt] = (task, burst)
            self._out += r2t(task.itt, task.lun, ttt, self._sn(advance=False),
                             r2tsn=task.r2tsn, offset=burst.offset, length=length,
                             digests=self._digests)
            task.r2tsn += 1
            task.solicit_next += length

    def _maybe_execute(self, task: _Task) -> None:
        if not task.admitted or not task.data_complete or task.executing:
            return
        session = self.session
        assert session is not None
        op = task.cdb[0] if task.cdb else 0
        if task.lun != 0 and op != Op.REPORT_LUNS:
            self._finish(task, Status.CHECK_CONDITION, sense=LUN_NOT_SUPPORTED)
            return
        if session.unit_attention and op not in (Op.INQUIRY, Op.REPORT_LUNS):
            session.unit_attention = False
            if op == Op.REQUEST_SENSE:
                alloc = task.cdb[4] if len(task.cdb) > 4 else 0
                self._finish(task, Status.GOOD, data=RESET_OCCURRED[:alloc])
            else:
                self._finish(task, Status.CHECK_CONDITION, sense=RESET_OCCURRED)
            return
        if task.too_big:
            self._finish(task, Status.CHECK_CONDITION, sense=TOO_MUCH_DATA_OUT)
            return
        task.executing = True
        # Data-Out that disagrees with the CDB goes to the LUN as it is (a WRITE writes the
        # whole blocks it got; COMPARE AND WRITE refuses any other size); the residual
        # then tells the initiator what was not transferred
        data_out = task.buf if task.buf is not None else b""
        self._events.append(Execute(task.itt, task.lun, task.cdb, data_out,
                                    task.edtl_out if task.write else None))

    def _finish(self, task: _Task, status: int, *, data: bytes = b"", sense: bytes = b"") -> None:
        """Answer a task the transport decided itself."""
        self._tasks.pop(task.itt, None)
        self._release(task)
        self._respond(task, status, data, sense)

    def _respond(self, task: _Task, status: int, data: bytes | bytearray | memoryview,
                 sense: bytes) -> None:
        """Data-In and status for a finished task, with residuals (RFC 7143 §11.4.5)."""
        if task.counted:
            task.counted = False
            assert self.session is not None
            self.session.in_flight -= 1
        session = self.session
        assert session is not None
        params = session.params
        if task.spdtl_out or task.edtl_out:  # a write: what the CDB took vs was sent
            expected, actual = task.edtl_out, task.spdtl_out
        else:  # a read, or no data: what the CDB produced vs what the initiator takes
            expected, actual = task.edtl_in, len(data)
        if actual > expected:
            flags, residual = ResponseFlag.OVERFLOW, actual - expected
        elif actual < expected:
            flags, residual = ResponseFlag.UNDERFLOW, expected - actual
        else:
            flags, residual = 0, 0
        send = memoryview(data)[: task.edtl_in] if data else memoryview(b"")
        fold = status == Status.GOOD and not sense and len(send) > 0
        datasn = 0
        chunk = params.max_recv_data_segment_length
        burst = params.max_burst_length
        pos = 0
        while pos < len(send):
            n = min(chunk, len(send) - pos, burst - pos % burst)
            last = pos + n == len(send)
            end_of_burst = last or (pos + n) % burst == 0
            if last and fold:
                sn = self._sn(advance=True)
                self._out += data_in(task.itt, task.lun, send[pos : pos + n], offset=pos,
                                     datasn=datasn, sn=sn, final=True, status=status,
                                     residual_flags=flags, residual=residual,
                                     digests=self._digests)
            else:
                self._out += data_in(task.itt, task.lun, send[pos : pos + n], offset=pos,
                                     datasn=datasn, sn=self._sn(advance=False),
                                     final=end_of_burst, digests=self._digests)
            datasn += 1
            pos += n
        if not fold:
            self._out += scsi_response(task.itt, status, self._sn(advance=True),
                                       sense=sense, residual_flags=flags, residual=residual,
                                       expdatasn=datasn or task.r2tsn, digests=self._digests)
        self._after_task()

    def _release(self, task: _Task) -> None:
        for ttt in task.r2ts:
            self._by_ttt.pop(ttt, None)
        task.r2ts.clear()
        if task.buf is not None:
            self._buffered -= len(task.buf)
            task.buf = None
            self._grant_waiting()

    def _drop(self, task: _Task) -> None:
        """End an aborted task that is not executing: no response is due for it."""
        self._tasks.pop(task.itt, None)
        self._release(task)
        self._task_gone(task)

    def _task_gone(self, task: _Task) -> None:
        if task.counted:
            task.counted = False
            if self.session is not None:
                self.session.in_flight -= 1
        for tmf in list(self._tmfs):
            tmf.waiting.discard(task.itt)
            if not tmf.waiting:
                self._tmfs.remove(tmf)
                if not self.closed:
                    self._out += tmf_response(tmf.itt, tmf.response, self._sn(advance=True),
                                              digests=self._digests)
        self._after_task()

    def _after_task(self) -> None:
        if self._logout is not None and not self._tasks:
            self._finish_logout()

    # -- other requests ------------------------------------------------------------------

    def _nop_out(self, pdu: Pdu) -> None:
        if pdu.itt == NO_TAG:
            return  # a ping that wants no answer
        data = bytes(pdu.data)[: self._params().max_recv_data_segment_length]
        self._out += nop_in(pdu.itt, NO_TAG, pdu.lun, self._sn(advance=True), data,
                            digests=self._digests)

    def _task_management(self, pdu: Pdu) -> None:
        function = pdu.flags & 0x7F
        session = self.session
        assert session is not None
        lun = pdu.lun
        if function == TmfFunction.ABORT_TASK:
            task = self._tasks.get(pdu.ttt)  # bytes 20-23: Referenced Task Tag
            if task is None or task.lun != lun:
                ref = pdu.u32(32)
                received = session.in_window(ref) and ref != pdu.cmdsn
                self._tmf_done(pdu, TmfResponse.COMPLETE if received
                               else TmfResponse.TASK_DOES_NOT_EXIST)
                return
            self._abort(pdu, [task])
            return
        if function in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET,
                        TmfFunction.LOGICAL_UNIT_RESET, TmfFunction.TARGET_WARM_RESET):
            if function != TmfFunction.TARGET_WARM_RESET and lun != 0:
                self._tmf_done(pdu, TmfResponse.LUN_DOES_NOT_EXIST)
                return
            tasks = [t for t in self._tasks.values()
                     if function == TmfFunction.TARGET_WARM_RESET or t.lun == lun]
            if function in (TmfFunction.LOGICAL_UNIT_RESET, TmfFunction.TARGET_WARM_RESET):
                assert session.target_name is not None
                self.sessions.reset(session.target_name)
            self._abort(pdu, tasks)
            return
        if function == TmfFunction.TASK_REASSIGN:
            self._tmf_done(pdu, TmfResponse.REASSIGNMENT_NOT_SUPPORTED)
            return
        self._tmf_done(pdu, TmfResponse.NOT_SUPPORTED)

    def _abort(self, pdu: Pdu, tasks: list[_Task]) -> None:
        """Abort tasks; the response waits until those already running have finished, so
        that nothing they do can land after the initiator was told they are gone."""
        waiting = set()
        for task in tasks:
            task.aborted = True
            if task.executing:
                waiting.add(task.itt)
            elif task.admitted:
                self._drop(task)
            else:
                self._release(task)  # held for its CmdSN: dropped when admitted
        if waiting:
            self._tmfs.append(_Tmf(pdu.itt, waiting, TmfResponse.COMPLETE))
        else:
            self._tmf_done(pdu, TmfResponse.COMPLETE)

    def _tmf_done(self, pdu: Pdu, response: int) -> None:
        self._out += tmf_response(pdu.itt, response, self._sn(advance=True),
                                  digests=self._digests)

    def _text(self, pdu: Pdu) -> None:
        if pdu.ttt != NO_TAG:  # the initiator asks for the rest of a long response
            rest = self._text_more.pop(pdu.ttt, None)
            if rest is None:
                self._reject(RejectReason.INVALID_PDU_FIELD, pdu.bhs)
                return
            self._send_text(pdu, rest)
            return
        # one text exchange at a time (RFC 7143 §11.10): a new request ends the last one,
        # so what an initiator never asked the rest of is not kept
        self._text_more.clear()
        if len(self._text_in) + len(pdu.data) > MAX_TEXT:
            self._text_in.clear()
            self._reject(RejectReason.INVALID_PDU_FIELD, pdu.bhs)
            self._close(f"text request continued past {MAX_TEXT} bytes")
            return
        self._text_in += pdu.data
        if pdu.flags & TextFlag.CONTINUE:
            self._out += text_response(pdu.itt, self._ttt(), 0, pdu.lun,
                                       self._sn(advance=True), b"", digests=self._digests)
            return
        try:
            pairs = parse(self._text_in)
        except TextError:
            self._text_in.clear()
            self._reject(RejectReason.INVALID_PDU_FIELD, pdu.bhs)
            return
        self._text_in.clear()
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answer += self._send_targets(value)
            else:
                answer.append((key, "NotUnderstood"))
        self._send_text(pdu, encode(answer))

    def _send_text(self, pdu: Pdu, text: bytes) -> None:
        limit = self._params().max_recv_data_segment_length
        if len(text) <= limit:
            self._out += text_response(pdu.itt, NO_TAG, TextFlag.FINAL, pdu.lun,
                                       self._sn(advance=True), text, digests=self._digests)
            return
        ttt = self._ttt()
        self._text_more[ttt] = text[limit:]
        self._out += text_response(pdu.itt, ttt, TextFlag.CONTINUE, pdu.lun,
                                   self._sn(advance=True), text[:limit], digests=self._digests)

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        """SendTargets=All lists every target in a discovery session; in a normal session
        only the session's own target (RFC 7143 Appendix C)."""
        session = self.session
        assert session is not None
        if session.discovery and value == "All":
            names = self.portal.targets()
        elif value in ("All", "") and not session.discovery:
            names = [session.target_name] if session.target_name else []
        else:
            target = self.portal.canonical_target(value)
            names = [target] if target is not None else []
        out = []
        for name in names:
            out += [("TargetName", name), ("TargetAddress",
                                           f"{self.address},{self.portal_group}")]
        return out

    def _logout_request(self, pdu: Pdu) -> None:
        reason = pdu.flags & 0x7F
        if reason == LogoutReason.REMOVE_FOR_RECOVERY:
            self._out += logout_response(pdu.itt, LogoutResponse.RECOVERY_NOT_SUPPORTED,
                                         self._sn(advance=True), digests=self._digests)
            return
        self._logout = pdu
        for task in list(self._tasks.values()):
            if not task.executing:  # still waiting for data: it will never get it
                task.aborted = True
                self._drop(task)
        if not self._tasks:
            self._finish_logout()

    def _finish_logout(self) -> None:
        pdu = self._logout
        assert pdu is not None
        self._logout = None
        self._out += logout_response(pdu.itt, LogoutResponse.CLOSED, self._sn(advance=True),
                                     digests=self._digests)
        session = self.session
        if session is not None and session.connection is self:
            session.connection = None
            self.sessions.remove(session)
        self._close("logged out")

    # -- plumbing ------------------------------------------------------------------------

    def _params(self):
        assert self.session is not None
        return self.session.params

    def _sn(self, *, advance: bool) -> SeqNumbers:
        session = self.session
        exp = session.exp_cmdsn if session else 0
        top = session.max_cmdsn if session else 0
        sn = SeqNumbers(self._statsn, exp, top)
        if advance:
            self._statsn = (self._statsn + 1) & MASK
        return sn

    def _ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (self._next_ttt % 0x7FFFFFFF) + 1
        return ttt

    def _reject(self, reason: RejectReason, bhs: bytes) -> None:
        self._events.append(Notice(f"reject {_name(bhs[0] & 0x3F)}: {reason.name}"))
        self._out += reject(reason, bytes(bhs[:48]), self._sn(advance=True),
                            digests=self._digests)

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        for task in list(self._tasks.values()):
            if not task.executing:
                self._tasks.pop(task.itt, None)
        self._events.append(Closed(reason))


def _name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode:#x}"

