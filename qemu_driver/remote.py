"""dog's end of a VM hosted by a sheep node (qemu_driver/host.py): the same operations as
VmControl's on a running VM, sent to the node that runs it, which its runtime record names.

A VM whose record names no node was started by a dog on its own host (`dog vm start
--here`, or `sheep up --vm`): VmControl drives it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.state import NodeInfo
from sheep.control import sheep_pb2 as pb
from sheep.control import sheep_pb2_grpc as pb_grpc
from sheep.control.channel import aio_channel
from sheep.gateway.iscsi.login import Chap
from sheep.security.identity import Identity

from . import console
from .accel import PROBE_TIMEOUT
from .control import STOP_TIMEOUT, VmStatus
from .errors import BadSpec, NoVm, VmError
from .migration import DEFAULT_TIMEOUT, MigrationFailed, Progress
from .spec import VmRuntime
from .supervisor import START_TIMEOUT

CALL_TIMEOUT = 15.0  # s for a call on a running VM; start and stop wait for the guest
# the host probes the accelerator, then waits for its supervisor (VmControl.start)
START_DEADLINE = PROBE_TIMEOUT + START_TIMEOUT + 60


class NoSuchNode(VmError):
    """no live node has that id"""


class HostUnreachable(VmError):
    """the node hosting the VM does not answer"""


async def find_node(etcd: EtcdCluster, node: str) -> NodeInfo:
    """The live node whose id is `node`, or the one whose id starts with it (the 12 digits
    `dog node list` shows are enough)."""
    nodes = await etcd.live_nodes()
    exact = [n for n in nodes if n.node_id == node]
    found = exact or ([n for n in nodes if n.node_id.startswith(node)] if node else [])
    if len(found) == 1:
        return found[0]
    if found:
        raise NoSuchNode(f"node id {node!r} is ambiguous: "
                         f"{', '.join(n.node_id[:12] for n in found)}")
    raise NoSuchNode(f"no live node has id {node!r} (dog node list shows them)")


ANY = "any"  # `dog vm start --on any`: not hex, so never a node id's prefix


def least_loaded(nodes: list[NodeInfo], runtimes: list[VmRuntime], prefer: str = ""
                 ) -> NodeInfo:
    """The node hosting the fewest running VMs; among equals `prefer` (the node dog talks
    to), then the lowest id."""
    if not nodes:
        raise NoSuchNode("no node is up to host the VM")
    load = {n.node_id: 0 for n in nodes}
    for rt in runtimes:
        if rt.node in load:
            load[rt.node] += 1
    return min(nodes, key=lambda n: (load[n.node_id], n.node_id != prefer, n.node_id))


async def choose_node(etcd: EtcdCluster, runtimes: list[VmRuntime], on: str,
                      prefer: str = "") -> NodeInfo:
    """The node `--on` names: an id (or its first digits), or `any` for the least loaded."""
    if on == ANY:
        return least_loaded(await etcd.live_nodes(), runtimes, prefer)
    return await find_node(etcd, on)


@dataclass(frozen=True)
class TakenSnapshot:
    """A snapshot the host took, as dog shows it."""

    name: str
    tag: str
    id: int
    label: str


def _refusal(exc: grpc.aio.AioRpcError) -> Exception:
    """The node's refusal as the error VmControl would have raised here."""
    kind = {grpc.StatusCode.NOT_FOUND: NoVm, grpc.StatusCode.INVALID_ARGUMENT: BadSpec,
            grpc.StatusCode.FAILED_PRECONDITION: VmError}.get(exc.code())
    return kind(exc.details()) if kind is not None else exc


