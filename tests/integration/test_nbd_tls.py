"""NBD over TLS end to end: a secure 2-node cluster (its own CA, sheep/security/local.py)
whose node 0 serves NBD with `--nbd-tls require` and node 1 with the loopback default
(`allow`, since it has an identity). Real clients read and write VDIs through STARTTLS
with the cluster's client certificate: qemu-img and qemu-io (tls-creds-x509), nbdinfo and
nbdcopy (nbds:// URIs). Refusals are checked with the same clients and with a raw
socket that speaks the handshake from the spec's numbers.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.localcluster import LaunchError, LocalCluster, NodeProcess, free_port
from sheep.security.identity import Identity
from sheep.security.pki import ClusterCA

from ..cluster import dog, nodes_stay_healthy, recv_exact, x509_client_dir

MiB = 1 << 20
SIZE = 16 * MiB
CLIENT_TIMEOUT = 120
HANDSHAKE_TIMEOUT = 10.0  # the server's, from connect to an export chosen

NBDMAGIC, IHAVEOPT, OPT_REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_GO = 1, 2, 3, 5, 7
REP_ACK, REP_SERVER = 1, 2
REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_TLS_REQD = 2**31 + 2, 2**31 + 3, 2**31 + 5


# -- fixtures -------------------------------------------------------------------------------


class TlsGateway:
    def __init__(self, root: Path) -> None:
        self.require_port, self.allow_port = free_port(), free_port()
        ports = [self.require_port, self.allow_port]
        self.cluster = LocalCluster(
            root, 2, secure=True,
            node_extra=lambda i: ["--nbd-port", str(ports[i]),
                                  *(["--nbd-tls", "require"] if i == 0 else [])])
        assert self.cluster.pki is not None
        self.pki = self.cluster.pki
        self.config = root / "dog.conf"

    def start(self) -> None:
        self.cluster.up(copies=2)
        self.pki.write_dog_config(self.config, self.cluster.address)

    def create(self, name: str) -> str:
        dog("vdi", "create", name, str(SIZE), address=self.cluster.address,
            env={"SHEEP_CONFIG": str(self.config)})
        return name


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsGateway]:
    gateway = TlsGateway(tmp_path_factory.mktemp("nbdtls") / "cluster")
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.cluster.stop()


@pytest.fixture(autouse=True)
def gateways_stay_healthy(gw: TlsGateway) -> Iterator[None]:
    with nodes_stay_healthy(gw.cluster.nodes):
        yield


_names = itertools.count()


@pytest.fixture
def vdi(gw: TlsGateway) -> str:
    return gw.create(f"t{next(_names)}")


@pytest.fixture(scope="module")
def client_dir(gw: TlsGateway, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cluster's `client` certificate, laid out for QEMU and libnbd."""
    files = gw.pki.client
    return x509_client_dir(tmp_path_factory.mktemp("client-tls"), files.ca, files.cert,
                           files.key)


def run(cmd: list[str], cwd: Path, *, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
                          cwd=cwd)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
    return proc


