"""Live migration between nodes (`dog vm migrate`, qemu_driver/migrate.py): a guest keeps
writing and reading back its disk, checking every byte, while it moves from node to node
and back, over NBD and over iSCSI; a migration called off leaves it running where it was,
with its disk's lock.

A 2-node cluster (copies=2), each node with NBD and iSCSI gateways of its own (a VM's disks
go through its host's). Under TCG, never forced: the accelerator probe decides.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_driver.guest import guest_artifacts, job_append, job_exit_status
from sheep.etcd_server import EtcdServer

from ..cluster import (
    BIN,
    Cluster,
    dog,
    dog_error,
    dog_json,
    reap_leftovers,
    start_cluster,
    wait_until,
)

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 90  # s, the accelerator probe of a fresh node included, on 2 loaded cores
MIGRATE_TIMEOUT = 240  # s for dog vm migrate, a 256 MiB guest under TCG on loaded cores
SLOTS = 16  # the workload cycles over this many 1 MiB slots of the disk
MIB = 1 << 20

# Each round writes its own pattern into the next slot, O_DIRECT and synced, reads the slot
# back O_DIRECT and compares; a line per round. A line on the console ends it.
WORKLOAD = f"""
slots={SLOTS}
( i=0
  while [ ! -e /tmp/stop ]; do
    slot=$((i % slots))
    yes "r$i-" | head -c 1048576 >/tmp/pat
    if ! dd if=/tmp/pat of=/dev/vda bs=1048576 seek=$slot count=1 oflag=direct \\
            conv=notrunc,fsync 2>/tmp/err; then
      echo "sheep-test: round $i IOERR write $(cat /tmp/err)"; break
    fi
    if ! dd if=/dev/vda of=/tmp/back bs=1048576 skip=$slot count=1 iflag=direct 2>/tmp/err
    then echo "sheep-test: round $i IOERR read $(cat /tmp/err)"; break; fi
    if cmp -s /tmp/pat /tmp/back; then echo "sheep-test: round $i ok"
    else echo "sheep-test: round $i BAD"; break; fi
    i=$((i + 1))
  done
  echo "sheep-test: last $((i - 1))"
  touch /tmp/done ) &
read -r line </dev/console
touch /tmp/stop
while [ ! -e /tmp/done ]; do sleep 0.2; done
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("migrate") / "cluster", etcd.url, nodes=2,
                      copies=2, nbd=True, iscsi=True, every_node_gateway=True)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("vms")
    yield root
    left = reap_leftovers(str(root))
    assert not left, f"processes outlived the module: {left}"


def node_ids(cluster: Cluster) -> list[str]:
    """The ids of cluster.nodes, in order."""
    by_port = {s["node"]["control_port"]: s["node"]["id"] for s in cluster.node_list()}
    return [by_port[n.port] for n in cluster.nodes]


def runtime(cluster: Cluster, name: str) -> dict:
    listed = next(v for v in dog_json("vm", "list", address=cluster.address)["vms"]
                  if v["name"] == name)
    return listed["runtime"]


def holds_lock(cluster: Cluster, vdi: str, node: str) -> bool:
    """Whether `node`'s gateway holds `vdi`'s write lock."""
    locks = dog_json("vdi", "lock", "list", address=cluster.address).get("locks", [])
    return any(lk["name"] == vdi and f"sheep node {node[:8]}" in lk["holder"] for lk in locks)


def consoles(run_root: Path, name: str) -> str:
    """The guest's console output on every node it ran on, in the order they began."""
    logs = sorted(run_root.glob(f"{name}*/console.log"), key=lambda p: p.stat().st_mtime)
    return "".join(p.read_text(errors="replace") for p in logs)


def rounds(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"sheep-test: round (\d+) ok", text)]


def failures(text: str) -> list[str]:
    return re.findall(r"sheep-test: round \d+ (?:IOERR|BAD)[^\r\n]*", text)


def migrate(cluster: Cluster, name: str, to: str, *extra: str,
            check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dog"), "vm", "migrate", name, "--to", to, *extra,
                           "-a", cluster.address], capture_output=True, text=True,
                          timeout=MIGRATE_TIMEOUT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def more_rounds(run_root: Path, name: str, count: int = 5) -> None:
    """Until the guest verified `count` more rounds than it has now."""
    start = len(rounds(consoles(run_root, name)))
    wait_until(lambda: len(rounds(consoles(run_root, name))) >= start + count, 60,
               f"{count} more verified rounds of {name}'s workload")


