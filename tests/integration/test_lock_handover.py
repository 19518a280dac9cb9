"""A VDI's write lock handed from one node's gateway to another's at a live migration
(sheep/vdi/handover.py, sheep/gateway/pending.py, ExportTable.find), without QEMU: a raw NBD
client writing through node 0's gateway plays the migration's source, another through node
1's gateway its destination, and the test plays the destination's supervisor, offering the
handover on a lease of its own, marking it ready at the "switch-over", or calling it off.

A 2-node cluster (copies=2), each node an NBD gateway; every test works on a VDI of its
own, which the source holds open for writing all along.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.state import EtcdTarget
from sheep.etcd_server import EtcdServer
from sheep.vdi import handover
from sheep.vdi.registry import Handover, VdiRegistry

from ..cluster import Cluster, dog, dog_bytes, dog_json, start_cluster, wait_until
from .test_nbd import EPERM, NbdClient, NbdError

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
LEASE_TTL = 10  # s, as a VM supervisor's (qemu_driver/supervisor.py)
T = TypeVar("T")


@dataclass(frozen=True)
class Gateway:
    node: str  # the node's id
    nbd_port: int

    def url(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{export}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("handover") / "cluster", etcd.url, nodes=2,
                      copies=2, nbd=True, every_node_gateway=True)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def gateways(cluster: Cluster) -> list[Gateway]:
    """The NBD gateways of cluster.nodes, in order, as the nodes publish them."""

    async def published() -> list[Gateway]:
        etcd = EtcdCluster(EtcdTarget.parse(cluster.etcd_url))
        await etcd.connect()
        try:
            nodes = {n.control_port: n for n in await etcd.live_nodes()}
        finally:
            await etcd.close()
        return [Gateway(nodes[p.port].node_id, nodes[p.port].nbd_port) for p in cluster.nodes]

    found = asyncio.run(published())
    assert all(g.nbd_port for g in found), found
    return found


@pytest.fixture(autouse=True)
def nodes_stay_healthy(cluster: Cluster) -> Iterator[None]:
    starts = [len(node.log()) for node in cluster.nodes]
    yield
    for node, start in zip(cluster.nodes, starts, strict=True):
        assert node.alive, f"{node.dir.name} died"
        new = node.log()[start:]
        assert "Traceback" not in new, f"{node.dir.name} logged a traceback:\n{new[-5000:]}"


_names = itertools.count()


@pytest.fixture
def vdi(cluster: Cluster) -> str:
    name = f"h{next(_names)}"
    dog("vdi", "create", name, "16M", address=cluster.address)
    return name


@pytest.fixture
def source(gateways: list[Gateway], vdi: str) -> Iterator[NbdClient]:
    """The migration's source: a client writing `vdi` through node 0's gateway, which holds
    its lock from the connection on."""
    with NbdClient(gateways[0].nbd_port, vdi) as client:
        assert not client.read_only
        client.write(0, b"\x0a" * (64 * KiB))
        client.flush()
        yield client


class Supervisor:
    """The destination supervisor's part in a migration (qemu_driver/supervisor.py): a
    lease of its own, kept alive by an event loop in a thread of its own, on which it
    offers the VDI's handover, marks it ready, or calls the migration off (revokes it)."""

    def __init__(self, etcd_url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.etcd = EtcdCluster(EtcdTarget.parse(etcd_url))
        self._run(self.etcd.connect())
        self.registry = VdiRegistry(self.etcd)
        self.lease = self._run(self.etcd.lease(LEASE_TTL))
        self._keepalive = self._run(self._start_keepalive())
        self.offered: dict[str, Handover] = {}
        self.revoked = False

    def _run(self, coro: Coroutine[object, object, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _start_keepalive(self) -> asyncio.Task[None]:
        async def refresh() -> None:
            while True:
                await asyncio.sleep(LEASE_TTL / 4)
                await self.lease.refresh()

        return asyncio.ensure_future(refresh())

    def offer(self, vdi: str, node: str) -> None:
        self.offered[vdi] = self._run(handover.offer(self.registry, vdi, node, "vm-test",
                                                     self.lease))

    def make_ready(self, vdi: str) -> None:
        self._run(handover.make_ready(self.registry, vdi, self.offered[vdi], self.lease))

    def call_off(self) -> None:
        """The migration failed: the lease goes, and the handovers with it."""
        self._keepalive.cancel()
        self._run(self.lease.revoke())
        self.revoked = True

    def close(self) -> None:
        self._keepalive.cancel()
        if not self.revoked:
            with contextlib.suppress(Exception):
                self._run(self.lease.revoke())
        self._run(self.etcd.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def supervisor(cluster: Cluster) -> Iterator[Supervisor]:
    sup = Supervisor(cluster.etcd_url)
    yield sup
    sup.close()


def lock_holder(cluster: Cluster, vdi: str) -> str:
    """The holder `dog vdi lock list` names for `vdi`'s lock ("" when unlocked)."""
    locks = dog_json("vdi", "lock", "list", address=cluster.address).get("locks", [])
    return next((lk["holder"] for lk in locks if lk["name"] == vdi), "")


def gateway_of(gw: Gateway) -> str:
    """How a lock held by `gw`'s node's gateway names its holder (node/daemon.py)."""
    return f"the gateway of sheep node {gw.node[:8]}"


def nbdinfo(url: str, cwd: Path) -> dict:
    proc = subprocess.run(["nbdinfo", "--json", url], capture_output=True, text=True,
                          timeout=60, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    (export,) = json.loads(proc.stdout)["exports"]
    return export


def refused_write(client: NbdClient, offset: int, data: bytes) -> int:
    """The errno of a write that must fail."""
    with pytest.raises(NbdError) as err:
        client.write(offset, data)
    return err.value.errno


# -- offered ----------------------------------------------------------------------------------


def test_a_vdi_handed_over_to_this_node_is_offered_writable_while_the_source_keeps_its_lock(
        cluster: Cluster, gateways: list[Gateway], vdi: str, source: NbdClient,
        supervisor: Supervisor, tmp_path: Path) -> None:
    src, dst = gateways
    supervisor.offer(vdi, dst.node)
    export = nbdinfo(dst.url(vdi), tmp_path)
    assert export["is_read_only"] is False, export
    assert "migrating here" in export["description"], export
    assert lock_holder(cluster, vdi) == gateway_of(src)
    source.write(0, b"\x0b" * 4096)  # the source writes on


# -- before the switch-over -------------------------------------------------------------------


def test_before_the_switch_over_a_write_at_the_destination_is_refused_and_the_source_writes_on(
        cluster: Cluster, gateways: list[Gateway], vdi: str, source: NbdClient,
        supervisor: Supervisor) -> None:
    src, dst = gateways
    supervisor.offer(vdi, dst.node)
    with NbdClient(dst.nbd_port, vdi) as dest:
        assert not dest.read_only
        assert refused_write(dest, 0, b"\xdd" * 4096) == EPERM
        assert lock_holder(cluster, vdi) == gateway_of(src)
        source.write(0, b"\x0b" * 4096)
        source.flush()
        dest.flush()  # nothing of its own to flush: it takes nothing
        assert lock_holder(cluster, vdi) == gateway_of(src)
    assert dog_bytes("vdi", "read", vdi, "0", "8192", address=cluster.address).stdout == (
        b"\x0b" * 4096 + b"\x0a" * 4096)


def test_before_the_switch_over_the_destination_reads_what_the_source_wrote_last(
        gateways: list[Gateway], vdi: str, source: NbdClient, supervisor: Supervisor) -> None:
    supervisor.offer(vdi, gateways[1].node)
    with NbdClient(gateways[1].nbd_port, vdi) as dest:
        assert dest.read(0, 8192) == b"\x0a" * 8192
        source.write(4096, b"\x0c" * 4096)  # in a block the source wrote already
        source.write(5 * MiB, b"\x0d" * 4096)  # in one it had not
        source.flush()
        assert dest.read(0, 8192) == b"\x0a" * 4096 + b"\x0c" * 4096
        assert dest.read(5 * MiB - 4096, 8192) == bytes(4096) + b"\x0d" * 4096


# -- the switch-over --------------------------------------------------------------------------


def test_after_the_switch_over_the_first_write_at_the_destination_takes_the_lock_over(
        cluster: Cluster, gateways: list[Gateway], vdi: str, source: NbdClient,
        supervisor: Supervisor) -> None:
    src, dst = gateways
    supervisor.offer(vdi, dst.node)
    with NbdClient(dst.nbd_port, vdi) as dest:
        supervisor.make_ready(vdi)
        assert lock_holder(cluster, vdi) == gateway_of(src)  # nothing taken before an I/O
        dest.write(4096, b"\x1d" * 4096)
        assert lock_holder(cluster, vdi) == gateway_of(dst)
        dest.flush()


def test_every_connection_of_the_destination_shares_the_one_takeover(
        cluster: Cluster, gateways: list[Gateway], vdi: str, source: NbdClient,
        supervisor: Supervisor) -> None:
    """A second client of the destination's gateway, before the switch-over (QEMU may open
    a disk twice): pending too, and after the first one's takeover it writes as well."""
    dst = gateways[1]
    supervisor.offer(vdi, dst.node)
    with NbdClient(dst.nbd_port, vdi) as first, NbdClient(dst.nbd_port, vdi) as second:
        assert not second.read_only
        assert refused_write(second, 0, b"\xdd" * 4096) == EPERM
        supervisor.make_ready(vdi)
        first.write(0, b"\x1d" * 4096)
        second.write(4096, b"\x1e" * 4096)
        second.flush()
        assert first.read(0, 8192) == b"\x1d" * 4096 + b"\x1e" * 4096
        assert lock_holder(cluster, vdi) == gateway_of(dst)


def test_after_the_takeover_the_sources_writes_are_refused_and_the_vdi_is_the_destinations(
        cluster: Cluster, gateways: list[Gateway], vdi: str, source: NbdClient,
        supervisor: Supervisor) -> None:
    """Taken over by a read (a resumed guest's first I/O may be one): the destination has
    written nothing yet, and still the nodes refuse the source's writes (fenced)."""
    dst = gateways[1]
    supervisor.offer(vdi, dst.node)
    with NbdClient(dst.nbd_port, vdi) as dest:
        supervisor.make_ready(vdi)
        assert dest.read(0, 4096) == b"\x0a" * 4096
        assert lock_holder(cluster, vdi) == gateway_of(dst)
        refused_write(source, 0, b"\xee" * 4096)  # a block it wrote
        refused_write(source, 9 * MiB, b"\xee" * 4096)  # a block nobody wrote yet
        dest.write(4096, b"\x1d" * 4096)
        dest.flush()
        refused_write(source, 4096, b"\xee" * 4096)
        source.close()  # the source leaves: what it gave up stays the destination's
        dest.write(8192, b"\x1e" * 4096)
        dest.flush()
        expected = b"\x0a" * 4096 + b"\x1d" * 4096 + b"\x1e" * 4096 + b"\x0a" * (52 * KiB)
        assert dest.read(0, 64 * KiB) == expected
        assert lock_holder(cluster, vdi) == gateway_of(dst)
    got = dog_bytes("vdi", "read", vdi, address=cluster.address).stdout
    assert got[: 64 * KiB] == expected
    assert got[64 * KiB :] == bytes(SIZE - 64 * KiB)


def test_a_ready_handover_breaks_only_the_lock_it_was_offered_for(
        cluster: Cluster, gateways: list[Gateway], vdi: str, source: NbdClient,
        supervisor: Supervisor) -> None:
    """The source's writer went and another took the lock after the offer: the handover
    names the old lock's token, so the destination must not break the new one."""
    src, dst = gateways
    supervisor.offer(vdi, dst.node)
    with NbdClient(dst.nbd_port, vdi) as dest:
        source.close()
        wait_until(lambda: not lock_holder(cluster, vdi), 10, "the source to let go")
        with NbdClient(src.nbd_port, vdi) as writer:  # a new lock, a new token
            assert not writer.read_only
            supervisor.make_ready(vdi)
            assert refused_write(dest, 0, b"\xdd" * 4096) == EPERM
            assert lock_holder(cluster, vdi) == gateway_of(src)
            writer.write(0, b"\x0b" * 4096)
            writer.flush()
    assert dog_bytes("vdi", "read", vdi, "0", "8192", address=cluster.address).stdout == (
        b"\x0b" * 4096 + b"\x0a" * 4096)


# -- no handover to this node -----------------------------------------------------------------


def test_a_handover_to_another_node_leaves_this_node_a_reader(
        cluster: Cluster, gateways: list[Gateway], vdi: str, source: NbdClient,
        supervisor: Supervisor, tmp_path: Path) -> None:
    src, dst = gateways
    supervisor.offer(vdi, "f" * 32)
    supervisor.make_ready(vdi)
    export = nbdinfo(dst.url(vdi), tmp_path)
    assert export["is_read_only"] is True, export
    assert "migrating here" not in export["description"], export
    with NbdClient(dst.nbd_port, vdi) as dest:
        assert dest.read_only
        assert refused_write(dest, 0, b"\xdd" * 4096) == EPERM
    assert lock_holder(cluster, vdi) == gateway_of(src)
    source.write(0, b"\x0b" * 4096)


def test_a_called_off_handover_lets_the_destination_take_nothing(
        cluster: Cluster, gateways: list[Gateway], vdi: str, source: NbdClient,
        supervisor: Supervisor, tmp_path: Path) -> None:
    src, dst = gateways
    supervisor.offer(vdi, dst.node)
    with NbdClient(dst.nbd_port, vdi) as dest:  # connected while it was offered
        assert not dest.read_only
        supervisor.make_ready(vdi)
        supervisor.call_off()  # the lease goes, the ready handover with it
        assert refused_write(dest, 0, b"\xdd" * 4096) == EPERM
        assert lock_holder(cluster, vdi) == gateway_of(src)
        source.write(0, b"\x0b" * 4096)
        source.flush()
    with NbdClient(dst.nbd_port, vdi) as late:
        assert late.read_only
    assert dog_bytes("vdi", "read", vdi, "0", "8192", address=cluster.address).stdout == (
        b"\x0b" * 4096 + b"\x0a" * 4096)


def test_after_a_called_off_handover_a_new_client_is_a_reader_while_the_destination_lingers(
        cluster: Cluster, gateways: list[Gateway], vdi: str, source: NbdClient,
        supervisor: Supervisor, tmp_path: Path) -> None:
    """The destination's connection (its volume never took the lock over) does not make
    this gateway a holder of the lock: a client arriving after the call-off is a reader."""
    dst = gateways[1]
    supervisor.offer(vdi, dst.node)
    with NbdClient(dst.nbd_port, vdi) as dest:
        assert not dest.read_only
        supervisor.call_off()
        assert nbdinfo(dst.url(vdi), tmp_path)["is_read_only"] is True
        with NbdClient(dst.nbd_port, vdi) as late:
            assert late.read_only
            assert late.read(0, 4096) == b"\x0a" * 4096


def test_after_the_takeover_a_new_client_of_the_source_is_a_reader_while_the_source_lingers(
        cluster: Cluster, gateways: list[Gateway], vdi: str, source: NbdClient,
        supervisor: Supervisor, tmp_path: Path) -> None:
    """The source's connection (its volume's lock taken over, seen at its refused write)
    does not make its gateway a holder any more: a client arriving there is a reader."""
    src, dst = gateways
    supervisor.offer(vdi, dst.node)
    with NbdClient(dst.nbd_port, vdi) as dest:
        supervisor.make_ready(vdi)
        dest.write(0, b"\x2b" * 4096)
        dest.flush()
        refused_write(source, 0, b"\xee" * 4096)
        assert nbdinfo(src.url(vdi), tmp_path)["is_read_only"] is True
        with NbdClient(src.nbd_port, vdi) as late:
            assert late.read_only
            assert late.read(0, 4096) == b"\x2b" * 4096
