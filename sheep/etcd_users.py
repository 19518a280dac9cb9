"""Who may use the private etcd, by the name in their certificate: the admin everything,
each node the keys (all of them: a node writes membership, epochs, the registry and the
locks), anyone else nothing.

Client-certificate authentication alone lets in every certificate of the cluster's CA,
and the CA also vouches for `client` holders (VM hosts, NBD users), who may attach disks
but must not rewrite the VDI registry or take a VDI's lock. With etcd's auth enabled and
client certificates required, etcd takes the certificate's common name as the user's
name, so granting users by those names is a role table, enforced by etcd itself. Users
have no password (certificates only); granting is idempotent, so each start adds the
nodes the cluster gained since.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from aetcd import rpc
from cryptography import x509

from sheep.security.identity import GRPC_NAME_OPTION, Identity
from sheep.security.pki import CertFiles, name_of

NODE_ROLE = "sheep-node"
ALL_KEYS = b"\0"  # as key and range end: every key


@dataclass(frozen=True)
class EtcdUsers:
    """The certificates etcd lets in: `admin` as root, `nodes` with every key."""

    admin: CertFiles
    nodes: tuple[CertFiles, ...]


def _name(files: CertFiles) -> str:
    return name_of(x509.load_pem_x509_certificate(files.cert.read_bytes()))


def _ignoring_exists(call, request) -> None:
    try:
        call(request, timeout=5)
    except grpc.RpcError as exc:
        if "already exists" not in (exc.details() or ""):
            raise


def _grant(channel: grpc.Channel, admin: str, nodes: Sequence[str]) -> None:
    auth = rpc.AuthStub(channel)
    certificate_only = rpc.UserAddOptions(no_password=True)
    _ignoring_exists(auth.RoleAdd, rpc.AuthRoleAddRequest(name=NODE_ROLE))
    auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(
        name=NODE_ROLE, perm=rpc.Permission(permType=rpc.Permission.READWRITE, key=ALL_KEYS,
                                            range_end=ALL_KEYS)), timeout=5)
    for user, role in [("root", "root"), (admin, "root"), *((n, NODE_ROLE) for n in nodes)]:
        _ignoring_exists(auth.UserAdd, rpc.AuthUserAddRequest(name=user,
                                                              options=certificate_only))
        auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=role), timeout=5)
    auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)


def grant_users(port: int, users: EtcdUsers, timeout: float = 20.0) -> None:
    """Make the etcd on 127.0.0.1:`port` let in `users` only, retrying while it elects
    itself leader (a fresh etcd refuses writes until then)."""
    admin = Identity.from_files(users.admin)
    names = [_name(n) for n in users.nodes]
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(f"127.0.0.1:{port}", admin.grpc_channel_credentials(),
                             options=[GRPC_NAME_OPTION]) as channel:
        while True:
            try:
                _grant(channel, name_of(admin.certificate), names)
                return
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not grant etcd's users: {exc.details()}") \
                        from None
                time.sleep(0.1)
