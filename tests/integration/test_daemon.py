"""`sheep run`: start-up refusals and clean exits."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from sheep.etcd_server import EtcdServer

from ..cluster import BIN, Cluster, SheepProcess, dog, free_port, wait_until


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


def test_data_and_etcd_dirs_are_private_to_their_owner(
        tmp_path: Path, etcd: EtcdServer) -> None:
    """Objects, sum files and the registry are other people's disks: they were 0644 in
    0755 directories. A node dir made by someone else (0755) is closed up at start."""
    c = Cluster(tmp_path / "c", etcd.url)
    (c.root / "node0").mkdir(parents=True, mode=0o755)
    c.add_node()
    try:
        c.format(1)
        dog("vdi", "create", "-P", "d", "4M", address=c.address)
        node = c.nodes[0].dir
        files = [p for p in node.rglob("*") if p.is_file()]
        assert any(p.parent.name == "obj" for p in files)
        for path in [node, *(p for p in node.rglob("*") if p.is_dir())]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        assert stat.S_IMODE(etcd.data_dir.stat().st_mode) == 0o700
    finally:
        c.stop()


def _secret(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text + "\n")
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize(("files", "why"), [
    ((("alice:a-long-enough-secret", 0o644),), "may be read by others (mode 644): chmod 600"),
    ((("alice:short", 0o600),), "CHAP secrets must be at least 12 (96 bits)"),
    ((("alice:a-long-enough-secret", 0o600), ("target:a-long-enough-secret", 0o600)),
     "the target's must differ from the initiators'"),
])
def test_weak_or_exposed_chap_secrets_are_refused_at_start(
        tmp_path: Path, etcd: EtcdServer, files: tuple, why: str) -> None:
    """Secrets once came on the command line (visible in ps), and a 1-byte secret, or the
    same secret both ways, was accepted."""
    flags = ["--iscsi-chap-file", "--iscsi-mutual-chap-file"]
    args = [arg for i, (text, mode) in enumerate(files)
            for arg in (flags[i], _secret(tmp_path / f"chap{i}", text, mode))]
    proc = _run_sheep("--dir", str(tmp_path / "n"), "--port", str(free_port()),
                      "--etcd", etcd.url + "/chap", "--iscsi-port", "0", *args)
    assert proc.returncode == 1
    assert why in _reason(proc)
