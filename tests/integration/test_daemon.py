"""`sheep run`: start-up refusals and clean exits."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from sheep.etcd_server import EtcdServer

from ..cluster import BIN, Cluster, SheepProcess, free_port, wait_until


def _run_sheep(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "sheep"), "run", *args], capture_output=True, text=True, timeout=timeout
    )


def _reason(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sheep: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_refuses_a_control_port_in_use(tmp_path: Path, etcd: EtcdServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _run_sheep("--dir", str(tmp_path / "n"), "--port", str(port),
                          "--etcd", etcd.url + "/port-busy")
    assert proc.returncode != 0
    assert "already in use" in _reason(proc)


def test_refuses_a_data_port_in_use(tmp_path: Path, etcd: EtcdServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _run_sheep("--dir", str(tmp_path / "n"), "--port", str(free_port()),
                          "--data-port", str(port), "--etcd", etcd.url + "/data-busy")
    assert proc.returncode != 0
    assert "data port" in _reason(proc)


def test_refuses_a_data_dir_of_another_cluster(tmp_path: Path, etcd: EtcdServer) -> None:
    first = Cluster(tmp_path / "a", etcd.url)
    node = first.add_node()
    first.format(1)
    wait_until(lambda: "cluster_id" in node.log() or first.info().get("cluster_id"), 10, "format")
    assert node.stop() == 0

    other = Cluster(tmp_path / "b", etcd.url)
    other.add_node()
    other.format(1)
    other.stop()

    proc = _run_sheep("--dir", str(node.dir), "--port", str(free_port()),
                      "--etcd", other.etcd_url)
    assert proc.returncode != 0
    assert "belongs to cluster" in _reason(proc)


def test_refuses_a_data_dir_in_use_by_another_daemon(empty_cluster: Cluster) -> None:
    node = empty_cluster.add_node()
    proc = _run_sheep("--dir", str(node.dir), "--port", str(free_port()),
                      "--etcd", empty_cluster.etcd_url)
    assert proc.returncode != 0
    assert "in use by another sheep daemon" in _reason(proc)


def test_refuses_an_unreachable_etcd(tmp_path: Path) -> None:
    proc = _run_sheep("--dir", str(tmp_path / "n"), "--port", str(free_port()),
                      "--etcd", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode != 0
    assert "cannot reach etcd" in _reason(proc)


def test_sigint_exits_cleanly(empty_cluster: Cluster) -> None:
    node = empty_cluster.add_node()
    node.kill(signal.SIGINT)
    assert node.proc is not None and node.proc.returncode == 0
    assert "stopped" in node.log()


def test_logs_are_readable_lines_with_time_level_and_source(empty_cluster: Cluster) -> None:
    node: SheepProcess = empty_cluster.add_node()
    first = node.log().splitlines()[0]
    date, clock, level, source = first.split()[:4]
    assert date.count("-") == 2 and clock.count(":") == 2
    assert level in {"INFO", "WARNING", "ERROR", "DEBUG"}
    assert source.startswith("sheep.")