def qemu_tls(creds: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client"]


def qemu_image(port: int, export: str) -> str:
    return f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0"


def nbds(port: int, export: str, creds: Path) -> str:
    return f"nbds://127.0.0.1:{port}/{export}?tls-certificates={creds}"


# -- a raw client, from the spec's numbers ----------------------------------------------------


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    magic, opt_magic, _flags = struct.unpack(">QQH", recv_exact(sock, 18))
    assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
    sock.sendall(struct.pack(">I", 0b11))  # FIXED_NEWSTYLE | NO_ZEROES
    return sock


def option(sock: socket.socket, code: int, data: bytes = b"") -> tuple[int, bytes]:
    """Send one option; its one reply (type, payload)."""
    sock.sendall(struct.pack(">QII", IHAVEOPT, code, len(data)) + data)
    magic, echoed, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert (magic, echoed) == (OPT_REPLY_MAGIC, code)
    return rtype, recv_exact(sock, length)


def go_request(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)


def starttls(sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
    assert option(sock, OPT_STARTTLS) == (REP_ACK, b"")
    return context.wrap_socket(sock)


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


# -- real clients read and write over TLS ----------------------------------------------------


def test_qemu_img_info_sees_the_vdi_over_tls(gw: TlsGateway, vdi: str, client_dir: Path,
                                             tmp_path: Path) -> None:
    proc = run(["qemu-img", "info", *qemu_tls(client_dir), "--image-opts",
                qemu_image(gw.require_port, vdi)], tmp_path)
    assert f"virtual size: 16 MiB ({SIZE} bytes)" in proc.stdout


def test_qemu_img_convert_writes_and_reads_back_the_same_bytes(
        gw: TlsGateway, vdi: str, client_dir: Path, tmp_path: Path) -> None:
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    src.write_bytes(os.urandom(SIZE))
    run(["qemu-img", "convert", "-n", *qemu_tls(client_dir), "-f", "raw", str(src),
         "--target-image-opts", qemu_image(gw.require_port, vdi)], tmp_path)
    run(["qemu-img", "convert", *qemu_tls(client_dir), "--image-opts",
         qemu_image(gw.require_port, vdi), "-O", "raw", str(back)], tmp_path)
    assert back.read_bytes() == src.read_bytes()


def test_qemu_io_writes_a_pattern_and_reads_it_back(gw: TlsGateway, vdi: str,
                                                   client_dir: Path, tmp_path: Path) -> None:
    image = qemu_image(gw.require_port, vdi)
    run(["qemu-io", *qemu_tls(client_dir), "--image-opts", image,
         "-c", "write -P 0x5a 1M 3M"], tmp_path)
    proc = run(["qemu-io", *qemu_tls(client_dir), "--image-opts", image,
                "-c", "read -P 0x5a 1M 3M", "-c", "read -P 0 0 1M"], tmp_path)
    assert "Pattern verification failed" not in proc.stdout, proc.stdout


def test_nbdcopy_writes_and_reads_back_and_nbdinfo_sees_the_size(
        gw: TlsGateway, vdi: str, client_dir: Path, tmp_path: Path) -> None:
    url = nbds(gw.require_port, vdi, client_dir)
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    src.write_bytes(os.urandom(SIZE))
    run(["nbdcopy", str(src), url], tmp_path)
    run(["nbdcopy", url, str(back)], tmp_path)
    assert back.read_bytes() == src.read_bytes()
    assert run(["nbdinfo", "--size", url], tmp_path).stdout.strip() == str(SIZE)


def test_an_allow_node_serves_tls_and_plaintext_clients_the_same_disk(
        gw: TlsGateway, vdi: str, client_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.raw"
    data.write_bytes(os.urandom(SIZE))
    run(["nbdcopy", str(data), nbds(gw.allow_port, vdi, client_dir)], tmp_path)
    back = tmp_path / "back.raw"
    run(["nbdcopy", f"nbd://127.0.0.1:{gw.allow_port}/{vdi}", str(back)], tmp_path)
    assert back.read_bytes() == data.read_bytes()


# -- refusals ---------------------------------------------------------------------------------


def test_a_plaintext_client_gets_err_tls_reqd_for_every_option(gw: TlsGateway,
                                                                vdi: str) -> None:
    with connect(gw.require_port) as sock:
        for code, data in [(OPT_LIST, b""), (OPT_GO, go_request(vdi))]:
            rtype, _ = option(sock, code, data)
            assert rtype == REP_ERR_TLS_REQD
        assert option(sock, OPT_ABORT) == (REP_ACK, b"")


def test_a_plaintext_export_name_is_hung_up_on(gw: TlsGateway, vdi: str) -> None:
    with connect(gw.require_port) as sock:
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(vdi)) + vdi.encode())
        assert closed_by_server(sock)


def test_plaintext_nbdinfo_is_refused_and_told_tls_is_required(gw: TlsGateway, vdi: str,
                                                                tmp_path: Path) -> None:
    proc = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{gw.require_port}/{vdi}"], tmp_path,
               ok=False)
    assert proc.returncode != 0 and str(SIZE) not in proc.stdout
    assert "server requires TLS" in proc.stderr, proc.stderr


