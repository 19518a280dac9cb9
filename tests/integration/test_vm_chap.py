"""`dog vm` on a cluster whose iSCSI portal requires CHAP: QEMU's iSCSI client logs in with
the user and secret of `dog vm start --iscsi-chap-file` (the secret handed over in a file,
never on QEMU's command line), on dog's host (--here) or on a node that dog hands them to,
and a start without them is refused in one line.

A 1-node cluster (copies=1) keeps it quick; the guest is the small one of test_vm.py,
under TCG.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_driver.guest import GuestImage, guest_artifacts
from sheep.etcd_server import EtcdServer

from ..cluster import Cluster, dog_error, dog_json, reap_leftovers, start_cluster
from .test_vm import CHECK_FILES, MAKE_FILES, Vm, vdi

pytestmark = pytest.mark.slow

USER, SECRET = "qemu-vm", "a-chap-secret-of-some-length"


@pytest.fixture(scope="module")
def chap_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chap") / "chap"
    path.write_text(f"{USER}:{SECRET}\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def chap_cluster(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer,
                 chap_file: Path) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("vm-chap") / "cluster", etcd.url, nodes=1,
                      copies=1, iscsi=True, iscsi_args=("--iscsi-chap-file", str(chap_file)))
    yield c
    c.stop()


@pytest.fixture
def run_root(tmp_path: Path, chap_cluster: Cluster) -> Iterator[Path]:
    """The test's VMs' root; none of them outlives the test."""
    root = tmp_path / "vms"
    yield root
    for spec in dog_json("vm", "list", address=chap_cluster.address).get("vms", []):
        if spec["runtime"] is not None:
            Vm(chap_cluster, root, spec["name"]).dog("stop", spec["name"], "--timeout", "1",
                                                     check=False)
    assert not reap_leftovers(str(root))


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return guest_artifacts()


def test_a_guest_on_dogs_host_boots_and_writes_over_iscsi_with_chap(
        chap_cluster: Cluster, run_root: Path, guest: GuestImage, chap_file: Path) -> None:
    disk = vdi(chap_cluster, "chap-disk")
    writer = Vm(chap_cluster, run_root, "chap-writer").create(
        guest, [disk], MAKE_FILES.format(vm="chap-writer"), "iscsi")
    writer.dog("start", writer.name, "--here", "--run-dir", str(run_root),
               "--iscsi-chap-file", str(chap_file))
    pid = writer.info()["runtime"]["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert SECRET not in cmdline and f"user\":\"{USER}" in cmdline.replace("\0", " ")
    writer.finish()
    reader = Vm(chap_cluster, run_root, "chap-reader").create(guest, [disk], CHECK_FILES,
                                                               "iscsi")
    reader.dog("start", reader.name, "--here", "--run-dir", str(run_root),
               "--iscsi-chap-file", str(chap_file))
    assert "read: written by chap-writer" in reader.finish()


def test_a_vm_without_chap_is_refused_by_a_portal_that_requires_it(
        chap_cluster: Cluster, run_root: Path, guest: GuestImage) -> None:
    disk = vdi(chap_cluster, "no-chap-disk")
    Vm(chap_cluster, run_root, "no-chap").create(guest, [disk], CHECK_FILES, "iscsi")
    error = dog_error("vm", "start", "no-chap", "--run-dir", str(run_root),
                      address=chap_cluster.address)
    assert error == (f"the iSCSI portal at 127.0.0.1:{chap_cluster.iscsi_port} requires "
                     "CHAP: give dog vm start --iscsi-chap-file FILE (USER:SECRET, mode 600)")


def test_a_node_hosting_a_vm_logs_in_with_the_chap_secret_dog_hands_it(
        chap_cluster: Cluster, run_root: Path, guest: GuestImage, chap_file: Path) -> None:
    """`--on`: the secret travels to the node in the start request (qemu_driver/host.py),
    and the node's QEMU logs in with it. `any` picks the least loaded node: the only one."""
    node = chap_cluster.node_list()[0]["node"]["id"]
    vm = Vm(chap_cluster, run_root, "chap-hosted").create(
        guest, [vdi(chap_cluster, "chap-hosted")], MAKE_FILES.format(vm="chap-hosted"), "iscsi")
    vm.dog("start", vm.name, "--on", "any", "--run-dir", str(run_root),
           "--iscsi-chap-file", str(chap_file))
    assert vm.info()["runtime"]["node"] == node
    vm.finish()
