"""VMs on VDIs end to end: `dog vm` boots the small guest (qemu_driver/guest.py) under TCG
with its disks on a real 3-node cluster (copies=3) through QEMU's own NBD or iSCSI client,
and the guest's jobs check what it sees. Node 0 is the gateway (NBD and iSCSI). A VM runs
where `dog vm start` puts it by default: on the least loaded node, node 0 here (the one
dog talks to), unless a test says otherwise.

One cluster serves the module; every test uses VMs and VDIs of its own. Faults run last:
a storage node is killed (and brought back), then the gateway itself. Every wait is
bounded; a boot takes about 5 s under TCG.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_driver.accel import OVERRIDE, choose_accel
from qemu_driver.console import send
from qemu_driver.guest import (
    POWER_BUTTON_MARKER,
    POWER_OFF_MARKER,
    READY_MARKER,
    GuestImage,
    guest_artifacts,
    job_append,
    job_exit_status,
)
from sheep.etcd_server import EtcdServer

from ..cluster import (
    Cluster,
    dog,
    dog_error,
    dog_json,
    reap_leftovers,
    start_cluster,
    wait_until,
)
from .test_vm_host import node_id

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 50  # s for a whole job, boot included, on a loaded 2-core machine
SIZE = "64M"
GUEST_ERRORS = ("I/O error", "EXT4-fs error", "Buffer I/O", "blk_update_request",
                "Read-only file system")

# The jobs, in busybox sh. The guest prints "sheep-test: NAME" at the points a test waits
# for, and reads a line from the console where the test must act first.
MAKE_FILES = """set -e
mke2fs -q /dev/vda
mount -t ext4 /dev/vda /mnt
echo "written by {vm}" >/mnt/hello.txt
dd if=/dev/urandom of=/mnt/big bs=1M count=6 2>/dev/null
md5sum /mnt/big >/mnt/big.md5
sync
umount /mnt
"""
CHECK_FILES = """set -e
mount -t ext4 /dev/vda /mnt
echo "read: $(cat /mnt/hello.txt)"
md5sum -c /mnt/big.md5
"""
WRITE_LOOP = """set -e
mke2fs -q /dev/vda
mount -t ext4 /dev/vda /mnt
i=0
while [ $i -lt {count} ]; do
  i=$((i+1))
  dd if=/dev/urandom of=/mnt/f$i bs=256K count=2 2>/dev/null
  md5sum /mnt/f$i >>/mnt/sums
  sync
  echo "sheep-test: wrote $i"
  sleep 0.3