def test_a_certificate_of_another_ca_fails_the_tls_handshake(
        gw: TlsGateway, vdi: str, tmp_path: Path) -> None:
    other = ClusterCA.load_or_create(tmp_path / "other-ca", cluster="other")
    stranger = other.issue(tmp_path / "stranger", "client", "client")
    # it trusts our CA, so only its own certificate can be what fails
    creds = x509_client_dir(tmp_path / "creds", gw.pki.client.ca, stranger.cert, stranger.key)
    proc = run(["qemu-img", "info", *qemu_tls(creds), "--image-opts",
                qemu_image(gw.require_port, vdi)], tmp_path, ok=False)
    assert proc.returncode != 0 and "virtual size" not in proc.stdout
    proc = run(["nbdinfo", nbds(gw.require_port, vdi, creds)], tmp_path, ok=False)
    assert proc.returncode != 0


def test_a_client_without_a_certificate_is_refused(gw: TlsGateway, vdi: str,
                                                   tmp_path: Path) -> None:
    creds = x509_client_dir(tmp_path / "creds", gw.pki.client.ca)
    proc = run(["nbdinfo", nbds(gw.require_port, vdi, creds)], tmp_path, ok=False)
    assert proc.returncode != 0
    proc = run(["qemu-img", "info", *qemu_tls(creds), "--image-opts",
                qemu_image(gw.require_port, vdi)], tmp_path, ok=False)
    assert proc.returncode != 0 and "virtual size" not in proc.stdout


def test_a_raw_tls_client_without_a_certificate_is_refused(gw: TlsGateway) -> None:
    context = ssl.create_default_context(cafile=str(gw.pki.client.ca))
    context.check_hostname = False
    with connect(gw.require_port) as sock, pytest.raises((ssl.SSLError, ConnectionError)):
        tls = starttls(sock, context)
        option(tls, OPT_LIST)  # TLS 1.3: the refusal arrives with the first read


def test_inside_tls_a_second_starttls_is_invalid_and_options_are_served(
        gw: TlsGateway, vdi: str) -> None:
    context = Identity.from_files(gw.pki.client).client_ssl()
    with connect(gw.require_port) as sock, starttls(sock, context) as tls:
        rtype, _ = option(tls, OPT_STARTTLS)
        assert rtype == REP_ERR_INVALID
        rtype, _ = option(tls, OPT_STARTTLS, b"data")
        assert rtype == REP_ERR_INVALID
        listed = []
        while True:  # one REP_SERVER per export, then REP_ACK
            rtype, payload = option(tls, OPT_LIST) if not listed else reply(tls, OPT_LIST)
            if rtype == REP_ACK:
                break
            assert rtype == REP_SERVER
            (n,) = struct.unpack_from(">I", payload)
            listed.append(payload[4:4 + n].decode())
        assert vdi in listed
        assert option(tls, OPT_ABORT) == (REP_ACK, b"")


def reply(sock: socket.socket, code: int) -> tuple[int, bytes]:
    magic, echoed, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert (magic, echoed) == (OPT_REPLY_MAGIC, code)
    return rtype, recv_exact(sock, length)


def test_a_certificate_whose_role_does_not_attach_disks_gets_err_policy(
        gw: TlsGateway, vdi: str) -> None:
    context = Identity.from_files(gw.pki.etcd).client_ssl()
    with connect(gw.require_port) as sock, starttls(sock, context) as tls:
        rtype, message = option(tls, OPT_GO, go_request(vdi))
        assert rtype == REP_ERR_POLICY
        assert b"role etcd" in message


def test_a_stalled_tls_handshake_is_dropped_at_the_handshake_timeout(gw: TlsGateway) -> None:
    with connect(gw.require_port) as sock:
        start = time.monotonic()
        assert option(sock, OPT_STARTTLS) == (REP_ACK, b"")
        sock.settimeout(HANDSHAKE_TIMEOUT + 5)
        assert closed_by_server(sock)  # no ClientHello ever sent
        assert time.monotonic() - start < HANDSHAKE_TIMEOUT + 3


def test_require_without_an_identity_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node0", free_port(), f"http://127.0.0.1:{free_port()}",
                       ["--nbd-port", "0", "--nbd-tls", "require"])
    with pytest.raises(LaunchError) as err:
        node.start().wait_ready(30)
    assert "--nbd-tls require needs the node's certificate" in str(err.value)


# -- a VDI's allow-list (dog vdi set NAME --nbd-allow) ---------------------------------------