class Guest:
    """A VM running the workload, started on node 0."""

    def __init__(self, cluster: Cluster, run_root: Path, name: str, transport: str) -> None:
        self.cluster, self.run_root, self.name = cluster, run_root, name
        guest = guest_artifacts()
        a = cluster.address
        dog("vdi", "create", name, "64M", address=a)
        dog("vm", "create", name, "--vdi", name, "--transport", transport, "--kernel",
            str(guest.kernel), "--initrd", str(guest.initrd), "--append",
            job_append(WORKLOAD), address=a)
        dog("vm", "start", name, "--on", node_ids(cluster)[0], "--run-dir", str(run_root),
            address=a)
        wait_until(lambda: len(rounds(self.console())) >= 3, BOOT_TIMEOUT,
                   f"{name}'s workload running")

    def console(self) -> str:
        return consoles(self.run_root, self.name)

    def finish(self) -> int:
        """Stop the workload and power the guest off; the last round it wrote."""
        rt = runtime(self.cluster, self.name)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(rt["console"])
            sock.sendall(b"stop\n")
            wait_until(lambda: job_exit_status(self.console()) is not None, 60,
                       f"{self.name}'s workload finishing")
        dog("vm", "wait", self.name, "--timeout", "60", address=self.cluster.address)
        last = re.findall(r"sheep-test: last (-?\d+)", self.console())
        assert last, self.console()[-2000:]
        return int(last[-1])

    def check_disk(self, last: int, tmp: Path) -> None:
        """Every slot holds the pattern of the last round that wrote it."""
        image = tmp / f"{self.name}.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                        self.cluster.nbd_url(self.name), str(image)], check=True, timeout=60)
        data = image.read_bytes()
        for slot in range(SLOTS):
            written = [i for i in range(last + 1) if i % SLOTS == slot]
            if not written:
                continue
            word = f"r{written[-1]}-\n".encode()
            expected = (word * (MIB // len(word) + 1))[:MIB]
            assert data[slot * MIB:(slot + 1) * MIB] == expected, f"slot {slot}"


@pytest.fixture(scope="module")
def nbd_guest(cluster: Cluster, run_root: Path) -> Iterator[Guest]:
    guest = Guest(cluster, run_root, "mig-nbd", "nbd")
    yield guest
    dog("vm", "stop", guest.name, "--timeout", "1", address=cluster.address, check=False)


def test_a_vm_migrates_to_another_node_and_back_under_writes_over_nbd(
        cluster: Cluster, nbd_guest: Guest, tmp_path: Path) -> None:
    ids, name, a = node_ids(cluster), nbd_guest.name, cluster.address
    dog("vm", "snapshot", name, "-s", "before", address=a)
    proc = migrate(cluster, name, ids[1], "--json")
    done = json.loads(proc.stdout)
    assert (done["from"], done["to"]) == (ids[0], ids[1])
    assert done["downtime_ms"] > 0 and done["paused_ms"] >= done["downtime_ms"]
    assert "completed" in proc.stderr  # the progress, as it went
    rt = runtime(cluster, name)
    assert rt["node"] == ids[1] and rt["state"] == "running"
    more_rounds(nbd_guest.run_root, name)
    # the lock went with the guest's I/O to node 1's gateway
    assert holds_lock(cluster, name, ids[1])
    dog("vm", "snapshot", name, "-s", "after", address=a)
    migrate(cluster, name, ids[0])
    assert runtime(cluster, name)["node"] == ids[0]
    more_rounds(nbd_guest.run_root, name)
    text = nbd_guest.console()
    assert not failures(text), failures(text)


def test_a_migration_called_off_leaves_the_vm_running_at_its_source_with_its_lock(
        cluster: Cluster, nbd_guest: Guest) -> None:
    ids, name, a = node_ids(cluster), nbd_guest.name, cluster.address
    before = runtime(cluster, name)
    assert before["node"] == ids[0]
    incoming = nbd_guest.run_root / f"{name}.{ids[1][:8]}" / "qemu.pid"
    old_pid = incoming.read_text() if incoming.exists() else ""  # an earlier migration's
    # slow enough to be caught in the middle; the destination's QEMU dies there
    proc = subprocess.Popen([str(BIN / "dog"), "vm", "migrate", name, "--to", ids[1],
                             "--bandwidth", "1M", "-a", a], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def new_qemu() -> int:
        text = incoming.read_text() if incoming.exists() else ""
        return int(text) if text and text != old_pid and Path(f"/proc/{int(text)}").exists() \
            else 0

    pid = wait_until(new_qemu, 60, "the destination's QEMU")
    time.sleep(2)  # into the migration
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=MIGRATE_TIMEOUT)
    assert proc.returncode != 0
    assert "dog: " in err and "migrat" in err
    rt = runtime(cluster, name)
    assert (rt["node"], rt["pid"], rt["state"]) == (ids[0], before["pid"], "running")
    more_rounds(nbd_guest.run_root, name)
    assert holds_lock(cluster, name, ids[0])
    assert not failures(nbd_guest.console())


def test_the_guests_bytes_are_all_right_after_its_migrations(
        cluster: Cluster, nbd_guest: Guest, tmp_path: Path) -> None:
    last = nbd_guest.finish()
    assert not failures(nbd_guest.console())
    nbd_guest.check_disk(last, tmp_path)


def test_a_vm_migrates_to_another_node_and_back_under_writes_over_iscsi(
        cluster: Cluster, run_root: Path, tmp_path: Path) -> None:
    guest = Guest(cluster, run_root, "mig-iscsi", "iscsi")
    ids = node_ids(cluster)
    try:
        migrate(cluster, guest.name, ids[1])
        assert runtime(cluster, guest.name)["node"] == ids[1]
        more_rounds(run_root, guest.name)
        migrate(cluster, guest.name, ids[0])
        assert runtime(cluster, guest.name)["node"] == ids[0]
        more_rounds(run_root, guest.name)
        last = guest.finish()
    finally:
        dog("vm", "stop", guest.name, "--timeout", "1", address=cluster.address, check=False)
    assert not failures(guest.console()), failures(guest.console())
    guest.check_disk(last, tmp_path)


def test_an_unknown_destination_or_a_stopped_vm_is_a_one_line_error(cluster: Cluster) -> None:
    assert "no live node has id 'nosuchnode'" in dog_error(
        "vm", "migrate", "mig-nbd", "--to", "nosuchnode", address=cluster.address)
    assert "is not running" in dog_error(
        "vm", "migrate", "mig-nbd", "--to", node_ids(cluster)[1], address=cluster.address)
