"""NBD over TLS with pre-shared keys end to end: a secure 1-node cluster whose node serves
NBD with `--nbd-tls require --nbd-tls-psk FILE`. Real GnuTLS clients prove a key of the
file instead of showing a certificate: qemu-img and qemu-io (tls-creds-psk, DIR/keys.psk)
and nbdinfo (nbds://IDENTITY@... ?tls-psk-file=FILE); certificates of the cluster's CA
still work beside them. Refusals are checked with the same clients.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.localcluster import LaunchError, LocalCluster, NodeProcess, free_port
from sheep.security.local import node_args

from ..cluster import dog, nodes_stay_healthy, x509_client_dir

MiB = 1 << 20
SIZE = 16 * MiB
CLIENT_TIMEOUT = 120

# identity -> key; `client` is also the name of the cluster's client certificate
KEYS = {name: os.urandom(32).hex() for name in ("vm1", "vm2", "client")}


def psk_line(identity: str, key: str) -> str:
    return f"{identity}:{key}\n"


def write_private(path: Path, text: str) -> Path:
    """Written 0600, then moved into place: the node re-reads a whole file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


class PskGateway:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True)
        self.keys = write_private(root / "server.psk",
                                  "".join(psk_line(i, k) for i, k in KEYS.items()))
        self.port = free_port()
        self.cluster = LocalCluster(
            root / "cluster", 1, secure=True,
            node_extra=lambda i: ["--nbd-port", str(self.port), "--nbd-tls", "require",
                                  "--nbd-tls-psk", str(self.keys)])
        assert self.cluster.pki is not None
        self.pki = self.cluster.pki
        self.config = root / "dog.conf"

    def start(self) -> None:
        self.cluster.up(copies=1)
        self.pki.write_dog_config(self.config, self.cluster.address)

    def dog(self, *args: str) -> None:
        dog(*args, address=self.cluster.address, env={"SHEEP_CONFIG": str(self.config)})


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PskGateway]:
    gateway = PskGateway(tmp_path_factory.mktemp("nbdpsk") / "gw")
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.cluster.stop()


@pytest.fixture(autouse=True)
def gateway_stays_healthy(gw: PskGateway) -> Iterator[None]:
    with nodes_stay_healthy(gw.cluster.nodes):
        yield


_names = itertools.count()


@pytest.fixture
def vdi(gw: PskGateway) -> str:
    name = f"p{next(_names)}"
    gw.dog("vdi", "create", name, str(SIZE))
    return name


def psk_dir(out: Path, identity: str, key: str) -> Path:
    """A directory as QEMU's tls-creds-psk wants it: DIR/keys.psk."""
    out.mkdir(parents=True, mode=0o700)
    write_private(out / "keys.psk", psk_line(identity, key))
    return out


def run(cmd: list[str], cwd: Path, *, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
                          cwd=cwd)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
    return proc


def qemu_psk(creds: Path, identity: str) -> list[str]:
    return ["--object",
            f"tls-creds-psk,id=tls0,endpoint=client,dir={creds},username={identity}"]


def qemu_image(gw: PskGateway, export: str) -> str:
    return f"driver=nbd,host=127.0.0.1,port={gw.port},export={export},tls-creds=tls0"


def nbds(gw: PskGateway, export: str, identity: str, keys: Path) -> str:
    return f"nbds://{identity}@127.0.0.1:{gw.port}/{export}?tls-psk-file={keys}"


def nbdinfo_size(gw: PskGateway, vdi: str, identity: str, key: str, tmp_path: Path,
                 *, ok: bool = True) -> subprocess.CompletedProcess:
    keys = write_private(tmp_path / f"{identity}-{key[:8]}.psk", psk_line(identity, key))
    return run(["nbdinfo", "--size", nbds(gw, vdi, identity, keys)], tmp_path, ok=ok)


# -- real clients read and write with a PSK ---------------------------------------------------


def test_qemu_img_convert_with_a_psk_writes_and_reads_back_the_same_bytes(
        gw: PskGateway, vdi: str, tmp_path: Path) -> None:
    creds = psk_dir(tmp_path / "creds", "vm1", KEYS["vm1"])
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    src.write_bytes(os.urandom(SIZE))
    run(["qemu-img", "convert", "-n", *qemu_psk(creds, "vm1"), "-f", "raw", str(src),
         "--target-image-opts", qemu_image(gw, vdi)], tmp_path)
    run(["qemu-img", "convert", *qemu_psk(creds, "vm1"), "--image-opts",
         qemu_image(gw, vdi), "-O", "raw", str(back)], tmp_path)
    assert back.read_bytes() == src.read_bytes()


def test_qemu_io_with_a_psk_writes_a_pattern_and_reads_it_back(
        gw: PskGateway, vdi: str, tmp_path: Path) -> None:
    creds = psk_dir(tmp_path / "creds", "vm2", KEYS["vm2"])
    image = qemu_image(gw, vdi)
    run(["qemu-io", *qemu_psk(creds, "vm2"), "--image-opts", image,
         "-c", "write -P 0xa5 2M 3M"], tmp_path)
    proc = run(["qemu-io", *qemu_psk(creds, "vm2"), "--image-opts", image,
                "-c", "read -P 0xa5 2M 3M", "-c", "read -P 0 0 2M"], tmp_path)
    assert "Pattern verification failed" not in proc.stdout, proc.stdout


