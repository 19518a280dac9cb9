"""etcd, which holds the VDI registry and the locks, refuses whoever cannot prove they are
of the cluster: a secure local cluster's private etcd speaks https only, to certificates
of the cluster's CA, and an external etcd is reached with its own CA, a client
certificate and etcd's user/password, the password from a 0600 file only."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc

from sheep.cluster.access import EtcdAccess, resolve_access
from sheep.cluster.etcd import EtcdCluster, EtcdRefused
from sheep.cluster.state import EtcdTarget
from sheep.etcd_server import EtcdServer
from sheep.localcluster import LocalCluster, NodeProcess, free_port
from sheep.security.identity import GRPC_NAME_OPTION, Identity
from sheep.security.pki import CertFiles, ClusterCA
from sheep.vdi.manager import open_manager

from ..cluster import dog_bytes, vdi_read, vdi_write

MB = 1 << 20


@pytest.fixture(scope="module")
def world_root() -> Iterator[Path]:
    """A directory every user may enter, so that what keeps `nobody` out of the cluster's
    files below is their own modes, not a private temporary directory above them."""
    root = Path(tempfile.mkdtemp(prefix="sheep-secure-etcd-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_cluster(world_root: Path) -> Iterator[LocalCluster]:
    """Two nodes of a secure cluster, formatted with 2 copies, on their private etcd."""
    cluster = LocalCluster(world_root / "cluster", 2, secure=True)
    try:
        cluster.up(copies=2)
        yield cluster
    finally:
        cluster.stop()


def _endpoint(cluster: LocalCluster) -> str:
    return f"127.0.0.1:{cluster.etcd.client_port}"


async def _raw_put(endpoint: str, credentials: grpc.ChannelCredentials | None,
                   key: bytes) -> None:
    """One Put with etcd's own gRPC API, as any etcd client would send it."""
    channel = (grpc.aio.insecure_channel(endpoint) if credentials is None else
               grpc.aio.secure_channel(endpoint, credentials, options=[GRPC_NAME_OPTION]))
    async with channel:
        await rpc.KVStub(channel).Put(rpc.PutRequest(key=key, value=b"tampered"), timeout=5)


async def _admin_get(cluster: LocalCluster, key: bytes) -> bytes | None:
    assert cluster.pki is not None
    etcd = EtcdCluster(EtcdTarget.parse(cluster.etcd_url),
                       identity=Identity.from_files(cluster.pki.admin))
    await etcd.connect()
    try:
        kv = await etcd.kv.get(key)
        return kv.value if kv is not None else None
    finally:
        await etcd.close()


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           *argv], capture_output=True, text=True, timeout=10)


# -- the private etcd of a secure cluster ---------------------------------------------------


async def test_a_tls_cluster_keeps_its_registry_in_an_https_etcd_and_serves_a_vdi(
        tls_cluster: LocalCluster) -> None:
    assert tls_cluster.pki is not None
    assert tls_cluster.etcd_url.startswith("https://127.0.0.1:")
    assert tls_cluster.info().etcd == tls_cluster.etcd_url
    admin = Identity.from_files(tls_cluster.pki.admin)
    data = os.urandom(MB)
    async with open_manager(tls_cluster.etcd_url, holder="test", identity=admin) as m:
        await m.create("disk", 8 * MB)
        await vdi_write(m, "disk", 3 * MB, data)
        assert await vdi_read(m, "disk", 3 * MB, MB) == data
        assert "disk" in (await m.state()).working


