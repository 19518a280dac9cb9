"""`dog cluster gc`: what deleted VDIs left on a node that was down at the delete.

The node comes back with its copies, recovery spreads them again (it cannot tell them from
replicas the others lost), and only the collection, which knows the deleted VDI ids, takes
them away, never an object a live VDI still references.
"""

from __future__ import annotations

import random
import signal

import pytest

from sheep.oid import ObjType, oid_type, oid_vdi

from ..cluster import Cluster, all_objects_on_disk, dog, dog_bytes, dog_json, wait_healthy

pytestmark = pytest.mark.slow

MiB = 1 << 20


def _vdi_id(cluster: Cluster, name: str) -> int:
    return dog_json("vdi", "info", name, address=cluster.address)["id"]


def _objects_of(cluster: Cluster, vdi_id: int) -> set[int]:
    return {oid for oid in all_objects_on_disk(cluster)
            if oid_vdi(oid) == vdi_id and oid_type(oid) in (ObjType.DATA, ObjType.INODE)}


@pytest.fixture
def leaked(cluster: Cluster) -> tuple[Cluster, dict[str, int], bytes]:
    """Two families deleted while node 2 was down: "doomed" (nothing shares it) and
    "parent" (its snapshot lives on in "child", a clone). Node 2 is back and recovered."""
    data = random.Random(5).randbytes(12 * MiB)
    for name in ("doomed", "parent"):
        dog("vdi", "create", name, "16M", address=cluster.address)
        dog_bytes("vdi", "write", name, "0", input=data, address=cluster.address)
    dog("vdi", "snapshot", "parent", "-s", "base", address=cluster.address)
    dog("vdi", "clone", "parent@base", "child", address=cluster.address)
    ids = {name: _vdi_id(cluster, name) for name in ("doomed", "parent")}
    ids["base"] = dog_json("vdi", "info", "parent", "-s", "base", address=cluster.address)["id"]

    down = cluster.nodes[2]
    down.kill(signal.SIGKILL)
    cluster.wait_members(2, timeout=30)
    dog("vdi", "delete", "doomed", address=cluster.address)
    dog("vdi", "delete", "parent", "-s", "base", address=cluster.address)
    dog("vdi", "delete", "parent", address=cluster.address)
    down.start().wait_up()
    cluster.wait_members(3)
    wait_healthy(cluster, 60)
    return cluster, ids, data


def test_objects_of_vdis_deleted_while_a_node_was_down_come_back_with_it(leaked) -> None:
    cluster, ids, _ = leaked
    assert _objects_of(cluster, ids["doomed"]), "nothing leaked: the test cannot show gc works"


def test_gc_removes_them_and_keeps_every_object_a_clone_still_references(leaked) -> None:
    cluster, ids, data = leaked
    shared = {oid for oid in _objects_of(cluster, ids["base"]) if oid_type(oid) == ObjType.DATA}
    assert shared, "the clone shares no object of the deleted snapshot"
    report = dog_json("cluster", "gc", address=cluster.address)
    assert report["removed"] == len(report["garbage"]) > 0
    assert _objects_of(cluster, ids["doomed"]) == set()
    assert _objects_of(cluster, ids["parent"]) == set()
    assert {oid for oid in _objects_of(cluster, ids["base"])
            if oid_type(oid) == ObjType.DATA} == shared  # only its inode went
    assert dog_bytes("vdi", "read", "child", "0", str(len(data)),
                     address=cluster.address).stdout == data
    dog("vdi", "check", "child", address=cluster.address)
    again = dog_json("cluster", "gc", address=cluster.address)
    assert again["garbage"] == [] and again["removed"] == 0


def test_gc_dry_run_lists_the_garbage_and_removes_nothing(leaked) -> None:
    cluster, ids, _ = leaked
    before = all_objects_on_disk(cluster)
    report = dog_json("cluster", "gc", "--dry-run", address=cluster.address)
    assert report["dry_run"] and report["removed"] == 0
    assert {int(oid, 16) for oid in report["garbage"]} >= _objects_of(cluster, ids["doomed"])
    assert all_objects_on_disk(cluster) == before


def test_gc_prints_a_summary_per_deleted_vdi_and_objects_only_when_verbose(leaked) -> None:
    cluster, ids, _ = leaked
    out = dog("cluster", "gc", "--dry-run", address=cluster.address).stdout
    assert f"deleted VDI {ids['doomed']:#x}:" in out
    assert "nothing removed (--dry-run)" in out and "object(s) scanned" in out
    assert "unreferenced" not in out
    verbose = dog("cluster", "gc", "--dry-run", "-v", address=cluster.address).stdout
    assert "unreferenced" in verbose