class HostedVm:
    """The VmHost service of one node."""

    def __init__(self, stub: pb_grpc.VmHostStub, node: NodeInfo) -> None:
        self.stub, self.node = stub, node

    async def _call(self, method: str, request, timeout: float) -> pb.VmReply:
        try:
            return await getattr(self.stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._failure(exc, getattr(request, "name", "")) from None

    def _failure(self, exc: grpc.aio.AioRpcError, name: str) -> Exception:
        """The host's refusal as VmControl's error; a host that does not answer, said so
        with its own address (dog's error line would name the node dog talks to)."""
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return HostUnreachable(
                f"VM {name!r} runs on node {self.node.node_id[:12]} at "
                f"{self.node.control_addr}, which does not answer: {exc.details()}")
        return _refusal(exc)

    async def start(self, name: str, *, run_root: str = "", reconnect_delay: int = 0,
                    chap: Chap | None = None, accel: str = "",
                    timeout: float = START_DEADLINE) -> VmRuntime:
        """`accel`: "kvm" or "tcg" to force on the node (dog's SHEEP_VM_ACCEL), "": the
        node's own choice."""
        request = pb.VmStartRequest(name=name, run_dir=run_root, reconnect_delay=reconnect_delay,
                                    chap_user=chap.user if chap else "",
                                    chap_secret=chap.secret if chap else b"", accel=accel)
        reply = await self._call("VmStart", request, timeout)
        return VmRuntime.load(reply.json.encode())

    async def stop(self, name: str, *, timeout: float = STOP_TIMEOUT) -> str:
        # the host waits up to `timeout` for the power button, then 10 s for quit, 10 for
        # SIGKILL and 15 for the supervisor's record
        reply = await self._call("VmStop", pb.VmRequest(name=name, timeout=timeout),
                                 timeout + 40)
        return reply.how

    async def pause(self, name: str) -> None:
        await self._call("VmPause", pb.VmRequest(name=name), CALL_TIMEOUT)

    async def resume(self, name: str) -> None:
        await self._call("VmResume", pb.VmRequest(name=name), CALL_TIMEOUT)

    async def attach(self, name: str, vdi: str) -> None:
        await self._call("VmAttach", pb.VmRequest(name=name, vdi=vdi), CALL_TIMEOUT)

    async def detach(self, name: str, vdi: str, *, timeout: float = 30.0) -> None:
        await self._call("VmDetach", pb.VmRequest(name=name, vdi=vdi, timeout=timeout),
                         timeout + CALL_TIMEOUT)

    async def snapshot(self, name: str, tag: str) -> tuple[str, list[TakenSnapshot]]:
        reply = await self._call("VmSnapshot", pb.VmRequest(name=name, tag=tag), 120.0)
        return reply.how, [TakenSnapshot(**r) for r in json.loads(reply.json)]

    async def console(self, name: str, *, stdin_fd: int = 0, stdout=None) -> None:
        """This terminal on the VM's serial console, through its host (console.relay):
        the tail of its log first, then live, until Ctrl-] or end of input."""
        call = self.stub.VmConsole()
        typed: asyncio.Queue[bytes] = asyncio.Queue()

        async def read() -> bytes:
            reply = await call.read()
            return b"" if reply is grpc.aio.EOF else reply.data

        async def typing() -> None:
            await call.write(pb.ConsoleInput(name=name))
            while True:
                await call.write(pb.ConsoleInput(data=await typed.get()))

        typer = asyncio.ensure_future(typing())
        try:
            out = stdout or sys.stdout.buffer
            out.write(await read())  # the log's tail, or the host's refusal
            out.flush()
            await console.relay(read, typed.put_nowait, stdin_fd=stdin_fd, stdout=out)
        except grpc.aio.AioRpcError as exc:
            raise self._failure(exc, name) from None
        finally:
            typer.cancel()
            call.cancel()

    async def console_log(self, name: str, out) -> None:
        """The whole console log of the VM this node runs or last ran, onto `out`."""
        try:
            async for chunk in self.stub.VmConsoleLog(pb.VmRequest(name=name),
                                                      timeout=CALL_TIMEOUT):
                out.write(chunk.data)
        except grpc.aio.AioRpcError as exc:
            raise self._failure(exc, name) from None
        out.flush()

    async def receive(self, name: str, *, run_root: str = "", reconnect_delay: int = 0,
                      chap: Chap | None = None, timeout: float = START_DEADLINE) -> str:
        """This node ready to take VM `name` in; the URI to send it to."""
        request = pb.VmStartRequest(name=name, run_dir=run_root, reconnect_delay=reconnect_delay,
                                    chap_user=chap.user if chap else "",
                                    chap_secret=chap.secret if chap else b"")
        return (await self._call("VmReceive", request, timeout)).how

    async def abort_receive(self, name: str) -> str:
        return (await self._call("VmAbortReceive", pb.VmRequest(name=name), CALL_TIMEOUT)).how

    async def send(self, name: str, uri: str, *, bandwidth: int = 0,
                   timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[Progress]:
        """VM `name`, which this node runs, sent to `uri`: its progress, the last one
        completed; MigrationFailed (the VM runs on here) or the node's refusal."""
        request = pb.VmSendRequest(name=name, uri=uri, bandwidth=bandwidth, timeout=timeout)
        try:
            async for reply in self.stub.VmSend(request, timeout=timeout + 60):
                yield Progress(**json.loads(reply.json))
        except grpc.aio.AioRpcError as exc:
            failure = self._failure(exc, name)
            if isinstance(failure, VmError) and not isinstance(failure, HostUnreachable):
                raise MigrationFailed(str(failure)) from None
            raise failure from None

    async def status(self, name: str) -> VmStatus:
        reply = await self._call("VmStatus", pb.VmRequest(name=name), CALL_TIMEOUT)
        return VmStatus.load(reply.json.encode())


@contextlib.asynccontextmanager
async def hosted(node: NodeInfo, identity: Identity | None) -> AsyncIterator[HostedVm]:
    """The VmHost service of `node`, over its control port (dog's certificate, if any)."""
    async with aio_channel(node.control_addr, identity) as channel:
        yield HostedVm(pb_grpc.VmHostStub(channel), node)