async def test_the_private_etcd_refuses_a_plain_http_client(
        tls_cluster: LocalCluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _raw_put(_endpoint(tls_cluster), None, b"/sheep/config")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await _admin_get(tls_cluster, b"/sheep/config") != b"tampered"


async def test_the_private_etcd_refuses_a_tls_client_without_a_certificate(
        tls_cluster: LocalCluster) -> None:
    assert tls_cluster.pki is not None
    ca = tls_cluster.pki.admin.ca.read_bytes()  # it trusts etcd, but shows nothing
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _raw_put(_endpoint(tls_cluster), grpc.ssl_channel_credentials(ca),
                       b"/sheep/no-cert")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await _admin_get(tls_cluster, b"/sheep/no-cert") is None


async def test_the_private_etcd_refuses_a_certificate_of_another_ca(
        tls_cluster: LocalCluster, tmp_path: Path) -> None:
    assert tls_cluster.pki is not None
    stranger = ClusterCA.create(tmp_path / "other-ca", cluster="other")
    files = stranger.issue(tmp_path / "admin", "admin", "admin")
    ours = tls_cluster.pki.admin.ca.read_bytes()
    credentials = grpc.ssl_channel_credentials(ours, files.key.read_bytes(),
                                               files.cert.read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _raw_put(_endpoint(tls_cluster), credentials, b"/sheep/other-ca")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await _admin_get(tls_cluster, b"/sheep/other-ca") is None


async def test_the_private_etcd_refuses_a_client_certificate_of_the_cluster(
        tls_cluster: LocalCluster) -> None:
    """A `client` holder (a VM host, an NBD user) attaches disks; it must not rewrite the
    registry or take a VDI's lock behind the nodes' backs."""
    assert tls_cluster.pki is not None
    client = Identity.from_files(tls_cluster.pki.client)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _raw_put(_endpoint(tls_cluster), client.grpc_channel_credentials(),
                       b"/sheep/by-client")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await _admin_get(tls_cluster, b"/sheep/by-client") is None


async def test_the_private_etcd_takes_a_put_from_a_certificate_of_the_cluster(
        tls_cluster: LocalCluster) -> None:
    """The refusals above are for the credentials, not for every raw client: the admin's
    and the nodes' certificates get in."""
    assert tls_cluster.pki is not None
    admin = Identity.from_files(tls_cluster.pki.admin)
    node = Identity.from_files(tls_cluster.pki.node(1))
    await _raw_put(_endpoint(tls_cluster), admin.grpc_channel_credentials(), b"/raw-admin")
    await _raw_put(_endpoint(tls_cluster), node.grpc_channel_credentials(), b"/raw-node")
    assert await _admin_get(tls_cluster, b"/raw-admin") == b"tampered"
    assert await _admin_get(tls_cluster, b"/raw-node") == b"tampered"


def test_a_node_without_a_certificate_is_refused_by_an_https_etcd_in_one_line(
        tls_cluster: LocalCluster, tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "stray", free_port(), tls_cluster.etcd_url)
    assert node.start().proc is not None
    assert node.proc.wait(30) == 1
    assert "speaks TLS: give this process a certificate" in node.tail(1)


def test_the_private_etcds_data_and_keys_are_private_to_their_owner(
        tls_cluster: LocalCluster) -> None:
    assert tls_cluster.pki is not None
    root = tls_cluster.root
    etcd_dir, etcd_key = root / "etcd", tls_cluster.pki.etcd.key
    db = etcd_dir / "member" / "snap" / "db"
    assert oct(etcd_dir.stat().st_mode & 0o777) == oct(0o700)
    assert oct(etcd_key.stat().st_mode & 0o777) == oct(0o600)
    assert oct(etcd_key.parent.stat().st_mode & 0o777) == oct(0o700)
    assert db.exists()
    readable = root / "readable"  # the same path to nobody, with the modes left open
    readable.write_text("anyone\n")
    readable.chmod(0o644)
    assert _as_nobody("cat", str(readable)).stdout == "anyone\n"
    for secret in (db, etcd_key, tls_cluster.pki.admin.key):
        denied = _as_nobody("cat", str(secret))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, secret


# -- an external etcd with its own CA, client certificates and users ------------------------


@pytest.fixture(scope="module")
def external(world_root: Path) -> Iterator[tuple[EtcdServer, CertFiles, Path]]:
    """An etcd with a CA of its own that wants client certificates and has users on
    (root, whose password is in a 0600 file): what a site's shared etcd looks like.
    Yields it, a client certificate of its CA, and the password file."""
    root = world_root / "external"
    ca = ClusterCA.create(root / "pki" / "ca", cluster="site-etcd")
    server = EtcdServer(root / "data", free_port(), free_port(), root / "etcd.log",
                        tls=ca.issue(root / "pki" / "etcd", "etcd", "etcd"))
    client = ca.issue(root / "pki" / "client", "sheep-client", "client")
    password = os.urandom(12).hex()
    password_file = root / "password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, f"{password}\n".encode())
    os.close(fd)
    server.start()
    try:
        _enable_auth(f"127.0.0.1:{server.client_port}", client, password)
        yield server, client, password_file
    finally:
        server.stop()


def _enable_auth(endpoint: str, client: CertFiles, password: str) -> None:
    """`etcdctl user add root; user grant-role root root; auth enable`, over etcd's API."""
    creds = Identity.from_files(client).grpc_channel_credentials()
    with grpc.secure_channel(endpoint, creds) as channel:  # its cert names 127.0.0.1
        auth = rpc.AuthStub(channel)
        auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=password), timeout=10)
        auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
        auth.AuthEnable(rpc.AuthEnableRequest(), timeout=10)


def _external_target(server: EtcdServer, prefix: str) -> EtcdTarget:
    return EtcdTarget.parse(f"{server.url}/{prefix}")


def _root_with_password(target: EtcdTarget, client: CertFiles, password_file: Path
                        ) -> EtcdAccess:
    """What `sheep run --etcd-ca/--etcd-cert/--etcd-key --etcd-user root
    --etcd-password-file` shows the external etcd."""
    return resolve_access(target, None, ca=str(client.ca), cert=str(client.cert),
                          key=str(client.key), user="root", password_file=str(password_file))


async def test_an_external_etcd_with_users_takes_a_client_with_the_password_from_its_file(
        external: tuple[EtcdServer, CertFiles, Path]) -> None:
    server, client, password_file = external
    target = _external_target(server, "with-password")
    etcd = EtcdCluster(target, access=_root_with_password(target, client, password_file))
    await etcd.connect()
    try:
        await etcd.format(copies=1, object_size=4 * MB)
        config = await etcd.config()
        assert config is not None and config.copies == 1
    finally:
        await etcd.close()


