"""VMs hosted by sheep nodes (qemu_driver/host.py): `dog vm start --on NODE` asks that node to
run the VM (without --on, the least loaded node), and dog, talking to another node, drives
it through the node that hosts it.

A 2-node cluster (copies=2), node 0 the NBD gateway; one guest serves the module, started on
node 1 by a dog talking to node 0, and the tests run in file order: it is stopped last. The
starts that only look at where and how QEMU runs use a VM with nothing to boot (its firmware
finds an empty disk and waits), stopped at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_driver.accel import OVERRIDE
from qemu_driver.guest import (
    POWER_OFF_MARKER,
    READY_MARKER,
    GuestImage,
    guest_artifacts,
    job_append,
)
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

BOOT_TIMEOUT = 60  # s, the accelerator probe of a fresh node included, on 2 loaded cores
NAME = "hosted"
JOB = """set -e
mke2fs -q /dev/vda
echo "sheep-test: running"
read -r line </dev/console
echo "sheep-test: typed $line"
while true; do sleep 1; done
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("vmhost") / "cluster", etcd.url, nodes=2,
                      copies=2, nbd=True)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("vms")
    yield root
    left = reap_leftovers(str(root))
    assert not left, f"processes outlived the module: {left}"


def node_id(cluster: Cluster, i: int) -> str:
    """The id of cluster.nodes[i], as `dog node list --json` gives it."""
    port = cluster.nodes[i].port
    return next(s["node"]["id"] for s in cluster.node_list()
                if s["node"]["control_port"] == port)


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def console(run_root: Path) -> str:
    path = run_root / NAME / "console.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def hosted(cluster: Cluster, run_root: Path) -> Iterator[dict]:
    """The VM's runtime record, once its guest runs: started on node 1 through node 0."""
    guest: GuestImage = guest_artifacts()
    a = cluster.nodes[0].address
    dog("vdi", "create", NAME, "64M", address=a)
    dog("vm", "create", NAME, "--vdi", NAME, "--kernel", str(guest.kernel), "--initrd",
        str(guest.initrd), "--append", job_append(JOB), address=a)
    rt = dog_json("vm", "start", NAME, "--on", node_id(cluster, 1), "--run-dir",
                  str(run_root), address=a)
    try:
        wait_until(lambda: "sheep-test: running" in console(run_root), BOOT_TIMEOUT,
                   f"{NAME}'s guest running")
        yield rt
    finally:
        dog("vm", "stop", NAME, "--timeout", "1", address=a, check=False)


@pytest.fixture(scope="module")
def bootless(cluster: Cluster) -> str:
    """A VM whose QEMU runs as soon as it starts: no kernel, an empty disk."""
    a = cluster.nodes[0].address
    dog("vdi", "create", "bootless", "16M", address=a)
    dog("vm", "create", "bootless", "--vdi", "bootless", address=a)
    return "bootless"


@pytest.fixture
def quick(cluster: Cluster, bootless: str) -> Iterator[str]:
    """`bootless`, stopped after the test (QEMU told to quit: no guest heeds the button)."""
    yield bootless
    dog("vm", "stop", bootless, "--timeout", "0.1", address=cluster.nodes[0].address,
        check=False)


def test_a_start_on_an_unknown_node_is_a_one_line_error(cluster: Cluster) -> None:
    assert "no live node has id 'nosuchnode'" in dog_error(
        "vm", "start", "anything", "--on", "nosuchnode", address=cluster.address)


def test_a_vm_started_on_a_node_is_run_by_that_nodes_process(
        cluster: Cluster, hosted: dict) -> None:
    assert hosted["node"] == node_id(cluster, 1)
    # the supervisor keeping QEMU company is node 1's child: node 1 started it, not dog
    assert parent(hosted["supervisor"]) == cluster.nodes[1].proc.pid


def test_a_vm_started_without_on_runs_on_the_least_loaded_node(
        cluster: Cluster, hosted: dict, quick: str, run_root: Path) -> None:
    """Node 1 hosts a VM, node 0 none: node 0 runs it, although dog talks to node 1 (the
    node dog talks to only wins among equals)."""
    rt = dog_json("vm", "start", quick, "--run-dir", str(run_root),
                  address=cluster.nodes[1].address)
    assert rt["node"] == node_id(cluster, 0)
    assert parent(rt["supervisor"]) == cluster.nodes[0].proc.pid


