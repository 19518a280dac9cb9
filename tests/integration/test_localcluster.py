"""The one launcher of local clusters (sheep/localcluster.py): a node is ready when its
ready file says so, not when its log does."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from sheep.etcd_server import EtcdServer
from sheep.localcluster import LaunchError, LocalCluster, NodeProcess, free_port


def test_a_ready_file_holds_the_pid_and_bound_ports_and_goes_when_the_node_stops(
        tmp_path: Path, etcd: EtcdServer) -> None:
    node = NodeProcess(tmp_path / "node0", free_port(), etcd.url + "/ready-file",
                       ["--lease-ttl", "3", "--nbd-port", "0"])
    try:
        doc = node.start().wait_ready(30)
        assert node.proc is not None and doc["pid"] == node.proc.pid
        assert doc["control_port"] == node.port
        assert doc["data_port"] > 0 and doc["nbd_port"] > 0 and doc["iscsi_port"] is None
        assert json.loads(node.ready_path.read_text()) == doc
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    finally:
        assert node.stop() == 0
    assert not node.ready_path.exists()


def test_a_killed_runs_ready_file_does_not_pass_for_the_next_run(
        tmp_path: Path, etcd: EtcdServer) -> None:
    node = NodeProcess(tmp_path / "node0", free_port(), etcd.url + "/stale-ready",
                       ["--lease-ttl", "3"])
    try:
        first = node.start().wait_ready(30)
        node.kill(signal.SIGKILL)
        assert node.ready_path.exists()  # nobody removed it
        with pytest.raises(LaunchError, match=r"node0 died \(killed by SIGKILL\)"):
            node.ready()
        node.start()
        assert node.ready() is None  # the old file is gone; the new run is not up yet
        again = node.wait_ready(30)
        assert node.proc is not None and again["pid"] == node.proc.pid != first["pid"]
    finally:
        node.stop()


def test_a_node_that_dies_at_start_is_a_launch_error_with_this_runs_log(
        tmp_path: Path, etcd: EtcdServer) -> None:
    node = NodeProcess(tmp_path / "node0", free_port(), etcd.url + "/dies")
    node.log_path.write_text("STALE: an older run's complaint\n")
    node = NodeProcess(node.dir, node.port, f"http://127.0.0.1:{free_port()}")  # no etcd
    with pytest.raises(LaunchError) as err:
        node.start().wait_ready(30)
    assert str(err.value).startswith("node0 died (exited with 1: ")
    assert "cannot reach etcd" in str(err.value) and "STALE" not in str(err.value)


def test_a_local_cluster_comes_up_formatted_and_stops(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c", 3, prefix="/t")
    try:
        info = cluster.up(copies=2)
        assert info.cluster_id and info.copies == 2
        assert all(node.ready() for node in cluster.nodes)
    finally:
        cluster.stop()
    assert [n.proc.returncode for n in cluster.nodes if n.proc] == [0, 0, 0]
    assert cluster.etcd.proc is not None and cluster.etcd.proc.poll() is not None