@pytest.mark.parametrize(("user", "password"), [("", ""), ("root", "not-the-password")],
                         ids=["certificate-only", "wrong-password"])
async def test_an_external_etcd_with_users_refuses_a_client_without_the_password(
        external: tuple[EtcdServer, CertFiles, Path], user: str, password: str) -> None:
    server, client, _ = external
    target = _external_target(server, "refused")
    own = Identity.from_files(client)
    access = EtcdAccess(own.ca_pem, own.cert_pem, own.key_pem, "", user, password)
    etcd = EtcdCluster(target, access=access)
    with pytest.raises(EtcdRefused, match="etcd refused us"):
        await etcd.connect(wait=5)


async def test_a_client_logs_in_again_when_a_restarted_etcd_forgot_its_token(
        external: tuple[EtcdServer, CertFiles, Path]) -> None:
    server, client, password_file = external
    target = _external_target(server, "relogin")
    etcd = EtcdCluster(target, access=_root_with_password(target, client, password_file))
    await etcd.connect()
    try:
        await etcd.kv.put(target.key("before"), b"1")
        server.stop()
        server.start()
        kv = await etcd.kv.get(target.key("before"))
        assert kv is not None and kv.value == b"1"
        assert etcd.kv._logins == 1  # type: ignore[attr-defined]
    finally:
        await etcd.close()


def test_sheep_run_joins_an_external_etcd_with_its_ca_certificate_and_password_file(
        external: tuple[EtcdServer, CertFiles, Path], tmp_path: Path) -> None:
    server, client, password_file = external
    url = f"{server.url}/run"
    node = NodeProcess(tmp_path / "node0", free_port(), url, [
        "--etcd-ca", str(client.ca), "--etcd-cert", str(client.cert),
        "--etcd-key", str(client.key), "--etcd-user", "root",
        "--etcd-password-file", str(password_file)])
    try:
        node.start().wait_ready(30)
        password = password_file.read_text().strip()
        assert node.proc is not None
        assert password not in " ".join(node.proc.args)
        assert password not in Path(f"/proc/{node.proc.pid}/cmdline").read_text()
    finally:
        assert node.stop() == 0


def test_sheep_run_refuses_a_password_file_others_can_read(
        external: tuple[EtcdServer, CertFiles, Path], tmp_path: Path) -> None:
    server, client, password_file = external
    shared = tmp_path / "shared-password"
    shutil.copy(password_file, shared)
    shared.chmod(0o644)
    node = NodeProcess(tmp_path / "node0", free_port(), f"{server.url}/run2", [
        "--etcd-ca", str(client.ca), "--etcd-user", "root",
        "--etcd-password-file", str(shared)])
    assert node.start().proc is not None
    assert node.proc.wait(30) == 1
    assert "is readable by others (mode 644): chmod 600 it" in node.tail(1)


def _peer_get(cluster: LocalCluster, client_ssl: ssl.SSLContext) -> bytes:
    """GET /version on etcd's peer port over TLS: the head of etcd's answer, b"" if it hung
    up."""
    with socket.create_connection(("127.0.0.1", cluster.etcd.peer_port), timeout=5) as raw, \
            client_ssl.wrap_socket(raw, server_hostname="sheep") as tls:
        tls.sendall(b"GET /version HTTP/1.1\r\nHost: sheep\r\nConnection: close\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := tls.recv(4096)):
            answer += chunk  # the head is enough: etcd may keep the socket open a while
        return answer


def test_the_private_etcds_peer_port_wants_a_certificate_of_the_cluster_too(
        tls_cluster: LocalCluster) -> None:
    assert tls_cluster.pki is not None
    node = Identity.from_files(tls_cluster.pki.node(0))
    assert _peer_get(tls_cluster, node.client_ssl()).startswith(b"HTTP/1.1 200")
    anonymous = ssl.create_default_context(cafile=str(tls_cluster.pki.node(0).ca))
    anonymous.check_hostname = False
    try:
        answer = _peer_get(tls_cluster, anonymous)
    except (ssl.SSLError, ConnectionResetError) as exc:
        answer = repr(exc).encode()
    assert not answer.startswith(b"HTTP"), answer


def test_dog_reaches_the_https_etcd_with_the_admin_certificate_its_config_names(
        tls_cluster: LocalCluster, tmp_path: Path) -> None:
    conf = tls_cluster.write_dog_config(tmp_path / "dog.conf")
    assert conf is not None
    data = os.urandom(4096)
    where = {"address": tls_cluster.address}
    dog_bytes("vdi", "create", "by-dog", "4M", "--config", str(conf), **where)
    dog_bytes("vdi", "write", "by-dog", "--config", str(conf), input=data, **where)
    read = dog_bytes("vdi", "read", "by-dog", "0", "4096", "--config", str(conf), **where)
    assert read.stdout == data
