"""The gRPC control service of one node: cluster format/info and node stats.

`dog` may talk to any node; a node answers cluster-wide questions by asking its peers'
control services (node list) or etcd (cluster info), never the data plane.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import asdict

import grpc

from sheep.cluster.etcd import AlreadyFormatted
from sheep.cluster.state import EpochRecord, NodeInfo
from sheep.errors import InvalidParams
from sheep.netaddr import host_port
from sheep.oid import DEFAULT_OBJECT_SIZE
from sheep.security.identity import Identity

from . import sheep_pb2 as pb
from . import sheep_pb2_grpc as pb_grpc
from .access import RoleCheck
from .channel import aio_channel
from .handle import NodeHandle, NodeStatus

PEER_TIMEOUT = 3.0
# What one peer can cost the control plane, as on the other planes: at most CONNECTIONS
# sockets (more are closed at once), 10 s to finish the TLS and HTTP/2 handshakes, small
# messages (every request is a few bytes), a bounded number of calls at a time.
CONNECTIONS = 64
HANDSHAKE_TIMEOUT_MS = 10_000
MAX_MESSAGE = 1 << 20
MAX_CALLS = 64
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_allowed_incoming_connections", CONNECTIONS),
    ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


def node_pb(info: NodeInfo) -> pb.Node:
    return pb.Node(
        id=info.node_id,
        host=info.host,
        data_port=info.data_port,
        control_port=info.control_port,
        zone=info.zone,
        vnodes=info.vnodes,
        capacity=info.capacity,
    )


def epoch_pb(record: EpochRecord) -> pb.Epoch:
    return pb.Epoch(epoch=record.epoch, time=record.time, nodes=[node_pb(n) for n in record.nodes])


def status_pb(status: NodeStatus) -> pb.NodeStats:
    return pb.NodeStats(node=node_pb(status.node), used=status.used, free=status.free,
                        objects=status.objects, epoch=status.epoch, reachable=True,
                        recovery=pb.RecoveryStats(**asdict(status.recovery)),
                        scrub=pb.ScrubStats(**asdict(status.scrub)),
                        filesystem=status.filesystem, space=status.space,
                        space_used=status.space_used)


def space_warnings(stats: list[pb.NodeStats]) -> list[str]:
    """One line per node past its nearfull or full ratio."""
    out = []
    for s in stats:
        if s.reachable and s.space in ("nearfull", "full"):
            what = ("full: it takes no new objects" if s.space == "full"
                    else "nearly full")
            out.append(f"node {s.node.id[:12]} ({host_port(s.node.host, s.node.control_port)}) is "
                       f"{what} ({s.space_used:.0%} of its disk used)")
    return out


class ControlService(pb_grpc.ControlServicer):
    def __init__(self, node: NodeHandle) -> None:
        self._node = node

    async def FormatCluster(self, request: pb.FormatRequest, context) -> pb.ClusterInfoReply:
        try:
            await self._node.etcd.format(request.copies,
                                         request.object_size or DEFAULT_OBJECT_SIZE)
        except InvalidParams as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AlreadyFormatted as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        await self._node.view.refresh(self._node.etcd)
        return await self.ClusterInfo(pb.Empty(), context)

    async def ClusterInfo(self, request: pb.Empty, context) -> pb.ClusterInfoReply:
        etcd = self._node.etcd
        config = await etcd.config()
        record, _ = await etcd.epoch()
        history = await etcd.epoch_history()
        reply = pb.ClusterInfoReply(
            epoch=record.epoch if record else 0, history=[epoch_pb(r) for r in history],
            etcd=self._node.etcd_url,
        )
        if config is None:
            reply.status = "waiting for format"
            return reply
        reply.cluster_id = config.cluster_id
        reply.copies = config.copies
        reply.object_size = config.object_size
        reply.created = config.created
        members = len(record.nodes) if record else 0
        reply.status = "running" if members >= config.copies else "degraded"
        if members < config.copies:
            reply.health = "degraded"
        else:
            done = await etcd.recovered_members(reply.epoch)
            finished = record is not None and all(n.node_id in done for n in record.nodes)
            reply.health = "healthy" if finished else "recovering"
        if record is not None:
            stats = await asyncio.gather(*(self._peer_stats(n) for n in record.nodes))
            reply.warnings.extend(space_warnings(stats))
        return reply

    async def NodeInfo(self, request: pb.Empty, context) -> pb.NodeStats:
        return self._stats()

    def _stats(self) -> pb.NodeStats:
        return status_pb(self._node.status())

    async def SetRecoveryThrottle(self, request: pb.ThrottleRequest, context) -> pb.NodeStats:
        self._node.set_recovery_throttle(request.bytes_per_second)
        return self._stats()

    async def StartScrub(self, request: pb.Empty, context) -> pb.NodeStats:
        self._node.start_scrub()
        return self._stats()

    async def NodeList(self, request: pb.Empty, context) -> pb.NodeListReply:
        record, _ = await self._node.etcd.epoch()
        nodes = record.nodes if record else ()
        stats = await asyncio.gather(*(self._peer_stats(n) for n in nodes))
        return pb.NodeListReply(nodes=stats)

    async def _peer_stats(self, info: NodeInfo) -> pb.NodeStats:
        if info.node_id == self._node.info.node_id:
            return self._stats()
        try:
            async with aio_channel(info.control_addr, self._node.identity) as channel:
                stub = pb_grpc.ControlStub(channel)
                return await stub.NodeInfo(pb.Empty(), timeout=PEER_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            return pb.NodeStats(node=node_pb(info), reachable=False, error=exc.details() or "")


# A service more on a node's control port: it registers itself on the server, for the node.
# The VM host (qemu_driver/host.py) is one: it sits above the node, so `sheep run` adds it.
ExtraService = Callable[[grpc.aio.Server, NodeHandle], None]


async def serve(node: NodeHandle, host: str, port: int,
                identity: Identity | None = None,
                services: Sequence[ExtraService] = ()) -> grpc.aio.Server:
    """Mutual TLS and the role table (access.py) with an identity, for `services` too;
    plain without (an open loopback node)."""
    server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=MAX_CALLS,
                             interceptors=[RoleCheck()] if identity else [])
    pb_grpc.add_ControlServicer_to_server(ControlService(node), server)
    for add in services:
        add(server, node)
    if identity is None:
        server.add_insecure_port(host_port(host, port))
    else:
        server.add_secure_port(host_port(host, port), identity.grpc_server_credentials())
    await server.start()
    return server