def test_nbdinfo_with_a_psk_file_sees_the_vdi(gw: PskGateway, vdi: str,
                                              tmp_path: Path) -> None:
    proc = nbdinfo_size(gw, vdi, "vm1", KEYS["vm1"], tmp_path)
    assert proc.stdout.strip() == str(SIZE)


def test_a_client_certificate_still_attaches_beside_the_psks(
        gw: PskGateway, vdi: str, tmp_path: Path) -> None:
    files = gw.pki.client
    creds = x509_client_dir(tmp_path / "x509", files.ca, files.cert, files.key)
    url = f"nbds://127.0.0.1:{gw.port}/{vdi}?tls-certificates={creds}"
    assert run(["nbdinfo", "--size", url], tmp_path).stdout.strip() == str(SIZE)


# -- refusals ---------------------------------------------------------------------------------


def test_a_wrong_key_is_refused_and_the_node_serves_others(gw: PskGateway, vdi: str,
                                                          tmp_path: Path) -> None:
    wrong = os.urandom(32).hex()
    proc = nbdinfo_size(gw, vdi, "vm1", wrong, tmp_path, ok=False)
    assert proc.returncode != 0 and str(SIZE) not in proc.stdout
    creds = psk_dir(tmp_path / "creds", "vm1", wrong)
    proc = run(["qemu-img", "info", *qemu_psk(creds, "vm1"), "--image-opts",
                qemu_image(gw, vdi)], tmp_path, ok=False)
    assert proc.returncode != 0 and "virtual size" not in proc.stdout
    assert nbdinfo_size(gw, vdi, "vm1", KEYS["vm1"], tmp_path).stdout.strip() == str(SIZE)


def test_an_identity_not_in_the_file_is_refused(gw: PskGateway, vdi: str,
                                                tmp_path: Path) -> None:
    proc = nbdinfo_size(gw, vdi, "stranger", os.urandom(32).hex(), tmp_path, ok=False)
    assert proc.returncode != 0 and str(SIZE) not in proc.stdout


def test_an_allow_list_naming_another_identity_refuses_the_psk_client(
        gw: PskGateway, vdi: str, tmp_path: Path) -> None:
    gw.dog("vdi", "set", vdi, "--nbd-allow", "psk:vm2")
    proc = nbdinfo_size(gw, vdi, "vm1", KEYS["vm1"], tmp_path, ok=False)
    assert proc.returncode != 0 and "server policy prevents" in proc.stderr  # ERR_POLICY
    assert nbdinfo_size(gw, vdi, "vm2", KEYS["vm2"], tmp_path).stdout.strip() == str(SIZE)


def test_a_certificate_name_on_the_allow_list_does_not_admit_a_psk_of_that_name(
        gw: PskGateway, vdi: str, tmp_path: Path) -> None:
    gw.dog("vdi", "set", vdi, "--nbd-allow", "client")  # the client certificate's name
    proc = nbdinfo_size(gw, vdi, "client", KEYS["client"], tmp_path, ok=False)
    assert proc.returncode != 0 and "server policy prevents" in proc.stderr


def test_a_client_added_to_the_file_is_admitted_without_a_restart(
        gw: PskGateway, vdi: str, tmp_path: Path) -> None:
    key = os.urandom(32).hex()
    assert nbdinfo_size(gw, vdi, "vm3", key, tmp_path, ok=False).returncode != 0
    write_private(gw.keys, gw.keys.read_text() + psk_line("vm3", key))
    assert nbdinfo_size(gw, vdi, "vm3", key, tmp_path).stdout.strip() == str(SIZE)


# -- at start ---------------------------------------------------------------------------------


def test_a_psk_file_readable_by_others_refuses_to_start_in_one_line(
        gw: PskGateway, tmp_path: Path) -> None:
    keys = write_private(tmp_path / "open.psk", psk_line("vm1", KEYS["vm1"]))
    keys.chmod(0o644)
    node = NodeProcess(tmp_path / "node", free_port(), f"http://127.0.0.1:{free_port()}",
                       [*node_args(gw.pki.node(0)), "--nbd-port", "0",
                        "--nbd-tls-psk", str(keys)])
    with pytest.raises(LaunchError) as err:
        node.start().wait_ready(30)
    assert f"PSK file {keys} is readable by others (mode 644): chmod 600 it" in str(err.value)


def test_a_psk_file_without_nbd_over_tls_refuses_to_start_in_one_line(
        gw: PskGateway, tmp_path: Path) -> None:
    keys = write_private(tmp_path / "keys.psk", psk_line("vm1", KEYS["vm1"]))
    node = NodeProcess(tmp_path / "node", free_port(), f"http://127.0.0.1:{free_port()}",
                       [*node_args(gw.pki.node(0)), "--nbd-port", "0", "--nbd-tls", "off",
                        "--nbd-tls-psk", str(keys)])
    with pytest.raises(LaunchError) as err:
        node.start().wait_ready(30)
    assert "--nbd-tls-psk needs NBD over TLS" in str(err.value)
