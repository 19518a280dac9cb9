"""`dog vm start --here` on a secure cluster whose NBD gateway requires TLS (`--nbd-tls
require`): QEMU, on dog's host, has its NBD client start TLS with the client certificate
dog's config names (handed to QEMU as a tls-creds-x509 directory in the VM's run dir, never
on its command line; a node hosting a VM shows its own: test_vm_host_tls.py), a guest boots,
writes a file system and a second VM reads it back; a disk hot-plugged into a running VM
goes over TLS too; and a start without a certificate is refused in one line.

A 1-node cluster (copies=1) with its own CA and private https etcd keeps it quick; the
guest is the small one of test_vm.py, under TCG.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_driver.control import VmControl
from qemu_driver.errors import VmError
from qemu_driver.guest import GuestImage, guest_artifacts
from qemu_driver.spec import VmSpec
from sheep.localcluster import LocalCluster, free_port
from sheep.vdi.manager import open_manager

from ..cluster import dog, reap_leftovers
from .test_vm import CHECK_FILES, CHECK_SUMS, MAKE_FILES, SIZE, WRITE_LOOP, Vm

pytestmark = pytest.mark.slow


class SecureCluster:
    """One node with an identity, serving NBD with `--nbd-tls require`; dog.conf names
    the admin's certificate for dog and the client's for the disks of VMs."""

    def __init__(self, root: Path) -> None:
        self.nbd_port = free_port()
        self.local = LocalCluster(root, 1, secure=True, node_extra=lambda i: [
            "--nbd-port", str(self.nbd_port), "--nbd-tls", "require"])
        assert self.local.pki is not None
        self.pki = self.local.pki
        self.config = root / "dog.conf"
        self.env = {"SHEEP_CONFIG": str(self.config)}

    @property
    def address(self) -> str:
        return self.local.address

    def start(self) -> None:
        self.local.up(copies=1)
        self.pki.write_dog_config(self.config, self.local.address)

    def dog(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return dog(*args, address=self.address, check=check, env=self.env)

    def vdi(self, name: str) -> str:
        self.dog("vdi", "create", name, SIZE)
        return name


class TlsVm(Vm):
    """A VM of test_vm.py run on dog's host by a dog that finds its credentials in
    dog.conf."""

    def __init__(self, cluster: SecureCluster, run_root: Path, name: str) -> None:
        super().__init__(cluster, run_root, name)  # type: ignore[arg-type]
        self.secure = cluster

    def dog(self, *args: str, check: bool = True, env: dict[str, str] | None = None):
        return super().dog(*args, check=check, env={**self.secure.env, **(env or {})})

    def start(self, *where: str, env: dict[str, str] | None = None) -> TlsVm:
        super().start("--here", *where, env=env)
        return self

    def info(self) -> dict:
        return json.loads(self.dog("info", self.name, "--json").stdout)

    def qemu_cmdline(self) -> str:
        pid = self.info()["runtime"]["pid"]
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    c = SecureCluster(tmp_path_factory.mktemp("vm-tls") / "cluster")
    try:
        c.start()
        yield c
    finally:
        c.local.stop()


@pytest.fixture
def run_root(tmp_path: Path, secure: SecureCluster) -> Iterator[Path]:
    """The test's VMs' root; none of them outlives the test."""
    root = tmp_path / "vms"
    yield root
    listed = json.loads(secure.dog("vm", "list", "--json").stdout)
    for spec in listed.get("vms", []):
        if spec["runtime"] is not None:
            secure.dog("vm", "stop", spec["name"], "--timeout", "1", check=False)
    assert not reap_leftovers(str(root))


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return guest_artifacts()


def test_a_guest_boots_writes_and_a_second_vm_reads_over_nbd_with_tls(
        secure: SecureCluster, run_root: Path, guest: GuestImage) -> None:
    disk = secure.vdi("tls-disk")
    writer = TlsVm(secure, run_root, "tls-writer").create(
        guest, [disk], MAKE_FILES.format(vm="tls-writer")).start()
    gateway = writer.info()["runtime"]["gateway"]
    assert (gateway["tls_mode"], gateway["tls"]) == ("require", True)
    writer.finish()
    reader = TlsVm(secure, run_root, "tls-reader").create(guest, [disk], CHECK_FILES).start()
    assert "read: written by tls-writer" in reader.finish()


def test_qemus_command_line_names_the_credentials_directory_never_the_key(
        secure: SecureCluster, run_root: Path, guest: GuestImage) -> None:
    key = secure.pki.client.key.read_text()
    secret_line = next(line for line in key.splitlines()[1:] if line.strip())
    vm = TlsVm(secure, run_root, "tls-argv").create(
        guest, [secure.vdi("tls-argv")], "read -r go </dev/console\n").start()
    cmdline = vm.qemu_cmdline()
    assert f"tls-creds-x509,id=nbd-tls,dir={vm.dir / 'tls'},endpoint=client" in cmdline
    assert '"tls-creds":"nbd-tls"' in cmdline
    assert secret_line not in cmdline and str(secure.pki.client.key) not in cmdline
    assert (vm.dir / "tls" / "client-key.pem").read_text() == key
    vm.type("go")
    vm.finish()
    assert not (vm.dir / "tls").exists(), "QEMU's copy of the key outlived the VM"


def test_a_disk_hot_plugged_into_a_running_vm_goes_over_tls_too(
        secure: SecureCluster, run_root: Path, guest: GuestImage) -> None:
    job = """set -e
