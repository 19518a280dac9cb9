"""Unauthenticated gateways on loopback serve root and the daemon's user only: another
local user (here `nobody`, through setpriv) is refused plaintext NBD and iSCSI without
CHAP, and is served over TLS or with CHAP. Real clients (nbdinfo, qemu-img, iscsi-ls)
run as nobody and as root against a secure 2-node cluster of the tests' root user:
node 0 serves NBD in the loopback default (`allow`) and iSCSI without CHAP, node 1 NBD
with `--nbd-tls off` and iSCSI with CHAP. Every client is a system binary run from `/`,
and what it reads (certificates) lies in a directory of nobody's, so a refusal can only
be the gateway's.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.localcluster import LocalCluster, free_port
from sheep.names import target_name

from ..cluster import dog, nodes_stay_healthy, x509_client_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="clients of another user need root")

MiB = 1 << 20
SIZE = 16 * MiB
CLIENT_TIMEOUT = 60
VDI = "shared"
CHAP_USER, CHAP_SECRET = "alice", "alice-secret-1"
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
NOBODY = pwd.getpwnam("nobody").pw_uid
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}


class Gateways:
    def __init__(self, root: Path) -> None:
        self.nbd, self.iscsi = free_port(), free_port()  # node 0: allow, no CHAP
        self.nbd_off, self.iscsi_chap = free_port(), free_port()  # node 1: off, CHAP
        chap = root / "chap"
        chap.parent.mkdir(parents=True, exist_ok=True)
        chap.write_text(f"{CHAP_USER}:{CHAP_SECRET}\n")
        chap.chmod(0o600)
        self.cluster = LocalCluster(
            root / "cluster", 2, secure=True,
            node_extra=lambda i: (
                ["--nbd-port", str(self.nbd), "--iscsi-port", str(self.iscsi)] if i == 0 else
                ["--nbd-port", str(self.nbd_off), "--nbd-tls", "off",
                 "--iscsi-port", str(self.iscsi_chap), "--iscsi-chap-file", str(chap)]))
        assert self.cluster.pki is not None
        self.pki = self.cluster.pki

    def start(self) -> None:
        self.cluster.up(copies=1)
        config = self.cluster.write_dog_config()
        dog("vdi", "create", VDI, str(SIZE), address=self.cluster.address,
            env={"SHEEP_CONFIG": str(config)})

    def log(self, node: int) -> str:
        return self.cluster.nodes[node].log()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    gateways = Gateways(tmp_path_factory.mktemp("loopback-peers"))
    try:
        gateways.start()
        yield gateways
    finally:
        gateways.cluster.stop()


@pytest.fixture(autouse=True)
def gateways_stay_healthy(gw: Gateways) -> Iterator[None]:
    with nodes_stay_healthy(gw.cluster.nodes):
        yield


@pytest.fixture(scope="module")
def nobodys_certificates(gw: Gateways) -> Iterator[Path]:
    """The cluster's client certificate, in a directory only nobody (and root) may read:
    pytest's own temporary directories are root's, mode 700."""
    home = Path(tempfile.mkdtemp(prefix="sheep-nobody-"))
    try:
        files = gw.pki.client
        creds = x509_client_dir(home / "tls", files.ca, files.cert, files.key)
        for path in (home, creds, *creds.iterdir()):
            os.chown(path, NOBODY, -1)
        yield creds
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(cmd: list[str], *, nobody: bool) -> subprocess.CompletedProcess:
    return subprocess.run([*AS_NOBODY, *cmd] if nobody else cmd, capture_output=True,
                          text=True, timeout=CLIENT_TIMEOUT, cwd="/", env=ENV)


def nbd(port: int) -> str:
    return f"nbd://127.0.0.1:{port}/{VDI}"


def refused_as(node_log: str) -> bool:
    return f"on loopback is only for root (uid 0), not uid {NOBODY}" in node_log


# -- NBD --------------------------------------------------------------------------------------


def test_plaintext_nbdinfo_of_another_user_is_refused_and_told_tls_is_required(
        gw: Gateways) -> None:
    start = len(gw.log(0))
    proc = run(["nbdinfo", "--size", nbd(gw.nbd)], nobody=True)
    assert proc.returncode != 0 and str(SIZE) not in proc.stdout
    assert "server requires TLS" in proc.stderr, proc.stderr
    assert refused_as(gw.log(0)[start:])


def test_plaintext_nbdinfo_of_root_is_served(gw: Gateways) -> None:
    proc = run(["nbdinfo", "--size", nbd(gw.nbd)], nobody=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(SIZE)


def test_nbdinfo_over_tls_of_another_user_is_served(gw: Gateways,
                                                    nobodys_certificates: Path) -> None:
    url = f"nbds://127.0.0.1:{gw.nbd}/{VDI}?tls-certificates={nobodys_certificates}"
    proc = run(["nbdinfo", "--size", url], nobody=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(SIZE)


def test_plaintext_qemu_img_of_another_user_is_refused_with_the_reason(gw: Gateways) -> None:
    proc = run(["qemu-img", "info", nbd(gw.nbd)], nobody=True)
    assert proc.returncode != 0 and "virtual size" not in proc.stdout
    assert "plaintext NBD on loopback is only for root" in proc.stderr, proc.stderr


def test_a_node_serving_no_tls_refuses_another_user_by_policy(gw: Gateways) -> None:
    proc = run(["nbdinfo", "--size", nbd(gw.nbd_off)], nobody=True)
    assert proc.returncode != 0 and str(SIZE) not in proc.stdout
    assert "server policy prevents" in proc.stderr, proc.stderr
    assert run(["nbdinfo", "--size", nbd(gw.nbd_off)], nobody=False).returncode == 0


# -- iSCSI ------------------------------------------------------------------------------------


def test_iscsi_ls_of_another_user_without_chap_is_refused(gw: Gateways) -> None:
    start = len(gw.log(0))
    proc = run(["iscsi-ls", f"iscsi://127.0.0.1:{gw.iscsi}"], nobody=True)
    assert proc.returncode != 0 and target_name(VDI) not in proc.stdout
    new = gw.log(0)[start:]
    assert refused_as(new) and "AUTH_FAILED" in new, new


def test_iscsi_ls_of_root_without_chap_is_served(gw: Gateways) -> None:
    proc = run(["iscsi-ls", f"iscsi://127.0.0.1:{gw.iscsi}"], nobody=False)
    assert proc.returncode == 0, proc.stderr
    assert target_name(VDI) in proc.stdout


def test_iscsi_ls_of_another_user_with_chap_is_served(gw: Gateways) -> None:
    url = f"iscsi://{CHAP_USER}%{CHAP_SECRET}@127.0.0.1:{gw.iscsi_chap}"
    proc = run(["iscsi-ls", url], nobody=True)
    assert proc.returncode == 0, proc.stderr
    assert target_name(VDI) in proc.stdout


def test_qemu_img_over_iscsi_of_another_user_without_chap_is_refused(gw: Gateways) -> None:
    start = len(gw.log(0))
    proc = run(["qemu-img", "info", f"iscsi://127.0.0.1:{gw.iscsi}/{target_name(VDI)}/0"],
               nobody=True)
    assert proc.returncode != 0 and "virtual size" not in proc.stdout
    assert refused_as(gw.log(0)[start:])