done
echo 3 >/proc/sys/vm/drop_caches
md5sum -c /mnt/sums >/dev/null
echo "sheep-test: verified $i"
umount /mnt
"""
CHECK_SUMS = """set -e
mount -t ext4 /dev/vda /mnt
md5sum -c /mnt/sums >/dev/null
echo "sheep-test: intact $(wc -l </mnt/sums)"
"""


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return guest_artifacts()


@pytest.fixture(scope="module")
def vmc(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Cluster]:
    """A 3-node cluster, copies=3; node 0 serves NBD and iSCSI."""
    c = start_cluster(tmp_path_factory.mktemp("vm") / "cluster", etcd.url, nodes=3,
                      copies=3, nbd=True, iscsi=True)
    yield c
    for spec in dog_json("vm", "list", address=c.address).get("vms", []):
        if spec["runtime"] is not None:
            dog("vm", "stop", spec["name"], "--timeout", "1", address=c.address, check=False)
    c.stop()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vms")


@pytest.fixture(autouse=True)
def no_vm_outlives_its_test(vmc: Cluster, run_root: Path) -> Iterator[None]:
    """Every test ends with no VM of its own running and no QEMU or supervisor left (all
    of them name a path under run_root); what is left is stopped, killed and reported."""
    yield
    running = [v["name"] for v in dog_json("vm", "list", address=vmc.address)["vms"]
               if v["runtime"] is not None]
    for name in running:
        dog("vm", "stop", name, "--timeout", "1", address=vmc.address, check=False)
    left = reap_leftovers(str(run_root))
    assert not running, f"VMs still running when the test ended: {running}"
    assert not left, f"processes outlived the test: {left}"


class Vm:
    """One VM of a test: `dog vm` commands and its console log."""

    def __init__(self, cluster: Cluster, run_root: Path, name: str) -> None:
        self.cluster, self.name, self.dir = cluster, name, run_root / name

    def dog(self, *args: str, check: bool = True, env: dict[str, str] | None = None):
        return dog("vm", *args, address=self.cluster.address, check=check, env=env)

    def create(self, guest: GuestImage, vdis: list[str], job: str, transport: str = "nbd",
               *, agent: bool = True) -> Vm:
        self.dog("create", self.name, "--vdi", ",".join(vdis), "--kernel", str(guest.kernel),
                 "--initrd", str(guest.initrd), "--append", job_append(job, agent=agent),
                 "--transport", transport)
        return self

    def start(self, *where: str, env: dict[str, str] | None = None) -> Vm:
        """`where`: --on NODE or --here; by default a node of dog's choice runs it."""
        self.dog("start", self.name, *where, "--run-dir", str(self.dir.parent), env=env)
        return self

    def info(self) -> dict:
        return dog_json("vm", "info", self.name, address=self.cluster.address)

    def console(self) -> str:
        path = self.dir / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_console(self, text: str, timeout: float = BOOT_TIMEOUT) -> None:
        def seen() -> bool:
            out = self.console()
            if job_exit_status(out) is not None and text not in out:
                raise AssertionError(f"the job ended before {text!r}:\n{out[-3000:]}")
            return text in out

        wait_until(seen, timeout, f"{text!r} on {self.name}'s console")

    def type(self, line: str) -> None:
        """A line on the console, once the guest is up: the UART drops what comes earlier
        (the job reads it from /dev/console, where the tty keeps it until read)."""
        self.wait_console(READY_MARKER)
        asyncio.run(send(self.dir / "console.sock", line + "\n"))

    def finish(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait for the guest to power off; its console, after checking the job passed."""
        self.dog("wait", self.name, "--timeout", str(timeout))
        out = self.console()
        assert job_exit_status(out) == 0, f"{self.name}'s job failed:\n{out[-3000:]}"
        for error in GUEST_ERRORS:
            assert error not in out, f"{self.name}'s guest saw {error!r}:\n{out[-3000:]}"
        return out


def vdi(cluster: Cluster, name: str) -> str:
    dog("vdi", "create", name, SIZE, address=cluster.address)
    return name


def run(cluster: Cluster, run_root: Path, guest: GuestImage, name: str, vdis: list[str],
        job: str, transport: str = "nbd") -> str:
    return Vm(cluster, run_root, name).create(guest, vdis, job, transport).start().finish()


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["nbd", "iscsi"])
def test_files_a_guest_writes_are_read_back_by_the_next_vm_on_the_same_vdi(
        vmc: Cluster, run_root: Path, guest: GuestImage, transport: str) -> None:
    disk = vdi(vmc, f"files-{transport}")
    run(vmc, run_root, guest, f"writer-{transport}", [disk],
        MAKE_FILES.format(vm=f"writer-{transport}"), transport)
    out = run(vmc, run_root, guest, f"reader-{transport}", [disk], CHECK_FILES, transport)
    assert f"read: written by writer-{transport}" in out
    assert "/mnt/big: OK" in out


def test_info_says_which_accelerator_and_gateway_a_running_vm_uses(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    vm = Vm(vmc, run_root, "shown").create(guest, [vdi(vmc, "shown")],
                                           "read -r go </dev/console\n").start()
    info = dog_json("vm", "info", "shown", address=vmc.address)
    assert info["state"] == "running"
    # the probe's verdict for this kernel on this host, and it was right: a VM that had to
    # fall back from KVM means the probe misjudged the host
    assert info["runtime"]["accel"] == choose_accel(guest.kernel).accel
    assert info["runtime"]["accel_reason"]
    assert info["runtime"]["fallback"] == ""
    assert info["runtime"]["gateway"]["port"] == vmc.nbd_port
    assert [b["file"] for b in info["block"]] == [vmc.nbd_url("shown")]
    assert {n["driver"] for n in info["nodes"]} == {"nbd"}
    listed = {v["name"]: v for v in dog_json("vm", "list", address=vmc.address)["vms"]}
    assert listed["shown"]["state"] == "running"
    vm.type("go")
    vm.finish()
    assert dog_json("vm", "info", "shown", address=vmc.address)["state"] == "stopped"


def test_a_vm_cannot_start_twice_nor_be_deleted_while_it_runs(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    vm = Vm(vmc, run_root, "once").create(guest, [vdi(vmc, "once")],
                                          "read -r go </dev/console\n").start()
    assert "already running" in dog_error("vm", "start", "once", "--run-dir",
                                          str(run_root), address=vmc.address)
    assert "stop it first" in dog_error("vm", "delete", "once", address=vmc.address)
    vm.type("go")
    vm.finish()
    vm.dog("delete", "once")
    assert "no VM named 'once'" in dog_error("vm", "info", "once", address=vmc.address)


def test_a_paused_vm_says_so_and_resumes(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    vm = Vm(vmc, run_root, "pauser").create(guest, [vdi(vmc, "pauser")],
                                            "read -r go </dev/console\n").start()
    vm.wait_console(READY_MARKER)
    vm.dog("pause", "pauser")
    assert dog_json("vm", "info", "pauser", address=vmc.address)["state"] == "paused"

    def listed() -> str:
        vms = dog_json("vm", "list", address=vmc.address)["vms"]
        return next(v["state"] for v in vms if v["name"] == "pauser")

    # the list tells what the supervisor last saw, which follows QEMU's events
    wait_until(lambda: listed() == "paused", 15, "pauser listed as paused")
    vm.dog("resume", "pauser")
    assert dog_json("vm", "info", "pauser", address=vmc.address)["state"] == "running"
    vm.type("go")
    vm.finish()


def test_bad_vm_commands_are_one_line_errors(vmc: Cluster, guest: GuestImage) -> None:
    a = vmc.address
    assert "no VDI named 'absent'" in dog_error("vm", "create", "x", "--vdi", "absent",
                                                address=a)
    assert "VM name" in dog_error("vm", "create", "bad name", "--vdi", "absent", address=a)
    assert "no VM named 'ghost'" in dog_error("vm", "start", "ghost", address=a)
    assert "no VM named 'ghost'" in dog_error("vm", "attach", "ghost", "absent", address=a)
    disk = vdi(vmc, "errs")
    dog("vm", "create", "errs", "--vdi", disk, address=a)
    assert "already exists" in dog_error("vm", "create", "errs", "--vdi", disk, address=a)
    assert "is not running" in dog_error("vm", "stop", "errs", address=a)
    assert "is not running" in dog_error("vm", "snapshot", "errs", "-s", "t", address=a)
    dog("vm", "delete", "errs", address=a)


def ext2_file(cluster: Cluster, tmp: Path, vdi: str, path: str, tag: str = "") -> str:
    """A file of the ext2 filesystem on VDI (or its snapshot), read on the host by debugfs
    after e2fsck -fn finds the filesystem consistent."""
    image = tmp / f"{vdi}-{tag or 'working'}.raw"
    dog("vdi", "export", vdi, str(image), *(["-s", tag] if tag else []),
        address=cluster.address)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          timeout=60)
    assert fsck.returncode == 0, f"{vdi}@{tag or 'working'} is inconsistent:\n{fsck.stdout}"
    cat = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                         text=True, timeout=60, check=True)
    return cat.stdout


def test_a_snapshot_of_a_running_vm_is_what_a_rollback_boots_and_a_clone_boots_beside_it(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    disk = vdi(vmc, "snap")
    # no sync: the guest agent's freeze flushes what the guest still caches
    job = """set -e
mke2fs -q /dev/vda
mount -t ext4 /dev/vda /mnt
echo before >/mnt/state
echo "sheep-test: first state"
read -r go </dev/console
echo after >/mnt/state
echo extra >/mnt/extra
sync
echo "sheep-test: second state"
read -r go </dev/console
"""
    vm = Vm(vmc, run_root, "snapper").create(guest, [disk], job).start()
    vm.wait_console("sheep-test: first state")
    taken = dog_json("vm", "snapshot", "snapper", "-s", "t1", address=vmc.address)
    assert taken["method"] == "guest filesystems frozen"
    assert [s["name"] for s in taken["snapshots"]] == ["snap"]
    vm.type("go")
    vm.wait_console("sheep-test: second state")
    assert dog_json("vm", "info", "snapper", address=vmc.address)["state"] == "running"

    refusal = dog_error("vdi", "rollback", "snap", "-s", "t1", address=vmc.address)
    assert "in use by VM snapper" in refusal

    vm.dog("stop", "snapper", "--timeout", "2")
    dog("vdi", "rollback", "snap", "-s", "t1", address=vmc.address)
    dog("vdi", "clone", "snap@t1", "snap-clone", address=vmc.address)
    check = """set -e
mount -t ext4 /dev/vda /mnt
echo "state: $(cat /mnt/state)"
[ ! -e /mnt/extra ] && echo "no extra"
echo "{who}" >/mnt/who
sync
"""
    rolled = Vm(vmc, run_root, "rolled").create(guest, [disk], check.format(who="rolled"))
    clone = Vm(vmc, run_root, "cloned").create(guest, ["snap-clone"], check.format(who="clone"))
    rolled.start()
    clone.start()  # both at once, sharing the snapshot's blocks
    for out in (rolled.finish(), clone.finish()):
        assert "state: before" in out and "no extra" in out


def test_a_guest_without_an_agent_is_paused_for_its_snapshot_and_runs_on(
        vmc: Cluster, run_root: Path, guest: GuestImage, tmp_path: Path) -> None:
    job = """set -e
mke2fs -q /dev/vda
mount -t ext4 /dev/vda /mnt
echo synced >/mnt/state
sync
echo "sheep-test: synced"
read -r go </dev/console
echo later >/mnt/state
umount /mnt
"""
    vm = Vm(vmc, run_root, "no-agent").create(guest, [vdi(vmc, "no-agent")], job, agent=False)
    vm.start().wait_console("sheep-test: synced")
    assert dog_json("vm", "info", "no-agent", address=vmc.address)["guest_agent"] is False
    taken = dog_json("vm", "snapshot", "no-agent", "-s", "paused", address=vmc.address)
    assert taken["method"] == "VM paused"
    assert dog_json("vm", "info", "no-agent", address=vmc.address)["state"] == "running"
    vm.type("go")
    vm.finish()
    assert ext2_file(vmc, tmp_path, "no-agent", "/state", "paused") == "synced\n"
    assert ext2_file(vmc, tmp_path, "no-agent", "/state") == "later\n"


def test_stop_presses_the_power_button_and_the_guest_shuts_down_cleanly(
        vmc: Cluster, run_root: Path, guest: GuestImage, tmp_path: Path) -> None:
    job = """set -e
mke2fs -q /dev/vda
mount -t ext4 /dev/vda /mnt
echo cached >/mnt/state
echo "sheep-test: running"
while true; do sleep 1; done
"""
    vm = Vm(vmc, run_root, "stoppable").create(guest, [vdi(vmc, "stoppable")], job).start()
    vm.wait_console("sheep-test: running")
    assert dog_json("vm", "info", "stoppable", address=vmc.address)["guest_agent"] is True
    stopped = dog_json("vm", "stop", "stoppable", "--timeout", "30", address=vmc.address)
    assert stopped["how"] == "powered off"
    out = vm.console()
    assert POWER_BUTTON_MARKER in out and POWER_OFF_MARKER in out, out[-3000:]
    # the job was ended, its filesystem unmounted (clean, nothing to fsck) with the data in it
    assert ext2_file(vmc, tmp_path, "stoppable", "/state") == "cached\n"


def test_a_vdi_hot_plugged_into_a_running_guest_appears_and_takes_writes(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    job = """set -e
n=0
while [ ! -b /dev/vdb ]; do n=$((n+1)); [ $n -lt 600 ]; sleep 0.1; done
echo "vdb sectors $(cat /sys/block/vdb/size)"
mke2fs -q /dev/vdb
mount -t ext4 /dev/vdb /mnt
echo hot >/mnt/plugged
sync
umount /mnt
echo "sheep-test: wrote vdb"
n=0
while [ -b /dev/vdb ]; do n=$((n+1)); [ $n -lt 600 ]; sleep 0.1; done
echo "sheep-test: vdb gone"
read -r go </dev/console
"""
    vm = Vm(vmc, run_root, "plug").create(guest, [vdi(vmc, "plug-root")], job).start()
    vm.wait_console("sheep-guest: ready")
    vm.dog("attach", "plug", vdi(vmc, "plug-extra"))
    vm.wait_console("sheep-test: wrote vdb")
    assert f"vdb sectors {(64 << 20) // 512}" in vm.console()
    info = dog_json("vm", "info", "plug", address=vmc.address)
    assert vmc.nbd_url("plug-extra") in [b["file"] for b in info["block"]]
    vm.dog("detach", "plug", "plug-extra")
    vm.wait_console("sheep-test: vdb gone")
    assert vmc.nbd_url("plug-extra") not in [
        b["file"] for b in dog_json("vm", "info", "plug", address=vmc.address)["block"]]
    vm.type("go")
    vm.finish()
    out = run(vmc, run_root, guest, "plug-check", ["plug-extra"],
              "mount -t ext4 /dev/vda /mnt && echo \"found: $(cat /mnt/plugged)\"\n")
    assert "found: hot" in out


def test_a_guest_writing_while_a_storage_node_is_killed_sees_no_io_error(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    vm = Vm(vmc, run_root, "survivor").create(guest, [vdi(vmc, "survivor")],
                                              WRITE_LOOP.format(count=16)).start()
    vm.wait_console("sheep-test: wrote 3")
    victim = vmc.nodes[2]  # not the gateway
    victim.kill(signal.SIGKILL)
    out = vm.finish()
    assert "sheep-test: verified 16" in out
    victim.start()
    victim.wait_up()
    vmc.wait_members(3)


def test_the_guest_carries_on_when_its_gateway_is_killed_and_restarted(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    # hosted by node 1: only its gateway (node 0) goes away under it
    vm = Vm(vmc, run_root, "reconnect").create(guest, [vdi(vmc, "reconnect")],
                                               WRITE_LOOP.format(count=12))
    vm.start("--on", node_id(vmc, 1))
    vm.wait_console("sheep-test: wrote 3")
    gateway = vmc.nodes[0]
    gateway.kill(signal.SIGKILL)
    time.sleep(1)  # QEMU notices and starts its reconnect-delay
    gateway.start()
    gateway.wait_up()
    out = vm.finish()
    assert "sheep-test: verified 12" in out
    out = run(vmc, run_root, guest, "reconnect-check", ["reconnect"], CHECK_SUMS)
    assert "sheep-test: intact 12" in out


# -- crashes ------------------------------------------------------------------------------

PANIC = """echo "sheep-test: panicking"
echo c >/proc/sysrq-trigger
"""


def test_a_guest_kernel_panic_shows_the_vm_as_crashed_and_wait_fails(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    vm = Vm(vmc, run_root, "panicky").create(guest, [vdi(vmc, "panicky")], PANIC).start()
    waited = vm.dog("wait", "panicky", "--timeout", str(BOOT_TIMEOUT), check=False)
    assert waited.returncode != 0
    assert "crashed" in waited.stderr and "panicked" in waited.stderr, waited.stderr
    info = vm.info()
    assert info["state"] == "crashed"
    assert "sysrq triggered crash" in info["last_exit"]["reason"]
    assert "(pvpanic)" in info["last_exit"]["reason"]
    listed = {v["name"]: v for v in dog_json("vm", "list", address=vmc.address)["vms"]}
    assert listed["panicky"]["state"] == "crashed"
    text = vm.dog("info", "panicky").stdout
    assert "State: crashed (the guest kernel panicked" in text


def test_a_qemu_killed_under_its_guest_shows_the_vm_as_crashed(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    vm = Vm(vmc, run_root, "killed").create(guest, [vdi(vmc, "killed")],
                                            "read -r go </dev/console\n").start()
    vm.wait_console(READY_MARKER)
    os.kill(vm.info()["runtime"]["pid"], signal.SIGKILL)
    waited = vm.dog("wait", "killed", "--timeout", "30", check=False)
    assert waited.returncode != 0 and "killed by SIGKILL" in waited.stderr, waited.stderr
    info = vm.info()
    assert info["state"] == "crashed" and info["last_exit"]["status"] == -9
    # a new start clears the crash
    (vm.dir / "console.log").unlink()  # so that its ready marker is the new boot's
    vm.start()
    assert vm.info()["state"] == "running" and vm.info()["last_exit"] is None
    vm.type("go")
    vm.finish()


TCG_ONLY = """if ! grep -q "QEMU TCG" /proc/cpuinfo; then
  echo "sheep-test: not under TCG: panic"
  echo c >/proc/sysrq-trigger
fi
echo "sheep-test: under TCG"
read -r go </dev/console
"""


def test_a_vm_forced_onto_kvm_that_fails_there_runs_again_under_tcg(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    """The one VM test that forces an accelerator: it tests the override (dog's, carried to
    the node that runs the VM) and the fallback. Under KVM this guest panics (or KVM fails
    it first); either way it must end up running under TCG, saying why."""
    vm = Vm(vmc, run_root, "fallback").create(guest, [vdi(vmc, "fallback")], TCG_ONLY)
    vm.start(env={OVERRIDE: "kvm"})
    vm.wait_console("sheep-test: under TCG")
    rt = vm.info()["runtime"]
    assert rt["accel"] == "tcg" and rt["fallback"], rt
    assert OVERRIDE in rt["accel_reason"]
    text = vm.dog("info", "fallback").stdout
    assert "KVM failed at start" in text and "restarted under TCG" in text
    vm.type("go")
    vm.finish()
    ended = vm.info()["last_exit"]
    assert ended["state"] == "stopped" and ended["accel"] == "tcg" and ended["fallback"]


def test_a_qemu_that_stops_answering_is_listed_as_unresponsive_until_it_answers_again(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    vm = Vm(vmc, run_root, "frozen").create(guest, [vdi(vmc, "frozen")],
                                            "read -r go </dev/console\n").start()
    vm.wait_console(READY_MARKER)
    pid = vm.info()["runtime"]["pid"]

    def listed() -> str:
        vms = dog_json("vm", "list", address=vmc.address)["vms"]
        return next(v["state"] for v in vms if v["name"] == "frozen")

    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: listed() == "unresponsive", 60, "frozen listed as unresponsive")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: listed() == "running", 60, "frozen listed as running again")
    vm.type("go")
    vm.finish()


def test_the_console_log_of_a_stopped_vm_is_found_where_it_ran(
        vmc: Cluster, run_root: Path, guest: GuestImage) -> None:
    vm = Vm(vmc, run_root, "logged").create(guest, [vdi(vmc, "logged")],
                                            "echo sheep-test: logged\n").start()
    vm.finish()
    for where in ([], ["--run-dir", str(run_root)], ["--run-dir", str(vm.dir)]):
        out = vm.dog("console", "logged", "--log", *where).stdout
        assert "sheep-test: logged" in out, where
    missing = vm.dog("console", "logged", "--log", "--run-dir", str(run_root / "nowhere"),
                     check=False)
    assert missing.returncode != 0 and "no console log" in missing.stderr
