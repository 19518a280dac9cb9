"""What a node exposes: a node others can reach starts only with its identity (and its
iSCSI only with CHAP), a node on every address only with an address to advertise, and a
cluster on IPv6 loopback serves like one on 127.0.0.1.

Non-loopback binds use an address of this host's own (eth0's, say): a refusal then cannot
be mistaken for a failure to bind. etcd stays on 127.0.0.1 (the session's shared one).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.etcd_server import EtcdServer
from sheep.security.local import node_args
from sheep.security.pki import CertFiles, ClusterCA

from ..cluster import SheepProcess, dog, free_port, start_cluster

MiB = 1 << 20
START_TIMEOUT = 30  # s for a refused node to exit, or an accepted one to serve


def host_address() -> str | None:
    """An IPv4 address of this host that is not loopback, or None."""
    out = subprocess.run(["ip", "-j", "-4", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        return None
    for link in json.loads(out.stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("local"):
                return info["local"]
    return None


@pytest.fixture(scope="module")
def address() -> str:
    found = host_address()
    if found is None:
        pytest.skip("this host has no address but loopback")
    return found


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory, address: str) -> CertFiles:
    """A node's certificate of a fresh cluster CA, naming the host's address too."""
    root = tmp_path_factory.mktemp("pki")
    ca = ClusterCA.create(root / "ca", cluster="exposure")
    return ca.issue(root / "certs", "node0", "node", ips=(address,))


@pytest.fixture
def chap_file(tmp_path: Path) -> Path:
    path = tmp_path / "chap"
    path.write_text("alice:alice-secret-1\n")
    os.chmod(path, 0o600)
    return path


def node(tmp_path: Path, etcd: EtcdServer, *args: str) -> SheepProcess:
    return SheepProcess(tmp_path / "node0", free_port(), f"{etcd.url}/t-exposure-"
                        f"{tmp_path.name}", ["--lease-ttl", "3", *args])


def refusal(proc: SheepProcess) -> str:
    """The node's exit: it must exit 1 at once, its reason one line on stderr."""
    proc.start()
    assert proc.proc is not None
    assert proc.proc.wait(START_TIMEOUT) == 1
    lines = proc.log()[proc.log_start:].strip().splitlines()
    reasons = [line for line in lines if line.startswith("sheep: ")]
    assert len(reasons) == 1, lines
    return reasons[0]


@pytest.fixture
def running() -> Iterator[list[SheepProcess]]:
    started: list[SheepProcess] = []
    yield started
    for proc in started:
        proc.stop()


def test_a_node_on_a_network_address_without_an_identity_refuses_to_start(
        tmp_path: Path, etcd: EtcdServer, address: str) -> None:
    proc = node(tmp_path, etcd, "--bind", address)
    assert refusal(proc) == (f"sheep: --bind {address} is not a loopback address: a node "
                             "others can reach needs its identity (--ca, --cert, --key)")
    assert not proc.dir.exists()  # refused before it opened (or bound) anything


def test_a_node_on_a_network_address_with_its_identity_serves_there(
        tmp_path: Path, etcd: EtcdServer, address: str, identity: CertFiles,
        running: list[SheepProcess]) -> None:
    proc = node(tmp_path, etcd, "--bind", address, *node_args(identity))
    running.append(proc.start())
    proc.wait_up(START_TIMEOUT)
    ready = proc.ready()
    assert ready is not None and ready["host"] == address
    for port in (proc.port, ready["data_port"]):
        socket.create_connection((address, port), timeout=5).close()


def test_every_address_without_one_to_advertise_refuses_to_start(
        tmp_path: Path, etcd: EtcdServer, identity: CertFiles) -> None:
    proc = node(tmp_path, etcd, "--bind", "0.0.0.0", *node_args(identity))
    assert refusal(proc) == ("sheep: --bind 0.0.0.0 listens on every address: peers need "
                             "--advertise ADDRESS, the one they can dial")


def test_every_address_with_one_to_advertise_tells_peers_that_one(
        tmp_path: Path, etcd: EtcdServer, address: str, identity: CertFiles,
        running: list[SheepProcess]) -> None:
    proc = node(tmp_path, etcd, "--bind", "0.0.0.0", "--advertise", address,
                *node_args(identity))
    running.append(proc.start())
    proc.wait_up(START_TIMEOUT)
    ready = proc.ready()
    assert ready is not None and ready["host"] == address


def test_iscsi_on_a_network_address_without_chap_refuses_to_start(
        tmp_path: Path, etcd: EtcdServer, address: str, identity: CertFiles) -> None:
    proc = node(tmp_path, etcd, "--bind", address, *node_args(identity),
                "--iscsi-port", str(free_port()))
    assert refusal(proc) == (f"sheep: --bind {address} is not a loopback address: iSCSI "
                             "there needs CHAP (--iscsi-chap-file)")


def test_iscsi_on_a_network_address_with_chap_serves_only_who_proves_it(
        tmp_path: Path, etcd: EtcdServer, address: str, identity: CertFiles,
        chap_file: Path, running: list[SheepProcess]) -> None:
    port = free_port()
    proc = node(tmp_path, etcd, "--bind", address, *node_args(identity),
                "--iscsi-port", str(port), "--iscsi-chap-file", str(chap_file))
    running.append(proc.start())
    proc.wait_up(START_TIMEOUT)

    def iscsi_ls(auth: str) -> subprocess.CompletedProcess:
        return subprocess.run(["iscsi-ls", "-s", f"iscsi://{auth}{address}:{port}"],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert iscsi_ls("").returncode != 0
    assert iscsi_ls("alice%alice-secret-1@").returncode == 0


# -- IPv6 --------------------------------------------------------------------------------------


def test_a_cluster_on_ipv6_loopback_formats_and_serves_a_vdi_over_nbd(
        tmp_path: Path, etcd: EtcdServer) -> None:
    """Peers dial each other at [::1] (copies=3: every write crosses the data plane), dog
    reaches them at [::1]:PORT, and NBD clients at nbd://[::1]:PORT/."""
    cluster = start_cluster(tmp_path / "cluster", etcd.url, nodes=3, copies=3, nbd=True,
                            host="::1")
    try:
        assert {n["host"] for n in cluster.info()["history"][-1]["nodes"]} == {"::1"}
        dog("vdi", "create", "v6", "16M", address=cluster.address)
        data = tmp_path / "data"
        data.write_bytes(os.urandom(9 * MiB))
        url = cluster.nbd_url("v6")
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(data),
                        url], check=True, timeout=120, cwd=tmp_path)
        back = tmp_path / "back"
        subprocess.run(["nbdcopy", url, str(back)], check=True, timeout=120, cwd=tmp_path)
        assert back.read_bytes()[:9 * MiB] == data.read_bytes()
        info = subprocess.run(["nbdinfo", "--json", url], check=True, capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert json.loads(info.stdout)["exports"][0]["export-size"] == 16 * MiB
    finally:
        cluster.stop()
