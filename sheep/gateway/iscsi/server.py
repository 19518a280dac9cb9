"""The iSCSI portal: the asyncio adapter around the sans-I/O connection core.

One Protocol per TCP connection. Received bytes go to connection.Connection; its events
are acted on here: at login the export's volume is opened through the shared VolumeCache
(so NBD and iSCSI clients of one VDI on this gateway share one Volume, one lock and one
owner table), each SCSI command runs as its own coroutine on the shared Lun, and whatever
the core wants sent goes out in one writelines per loop pass.

Flow control: the CmdSN window already bounds the commands an initiator may have with us;
on top of that, reading stops while the transport's write buffer is over its high-water
mark (an initiator that does not read its Data-In cannot make us buffer without bound).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from dataclasses import dataclass

from sheep.gateway.exports import Export, ExportTable, VolumeCache
from sheep.gateway.scsi import Lun, SenseKey, Status, fixed_sense
from sheep.gateway.scsi.sense import INTERNAL_TARGET_FAILURE
from sheep.names import export_name, spelled_export, target_name
from sheep.netpeer import loopback_refusal
from sheep.tcp import ConnectionCap, accept_transport
from sheep.vdi.volume import Volume

from .connection import Closed, Connection, Execute, LogicalUnit, LoginReady, Notice
from .login import AuthPolicy, Chap, LoginInfo
from .names import lun_identity
from .session import SessionTable
from .text import Limits
from .wire import LoginStatus

log = logging.getLogger(__name__)

DEFAULT_PORT = 3260
_WRITE_HIGH = 8 << 20
# Bytes of commands' data (Data-Out received, Data-In to read) executing per connection
# before no more start (one always may): 128 READs of 32 MiB in the CmdSN window would
# otherwise hold 4 GiB for an initiator that never reads them.
_EXECUTING_BYTES = 16 << 20
MAX_CONNECTIONS = 128  # initiator connections at once (see sheep.fdlimit.RESERVED)
LOGIN_TIMEOUT = 10.0  # s from connect to the full feature phase: idle sockets hold no slot
# the sense of a command the SCSI layer itself failed on
_HARDWARE_ERROR_SENSE = fixed_sense(SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE)


@dataclass(frozen=True)
class IscsiConfig:
    """CHAP for every target and for discovery: `chap` is what initiators must know,
    `mutual` what we answer with when they challenge us (then required)."""

    chap: Chap | None = None
    mutual: Chap | None = None

    def policy(self, refused: str = "") -> AuthPolicy:
        """`refused`: why this connection's initiator may not log in without CHAP."""
        return AuthPolicy(self.chap, self.mutual if self.chap else None, refused)


class _Portal:
    """The connection core's synchronous view of the targets: the registry as of the
    moment the initiator connected."""

    def __init__(self, table: ExportTable, config: IscsiConfig, refused: str) -> None:
        self._table = table
        self._config = config
        self._refused = refused

    def canonical_target(self, name: str) -> str | None:
        export = self.find(name)
        return None if export is None else target_name(export.name)

    def find(self, name: str) -> Export | None:
        export = export_name(name)
        if export is None:
            return None
        literal = spelled_export(name)
        if literal is not None and self._table.find(literal) is not None:
            log.warning("iSCSI: %s names %s but spells %s, which exists too: refused",
                        name, export, literal)
            return None
        return self._table.find(export)

    def targets(self) -> list[str]:
        return [target_name(name) for name in self._table.names()]

    def auth(self, target: str | None) -> AuthPolicy:
        return self._config.policy(self._refused)

    def random(self, n: int) -> bytes:
        return os.urandom(n)


class _SharedLun:
    """The Lun of one export and the volume under it: a volume reopened after the last
    user released it gets a new Lun."""

    def __init__(self, lun: LogicalUnit, volume: Volume) -> None:
        self.lun = lun
        self.volume = volume
        self.users = 0