def test_the_accelerator_dog_forces_is_the_one_the_node_runs_the_vm_under(
        cluster: Cluster, quick: str, run_root: Path) -> None:
    """The one test here that forces an accelerator: dog's SHEEP_VM_ACCEL goes with the
    start, and wins over the node's own choice (its environment has none: it would probe)."""
    out = dog("vm", "start", quick, "--on", node_id(cluster, 0), "--run-dir", str(run_root),
              "--json", address=cluster.nodes[0].address, env={OVERRIDE: "tcg"}).stdout
    rt = json.loads(out)
    assert rt["node"] == node_id(cluster, 0)
    assert (rt["accel"], rt["accel_reason"]) == (
        "tcg", f"forced by {OVERRIDE}=tcg given to dog vm start")
    cmdline = Path(f"/proc/{rt['pid']}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"-accel") + 1] == b"tcg"


def test_list_and_info_show_the_node_hosting_the_vm(cluster: Cluster, hosted: dict) -> None:
    a = cluster.nodes[0].address
    listed = next(v for v in dog_json("vm", "list", address=a)["vms"] if v["name"] == NAME)
    assert listed["runtime"]["node"] == hosted["node"]
    table = dog("vm", "list", address=a).stdout.splitlines()
    assert table[0].split()[:4] == ["Name", "State", "Node", "Host"]
    assert next(r for r in table if r.startswith(NAME)).split()[2] == hosted["node"][:12]
    assert f"Node: {hosted['node']}" in dog("vm", "info", NAME, address=a).stdout


def test_the_console_through_another_node_shows_the_guest_and_takes_keystrokes(
        cluster: Cluster, hosted: dict, run_root: Path) -> None:
    proc = subprocess.Popen([str(BIN / "dog"), "vm", "console", NAME, "-a",
                             cluster.nodes[0].address], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = bytearray()

    def read() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # the log's tail comes first, from node 1
        wait_until(lambda: b"sheep-test: running" in seen, 20, "the console's tail")
        assert proc.stdin is not None
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        # the guest read the line typed on dog's stdin, and its answer came back live
        wait_until(lambda: b"sheep-test: typed hello" in seen, 20, "the guest's answer")
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=20)
    reader.join(timeout=5)
    assert proc.returncode == 0, proc.stderr.read()  # type: ignore[union-attr]
    assert READY_MARKER in console(run_root)
    # node 1 relayed it (the console socket is reachable here too: same machine)
    assert f"vm {NAME}: console attached" in cluster.nodes[1].log()


def test_a_vdi_hot_plugged_through_another_node_reaches_the_guest_and_leaves_it(
        cluster: Cluster, hosted: dict) -> None:
    a = cluster.nodes[0].address
    dog("vdi", "create", "extra", "64M", address=a)

    def files() -> list[str]:  # node 1 asks QEMU
        return [b["file"] for b in dog_json("vm", "info", NAME, address=a)["block"]]

    dog("vm", "attach", NAME, "extra", address=a)
    assert cluster.nbd_url("extra") in files()
    dog("vm", "detach", NAME, "extra", address=a)
    assert cluster.nbd_url("extra") not in files()
    assert f"vm {NAME}: attach done" in cluster.nodes[1].log()


def test_a_snapshot_through_another_node_is_taken_with_the_guest_frozen(
        cluster: Cluster, hosted: dict) -> None:
    taken = dog_json("vm", "snapshot", NAME, "-s", "hosted-snap",
                     address=cluster.nodes[0].address)
    assert taken["method"] == "guest filesystems frozen"
    assert [(s["name"], s["tag"]) for s in taken["snapshots"]] == [(NAME, "hosted-snap")]
    assert f"vm {NAME}: snapshot done" in cluster.nodes[1].log()


def test_pause_and_resume_through_another_node_reach_the_vms_qemu(
        cluster: Cluster, hosted: dict) -> None:
    a = cluster.nodes[0].address
    dog("vm", "pause", NAME, address=a)
    # info asks node 1, which asks QEMU itself
    assert dog_json("vm", "info", NAME, address=a)["state"] == "paused"
    dog("vm", "resume", NAME, address=a)
    assert dog_json("vm", "info", NAME, address=a)["state"] == "running"
    assert f"vm {NAME}: pause done" in cluster.nodes[1].log()


def test_the_vm_outlives_its_nodes_process_and_obeys_it_again_once_it_is_back(
        cluster: Cluster, hosted: dict) -> None:
    a, host = cluster.nodes[0].address, cluster.nodes[1]
    host.kill(signal.SIGKILL)
    # QEMU and its supervisor run on (sessions of their own); the cluster says where
    assert Path(f"/proc/{hosted['pid']}").exists()
    assert Path(f"/proc/{hosted['supervisor']}").exists()
    listed = next(v for v in dog_json("vm", "list", address=a)["vms"] if v["name"] == NAME)
    assert listed["runtime"]["node"] == hosted["node"]
    # whether node 1's membership has expired yet or not, dog says which node is missing
    error = dog_error("vm", "pause", NAME, address=a)
    assert f"runs on node {hosted['node'][:12]}" in error
    assert "not up" in error or "does not answer" in error
    assert dog_json("vm", "info", NAME, address=a)["state"] == "running"  # the record's word
    host.start()
    host.wait_up()
    dog("vm", "pause", NAME, address=a)
    dog("vm", "resume", NAME, address=a)
    # the restarted process (same data dir, so the same node id) did it
    assert f"vm {NAME}: resume done" in host.log()[host.log_start:]


def test_stop_through_another_node_powers_the_guest_off_on_its_host(
        cluster: Cluster, hosted: dict, run_root: Path) -> None:
    a = cluster.nodes[0].address
    assert dog_json("vm", "stop", NAME, "--timeout", "30", address=a)["how"] == "powered off"
    assert POWER_OFF_MARKER in console(run_root)
    listed = next(v for v in dog_json("vm", "list", address=a)["vms"] if v["name"] == NAME)
    assert listed["state"] == "stopped" and listed["runtime"] is None
    assert listed["last_exit"]["node"] == hosted["node"]
    assert f"vm {NAME}: stop done" in cluster.nodes[1].log()


def test_the_console_log_of_the_stopped_vm_comes_from_the_node_that_ran_it(
        cluster: Cluster, hosted: dict, run_root: Path) -> None:
    out = dog("vm", "console", NAME, "--log", address=cluster.nodes[0].address).stdout
    assert out == console(run_root) and POWER_OFF_MARKER in out
    assert f"vm {NAME}: console log read" in cluster.nodes[1].log()
