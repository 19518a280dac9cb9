"""A VM hosted by a node of a secure cluster (qemu_driver/host.py): dog, with the admin's
certificate, asks node 1 through node 0; node 1 runs QEMU, whose NBD client shows the
gateway (`--nbd-tls require`) node 1's own certificate; nothing of dog's but the
request reaches the node.

Then it migrates live to node 0, the VM's memory under mutual TLS between the nodes' QEMUs.

A 2-node cluster (copies=2) with its own CA and private https etcd, each node an NBD
gateway requiring TLS; the small guest under TCG; one test, the whole life of one VM.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_driver.guest import POWER_OFF_MARKER, guest_artifacts, job_append
from sheep.localcluster import LocalCluster, free_port

from ..cluster import dog, reap_leftovers, wait_until

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 60
JOB = """set -e
mke2fs -q /dev/vda
echo "sheep-test: running"
while true; do sleep 1; done
"""


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    ports = [free_port(), free_port()]  # each node's NBD gateway: its VMs' disks'
    c = LocalCluster(tmp_path_factory.mktemp("vmhost-tls") / "cluster", 2, secure=True,
                     node_extra=lambda i: ["--nbd-port", str(ports[i]), "--nbd-tls",
                                           "require"])
    try:
        c.up(copies=2)
        c.write_dog_config()
        yield c
    finally:
        c.stop()


def test_a_vm_hosted_by_a_node_shows_the_tls_gateway_that_nodes_certificate(
        secure: LocalCluster, tmp_path: Path) -> None:
    assert secure.pki is not None
    env = {"SHEEP_CONFIG": str(secure.root / "dog.conf")}
    a = secure.nodes[0].address

    def run(*args: str) -> str:
        return dog(*args, address=a, env=env).stdout

    on = next(s["node"]["id"] for s in json.loads(run("node", "list", "--json"))["nodes"]
              if s["node"]["control_port"] == secure.nodes[1].port)
    guest = guest_artifacts()
    run("vdi", "create", "tls-hosted", "64M")
    run("vm", "create", "tls-hosted", "--vdi", "tls-hosted", "--kernel", str(guest.kernel),
        "--initrd", str(guest.initrd), "--append", job_append(JOB))
    root = tmp_path / "vms"
    try:
        rt = json.loads(run("vm", "start", "tls-hosted", "--on", on, "--run-dir", str(root),
                            "--json"))
        assert rt["node"] == on
        assert (rt["gateway"]["tls_mode"], rt["gateway"]["tls"]) == ("require", True)
        log = root / "tls-hosted" / "console.log"
        wait_until(lambda: log.exists() and "sheep-test: running" in log.read_text(
            errors="replace"), BOOT_TIMEOUT, "the guest running over TLS")
        shown = (root / "tls-hosted" / "tls" / "client-cert.pem").read_bytes()
        assert shown == secure.pki.node(1).cert.read_bytes()
        # a live migration to node 0: the destination QEMU admits only a node's
        # certificate under TLS, so a plain or a client's stream would fail; the
        # certificates' copies are gone once QEMU read them
        back = next(s["node"]["id"] for s in json.loads(run("node", "list", "--json"))["nodes"]
                    if s["node"]["control_port"] == secure.nodes[0].port)
        moved = json.loads(run("vm", "migrate", "tls-hosted", "--to", back, "--json"))
        assert moved["to"] == back and moved["runtime"]["state"] == "running"
        assert not list(root.glob("*/migration-tls"))
        log = Path(moved["runtime"]["console_log"])
        stopped = json.loads(run("vm", "stop", "tls-hosted", "--timeout", "30", "--json"))
        assert stopped["how"] == "powered off"
        assert POWER_OFF_MARKER in log.read_text(errors="replace")
    finally:
        dog("vm", "stop", "tls-hosted", "--timeout", "1", address=a, env=env, check=False)
        assert not reap_leftovers(str(root))
