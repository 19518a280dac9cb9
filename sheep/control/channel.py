"""A channel to a node's control service: mutual TLS when the caller has an identity of
the cluster (sheep/security/identity.py), plain on an open loopback cluster otherwise."""

from __future__ import annotations

import grpc

from sheep.security.identity import GRPC_NAME_OPTION, Identity


def aio_channel(address: str, identity: Identity | None) -> grpc.aio.Channel:
    if identity is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, identity.grpc_channel_credentials(),
                                   options=[GRPC_NAME_OPTION])


def sync_channel(address: str, identity: Identity | None) -> grpc.Channel:
    if identity is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, identity.grpc_channel_credentials(),
                               options=[GRPC_NAME_OPTION])
