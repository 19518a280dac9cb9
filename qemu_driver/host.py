"""A sheep node as a VM host: the VmHost service on its control port runs VmControl there,
so QEMU, its supervisor and its sockets live on the node, the VM's runtime record names the
node, and dog drives the VM from any machine that reaches the cluster (qemu_driver/remote.py
is dog's end). `sheep run` adds it to every node; the role table (sheep/control/access.py)
leaves it to the admin.

The node shows its own certificate (role `node`, which gateways let attach disks) to the
NBD gateway its VMs use, and its own identity to etcd: nothing secret travels from dog but
an iSCSI CHAP secret, when the portal asks for one. Of dog's environment only an
accelerator it forces (SHEEP_VM_ACCEL) comes along, and wins over the node's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

from sheep.control import sheep_pb2 as pb
from sheep.control import sheep_pb2_grpc as pb_grpc
from sheep.control.handle import NodeHandle
from sheep.errors import InvalidParams, SheepError
from sheep.gateway.iscsi.login import Chap
from sheep.vdi.manager import VdiManager
from sheep.vdi.registry import VdiRegistry

from . import console
from .cmdline import DEFAULT_RECONNECT_DELAY
from .control import STOP_TIMEOUT, VmControl
from .errors import NoVm, VmNotRunning
from .migration import DEFAULT_BANDWIDTH, DEFAULT_TIMEOUT
from .spec import VmRuntime

log = logging.getLogger("sheep.vmhost")
CHUNK = 256 << 10  # bytes of console log per message (a node's messages stay well under 1 MiB)


def status_code(exc: SheepError) -> grpc.StatusCode:
    """The gRPC status a refused VM operation ends with; dog maps it back (remote.py)."""
    if isinstance(exc, NoVm):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, InvalidParams):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.FAILED_PRECONDITION


async def _done(action: Awaitable[object]) -> pb.VmReply:
    """An action whose answer is only that it was done."""
    await action
    return pb.VmReply()


class VmHostService(pb_grpc.VmHostServicer):
    def __init__(self, node: NodeHandle) -> None:
        self._node = node
        self._receiving: dict[str, Path] = {}  # VM -> run directory of its incoming QEMU

    def _control(self, what: str) -> VmControl:
        client = self._node.client
        holder = f"sheep node {self._node.info.node_id[:8]} vm {what}"
        return VmControl(VdiManager(client, VdiRegistry(client.etcd), holder=holder))

    async def _run(self, context, what: str, name: str,
                   call: Callable[[VmControl], Awaitable[pb.VmReply]]) -> pb.VmReply:
        """`call` on this node's VmControl; a refusal is one line back to dog."""
        try:
            reply = await call(self._control(what))
            if what != "status":  # dog vm info is a question, not an action
                log.info("vm %s: %s done for %s", name, what, context.peer())
            return reply
        except SheepError as exc:
            log.info("vm %s %s refused: %s", what, name, exc)
            await context.abort(status_code(exc), str(exc))
            raise  # abort raises; never reached

    async def VmStart(self, request: pb.VmStartRequest, context) -> pb.VmReply:
        async def start(ctl: VmControl) -> pb.VmReply:
            chap = Chap(request.chap_user, request.chap_secret) if request.chap_user else None
            rt = await ctl.start(
                request.name, run_root=Path(request.run_dir) if request.run_dir else None,
                reconnect_delay=request.reconnect_delay or DEFAULT_RECONNECT_DELAY,
                chap=chap, tls=self._node.identity, node=self._node.info.node_id,
                accel=request.accel)
            log.info("vm %s started here: pid %d", rt.name, rt.pid)
            return pb.VmReply(json=rt.dump().decode())

        return await self._run(context, "start", request.name, start)

    async def _drive(self, context, what: str, name: str,
                     call: Callable[[VmControl], Awaitable[pb.VmReply]]) -> pb.VmReply:
        """`call` on a VM this node hosts; one hosted elsewhere is refused (_mine)."""
        async def mine_then_call(ctl: VmControl) -> pb.VmReply:
            await self._mine(ctl, name)
            return await call(ctl)

        return await self._run(context, what, name, mine_then_call)

    async def VmStop(self, request: pb.VmRequest, context) -> pb.VmReply:
        async def stop(ctl: VmControl) -> pb.VmReply:
            return pb.VmReply(how=await ctl.stop(request.name,
                                                 timeout=request.timeout or STOP_TIMEOUT))

        return await self._drive(context, "stop", request.name, stop)

    async def VmPause(self, request: pb.VmRequest, context) -> pb.VmReply:
        return await self._drive(context, "pause", request.name,
                                 lambda ctl: _done(ctl.pause(request.name)))

    async def VmResume(self, request: pb.VmRequest, context) -> pb.VmReply:
        return await self._drive(context, "resume", request.name,
                                 lambda ctl: _done(ctl.resume(request.name)))

    async def VmAttach(self, request: pb.VmRequest, context) -> pb.VmReply:
        return await self._drive(context, "attach", request.name,
                                 lambda ctl: _done(ctl.attach(request.name, request.vdi)))

    async def VmDetach(self, request: pb.VmRequest, context) -> pb.VmReply:
        return await self._drive(context, "detach", request.name, lambda ctl: _done(
            ctl.detach(request.name, request.vdi, timeout=request.timeout or 30.0)))

    async def VmSnapshot(self, request: pb.VmRequest, context) -> pb.VmReply:
        async def snapshot(ctl: VmControl) -> pb.VmReply:
            how, records = await ctl.snapshot(request.name, request.tag)
            return pb.VmReply(how=how, json=json.dumps(
                [{"name": r.name, "tag": r.tag, "id": r.id, "label": r.label} for r in records]))

        return await self._drive(context, "snapshot", request.name, snapshot)

    async def VmStatus(self, request: pb.VmRequest, context) -> pb.VmReply:
        async def status(ctl: VmControl) -> pb.VmReply:
            return pb.VmReply(json=(await ctl.status(request.name)).dump().decode())

        return await self._run(context, "status", request.name, status)

    async def VmConsole(self, requests, context) -> AsyncIterator[pb.ConsoleOutput]:
        """The tail of the console's log, then its live output; the requests after the
        first are keystrokes. Ends when dog hangs up (or QEMU exits)."""
        typed = aiter(requests)
        first = await anext(typed, None)
        if first is None:
            return
        try:
            rt = await self._mine(self._control("console"), first.name)
            reader, writer = await asyncio.open_unix_connection(rt.console)
        except SheepError as exc:
            await context.abort(status_code(exc), str(exc))
            return
        except OSError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"cannot reach the console of VM {first.name!r}: {exc}")
            return

        async def typing() -> None:
            async for keys in typed:
                writer.write(keys.data)
                await writer.drain()  # a guest that reads no keys holds back dog's, not memory

        log.info("vm %s: console attached (%s)", first.name, context.peer())
        typer = asyncio.ensure_future(typing())
        try:
            tail = console.replayable(console.read_log(rt.console_log)[-4096:])
            yield pb.ConsoleOutput(data=tail.encode())
            while chunk := await reader.read(4096):
                yield pb.ConsoleOutput(data=chunk)
        finally:
            typer.cancel()
            writer.close()
            log.info("vm %s: console detached", first.name)

    async def VmConsoleLog(self, request: pb.VmRequest, context
                           ) -> AsyncIterator[pb.ConsoleOutput]:
        ctl = self._control("console log")
        me = self._node.info.node_id
        try:
            await ctl.vms.get(request.name)
            known = await ctl.vms.runtime(request.name) or await ctl.vms.last_exit(request.name)
            if known is None or known.node != me:
                raise VmNotRunning(f"VM {request.name!r} did not run on node {me[:12]} last")
            log_file = open(Path(known.run_dir) / "console.log", "rb")  # noqa: SIM115
        except SheepError as exc:
            await context.abort(status_code(exc), str(exc))
            return
        except OSError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"no console log of VM {request.name!r} on node {me[:12]}: "
                                f"{exc.strerror}")
            return
        log.info("vm %s: console log read by %s", request.name, context.peer())
        with log_file:
            while chunk := log_file.read(CHUNK):
                yield pb.ConsoleOutput(data=chunk)

    # -- live migration -------------------------------------------------------------------

    async def VmReceive(self, request: pb.VmStartRequest, context) -> pb.VmReply:
        async def receive(ctl: VmControl) -> pb.VmReply:
            chap = Chap(request.chap_user, request.chap_secret) if request.chap_user else None
            uri, run_dir = await ctl.receive(
                request.name, self._node.info.node_id,
                run_root=Path(request.run_dir) if request.run_dir else None,
                reconnect_delay=request.reconnect_delay or DEFAULT_RECONNECT_DELAY,
                chap=chap, tls=self._node.identity)
            self._receiving[request.name] = run_dir
            log.info("vm %s: waiting here for its migration on %s", request.name, uri)
            return pb.VmReply(how=uri)

        return await self._run(context, "receive", request.name, receive)

    async def VmSend(self, request: pb.VmSendRequest, context) -> AsyncIterator[pb.VmProgress]:
        """The migration's progress as QEMU reports it, the last one completed; a failed
        migration ends the call with its reason (the VM runs on here)."""
        ctl = self._control("migrate")
        try:
            await self._mine(ctl, request.name)
            log.info("vm %s: migrating to %s for %s", request.name, request.uri,
                     context.peer())
            async for progress in ctl.send(
                    request.name, request.uri, bandwidth=request.bandwidth or DEFAULT_BANDWIDTH,
                    timeout=request.timeout or DEFAULT_TIMEOUT, tls=self._node.identity):
                yield pb.VmProgress(json=json.dumps(progress.dump()))
            log.info("vm %s: migration sent", request.name)
        except SheepError as exc:
            log.info("vm %s: migration failed: %s", request.name, exc)
            await context.abort(status_code(exc), str(exc))

    async def VmAbortReceive(self, request: pb.VmRequest, context) -> pb.VmReply:
        async def abort(ctl: VmControl) -> pb.VmReply:
            run_dir = self._receiving.pop(request.name, None)
            if run_dir is None:
                raise VmNotRunning(f"no migration of VM {request.name!r} is coming in here")
            return pb.VmReply(how=await ctl.abort_receive(request.name, run_dir))

        return await self._run(context, "abort migration", request.name, abort)

    async def _mine(self, ctl: VmControl, name: str) -> VmRuntime:
        """A VM hosted by another node (or by a dog) is not driven from here, even on a
        host they share: its runtime record names its host."""
        rt = await ctl.running(name)
        if rt.node != self._node.info.node_id:
            where = f"node {rt.node[:12]}" if rt.node else f"a dog on host {rt.host}"
            raise VmNotRunning(f"VM {name!r} is not hosted by node "
                               f"{self._node.info.node_id[:12]} but by {where}")
        return rt


def add_vm_host(server: grpc.aio.Server, node: NodeHandle) -> None:
    """The VmHost service on `node`'s control server (sheep.control.service.serve)."""
    pb_grpc.add_VmHostServicer_to_server(VmHostService(node), server)
