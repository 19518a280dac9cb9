"""The control plane of a secure cluster: mutual TLS, and what each role may call
(sheep/control/access.py)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from sheep.control import sheep_pb2 as pb
from sheep.control import sheep_pb2_grpc as pb_grpc
from sheep.control.channel import sync_channel
from sheep.etcd_server import EtcdServer
from sheep.localcluster import LocalCluster
from sheep.security.identity import Identity
from sheep.security.pki import ClusterCA

from ..cluster import Cluster, dog


def _call(cluster: LocalCluster, identity: Identity | None, method: str,
          request=None, stub=pb_grpc.ControlStub) -> grpc.StatusCode:
    with sync_channel(cluster.address, identity) as channel:
        try:
            getattr(stub(channel), method)(request or pb.Empty(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_plaintext_client_cannot_reach_the_control_service(
        secure_cluster: LocalCluster) -> None:
    assert _call(secure_cluster, None, "SetRecoveryThrottle",
                 pb.ThrottleRequest(bytes_per_second=1)) == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_of_another_ca_is_refused(secure_cluster: LocalCluster,
                                                tmp_path: Path) -> None:
    stranger = ClusterCA.create(tmp_path / "other-ca").issue(tmp_path / "x", "admin", "admin")
    assert _call(secure_cluster, Identity.from_files(stranger),
                 "NodeInfo") == grpc.StatusCode.UNAVAILABLE


def test_a_client_identity_may_not_administer(secure_cluster: LocalCluster) -> None:
    client = Identity.from_files(secure_cluster.pki.client)
    assert _call(secure_cluster, client, "SetRecoveryThrottle",
                 pb.ThrottleRequest(bytes_per_second=1)) == grpc.StatusCode.PERMISSION_DENIED
    assert _call(secure_cluster, client, "NodeInfo") == grpc.StatusCode.PERMISSION_DENIED


def test_a_node_identity_may_ask_what_nodes_ask_and_nothing_more(
        secure_cluster: LocalCluster) -> None:
    node = Identity.from_files(secure_cluster.pki.node(1))
    assert _call(secure_cluster, node, "NodeInfo") == grpc.StatusCode.OK
    assert _call(secure_cluster, node, "StartScrub") == grpc.StatusCode.PERMISSION_DENIED


def test_only_the_admin_may_drive_a_nodes_vms(secure_cluster: LocalCluster) -> None:
    for who in (secure_cluster.pki.client, secure_cluster.pki.node(1)):
        for method, request in (("VmStart", pb.VmStartRequest(name="x")),
                                ("VmStop", pb.VmRequest(name="x"))):
            assert _call(secure_cluster, Identity.from_files(who), method, request,
                         pb_grpc.VmHostStub) == grpc.StatusCode.PERMISSION_DENIED
    # streams too: the console and its log
    client = Identity.from_files(secure_cluster.pki.client)
    for method, request in (("VmConsoleLog", pb.VmRequest(name="x")),
                            ("VmConsole", iter([pb.ConsoleInput(name="x")]))):
        with (sync_channel(secure_cluster.address, client) as channel,
              pytest.raises(grpc.RpcError) as refused):
            list(getattr(pb_grpc.VmHostStub(channel), method)(request, timeout=5))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # the admin gets as far as the VM host itself, which knows no VM "x"
    admin = Identity.from_files(secure_cluster.pki.admin)
    assert _call(secure_cluster, admin, "VmStop", pb.VmRequest(name="x"),
                 pb_grpc.VmHostStub) == grpc.StatusCode.NOT_FOUND


def test_dog_finds_the_admin_certificate_in_its_config(secure_cluster: LocalCluster) -> None:
    conf = secure_cluster.root / "dog.conf"
    listing = dog("node", "list", "--json", env={"SHEEP_CONFIG": str(conf)})
    assert '"reachable": true' in listing.stdout
    throttle = dog("node", "recovery", "set-throttle", "10M", env={"SHEEP_CONFIG": str(conf)})
    assert "on 3 node(s)" in throttle.stdout


def test_dog_without_credentials_is_told_in_one_line(secure_cluster: LocalCluster) -> None:
    proc = dog("node", "list", address=secure_cluster.address, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "cannot reach sheep" in proc.stderr


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_dog_refuses_a_key_others_can_read(secure_cluster: LocalCluster, mode: int) -> None:
    secure_cluster.pki.admin.key.chmod(mode)
    try:
        proc = dog("node", "list", check=False,
                   env={"SHEEP_CONFIG": str(secure_cluster.root / "dog.conf")})
    finally:
        secure_cluster.pki.admin.key.chmod(0o600)
    assert proc.returncode == 1 and "readable by others" in proc.stderr


def test_certificates_from_an_operators_ca_make_a_secure_cluster(
        tmp_path: Path, etcd: EtcdServer) -> None:
    """`dog cluster certs` for a cluster of your own: a node started with the certificate
    it issued serves mutual TLS, and dog with the admin's administers it."""
    dog("cluster", "certs", "ca", str(tmp_path / "ca"))
    issued = {}
    for name, role in (("node0", "node"), ("ops", "admin")):
        out = json.loads(dog("cluster", "certs", "issue", name, "--ca", str(tmp_path / "ca"),
                             "--role", role, "--out", str(tmp_path / name), "--json").stdout)
        issued[name] = out
    node = issued["node0"]
    cluster = Cluster(tmp_path / "c", etcd.url)
    try:
        cluster.add_node("--ca", node["ca"], "--cert", node["cert"], "--key", node["key"])
        conf = tmp_path / "dog.conf"
        conf.write_text(json.dumps({"address": cluster.address, **{
            k: issued["ops"][k] for k in ("ca", "cert", "key")}}))
        env = {"SHEEP_CONFIG": str(conf)}
        assert json.loads(dog("cluster", "format", "--copies", "1", "--json",
                              env=env).stdout)["copies"] == 1
        assert dog("node", "list", address=cluster.address, check=False).returncode == 1
    finally:
        cluster.stop()