class IscsiGateway:
    """Everything the connections of one portal share."""

    def __init__(self, volumes: VolumeCache, config: IscsiConfig | None = None,
                 limits: Limits | None = None) -> None:
        self.volumes = volumes
        self.config = config or IscsiConfig()
        self.limits = limits or Limits()
        self.sessions = SessionTable()
        self._luns: dict[tuple[str, bool], _SharedLun] = {}
        self.connections: set[IscsiConnection] = set()
        self.cap = ConnectionCap(MAX_CONNECTIONS, "iSCSI")

    async def open_lun(self, export: Export) -> LogicalUnit:
        """The export's volume (opened or shared) and the one Lun over it: one Lun per
        volume, so COMPARE AND WRITE from two sessions is atomic against both."""
        volume = await self.volumes.acquire(export)
        key = (export.name, export.read_only)
        shared = self._luns.get(key)
        if shared is None or shared.volume is not volume:
            identity = lun_identity(volume.record, volume.read_only)
            lun = Lun(volume, identity, block_size=512, object_size=volume.block_size)
            shared = self._luns[key] = _SharedLun(lun, volume)
        shared.users += 1
        return shared.lun

    async def close_lun(self, export: Export) -> None:
        key = (export.name, export.read_only)
        shared = self._luns.get(key)
        if shared is not None:
            shared.users -= 1
            if shared.users <= 0:
                del self._luns[key]
        await self.volumes.release(export)

    async def serve(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: IscsiConnection(self), host, port,
                                        reuse_address=True)

    def close(self) -> None:
        for conn in list(self.connections):
            conn.abort("gateway stopping")


