"""HA VMs (qemu_driver/ha.py): a VM defined with --ha is restarted on another node when its
host dies, stays stopped when stopped on purpose, and a host that comes back after the VM
moved cannot write a byte more to its disks (fenced locks, sheep/vdi/fence.py).

A 3-node cluster (copies=2: it serves with one node gone), every node an NBD gateway (a
VM's disks go through its own node's), node leases and the VMs' supervisor leases of 3 s.
The tests run in file order on one cluster.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_driver.guest import READY_MARKER, guest_artifacts, job_append
from sheep.etcd_server import EtcdServer

from ..cluster import (
    Cluster,
    dog,
    dog_bytes,
    dog_json,
    reap_leftovers,
    start_cluster,
    wait_until,
)

pytestmark = pytest.mark.slow

LEASE = 3  # s: the nodes' and the supervisors' leases
BOOT_TIMEOUT = 60  # s, the accelerator probe of a node's first VM included, on 2 loaded cores
RESTART_TIMEOUT = LEASE + 10 + BOOT_TIMEOUT  # lease, the watchers' look, the start, the boot
BLOCKS = 16  # the fencing guest's marked blocks
BLOCK = 4096

# Marks every block with this instance's id, says so, then rewrites them in turn for ever,
# saying which writes the disk took and which it refused.
FENCE_JOB = r"""id=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
mark() {
  printf 'sheep-ha %s %08d\n' "$id" "$1" |
    dd of=/dev/vda bs=4096 seek=$(($1 % 16)) conv=fsync 2>/dev/null
}
i=0; while [ $i -lt 16 ]; do mark $i || exit 1; i=$((i+1)); done
echo "sheep-test: claimed $id"
n=16
while true; do
  if mark $n; then echo "sheep-test: wrote $id $n"; else echo "sheep-test: refused $id $n"; fi
  n=$((n+1)); sleep 0.3
done
"""
RUN_JOB = """mke2fs -q /dev/vda && echo "sheep-test: running"
while true; do sleep 1; done
"""


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("havms")
    yield root
    left = reap_leftovers(str(root))
    assert not left, f"processes outlived the module: {left}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer,
            run_root: Path) -> Iterator[Cluster]:
    # the nodes' environment: their VMs' supervisors hold short leases, and a VM a node
    # restarts gets its run directory below run_root (reap_leftovers finds its processes)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SHEEP_VM_LEASE_TTL", str(LEASE))
        env.setenv("SHEEP_VM_RUN_DIR", str(run_root))
        c = start_cluster(tmp_path_factory.mktemp("ha") / "cluster", etcd.url, nodes=3,
                          copies=2, lease_ttl=LEASE, nbd=True, every_node_gateway=True)
    yield c
    for name in ("ha1", "fenced"):
        dog("vm", "stop", name, "--timeout", "1", address=c.address, check=False)
    c.stop()


def node_ids(cluster: Cluster) -> list[str]:
    """cluster.nodes' ids, in order."""
    by_port = {s["node"]["control_port"]: s["node"]["id"] for s in cluster.node_list()}
    return [by_port[n.port] for n in cluster.nodes]


def runtime(cluster: Cluster, name: str) -> dict | None:
    listed = dog_json("vm", "list", address=cluster.address)["vms"]
    return next(v for v in listed if v["name"] == name)["runtime"]


def console(rt: dict) -> str:
    path = Path(rt["console_log"])
    return path.read_text(errors="replace") if path.exists() else ""


def define_and_start(cluster: Cluster, run_root: Path, name: str, job: str, on: str,
                     marker: str) -> dict:
    guest = guest_artifacts()
    a = cluster.address
    dog("vdi", "create", name, "64M", address=a)
    dog("vm", "create", name, "--ha", "--vdi", name, "--kernel", str(guest.kernel),
        "--initrd", str(guest.initrd), "--append", job_append(job), address=a)
    rt = dog_json("vm", "start", name, "--on", on, "--run-dir", str(run_root), address=a)
    wait_until(lambda: marker in console(rt), BOOT_TIMEOUT, f"{name}'s guest running")
    return rt


def restarted(cluster: Cluster, name: str, old: dict, marker: str) -> dict:
    """The VM's new runtime record, once HA restarted it elsewhere and its guest says
    `marker`."""
    def moved() -> dict | None:
        rt = runtime(cluster, name)
        if rt is None or rt["node"] == old["node"] or rt["state"] != "running":
            return None
        return rt if marker in console(rt) else None

    return wait_until(moved, RESTART_TIMEOUT, f"{name} restarted on another node")


def ha_restarts(cluster: Cluster, name: str) -> int:
    return sum(n.log().count(f"vm {name}: HA restart done") for n in cluster.nodes)