@pytest.fixture(scope="module")
def vmhost2(gw: TlsGateway, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second client certificate of the cluster's own CA, named vmhost2."""
    ca = ClusterCA.load(gw.pki.root / "ca")
    files = ca.issue(tmp_path_factory.mktemp("vmhost2"), "vmhost2", "client")
    return x509_client_dir(tmp_path_factory.mktemp("vmhost2-tls"), files.ca, files.cert,
                           files.key)


def allow(gw: TlsGateway, name: str, *options: str) -> None:
    dog("vdi", "set", name, *options, address=gw.cluster.address,
        env={"SHEEP_CONFIG": str(gw.config)})


def test_an_allow_list_admits_the_named_certificate_only(
        gw: TlsGateway, vdi: str, client_dir: Path, vmhost2: Path, tmp_path: Path) -> None:
    allow(gw, vdi, "--nbd-allow", "client")
    proc = run(["nbdinfo", "--size", nbds(gw.require_port, vdi, vmhost2)], tmp_path, ok=False)
    assert proc.returncode != 0 and "server policy prevents" in proc.stderr  # ERR_POLICY
    assert run(["nbdinfo", "--size", nbds(gw.require_port, vdi, client_dir)],
               tmp_path).stdout.strip() == str(SIZE)
    listed = run(["nbdinfo", "--list", "--json", nbds(gw.require_port, "", vmhost2)],
                 tmp_path).stdout
    assert f'"{vdi}"' not in listed  # NBD_OPT_LIST shows a client only what it may attach


def test_a_snapshot_follows_its_vdis_allow_list(gw: TlsGateway, vdi: str, vmhost2: Path,
                                               tmp_path: Path) -> None:
    dog("vdi", "snapshot", vdi, "-s", "s1", address=gw.cluster.address,
        env={"SHEEP_CONFIG": str(gw.config)})
    allow(gw, vdi, "--nbd-allow", "client")
    proc = run(["nbdinfo", "--size", nbds(gw.require_port, f"{vdi}@s1", vmhost2)], tmp_path,
               ok=False)
    assert proc.returncode != 0 and "server policy prevents" in proc.stderr


def test_clearing_the_allow_list_admits_any_client_certificate_again(
        gw: TlsGateway, vdi: str, vmhost2: Path, tmp_path: Path) -> None:
    allow(gw, vdi, "--nbd-allow", "client")
    allow(gw, vdi, "--nbd-allow-any")
    assert run(["nbdinfo", "--size", nbds(gw.require_port, vdi, vmhost2)],
               tmp_path).stdout.strip() == str(SIZE)


def test_an_allow_listed_vdi_is_tls_only_on_an_allow_node(
        gw: TlsGateway, vdi: str, client_dir: Path, tmp_path: Path) -> None:
    allow(gw, vdi, "--nbd-allow", "client")
    with connect(gw.allow_port) as sock:
        rtype, message = option(sock, OPT_GO, go_request(vdi))
        assert rtype == REP_ERR_TLS_REQD, message
    assert run(["nbdinfo", "--size", nbds(gw.allow_port, vdi, client_dir)],
               tmp_path).stdout.strip() == str(SIZE)


def test_vdi_info_shows_the_allow_list(gw: TlsGateway, vdi: str) -> None:
    env = {"SHEEP_CONFIG": str(gw.config)}
    info = dog("vdi", "info", vdi, "--json", address=gw.cluster.address, env=env).stdout
    assert json.loads(info)["nbd_allow"] is None
    allow(gw, vdi, "--nbd-allow", "vmhost2,client")
    text = dog("vdi", "info", vdi, address=gw.cluster.address, env=env).stdout
    assert "NBD allow-list: client, vmhost2" in text


def test_failed_tls_handshakes_give_their_connection_slots_back(
        gw: TlsGateway, vdi: str, client_dir: Path, tmp_path: Path) -> None:
    """More failed TLS handshakes than the gateway takes connections at once (256): had a
    failure kept its slot, the client after them would be turned away."""
    for _ in range(300):
        with connect(gw.require_port) as sock:
            assert option(sock, OPT_STARTTLS) == (REP_ACK, b"")
            sock.sendall(b"\x16\x03\x01\x00\x05hello")  # a broken ClientHello
            assert closed_by_server(sock)
    assert run(["nbdinfo", "--size", nbds(gw.require_port, vdi, client_dir)],
               tmp_path).stdout.strip() == str(SIZE)