class IscsiConnection(asyncio.Protocol):
    def __init__(self, gateway: IscsiGateway) -> None:
        self._gw = gateway
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._refused = ""  # why this initiator may not log in without CHAP
        self._core: Connection | None = None
        self._early = bytearray()  # bytes that came before the registry was read
        self._export: Export | None = None
        self._lun: LogicalUnit | None = None
        self._running = 0
        self._running_bytes = 0
        self._ready: deque[Execute] = deque()  # commands waiting for _EXECUTING_BYTES
        self._tasks: set[asyncio.Future] = set()
        self._lost = False
        self._closing = False
        self._flush_scheduled = False
        self._write_paused = False
        self._admitted = False
        self._login_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._gw.cap.admit(transport):
            return
        self._admitted = True
        self._transport = transport  # type: ignore[assignment]
        self._peer = accept_transport(transport, _WRITE_HIGH)
        self._refused = self._refusal(transport)
        self._login_timer = self._loop.call_later(
            LOGIN_TIMEOUT, self._login_expired)
        self._gw.connections.add(self)
        transport.pause_reading()  # type: ignore[attr-defined]
        self._spawn(self._start(transport.get_extra_info("sockname")))

    def data_received(self, data: bytes) -> None:
        if self._core is None:
            self._early += data
            return
        self._core.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._gw.cap.release()
        if self._login_timer is not None:
            self._login_timer.cancel()
        self._lost = True
        self._transport = None
        self._gw.connections.discard(self)
        self._ready.clear()  # nobody is left to answer
        if self._core is not None:
            self._core.connection_lost()
        self._maybe_release()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()
        self._start_ready()

    # -- phases --------------------------------------------------------------------------

    async def _start(self, sockname: tuple | None) -> None:
        try:
            table = await self._gw.volumes.table()
        except Exception as exc:
            log.warning("iscsi %s: cannot read the VDI registry: %s", self._peer, exc)
            self.abort("registry unavailable")
            return
        if self._transport is None:
            return
        host, port = (sockname[0], sockname[1]) if sockname else ("127.0.0.1", DEFAULT_PORT)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._portal = _Portal(table, self._gw.config, self._refused)
        self._core = Connection(self._portal, self._gw.sessions, limits=self._gw.limits,
                                address=address)
        self._core.wake = self._pump
        self._transport.resume_reading()  # type: ignore[attr-defined]
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self._core.receive_data(early)
            self._pump()

    def _refusal(self, transport: asyncio.BaseTransport) -> str:
        """Any local user reaches a loopback port: without CHAP, only root and the
        daemon's user may log in (sheep/netpeer.py), asked once here, at accept."""
        if self._gw.config.chap is not None:  # every initiator proves itself anyway
            return ""
        why = loopback_refusal(transport.get_extra_info("sockname"),
                               transport.get_extra_info("peername"), "iSCSI without CHAP",
                               "give the portal --iscsi-chap-file to serve other users")
        if why:
            log.info("iscsi %s: %s", self._peer, why)
        return why

    async def _login(self, info: LoginInfo) -> None:
        core = self._core
        assert core is not None
        if info.target_name is None:  # discovery
            core.accept_login()
            self._pump()
            return
        export = self._portal.find(info.target_name)
        if export is None:
            core.refuse_login(LoginStatus.TARGET_REMOVED)
            self._pump()
            return
        try:
            lun = await self._gw.open_lun(export)
        except Exception as exc:
            log.warning("iscsi %s: cannot open %s: %s", self._peer, export.name, exc)
            core.refuse_login(LoginStatus.SERVICE_UNAVAILABLE)
            self._pump()
            return
        self._export, self._lun = export, lun
        if self._lost or core.closed:
            self._maybe_release()
            return
        if core.accept_login(lun.data_out_length):
            log.info("iscsi %s: %s logged in to %s (tsih %d)", self._peer,
                     info.initiator_name, export.name, core.session.tsih if core.session else 0)
        else:
            self._maybe_release()
        self._pump()

    async def _execute(self, event: Execute, cost: int) -> None:
        core = self._core
        assert core is not None and self._lun is not None
        try:
            result = await self._lun.execute(event.cdb, event.data_out,
                                             expected_length=event.expected_length)
            status, data, sense = int(result.status), result.data, result.sense
        except Exception:
            log.exception("iscsi %s: command %#x failed", self._peer,
                          event.cdb[0] if event.cdb else -1)
            status, data, sense = Status.CHECK_CONDITION, b"", _HARDWARE_ERROR_SENSE
        finally:
            self._running -= 1
            self._running_bytes -= cost
        core.complete(event.itt, status, data, sense)
        self._pump()
        self._maybe_release()

    # -- plumbing ------------------------------------------------------------------------

    def _pump(self) -> None:
        """Act on the core's events and schedule its output."""
        core = self._core
        if core is None:
            return
        for event in core.events():
            if isinstance(event, Execute):
                self._ready.append(event)
            elif isinstance(event, LoginReady):
                self._spawn(self._login(event.info))
            elif isinstance(event, Closed):
                log.info("iscsi %s: closing: %s", self._peer, event.reason)
                self._closing = True
                self._maybe_release()
            elif isinstance(event, Notice):
                log.info("iscsi %s: %s", self._peer, event.text)
        if not self._flush_scheduled:  # the flush starts waiting commands
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _cost(self, event: Execute) -> int:
        lun = self._lun
        return len(event.data_out) + (lun.data_in_length(event.cdb) if lun is not None else 0)

    def _start_ready(self) -> None:
        """Run waiting commands while the connection's executing bytes allow and the
        initiator takes what they answer (called after answers went to the transport,
        so that one it does not take pauses this first)."""
        while self._ready and not self._write_paused and (
                self._running == 0 or self._running_bytes < _EXECUTING_BYTES):
            event = self._ready.popleft()
            cost = self._cost(event)
            self._running += 1
            self._running_bytes += cost
            self._spawn(self._execute(event, cost))

    def _flush(self) -> None:
        self._flush_scheduled = False
        core, transport = self._core, self._transport
        if core is None or transport is None:
            return
        out = core.data_to_send()
        if out and not transport.is_closing():
            transport.writelines(out)  # may pause_writing
        if self._closing and not transport.is_closing():
            transport.close()
        self._start_ready()

    def _login_expired(self) -> None:
        self._login_timer = None
        if self._core is None or self._core.session is None:
            self.abort(f"no login within {LOGIN_TIMEOUT:.0f} s")

    def abort(self, why: str) -> None:
        log.info("iscsi %s: closing: %s", self._peer, why)
        if self._transport is not None:
            self._transport.close()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _maybe_release(self) -> None:
        """Give the volume back once the connection is gone and its commands are done: a
        write in progress still completes on a volume that is open."""
        if (self._lost or (self._core is not None and self._core.closed)) \
                and self._running == 0 and self._export is not None:
            export, self._export = self._export, None
            self._lun = None
            self._spawn(self._gw.close_lun(export))


async def serve_iscsi(volumes: VolumeCache, host: str, port: int,
                      config: IscsiConfig | None = None) -> tuple[IscsiGateway, asyncio.Server]:
    gateway = IscsiGateway(volumes, config)
    return gateway, await gateway.serve(host, port)
