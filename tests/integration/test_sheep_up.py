"""`sheep up`: the embedded default cluster that `make run` starts."""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ..cluster import BIN, dog_json, free_port

pytestmark = pytest.mark.slow


def _free_base_port() -> int:
    rnd = random.Random()
    for _ in range(200):
        base = rnd.randrange(20000, 50000)
        ports = [base, base + 1, base + 2, base + 100, base + 101, base + 102, base + 379,
                 base + 380]
        socks = []
        try:
            for port in ports:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _processes_using(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            pids.append(int(entry.name))
    return pids


class Up:
    def __init__(self, root: Path, base: int) -> None:
        self.root = root
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [str(BIN / "sheep"), "up", "--nodes", "3", "--copies", "3", "--dir", str(root),
             "--base-port", str(base), "--nbd-port", str(free_port()),
             "--iscsi-port", str(free_port())],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self._buf = b""

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            chunk = os.read(fd, 65536) if ready else b""
            self._buf += chunk
            self.lines = self._buf.decode(errors="replace").splitlines()
            if text.encode() in self._buf:
                return
            if ready and not chunk:
                break  # EOF: sheep up exited
        raise AssertionError(f"no {text!r} from sheep up; output:\n{self._buf.decode()}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # its stacks, to see where it is stuck
            time.sleep(1)
            with contextlib.suppress(AssertionError):
                self.wait_for("\x00never", timeout=1)
            raise AssertionError("sheep up did not stop within 40 s of Ctrl-C; its output:\n"
                                 + self._buf.decode(errors="replace")) from None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                for pid in _processes_using(self.root):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def test_sheep_up_runs_three_nodes_and_sigint_stops_every_child(tmp_path: Path) -> None:
    root = tmp_path / "var"
    base = _free_base_port()
    up = Up(root, base)
    try:
        up.wait_for("Ctrl-C stops")
        assert any("formatted cluster" in line for line in up.lines)
        nodes = dog_json("node", "list", address=f"127.0.0.1:{base}")["nodes"]
        assert len(nodes) == 3
        assert {n["node"]["control_port"] for n in nodes} == {base, base + 1, base + 2}
        assert len(_processes_using(root)) >= 4  # etcd + 3 daemons
    finally:
        code = up.interrupt()
    assert code == 0
    assert _processes_using(root) == []


def test_sheep_up_again_reuses_the_data(tmp_path: Path) -> None:
    root = tmp_path / "var"
    base = _free_base_port()
    first = Up(root, base)
    try:
        first.wait_for("Ctrl-C stops")
        cluster_id = dog_json("cluster", "info", address=f"127.0.0.1:{base}")["cluster_id"]
    finally:
        first.interrupt()
    second = Up(root, base)
    try:
        second.wait_for("Ctrl-C stops")
        assert not any("formatted cluster" in line for line in second.lines)
        info = dog_json("cluster", "info", address=f"127.0.0.1:{base}")
        assert info["cluster_id"] == cluster_id
    finally:
        assert second.interrupt() == 0
