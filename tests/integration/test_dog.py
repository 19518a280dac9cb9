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


def test_cluster_format_refuses_more_copies_than_a_vdi_can_use(empty_cluster: Cluster
                                                               ) -> None:
    # an object id carries copies in 4 bits: 16 was accepted, and every dog vdi create
    # without -c then failed
    empty_cluster.add_node()
    proc = dog("cluster", "format", "--copies", "16", address=empty_cluster.address,
               check=False)
    assert proc.returncode == 1 and "copies must be 1..15" in proc.stderr, proc.stderr


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


def test_dog_exits_quietly_when_its_stdout_pipe_is_already_closed(cluster: Cluster) -> None:
    """`dog node list | head -0`: the reader is gone before dog writes its first line."""
    import os
    import subprocess

    from ..cluster import BIN

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([str(BIN / "dog"), "node", "list", "-a", cluster.address],
                              stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert proc.stderr == b""
    assert proc.returncode == 141  # 128 + SIGPIPE, as coreutils end


def test_dog_vdi_read_into_head_stops_quietly_when_head_has_its_line(cluster: Cluster) -> None:
    """`dog vdi read d | head -c 4096`: the pipe closes while dog still has 8 MiB to write."""
    import subprocess

    from ..cluster import BIN

    dog("vdi", "create", "d", "8M", address=cluster.address)
    proc = subprocess.Popen([str(BIN / "dog"), "vdi", "read", "d", "-a", cluster.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert len(proc.stdout.read(4096)) == 4096
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(60)
    finally:
        proc.kill()
        proc.wait(10)
    assert err == b""
    assert proc.returncode == 141


def test_sheep_run_names_a_data_dir_it_cannot_create_in_one_line(tmp_path: Path) -> None:
    import subprocess

    from ..cluster import BIN

    proc = subprocess.run([str(BIN / "sheep"), "run", "--dir", "/proc/no-such/node",
                           "--port", str(free_port()), "--etcd", "http://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == "sheep: /proc/no-such: No such file or directory\n"


def test_node_and_cluster_json_give_sizes_counts_and_times_as_numbers(cluster: Cluster) -> None:
    """One --json convention: integers (64-bit ones too) are JSON numbers, times are epoch
    seconds as numbers; proto3's JSON mapping would make uint64 fields strings."""
    a = cluster.address
    info = dog_json("cluster", "info", address=a)
    assert type(info["object_size"]) is int and info["object_size"] == 4 << 20
    assert type(info["copies"]) is int and type(info["epoch"]) is int
    assert isinstance(info["created"], float) and info["created"] > 1.7e9
    for epoch in info["history"]:
        assert type(epoch["epoch"]) is int and isinstance(epoch["time"], float)
    for cmd in ("list", "info"):
        for n in dog_json("node", cmd, address=a)["nodes"]:
            for key in ("used", "free", "objects", "epoch"):
                assert type(n[key]) is int, (cmd, key, n[key])
            assert type(n["node"]["capacity"]) is int and type(n["node"]["vnodes"]) is int
            for key in ("done", "total", "throttle"):
                assert type(n["recovery"][key]) is int, (cmd, key)
            for key in ("done", "total", "bad_blocks", "blocks_repaired"):
                assert type(n["scrub"][key]) is int, (cmd, key)


def test_an_error_under_json_is_a_json_object_on_stderr(cluster: Cluster) -> None:
    import json

    proc = dog("vdi", "info", "nope", "--json", address=cluster.address, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert json.loads(proc.stderr) == {"error": "no VDI named 'nope'", "code": "no_vdi"}


def test_an_unreachable_cluster_under_json_is_a_json_error(tmp_path: Path) -> None:
    import json

    proc = dog("cluster", "info", "--json", address=f"127.0.0.1:{free_port()}", check=False)
    assert proc.returncode == 1
    error = json.loads(proc.stderr)
    assert error["code"] == "unreachable" and error["error"].startswith("cannot reach sheep")


def test_a_bad_command_line_under_json_is_a_json_error() -> None:
    import json

    proc = dog("vdi", "create", "--json", address="127.0.0.1:1", check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stderr)["code"] == "usage"


def test_dog_and_sheep_print_the_package_version() -> None:
    import subprocess
    from importlib.metadata import version

    from ..cluster import BIN

    for prog in ("dog", "sheep"):
        proc = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0
        assert proc.stdout == f"{prog} {version('sheep')}\n"


def test_vdi_create_help_states_the_maximum_vdi_size() -> None:
    from sheep.vdi.inode import max_vdi_size

    text = " ".join(dog("vdi", "create", "--help").stdout.split())
    assert f"{max_vdi_size(4 << 20)} bytes" in text and "4092 GiB" in text


def test_vm_start_help_documents_sheep_vm_accel() -> None:
    text = dog("vm", "start", "--help").stdout
    assert "SHEEP_VM_ACCEL=kvm" in text and "SHEEP_VM_ACCEL=tcg" in text


def test_node_list_numbers_nodes_by_control_port_as_sheep_up_does(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    """The cluster orders its members by node id; each node here is given an id that puts
    them in the reverse of their port order, so only dog's own ordering passes."""
    from sheep.store.meta import NodeMeta

    from ..cluster import SheepProcess

    c = Cluster(tmp_path / "order", etcd.url)
    try:
        ports = sorted(free_port() for _ in range(3))
        for i, port in enumerate(ports):
            node_dir = c.root / f"node{i}"
            node_dir.mkdir(parents=True)
            with NodeMeta(node_dir) as meta:
                meta.set("node_id", f"{9 - i:032x}")
            c.nodes.append(SheepProcess(node_dir, port, c.etcd_url,
                                        ["--lease-ttl", str(c.lease_ttl)]).start())
        for node in c.nodes:
            node.wait_up()
        c.wait_members(3)
        for cmd in ("list", "info"):
            nodes = dog_json("node", cmd, address=c.address)["nodes"]
            assert [n["node"]["control_port"] for n in nodes] == ports, cmd
        rows = dog("node", "list", address=c.address).stdout.splitlines()[1:]
        assert [(r.split()[0], r.split()[2]) for r in rows] == [
            (str(i), f"127.0.0.1:{port}") for i, port in enumerate(ports)]
    finally:
        c.stop()


def test_cluster_info_shows_the_last_ten_epochs_and_all_with_all(cluster: Cluster) -> None:
    for _ in range(5):  # each stop and start of a node is two epochs
        cluster.nodes[2].stop()
        cluster.wait_members(2)
        cluster.nodes[2].start()
        cluster.nodes[2].wait_up()
        cluster.wait_members(3)
    every = dog_json("cluster", "info", "--all", address=cluster.address)
    assert len(every["history"]) > 10
    recent = cluster.info()
    assert recent["history"] == every["history"][-10:]
    text = dog("cluster", "info", address=cluster.address).stdout
    assert "--all shows every one" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Epoch  "))
    assert len(lines[header + 1 :]) == 10


def test_vdi_space_is_allocated_where_node_space_is_used(cluster: Cluster) -> None:
    """Two different things, two names: a VDI's allocated objects, a node's bytes on disk."""
    a = cluster.address
    dog("vdi", "create", "d", "4M", "--prealloc", address=a)
    header = dog("vdi", "list", address=a).stdout.splitlines()[0].split()
    assert "Allocated" in header and "Used" not in header
    info = dog("vdi", "info", "d", address=a).stdout
    assert "Allocated: 4 MiB" in info and "Used" not in info
    assert dog_json("vdi", "info", "d", address=a)["allocated"] == 4 << 20
    assert "Used" in dog("node", "info", address=a).stdout.splitlines()[0].split()