def test_a_vm_is_defined_with_ha(cluster: Cluster, run_root: Path) -> None:
    dog("vdi", "create", "plain", "8M", address=cluster.address)
    dog("vm", "create", "plain", "--vdi", "plain", address=cluster.address)
    plain = next(v for v in dog_json("vm", "list", address=cluster.address)["vms"]
                 if v["name"] == "plain")
    assert plain["ha"] is False
    assert "HA: no" in dog("vm", "info", "plain", address=cluster.address).stdout


def test_an_ha_vm_is_restarted_on_another_node_after_its_host_is_killed(
        cluster: Cluster, run_root: Path) -> None:
    ids = node_ids(cluster)
    old = define_and_start(cluster, run_root, "ha1", RUN_JOB, ids[1], "sheep-test: running")
    assert dog_json("vm", "info", "ha1", address=cluster.address)["ha"] is True
    host = cluster.nodes[1]
    killed = time.monotonic()
    for pid in (old["supervisor"], old["pid"]):  # the supervisor first: it records no exit
        os.kill(pid, signal.SIGKILL)
    host.kill(signal.SIGKILL)
    new = restarted(cluster, "ha1", old, "sheep-test: running")
    took = time.monotonic() - killed
    print(f"HA restart: {took:.1f} s from kill -9 to the new guest's job running")
    assert new["node"] in ids and new["node"] != old["node"]
    # the new QEMU got the disk for writing (mke2fs ran): the dead gateway's lock is gone
    assert READY_MARKER in console(new)
    assert ha_restarts(cluster, "ha1") == 1
    host.start()
    host.wait_up()


def test_an_ha_vm_stopped_on_purpose_stays_stopped(cluster: Cluster) -> None:
    a = cluster.address
    dog("vm", "stop", "ha1", "--timeout", "30", address=a)
    restarts = ha_restarts(cluster, "ha1")
    time.sleep(LEASE * 2 + 4)  # past the lease, and the watchers looked again
    listed = next(v for v in dog_json("vm", "list", address=a)["vms"] if v["name"] == "ha1")
    assert listed["runtime"] is None and listed["state"] == "stopped"
    assert ha_restarts(cluster, "ha1") == restarts


def marks(data: bytes) -> list[str]:
    """The instance id marked in each block."""
    found = []
    for i in range(BLOCKS):
        m = re.match(rb"sheep-ha ([0-9a-f]+) \d+\n", data[i * BLOCK:(i + 1) * BLOCK])
        found.append(m.group(1).decode() if m else "")
    return found


def test_a_host_stopped_past_its_lease_cannot_write_once_the_vm_moved(
        cluster: Cluster, run_root: Path) -> None:
    ids = node_ids(cluster)
    old = define_and_start(cluster, run_root, "fenced", FENCE_JOB, ids[2],
                           "sheep-test: claimed")
    old_id = re.search(r"sheep-test: claimed (\w+)", console(old)).group(1)  # type: ignore
    host = cluster.nodes[2]
    frozen = [old["supervisor"], host.proc.pid, old["pid"]]  # type: ignore[union-attr]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    wrote = f"sheep-test: wrote {old_id}"
    try:
        written = console(old).count(wrote)
        new = restarted(cluster, "fenced", old, "sheep-test: claimed")
        new_id = re.search(r"sheep-test: claimed (\w+)", console(new)).group(1)  # type: ignore
        assert new_id != old_id
        # the old node and QEMU go on first, their supervisor still stopped: nothing but
        # fencing stands between the old guest's writes and the disk
        for pid in frozen[1:]:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: f"sheep-test: refused {old_id}" in console(old), 30,
                   "the old guest's writes refused")
        # at most the write in flight when it stopped, done before the VM moved
        assert console(old).count(wrote) <= written + 1
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    # its supervisor finds its lease gone and kills its QEMU
    wait_until(lambda: not Path(f"/proc/{old['pid']}").exists(), 30, "the old QEMU gone")
    assert "killing QEMU" in (Path(old["run_dir"]) / "supervisor.log").read_text()
    # the new instance writes on, undisturbed
    seen = console(new).count(f"sheep-test: wrote {new_id}")
    wait_until(lambda: console(new).count(f"sheep-test: wrote {new_id}") > seen + 3, 30,
               "the new instance writing")
    assert "sheep-test: refused" not in console(new)
    dog("vm", "stop", "fenced", "--timeout", "1", address=cluster.address)
    data = dog_bytes("vdi", "read", "fenced", "0", str(BLOCKS * BLOCK),
                     address=cluster.address).stdout
    assert marks(data) == [new_id] * BLOCKS
    # the stopped VM was stopped on purpose: not restarted
    assert runtime(cluster, "fenced") is None
