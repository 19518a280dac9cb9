"""Who may call what on a node's control service, in one table: the admin identity may
do everything, a node only what nodes ask of each other (their peers' stats for `dog node
list`, cluster info). A `client` identity (a VM host, an NBD user) has no business here.

Enforced by a server interceptor on a secure port only (mutual TLS has already checked the
chain to the cluster's CA); a method missing from the table is refused, so a new RPC is
closed until someone decides who may call it."""

from __future__ import annotations

import grpc

from sheep.security.identity import peer_of_grpc

ADMIN = frozenset({"admin"})
ADMIN_OR_NODE = frozenset({"admin", "node"})

ALLOWED: dict[str, frozenset[str]] = {
    "FormatCluster": ADMIN,
    "ClusterInfo": ADMIN_OR_NODE,
    "NodeList": ADMIN,
    "NodeInfo": ADMIN_OR_NODE,
    "SetRecoveryThrottle": ADMIN,
    "StartScrub": ADMIN,
    # VmHost: QEMU on the node, its disks, its guest: the admin's alone
    "VmStart": ADMIN,
    "VmStop": ADMIN,
    "VmPause": ADMIN,
    "VmResume": ADMIN,
    "VmAttach": ADMIN,
    "VmDetach": ADMIN,
    "VmSnapshot": ADMIN,
    "VmStatus": ADMIN,
    "VmConsole": ADMIN,
    "VmReceive": ADMIN,
    "VmSend": ADMIN,
    "VmAbortReceive": ADMIN,
    "VmConsoleLog": ADMIN,
}


def allowed_roles(method: str) -> frozenset[str]:
    """`method` as gRPC names it: /sheep.control.Control/NodeInfo (method names are
    unique across the services a node serves)."""
    return ALLOWED.get(method.rsplit("/", 1)[-1], frozenset())


class RoleCheck(grpc.aio.ServerInterceptor):
    """Unary calls, and streams of replies (written as async generators, as the VM
    console is); any other kind of method is closed (UNIMPLEMENTED) until this checks it."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return handler
        roles = allowed_roles(details.method)
        name = details.method.rsplit("/", 1)[-1]

        async def check(context: grpc.aio.ServicerContext) -> None:
            peer = peer_of_grpc(context)
            if peer is None or peer.role not in roles:
                who = f"{peer.role} {peer.name!r}" if peer else "an unauthenticated peer"
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{who} may not call {name}")

        if handler.unary_unary is not None:
            call = handler.unary_unary

            async def guarded(request, context: grpc.aio.ServicerContext):
                await check(context)
                return await call(request, context)

            return grpc.unary_unary_rpc_method_handler(
                guarded, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        for kind, wrap in ((handler.stream_stream, grpc.stream_stream_rpc_method_handler),
                           (handler.unary_stream, grpc.unary_stream_rpc_method_handler)):
            if kind is not None:
                return wrap(_guarded_stream(kind, check),
                            request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return None


def _guarded_stream(stream, check):
    """`stream` (an async generator of replies) once `check` let the caller in."""

    async def guarded(request, context: grpc.aio.ServicerContext):
        await check(context)
        async for reply in stream(request, context):
            yield reply

    return guarded