n=0
while [ ! -b /dev/vdb ]; do n=$((n+1)); [ $n -lt 600 ]; sleep 0.1; done
mke2fs -q /dev/vdb
mount -t ext4 /dev/vdb /mnt
echo hot >/mnt/plugged
umount /mnt
echo "sheep-test: wrote vdb"
"""
    vm = TlsVm(secure, run_root, "tls-plug").create(guest, [secure.vdi("tls-plug-root")],
                                                    job).start()
    vm.wait_console("sheep-guest: ready")
    vm.dog("attach", vm.name, secure.vdi("tls-plug-extra"))
    vm.wait_console("sheep-test: wrote vdb")
    vm.finish()
    out = TlsVm(secure, run_root, "tls-plug-check").create(
        guest, ["tls-plug-extra"],
        "mount -t ext4 /dev/vda /mnt && echo \"found: $(cat /mnt/plugged)\"\n").start().finish()
    assert "found: hot" in out


def test_the_guest_carries_on_over_tls_when_its_gateway_is_killed_and_restarted(
        secure: SecureCluster, run_root: Path, guest: GuestImage) -> None:
    """QEMU's reconnect starts TLS again with the credentials it loaded at start."""
    vm = TlsVm(secure, run_root, "tls-reconnect").create(
        guest, [secure.vdi("tls-reconnect")], WRITE_LOOP.format(count=12)).start()
    vm.wait_console("sheep-test: wrote 3")
    gateway = secure.local.nodes[0]
    gateway.kill(signal.SIGKILL)
    time.sleep(1)  # QEMU notices and starts its reconnect-delay
    gateway.start()
    gateway.wait_ready()
    assert "sheep-test: verified 12" in vm.finish()
    out = TlsVm(secure, run_root, "tls-reconnect-check").create(
        guest, ["tls-reconnect"], CHECK_SUMS).start().finish()
    assert "sheep-test: intact 12" in out


def test_a_vm_without_a_certificate_is_refused_by_a_gateway_that_requires_tls(
        secure: SecureCluster, run_root: Path, guest: GuestImage) -> None:
    """dog always has a certificate here (it reaches the cluster with it), so this is the
    API dog calls, started with none for the disks, as another program might."""
    disk = secure.vdi("no-tls-disk")

    async def start() -> str:
        async with open_manager(secure.local.etcd_url, holder="test",
                                identity=secure.local.admin) as manager:
            ctl = VmControl(manager)
            await ctl.create(VmSpec("no-tls", (disk,), kernel=str(guest.kernel),
                                    initrd=str(guest.initrd)))
            with pytest.raises(VmError) as refused:
                await ctl.start("no-tls", run_root=run_root, tls=None)
            assert await ctl.vms.runtime("no-tls") is None
            return str(refused.value)

    assert asyncio.run(start()) == (
        f"the NBD gateway at 127.0.0.1:{secure.nbd_port} requires TLS: dog needs a "
        "certificate of the cluster (its config file: --config, $SHEEP_CONFIG or "
        "./var/dog.conf)")
    assert not (run_root / "no-tls").exists()
