"""`dog` against a real cluster: Sheepdog's command names, --json, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

from sheep.etcd_server import EtcdServer
from sheep.units import parse_size

from ..cluster import Cluster, dog, dog_json, free_port


def test_cluster_format_sets_copies_and_object_size(empty_cluster: Cluster) -> None:
    empty_cluster.add_node()
    reply = empty_cluster.format(1, "--object-size", "1M")
    assert reply["copies"] == 1
    assert int(reply["object_size"]) == 1 << 20
    assert reply["status"] == "running"


def test_cluster_format_twice_is_refused(cluster: Cluster) -> None:
    proc = dog("cluster", "format", "--copies", "2", address=cluster.address, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "dog: the cluster is already formatted"


def test_cluster_format_rejects_bad_copies_and_object_sizes(empty_cluster: Cluster) -> None:
    empty_cluster.add_node()
    for args in (["--copies", "0"], ["--copies", "99"], ["--object-size", "3M"],
                 ["--object-size", "1K"], ["--object-size", "lots"]):
        proc = dog("cluster", "format", *args, address=empty_cluster.address, check=False)
        assert proc.returncode == 1, args
        assert proc.stderr.startswith("dog: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert dog_json("cluster", "info", address=empty_cluster.address)["status"] == (
        "waiting for format"
    )


def test_cluster_info_shows_status_copies_and_epoch_history(cluster: Cluster) -> None:
    info = cluster.info()
    assert info["status"] == "running"
    assert info["copies"] == 3
    assert int(info["object_size"]) == 4 << 20
    epochs = [e["epoch"] for e in info["history"]]
    assert epochs == sorted(epochs) and epochs[-1] == info["epoch"]
    assert len(info["history"][-1]["nodes"]) == 3
    text = dog("cluster", "info", address=cluster.address).stdout
    assert "Cluster status: running" in text and "Copies: 3" in text


def test_cluster_info_says_degraded_when_fewer_nodes_than_copies(cluster: Cluster) -> None:
    cluster.nodes[2].stop()
    cluster.wait_members(2)
    assert cluster.info()["status"] == "degraded"


def test_node_list_shows_every_node_with_address_zone_vnodes_and_space(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    c = Cluster(tmp_path / "z", etcd.url)
    try:
        for zone in ("a", "b", "c"):
            c.add_node("--zone", zone)
        c.wait_members(3)
        nodes = c.node_list()
        assert len(nodes) == 3
        assert sorted(n["node"]["zone"] for n in nodes) == ["a", "b", "c"]
        ports = {n["node"]["control_port"] for n in nodes}
        assert ports == {node.port for node in c.nodes}
        for n in nodes:
            assert n["reachable"] is True
            assert n["node"]["vnodes"] > 0
            assert int(n["free"]) > 0
            assert n["node"]["host"] == "127.0.0.1" and n["node"]["data_port"] > 0
        table = dog("node", "list", address=c.address).stdout.splitlines()
        assert table[0].split()[:4] == ["Idx", "Id", "Control", "Data"] and len(table) == 4
    finally:
        c.stop()


def test_every_node_answers_the_same_node_list(cluster: Cluster) -> None:
    views = [
        sorted(n["node"]["id"] for n in dog_json("node", "list", address=node.address)["nodes"])
        for node in cluster.nodes
    ]
    assert views[0] == views[1] == views[2]


def test_node_info_totals_space(cluster: Cluster) -> None:
    lines = dog("node", "info", address=cluster.address).stdout.splitlines()
    assert lines[0].split() == ["Id", "Size", "Used", "Avail", "Use%", "Objects"]
    assert lines[-1].startswith("Total")
    assert len(lines) == 5


def test_node_info_counts_a_filesystem_that_nodes_share_once(cluster: Cluster) -> None:
    """The test's three nodes keep their data dirs on one filesystem: its free space is
    there once, not three times."""
    a = cluster.address
    nodes = dog_json("node", "info", address=a)["nodes"]
    assert len({n["filesystem"] for n in nodes}) == 1 and nodes[0]["filesystem"]
    st = os.statvfs(cluster.nodes[0].dir)
    free = st.f_bavail * st.f_frsize
    total = dog("node", "info", address=a).stdout.splitlines()[-1].split()
    # Total, then size, used and avail as "N UNIT", then use%: avail is one filesystem's
    # free space, give or take what was written between the two looks
    avail = float(total[5]) * parse_size("1" + total[6])
    assert abs(avail - free) < free // 50, (total, free)


def test_dog_uses_sheep_address_from_the_environment(cluster: Cluster) -> None:
    import os
    import subprocess

    from ..cluster import BIN

    env = dict(os.environ, SHEEP_ADDRESS=cluster.address)
    proc = subprocess.run([str(BIN / "dog"), "node", "list", "--json"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_dog_says_clearly_when_no_node_answers(tmp_path: Path) -> None:
    proc = dog("cluster", "info", address=f"127.0.0.1:{free_port()}", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("dog: cannot reach sheep at 127.0.0.1:")


def test_a_two_zone_cluster_keeps_copies_in_distinct_zones(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    import asyncio

    from sheep.oid import data_oid

    from ..cluster import object_client

    c = Cluster(tmp_path / "zz", etcd.url)
    try:
        for zone in ("a", "a", "b", "b"):
            c.add_node("--zone", zone)
        c.wait_members(4)
        c.format(2)

        async def check() -> None:
            async with object_client(c.etcd_url) as client:
                for i in range(50):
                    zones = {n.zone for n in client.replicas(data_oid(3, i))}
                    assert zones == {"a", "b"}

        asyncio.run(check())
    finally:
        c.stop()
